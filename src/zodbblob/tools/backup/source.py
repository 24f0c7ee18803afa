"""Reading the source: a live Data.fs and its blob directory, without a lock.

FileStorage only appends, so the bytes up to the end of a committed
transaction never change; a pack is what does change them: it replaces
Data.fs under its name and removes the blob files of the revisions it
dropped, which the bytes already read still reference.  `_Source` reads
through one file descriptor, so those bytes stay as they were, and tells
(`_Source.packed`) when a pack ran.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
from collections.abc import Iterator

import ZODB.FileStorage
from ZODB.FileStorage.FileStorage import packed_version
from ZODB.FileStorage.format import TRANS_HDR, TRANS_HDR_LEN
from ZODB.utils import z64

from zodbblob.storage import held_by_a_storage
from zodbblob.storage.catalog import pack_under_way
from zodbblob.tools.backup.errors import (
    BackupError,
    SourceChanged,
)
from zodbblob.tools.backup.manifest import CHUNK


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


class _Source:
    """The live Data.fs and blob directory of `storage`, read only.

    Data.fs is read through one file descriptor opened here: a pack that
    replaces the file meanwhile leaves these bytes as they were, but
    removes the blob files of the revisions it packed away, which these
    bytes still reference.  `packed` tells.
    """

    def __init__(self, storage):
        base = getattr(storage, 'base', None)
        if not isinstance(base, ZODB.FileStorage.FileStorage):
            raise BackupError(
                f'{storage.getName()}: backup needs a zodbblob storage over '
                f'a FileStorage; its base is {type(base).__name__}')
        self.path = os.path.abspath(base.getName())
        self.fshelper = storage.fshelper
        self.blob_dir = storage.fshelper.base_dir.rstrip(os.sep)
        self.layout_name = storage.fshelper.layout_name
        self.is_blob_record = storage.is_blob_record
        self.last_transaction = storage.lastTransaction()
        self.file = open(self.path, 'rb')
        self._blob_pickles: dict[bytes, bool] = {}
        # The file the storage opened, whose index it read: the snapshot's
        # view starts there.
        opened = getattr(base, '_file', None) or self.file
        self._opened = _identity(os.fstat(opened.fileno()))
        self._writable = not storage.isReadOnly()
        # A storage on a bucket (``storage/objects.py``): each blob is
        # downloaded into the blob directory's ``tmp`` for the copy, and
        # its name removed once open (not kept in the local cache).
        self.objects = getattr(storage, 'object_store', None)
        self._downloads = itertools.count()

    def blob_path(self, oid: bytes, tid: bytes) -> str:
        """Where the blob file of `tid` of `oid` can be opened: its name
        in the blob directory, or a download of its object (a name that
        is not there when the bucket has none).  Call `opened` once it
        is open."""
        path = self.fshelper.getBlobFilename(oid, tid)
        if self.objects is None:
            return path
        download = os.path.join(
            self.fshelper.temp_dir,
            f'backup-{os.getpid()}-{next(self._downloads)}.blob')
        try:
            # By content: the content's key, where the catalog names it.
            self.objects.bucket.download(self.objects.object_key(oid, tid),
                                         download)
        except self.objects.missing:
            return path
        except self.objects.failure as e:
            raise BackupError(str(e)) from None
        return download

    def content(self, oid: bytes, tid: bytes) -> bytes | None:
        """On a bucket by content (dedup): the digest the catalog
        records for `tid` of `oid`, which names its content; else None.
        The backup downloads each content once."""
        if self.objects is None or self.objects.contents is None:
            return None
        return self.objects.journal.digest(oid, tid)

    def opened(self, path: str) -> None:
        """`path`, from `blob_path`, is open: a download's name goes."""
        if self.objects is not None and path.startswith(
                self.fshelper.temp_dir):
            os.remove(path)

    def packed(self) -> bool:
        """Whether Data.fs was packed since the storage was opened, or a
        live storage is packing it.

        A pack replaces Data.fs (another inode under its name), and
        records its intent in the catalog before the base packs and
        clears it once it has removed its blob files; without a storage
        holding the directory, an intent is one a killed pack left, whose
        removals recovery finishes: the files it removes are no record's
        in the packed Data.fs.
        """
        mine = _identity(os.fstat(self.file.fileno()))
        try:
            named = _identity(os.stat(self.path))
        except FileNotFoundError:
            return True
        if not mine == named == self._opened:
            return True
        return pack_under_way(self.blob_dir) and (
            self._writable or held_by_a_storage(self.blob_dir))

    def close(self) -> None:
        self.file.close()

    def _read(self, size: int, position: int) -> bytes:
        return os.pread(self.file.fileno(), size, position)

    def _transactions(self, start: int) -> Iterator[tuple[bytes, int]]:
        """``(tid, end)`` of the committed transactions from `start` on.

        `start` is where a transaction begins (or 0).  Each header is
        checked as FileStorage checks it, and the walk stops at the first
        that is not a committed transaction: the one being committed
        (status ``c``), the end of the file as it was when the walk began,
        or bytes that are no header at all (the file is not the one whose
        positions `start` came from).
        """
        if self._read(4, 0) != packed_version:
            raise SourceChanged(f'{self.path} is not a FileStorage file')
        position = max(start, 4)
        size = os.fstat(self.file.fileno()).st_size
        previous = z64
        while True:
            header = self._read(TRANS_HDR_LEN, position)
            if len(header) < TRANS_HDR_LEN:
                return
            tid, length, status = struct.unpack(TRANS_HDR, header)[:3]
            end = position + length + 8
            if (tid <= previous or status not in b' p'
                    or length < TRANS_HDR_LEN or end > size
                    or self._read(8, position + length) != header[8:16]):
                return
            yield tid, end
            previous, position = tid, end

    def last_committed(self, start: int) -> tuple[bytes, int] | None:
        """``(tid, end)`` of the last committed transaction after `start`.

        Not newer than the storage's ``lastTransaction()``, but possibly
        older: a read-only FileStorage opened while a transaction is being
        committed reports that transaction's tid, committed or not.
        """
        last = None
        for tid, end in self._transactions(start):
            if tid > self.last_transaction:
                break
            last = tid, end
        return last

    def end_of(self, tid: bytes, start: int) -> int:
        """The position just after transaction `tid`, found from `start`.

        Raises SourceChanged when the headers from `start` do not lead to
        `tid`: Data.fs was packed since `start` was recorded.
        """
        if tid == z64:
            return max(start, 4)
        for found, end in self._transactions(start):
            if found == tid:
                return end
            if found > tid:
                break
        raise SourceChanged(
            f'{self.path} has no transaction {tid.hex()} where the backup '
            f'expected it (from position {start}): was it packed?')

    def holds(self, start: int, end: int, sha256: bytes) -> bool:
        """Whether bytes `start` to `end` of Data.fs have this sha256."""
        digest = hashlib.sha256()
        position = start
        while position < end:
            chunk = self._read(min(CHUNK, end - position), position)
            if not chunk:
                return False
            digest.update(chunk)
            position += len(chunk)
        return digest.digest() == sha256

    def _same_file(self) -> bool:
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self.file.fileno())
        return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)

    def blob_records(self, start: int, tid: bytes) -> Iterator[
            tuple[bytes, bytes]]:
        """``(oid, tid)`` of every blob record from `start` up to `tid`."""
        if tid == z64:
            return
        # FileIterator opens the file by name: if, once it has, the name
        # still names the file read here, it opened that file.
        transactions = ZODB.FileStorage.FileIterator(
            self.path, stop=tid, pos=max(start, 4))
        if not self._same_file():
            transactions.close()
            raise SourceChanged(f'{self.path} was replaced (packed?) while '
                                f'the backup read it')
        last = None
        try:
            for transaction in transactions:
                last = transaction.tid
                for record in transaction:
                    if self._is_blob_record(record.data):
                        yield record.oid, record.tid
        finally:
            transactions.close()
        if last != tid:
            raise SourceChanged(f'{self.path}: reading transactions from '
                                f'position {start} did not reach {tid.hex()}')

    def _is_blob_record(self, data) -> bool:
        # A store's blob records are a few distinct short pickles:
        # remembering each answer saves unpickling every record.
        if not data:
            return False
        answer = self._blob_pickles.get(data)
        if answer is None:
            answer = self.is_blob_record(data)
            if len(data) < 256 and len(self._blob_pickles) < 1024:
                self._blob_pickles[data] = answer
        return answer
