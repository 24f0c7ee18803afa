"""The FileStorage zodbblob opens itself, and its torn last transaction.

A storage that opens its base itself (``<zodbblob>`` around
``<filestorage>``, ``zodbblob.open_filestorage``, the command line)
commits with *one sync*: a transaction's commit record is fdatasynced
(S1) while the base's ``tpc_finish`` fsyncs ``Data.fs`` (S2), and
``tpc_finish`` returns only when both are done.  A power cut between the
two can leave S2 durable and S1 not: ``Data.fs`` ends with a committed
transaction T whose record and blob files are gone.  T's ``tpc_finish``
never returned, so nobody was told T committed (its invalidations are
sent only after its files are published): T may be removed, as
FileStorage's own recovery removes a damaged tail.  That has to happen
before FileStorage opens the file (no public API truncates an open
FileStorage), so only a storage that opens its base can do it; any other
base keeps the serial protocol (S1 before the base's vote returns).

``last_transaction`` reads the end of ``Data.fs`` from FileStorage's
documented format (no ZODB code is copied): the last 8 bytes repeat the
length of the last transaction record, whose header is ``tid`` (8),
``length`` (8), ``status`` (1), the lengths of user, description and
extension (2 each), followed by those and the data records: ``oid``
(8), ``tid`` (8), ``prev`` (8), ``tloc`` (8), version length (2), data
length (8), then the data, or a back pointer (8) where the length is 0.
Anything that does not read back exactly like that is left alone: it is
FileStorage's own recovery's business.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

import zc.lockfile
import ZODB.blob

from zodbblob.layout import fsync_directory

logger = logging.getLogger(__name__)

# The file's first 4 bytes: FS30 (written by Python 3), FS21 (Python 2).
MAGICS = (b'FS30', b'FS21')
_TRANSACTION = struct.Struct('>8sQcHHH')  # tid, length, status, lengths
_DATA = struct.Struct('>8s8sQQHQ')  # oid, tid, prev, tloc, vlen, plen
_LENGTH = struct.Struct('>Q')
COMMITTED = b' '
# Back pointers are followed this far (an undo of an undo of ...).
_MAX_HOPS = 64


@dataclass(frozen=True)
class Transaction:
    """The last transaction record of a ``Data.fs``."""
    tid: bytes
    start: int         # offset of its header: the file's size without it
    status: bytes      # b' ' committed, b'c' not yet, b'u', b'p'
    blob_oids: tuple[bytes, ...]   # oids whose new state is a blob


def last_transaction(path: str) -> Transaction | None:
    """The last transaction in the ``Data.fs`` at `path`, or None.

    None when there is none, or the file's end does not read back as one
    whole transaction record (a torn vote, a damaged tail): FileStorage's
    own recovery handles those when it opens the file.
    """
    try:
        with open(path, 'rb') as f:
            return _Reader(f.fileno()).last()
    except FileNotFoundError:
        return None


class _Reader:

    def __init__(self, fd: int):
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def read(self, offset: int, length: int) -> bytes | None:
        if offset < 0 or offset + length > self.size:
            return None
        data = os.pread(self.fd, length, offset)
        return data if len(data) == length else None

    def last(self) -> Transaction | None:
        if self.read(0, 4) not in MAGICS:
            return None
        raw = self.read(self.size - _LENGTH.size, _LENGTH.size)
        if raw is None:
            return None
        (length,) = _LENGTH.unpack(raw)
        start = self.size - _LENGTH.size - length
        if start < 4 or length < _TRANSACTION.size:
            return None
        raw = self.read(start, _TRANSACTION.size)
        if raw is None:
            return None
        tid, again, status, user, description, extension = (
            _TRANSACTION.unpack(raw))
        if again != length:
            return None
        position = start + _TRANSACTION.size + user + description + extension
        end = start + length
        blob_oids = []
        while position < end:
            raw = self.read(position, _DATA.size)
            if raw is None:
                return None
            oid, serial, _prev, tloc, version, size = _DATA.unpack(raw)
            if serial != tid or tloc != start or version:
                return None
            position += _DATA.size
            if size:
                data = self.read(position, size)
                position += size
            else:
                back = self.read(position, _LENGTH.size)
                if back is None:
                    return None
                data = self.data_at(_LENGTH.unpack(back)[0])
                position += _LENGTH.size
            if data and ZODB.blob.is_blob_record(data):
                blob_oids.append(oid)
        if position != end:
            return None
        return Transaction(tid, start, status, tuple(blob_oids))

    def data_at(self, offset: int) -> bytes | None:
        """The data a back pointer leads to (None: no data, or unreadable)."""
        for _ in range(_MAX_HOPS):
            if not offset:
                return None
            raw = self.read(offset, _DATA.size)
            if raw is None:
                return None
            version, size = _DATA.unpack(raw)[4:]
            if version:
                return None
            if size:
                return self.read(offset + _DATA.size, size)
            back = self.read(offset + _DATA.size, _LENGTH.size)
            if back is None:
                return None
            offset = _LENGTH.unpack(back)[0]
        return None


def torn_transaction(path: str, commit_log, fshelper) -> Transaction | None:
    """The last transaction of ``Data.fs`` at `path` if it must be rolled
    back, else None.  Reads only.

    Rolled back only if all of these hold; otherwise ``Data.fs`` is left
    alone:

    - the commit log says a one-sync storage had it open and did not
      close it (a clean close marks it after its last checkpoint);
    - the file ends with a whole transaction T whose status is committed
      (a torn vote is FileStorage's to truncate);
    - T's tid is after the last commit record that is durable (the log's
      records, and the last tid a checkpoint let go): T's record never
      became durable, so T's ``tpc_finish`` never returned;
    - T stored blobs (a transaction without blobs writes no record, so
      the missing record says nothing about it);
    - T's blob files are not all at their final names: files are
      published only after the record is durable, so a transaction that
      ZODB committed without zodbblob (stock ZODB renames its files at
      ``storeBlob``) is never taken for a torn one.
    """
    if not commit_log.open_one_sync:
        return None
    last = last_transaction(path)
    if (last is None or last.status != COMMITTED
            or last.tid <= commit_log.last_durable_tid
            or not last.blob_oids):
        return None
    if all(os.path.exists(fshelper.getBlobFilename(oid, last.tid))
           for oid in last.blob_oids):
        return None
    return last


def truncate(path: str, start: int) -> str:
    """Cut ``Data.fs`` at `start`, durably; return where the cut bytes went.

    As FileStorage does with a damaged tail, the bytes are first saved to
    ``<path>.tr<n>`` (the first free n), so nothing is destroyed.
    """
    number = 0
    while os.path.exists(f'{path}.tr{number}'):
        number += 1
    saved = f'{path}.tr{number}'
    with open(path, 'r+b') as source:
        with open(saved, 'xb') as copy:
            copy.write(os.pread(source.fileno(),
                                os.fstat(source.fileno()).st_size - start,
                                start))
            copy.flush()
            os.fsync(copy.fileno())
        os.truncate(source.fileno(), start)
        os.fsync(source.fileno())
    fsync_directory(os.path.dirname(os.path.abspath(path)))
    return saved


def file_lock(path: str) -> zc.lockfile.LockFile:
    """FileStorage's own lock of `path` (``<path>.lock``), which a process
    that has it open holds: a file in use is never cut."""
    return zc.lockfile.LockFile(path + '.lock')


class FileStorageOpener:
    """A zero-argument callable that opens a FileStorage at `path`.

    Given to ``zodbblob.BlobStorage`` in place of a base storage, it lets
    the storage open its base itself, after the blob directory is locked
    and a torn last transaction rolled back: the storage commits with one
    sync.  `open` opens it (``ZODB.config``'s section does, with the
    section's options); by default ``ZODB.FileStorage.FileStorage(path,
    **options)``.
    """

    def __init__(self, path: str, open=None, read_only: bool = False,
                 **options):
        if options.get('blob_dir'):
            raise ValueError(
                f'FileStorage {path}: blob_dir {options["blob_dir"]} would '
                f'give it blob support of its own; zodbblob keeps the blobs '
                f'(give the blob directory to zodbblob instead)')
        # Refused now, before the blob directory is made or locked.
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ValueError(f'FileStorage {path}: its directory {directory} '
                             f'does not exist')
        if os.path.isdir(path) or (os.path.lexists(path)
                                   and not os.path.isfile(path)):
            raise ValueError(f'FileStorage {path} is not a regular file')
        self.path = path
        self.read_only = bool(read_only or options.get('read_only'))
        self.create = bool(options.get('create'))
        if read_only:
            options['read_only'] = True
        self.options = options
        self._open = open

    def __call__(self):
        if self._open is not None:
            return self._open()
        from ZODB.FileStorage import FileStorage
        return FileStorage(self.path, **self.options)

    def __repr__(self):
        return f'<zodbblob FileStorageOpener {self.path}>'
