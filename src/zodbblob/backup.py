"""Snapshots of a FileStorage and its blob directory, consistent at one tid.

``backup(storage, destination)`` reads a storage that a ZEO server may be
serving and committing to: it opens nothing for writing and takes no lock
of the storage's.  The snapshot holds the database as of one transaction
*T*, the last one committed when the backup started: ``Data.fs`` up to the
end of *T* (a valid ``Data.fs``; FileStorage only appends, so those bytes
no longer change), and the file of every blob record in those bytes.

Snapshots are directories in one destination, named for their tid::

    DEST/03f0c4a1b2c3d4e5/
      Data.fs.0000000000000000-00000000000a3f20  Data.fs bytes 0 to 0xa3f20
      Data.fs.00000000000a3f20-00000000000b0010  the bytes appended since
      blobs/                                     the source's layout
      manifest.sqlite                            every file, its sha256
      COMPLETE                                   written last

The ``Data.fs.*`` parts, concatenated in name order, are the ``Data.fs``
of the snapshot (``cat Data.fs.* > Data.fs`` would do; ``restore`` does
it and checks every byte).  A new snapshot is incremental: it hard-links
the previous snapshot's parts and the blob files it already has (a
committed blob file never changes: one (oid, tid) is one content), and
writes only the bytes appended to ``Data.fs`` since and the new blob
files.  Each snapshot is complete on its own, so any of them can be
deleted.  When the previous snapshot's last part no longer matches the
source (``Data.fs`` was packed), the new snapshot copies ``Data.fs``
whole, and still links the blob files.

An interrupted backup resumes: the manifest lists every file the
snapshot needs, each in progress or done.  Files are copied to
``.partial`` names and renamed, then marked done, so a rerun skips what
is done, discards partial files and copies the rest (after a reboot, it
first checks the files marked done: see `_SnapshotWriter`).
``COMPLETE`` is written only once everything is durable; a snapshot
without it is resumed, never linked from.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import stat
import struct
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator

import zc.lockfile
import ZODB.FileStorage
from persistent.TimeStamp import TimeStamp
from ZODB.FileStorage.FileStorage import packed_version
from ZODB.FileStorage.format import TRANS_HDR, TRANS_HDR_LEN
from ZODB.utils import oid_repr, z64

from zodbblob.journal import SYNCFS_AVAILABLE, Journal, sync_filesystem
from zodbblob.layout import (
    LAYOUT_MARKER,
    FilesystemHelper,
    fsync_directory,
    fsync_path,
    get_layout,
    makedirs_durable,
    remove_if_exists,
)

logger = logging.getLogger(__name__)

FORMAT = 1
MANIFEST_NAME = 'manifest.sqlite'
COMPLETE_NAME = 'COMPLETE'
BLOBS_NAME = 'blobs'
PART_PREFIX = 'Data.fs.'
PARTIAL_SUFFIX = '.partial'
LOCK_NAME = '.lock'
SNAPSHOT_NAME = re.compile(r'[0-9a-f]{16}\Z')
IN_PROGRESS, DONE, MISSING = 0, 1, 2
# Finished files are marked done in the manifest in batches: at most a
# batch is copied again after a crash.
BATCH_FILES = 256
BATCH_BYTES = 256 << 20
CHUNK = 1 << 20
# ZODBBLOB_BACKUP_KILL_AFTER=N[:SIGNAL]: the tests' crash point.  After N
# files copied, the process sends itself SIGNAL (default KILL) while the
# next copy is half written.
KILL_VARIABLE = 'ZODBBLOB_BACKUP_KILL_AFTER'

_SCHEMA = """
CREATE TABLE meta (
    name TEXT PRIMARY KEY,
    value
);
CREATE TABLE part (
    start INTEGER PRIMARY KEY,
    "end" INTEGER NOT NULL,
    sha256 BLOB,
    state INTEGER NOT NULL
);
CREATE TABLE blob (
    oid BLOB NOT NULL,
    tid BLOB NOT NULL,
    size INTEGER,
    sha256 BLOB,
    state INTEGER NOT NULL,
    PRIMARY KEY (oid, tid)
) WITHOUT ROWID;
"""


class BackupError(Exception):
    """A backup, check or restore cannot go on, as the message says."""


class SourceChanged(BackupError):
    """Data.fs no longer holds the bytes a snapshot was planned from."""


class BackupInterrupted(KeyboardInterrupt):
    """Ctrl-C during a backup; `snapshot` is left unfinished, resumable."""

    def __init__(self, snapshot: str):
        super().__init__(snapshot)
        self.snapshot = snapshot


def tid_time(tid: bytes) -> str:
    """The UTC time of `tid`, to the second, for people."""
    stamp = TimeStamp(tid)
    moment = datetime.datetime.fromtimestamp(stamp.timeTime(),
                                             datetime.timezone.utc)
    return f'{moment:%Y-%m-%d %H:%M:%S} UTC'


def part_name(start: int, end: int) -> str:
    return f'{PART_PREFIX}{start:016x}-{end:016x}'


def _sqlite_uri(path: str, **parameters) -> str:
    query = urllib.parse.urlencode(parameters)
    return f'file:{urllib.parse.quote(os.path.abspath(path))}?{query}'


def _hash_file(path: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, 'rb') as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.digest()


# the manifest

class Manifest:
    """The ``manifest.sqlite`` of one snapshot.

    ``meta`` holds what the snapshot is (``tid``, ``size``: the end of
    Data.fs, ``layout``, ``source``, ``base``, ``state``); ``part`` a row
    per Data.fs part and ``blob`` a row per blob file, each with its size,
    SHA-256 (32 bytes: ``hex(sha256)`` in SQL) and state (0: in progress,
    1: done, 2: missing from the source).  A row is about 70 bytes: the
    manifest is what a snapshot writes in proportion to all its files.
    """

    def __init__(self, snapshot: str, create: bool = False,
                 read_only: bool = False):
        self.path = os.path.join(snapshot, MANIFEST_NAME)
        if read_only:
            # A complete snapshot's manifest is one file, never written
            # again: readable from read-only media, with no -shm file.
            target = _sqlite_uri(self.path, mode='ro', immutable=1)
        elif create:
            target = self.path
        else:
            target = _sqlite_uri(self.path, mode='rw')
        self.db = None
        try:
            self.db = sqlite3.connect(target, uri=True, isolation_level=None)
            if create:
                self.db.execute('PRAGMA journal_mode=WAL')
                self.db.executescript(_SCHEMA)
            if not read_only:
                # A power cut may lose the last commits: their files are
                # copied again.  (Files marked done whose bytes a power
                # cut lost are found by the check after a reboot.)
                self.db.execute('PRAGMA synchronous=NORMAL')
            self.db.execute('SELECT count(*) FROM meta').fetchone()
        except sqlite3.DatabaseError as e:
            if self.db is not None:
                self.db.close()
            raise BackupError(f'Cannot read snapshot manifest {self.path}: '
                              f'{e}') from e

    def close(self) -> None:
        self.db.close()

    def seal(self) -> None:
        """Fold the WAL into the one file and close: the snapshot is done."""
        self.db.execute('PRAGMA wal_checkpoint(TRUNCATE)')
        self.db.execute('PRAGMA journal_mode=DELETE')
        self.db.close()
        fsync_path(self.path)

    def meta(self) -> dict:
        return dict(self.db.execute('SELECT name, value FROM meta'))

    def set_meta(self, **values) -> None:
        self.db.executemany(
            'INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)',
            values.items())

    def parts(self) -> list[tuple[int, int, str | None, int]]:
        return self.db.execute(
            'SELECT start, "end", sha256, state FROM part ORDER BY start'
        ).fetchall()

    def blobs(self, state: int | None = None) -> Iterator[
            tuple[bytes, bytes, int, str, int]]:
        """``(oid, tid, size, sha256, state)`` in (oid, tid) order."""
        where = '' if state is None else 'state = ? AND '
        return self._pages(
            f'SELECT oid, tid, size, sha256, state FROM blob '
            f'WHERE {where}(oid, tid) > (?, ?) ORDER BY oid, tid LIMIT ?',
            () if state is None else (state,))

    def pending_with_base(self) -> Iterator[
            tuple[bytes, bytes, int | None, str | None]]:
        """``(oid, tid, size, sha256)`` of the blob files in progress;
        size and sha256 are the attached base snapshot's, where it has
        the file."""
        return self._pages(
            'SELECT n.oid, n.tid, b.size, b.sha256 FROM blob n '
            'LEFT JOIN base.blob b ON b.oid = n.oid AND b.tid = n.tid '
            'AND b.state = ? WHERE n.state = ? AND (n.oid, n.tid) > (?, ?) '
            'ORDER BY n.oid, n.tid LIMIT ?', (DONE, IN_PROGRESS))

    def _pages(self, query: str, parameters: tuple, page: int = 1000):
        # A page at a time, keyed on (oid, tid): memory stays flat, and
        # the caller may update rows between pages.
        last = (b'', b'')
        while True:
            rows = self.db.execute(
                query, parameters + last + (page,)).fetchall()
            yield from rows
            if len(rows) < page:
                return
            last = rows[-1][:2]

    def lookup(self, oid: bytes, tid: bytes):
        return self.db.execute(
            'SELECT size, sha256, state FROM blob WHERE oid = ? AND tid = ?',
            (oid, tid)).fetchone()

    def counts(self) -> dict[int, int]:
        return dict(self.db.execute(
            'SELECT state, count(*) FROM blob GROUP BY state'))


# snapshots in a destination

@dataclasses.dataclass
class Snapshot:
    path: str
    tid: bytes
    complete: bool

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def snapshots(destination: str) -> list[Snapshot]:
    """The snapshots in `destination`, oldest transaction first."""
    try:
        names = os.listdir(destination)
    except FileNotFoundError:
        return []
    result = []
    for name in sorted(names):
        path = os.path.join(destination, name)
        if SNAPSHOT_NAME.match(name) and os.path.isdir(path):
            result.append(Snapshot(path, bytes.fromhex(name), os.path.exists(
                os.path.join(path, COMPLETE_NAME))))
    return result


# reading the source

class _Source:
    """The live Data.fs and blob directory of `storage`, read only.

    Data.fs is read through one file descriptor opened here: a pack that
    replaces the file meanwhile leaves these bytes as they were.
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


# writing files durably

class _Kill:
    """The crash point of `KILL_VARIABLE`, for the tests."""

    def __init__(self):
        value = os.environ.get(KILL_VARIABLE, '')
        count, _, name = value.partition(':')
        self.after = int(count) if count else None
        self.signal = getattr(signal, 'SIG' + (name or 'KILL').upper())
        self.copied = 0

    def mid_copy(self) -> None:
        if self.after is not None and self.copied >= self.after:
            self.after = None
            os.kill(os.getpid(), self.signal)


class _Files:
    """Writes files under one directory tree; `sync` makes them durable.

    With syncfs, the one call at the end covers the files, their names and
    their directories.  Without it, every file is fsynced as it is written,
    every new directory as it is made, and the directories that got new
    names at `sync`.
    """

    def __init__(self, root: str, kill: _Kill | None = None):
        self.root = root
        self.kill = kill
        self.made: set[str] = set()
        self.touched: set[str] = set()

    def makedirs(self, directory: str) -> None:
        if directory in self.made:
            return
        if SYNCFS_AVAILABLE:
            try:
                os.mkdir(directory)  # the parent usually exists
            except FileExistsError:
                pass
            except FileNotFoundError:
                os.makedirs(directory, exist_ok=True)
        else:
            makedirs_durable(directory)
        self.made.add(directory)

    def copy(self, fd: int, target: str, mode: int, offset: int,
             length: int) -> tuple[int, bytes]:
        """Copy `length` bytes at `offset` of `fd` to `target`.

        Returns (size, sha256) of what was written: fewer bytes than
        `length` when the file ended early.  The bytes go to a
        ``.partial`` name, renamed when complete; whatever happens before,
        the partial file is removed.
        """
        directory = os.path.dirname(target)
        self.makedirs(directory)
        partial = target + PARTIAL_SUFFIX
        digest = hashlib.sha256()
        size = 0
        try:
            # Created with its final mode, which may be read-only: a
            # partial file an earlier run left must go first.
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            try:
                out = os.open(partial, flags, mode)
            except FileExistsError:
                os.remove(partial)
                out = os.open(partial, flags, mode)
            try:
                while size < length:
                    chunk = os.pread(fd, min(CHUNK, length - size),
                                     offset + size)
                    if not chunk:
                        break
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view):]
                    size += len(chunk)
                    if self.kill is not None:
                        self.kill.mid_copy()
                if not SYNCFS_AVAILABLE:
                    os.fsync(out)
            finally:
                os.close(out)
            os.replace(partial, target)
        except BaseException:
            remove_if_exists(partial)
            raise
        if not SYNCFS_AVAILABLE:
            self.touched.add(directory)
        if self.kill is not None:
            self.kill.copied += 1
        return size, digest.digest()

    def link(self, existing: str, target: str) -> bool:
        """Hard-link `existing` as `target`; False where links fail."""
        directory = os.path.dirname(target)
        self.makedirs(directory)
        try:
            os.link(existing, target)
        except FileExistsError:
            os.remove(target)
            os.link(existing, target)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK,
                               errno.ENOTSUP, errno.ENOENT):
                raise
            return False
        if not SYNCFS_AVAILABLE:
            self.touched.add(directory)
        return True

    def sync(self) -> None:
        if SYNCFS_AVAILABLE:
            sync_filesystem(self.root)
        else:
            for directory in self.touched:
                fsync_directory(directory)
        self.touched.clear()


def _boot_id() -> str | None:
    """This boot of the machine, or None where the kernel does not say."""
    try:
        with open('/proc/sys/kernel/random/boot_id') as f:
            return f.read().strip()
    except OSError:
        return None


def _write_marker(directory: str, name: str, text: str) -> None:
    """Write `name` in `directory` whole or not at all, durably."""
    path = os.path.join(directory, name)
    staged = path + PARTIAL_SUFFIX
    with open(staged, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, path)
    fsync_directory(directory)


# taking a snapshot

@dataclasses.dataclass
class BackupResult:
    """What one snapshot holds, and what taking it wrote."""

    snapshot: str
    tid: bytes
    up_to_date: bool = False
    resumed: bool = False
    data_fs_size: int = 0
    data_fs_copied: int = 0
    blob_files: int = 0
    copied: int = 0
    linked: int = 0
    bytes_copied: int = 0
    missing: list = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        when = f'transaction {self.tid.hex()} ({tid_time(self.tid)})'
        if self.up_to_date:
            return [f'{self.snapshot}: up to date, holds {when}']
        result = [f'{self.snapshot}: {"resumed and " if self.resumed else ""}'
                  f'complete, holds {when}',
                  f'  Data.fs: {self.data_fs_size} bytes, '
                  f'{self.data_fs_copied} copied',
                  f'  blob files: {self.blob_files}, {self.copied} copied '
                  f'({self.bytes_copied} bytes), {self.linked} linked']
        for path in self.missing:
            result.append(f'  missing: {path} was not in the source blob '
                          f'directory')
        return result


class _SnapshotWriter:
    """Fills one snapshot directory from the source; resumable.

    Finished files are marked done in the manifest a batch at a time,
    without a sync: after a crash of the process, the files it wrote are
    intact.  Only a crash of the machine can lose them, so a run that
    resumes in another boot than the one that wrote them checks every
    file marked done again.  Everything is synced before ``COMPLETE``.
    """

    def __init__(self, path: str, source: _Source, manifest: Manifest,
                 progress, kill: _Kill, resuming: bool = False):
        self.path = path
        self.source = source
        self.manifest = manifest
        self.progress = progress
        self.resuming = resuming
        self.files = _Files(path, kill)
        meta = manifest.meta()
        self.meta = meta
        self.tid = bytes.fromhex(meta['tid'])
        self.layout = get_layout(meta['layout'])
        self.blobs = os.path.join(path, BLOBS_NAME)
        self.base = None
        if meta['base']:
            base_path = os.path.join(os.path.dirname(path), meta['base'])
            if os.path.exists(os.path.join(base_path, COMPLETE_NAME)):
                self.base = base_path
                self.base_blobs = os.path.join(base_path, BLOBS_NAME)
                manifest.db.execute(
                    'ATTACH DATABASE ? AS base',
                    (_sqlite_uri(os.path.join(base_path, MANIFEST_NAME),
                                 mode='ro', immutable=1),))
                self.base_layout = get_layout(manifest.db.execute(
                    "SELECT value FROM base.meta WHERE name = 'layout'"
                ).fetchone()[0])
        self.result = BackupResult(path, self.tid, data_fs_size=meta['size'])
        self.done_rows: list[tuple] = []
        self.batch_bytes = 0

    def run(self) -> BackupResult:
        if self.resuming:
            self._prepare_resume()
        counts = self.manifest.counts()
        parts = self.manifest.parts()
        total = sum(counts.values()) + len(parts)
        done = counts.get(DONE, 0) + counts.get(MISSING, 0) + sum(
            1 for part in parts if part[3] == DONE)
        self.result.blob_files = sum(counts.values())
        self._progress(done, total)
        try:
            for start, end, sha256, state in parts:
                if state != DONE:
                    self._part(start, end)
                    done += 1
                    self._progress(done, total)
            if self.base is not None:
                rows = self.manifest.pending_with_base()
            else:
                rows = ((oid, tid, None, None) for oid, tid, *_
                        in self.manifest.blobs(IN_PROGRESS))
            for oid, tid, size, sha256 in rows:
                self._blob(oid, tid, size, sha256)
                done += 1
                self._progress(done, total)
                if (len(self.done_rows) >= BATCH_FILES
                        or self.batch_bytes >= BATCH_BYTES):
                    self._flush()
            self._flush()
        except KeyboardInterrupt:
            self._flush()
            raise BackupInterrupted(self.path) from None
        for oid, tid, size, sha256, state in self.manifest.blobs(MISSING):
            self.result.missing.append(self._source_path(oid, tid))
        self._finish()
        return self.result

    def _prepare_resume(self) -> None:
        """Remove partial files; after a reboot, check what is done."""
        boot = _boot_id()
        recheck = boot is None or self.meta.get('boot_id') != boot
        redo = []
        for oid, tid, size, sha256, state in self.manifest.blobs():
            path = self._path(oid, tid)
            if state == IN_PROGRESS:
                remove_if_exists(path + PARTIAL_SUFFIX)
            elif state == DONE and recheck:
                try:
                    actual = _hash_file(path)
                except OSError:
                    actual = None
                if actual != (size, sha256):
                    remove_if_exists(path)
                    redo.append((IN_PROGRESS, oid, tid))
        for start, end, sha256, state in self.manifest.parts():
            path = os.path.join(self.path, part_name(start, end))
            remove_if_exists(path + PARTIAL_SUFFIX)
            if state == DONE and recheck:
                try:
                    actual = _hash_file(path)
                except OSError:
                    actual = None
                if actual != (end - start, sha256):
                    self.manifest.db.execute(
                        'UPDATE part SET state = ? WHERE start = ?',
                        (IN_PROGRESS, start))
                    redo.append(None)
        with self.manifest.db:
            self.manifest.db.execute('BEGIN')
            self.manifest.db.executemany(
                'UPDATE blob SET state = ? WHERE oid = ? AND tid = ?',
                [row for row in redo if row is not None])
            self.manifest.set_meta(boot_id=boot or '')
        if recheck:
            logger.warning('Snapshot %s was interrupted before the machine '
                           'restarted: checked the files it had finished; '
                           '%d to copy again', self.path, len(redo))

    def _progress(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)

    def _path(self, oid: bytes, tid: bytes) -> str:
        return os.path.join(self.blobs, self.layout.getBlobFilePath(oid, tid))

    def _source_path(self, oid: bytes, tid: bytes) -> str:
        return self.source.fshelper.getBlobFilename(oid, tid)

    def _part(self, start: int, end: int) -> None:
        name = part_name(start, end)
        target = os.path.join(self.path, name)
        if self.base is not None:
            row = self.manifest.db.execute(
                'SELECT sha256 FROM base.part WHERE start = ? AND "end" = ? '
                'AND state = ?', (start, end, DONE)).fetchone()
            existing = os.path.join(self.base, name)
            if (row is not None and self.files.link(existing, target)
                    and os.stat(target).st_size == end - start):
                self._done_part(start, row[0])
                return
        size, sha256 = self.files.copy(self.source.file.fileno(), target,
                                       0o444, start, end - start)
        if size != end - start:
            raise SourceChanged(f'{self.source.path} ends at {start + size}, '
                                f'before the end of transaction '
                                f'{self.tid.hex()} at {end}')
        self.result.data_fs_copied += size
        self._done_part(start, sha256)

    def _done_part(self, start: int, sha256: bytes) -> None:
        with self.manifest.db:
            self.manifest.db.execute('BEGIN')
            self.manifest.db.execute(
                'UPDATE part SET sha256 = ?, state = ? WHERE start = ?',
                (sha256, DONE, start))

    def _blob(self, oid, tid, base_size, base_sha256) -> None:
        # One layout computation for the three trees, where they share it.
        relative = self.layout.getBlobFilePath(oid, tid)
        target = os.path.join(self.blobs, relative)
        source = os.path.join(self.source.blob_dir, relative) if (
            self.source.fshelper.layout is self.layout) else (
                self._source_path(oid, tid))
        if base_size is not None:
            try:
                live_size = os.stat(source).st_size
            except FileNotFoundError:
                live_size = None
                logger.warning('Blob file %s is missing from the source; '
                               'kept the copy in snapshot %s', source,
                               self.base)
            existing = os.path.join(self.base_blobs, relative if (
                self.base_layout is self.layout) else (
                    self.base_layout.getBlobFilePath(oid, tid)))
            if live_size is not None and live_size != base_size:
                logger.warning('Blob file %s is %d bytes, but %d in '
                               'snapshot %s: copied it again', source,
                               live_size, base_size, self.base)
            elif (self.files.link(existing, target)
                  and os.stat(target).st_size == base_size):
                self.result.linked += 1
                self.done_rows.append((base_size, base_sha256, DONE, oid, tid))
                return
            else:
                logger.warning('Could not link blob file %s from snapshot '
                               '%s: copied it', existing, self.base)
                remove_if_exists(target)
        try:
            fd = os.open(source, os.O_RDONLY)
        except FileNotFoundError:
            logger.warning('Blob file %s of oid %s tid %s is missing from '
                           'the source', source, oid_repr(oid), oid_repr(tid))
            remove_if_exists(target)
            self.done_rows.append((None, None, MISSING, oid, tid))
            return
        try:
            info = os.fstat(fd)
            size, sha256 = self.files.copy(
                fd, target, stat.S_IMODE(info.st_mode), 0, info.st_size)
        finally:
            os.close(fd)
        self.result.copied += 1
        self.result.bytes_copied += size
        self.batch_bytes += size
        self.done_rows.append((size, sha256, DONE, oid, tid))

    def _flush(self) -> None:
        """Mark the files finished since the last flush done."""
        with self.manifest.db:
            self.manifest.db.execute('BEGIN')
            self.manifest.db.executemany(
                'UPDATE blob SET size = ?, sha256 = ?, state = ? '
                'WHERE oid = ? AND tid = ?', self.done_rows)
        self.done_rows = []
        self.batch_bytes = 0

    def _finish(self) -> None:
        # Every file, name and directory on disk before the manifest says
        # complete, and the manifest before the marker.
        self.files.sync()
        counts = self.manifest.counts()
        self.manifest.set_meta(state='complete', finished=time.time())
        if self.base is not None:
            self.manifest.db.execute('DETACH DATABASE base')
        self.manifest.seal()
        _write_marker(self.path, COMPLETE_NAME, json.dumps({
            'format': FORMAT, 'tid': self.tid.hex(),
            'size': self.meta['size'], 'blob_files': counts.get(DONE, 0),
            'missing': counts.get(MISSING, 0)}) + '\n')
        fsync_directory(os.path.dirname(self.path))


def _plan(destination: str, source: _Source, base: Snapshot | None,
          full: bool) -> tuple[str, bool]:
    """Plan a snapshot of the source's last committed transaction.

    Creates its directory and manifest, which lists every file the
    snapshot needs, in progress, written in one transaction: a snapshot
    directory without that plan is garbage, removed by the next run.
    Returns the snapshot's path, and whether it was there already,
    complete (nothing was committed since).
    """
    base_manifest = None
    parts: list[tuple[int, int]] = []
    start = 0
    if base is not None:
        base_manifest = Manifest(base.path, read_only=True)
        base_meta = base_manifest.meta()
        if base_meta.get('source') != source.path:
            logger.warning('Snapshots in %s were taken of %s, not %s: '
                           'copying everything', destination,
                           base_meta.get('source'), source.path)
            base_manifest.close()
            base_manifest = base = None
    try:
        if base is not None and not full:
            base_parts = base_manifest.parts()
            last_start, last_end, last_sha256, _ = base_parts[-1]
            if source.holds(last_start, last_end, last_sha256):
                parts = [(s, e) for s, e, *_ in base_parts]
                start = last_end
            else:
                logger.warning('%s changed before position %d since '
                               'snapshot %s (packed?): copying it whole',
                               source.path, last_end, base.path)
        last = source.last_committed(start)
        if last is None:
            if not start:
                last = z64, 4  # no transaction at all
            else:
                last = base.tid, start
        tid, end = last
        path = os.path.join(destination, tid.hex())
        if os.path.exists(os.path.join(path, COMPLETE_NAME)):
            return path, True
        parts.append((start, end))
        _write_plan(path, source, tid, end, parts, start, base_manifest,
                    base.name if base is not None and not full else '')
    finally:
        if base_manifest is not None:
            base_manifest.close()
    return path, False


def _write_plan(path, source, tid, end, parts, start, base_manifest,
                base_name) -> None:
    os.mkdir(path)
    try:
        _write_manifest(path, source, tid, end, parts, start, base_manifest,
                        base_name)
    except BaseException:
        # Interrupted while reading Data.fs, say: no half plan is left.
        shutil.rmtree(path, ignore_errors=True)
        raise
    fsync_directory(os.path.dirname(path))


def _write_manifest(path, source, tid, end, parts, start, base_manifest,
                    base_name) -> None:
    os.mkdir(os.path.join(path, BLOBS_NAME))
    _write_marker(os.path.join(path, BLOBS_NAME), LAYOUT_MARKER,
                  source.layout_name)
    manifest = Manifest(path, create=True)
    try:
        with manifest.db:
            manifest.db.execute('BEGIN')
            manifest.set_meta(
                format=FORMAT, tid=tid.hex(), size=end,
                layout=source.layout_name, source=source.path,
                blob_dir=source.blob_dir, started=time.time(),
                base=base_name, state='planned', boot_id=_boot_id() or '')
            manifest.db.executemany(
                'INSERT INTO part (start, "end", state) VALUES (?, ?, ?)',
                [(s, e, IN_PROGRESS) for s, e in parts])
            if start:
                # The base's files: those of every blob record before
                # `start`, which the source still holds byte for byte.
                # Written with their size and digest, which linking them
                # confirms: rows that do not grow when they are done keep
                # the manifest's pages full.
                manifest.db.executemany(
                    'INSERT INTO blob (oid, tid, size, sha256, state) '
                    'VALUES (?, ?, ?, ?, ?)',
                    ((oid, record_tid, size, sha256, IN_PROGRESS)
                     for oid, record_tid, size, sha256, _
                     in base_manifest.blobs()))
            manifest.db.executemany(
                'INSERT OR IGNORE INTO blob (oid, tid, state) '
                'VALUES (?, ?, ?)',
                ((oid, record_tid, IN_PROGRESS) for oid, record_tid
                 in source.blob_records(start, tid)))
    finally:
        manifest.close()


def _open_unfinished(snapshot: Snapshot, source: _Source) -> Manifest | None:
    """The manifest of an unfinished snapshot that can be finished.

    None (and a warning) when it cannot: no plan, another source, or a
    source that no longer holds its transaction.
    """
    manifest = None
    try:
        manifest = Manifest(snapshot.path)
        meta = manifest.meta()
        if meta.get('state') != 'planned':
            reason = 'it was interrupted before its plan was written'
        elif meta.get('source') != source.path:
            reason = f'it is a snapshot of {meta.get("source")}'
        else:
            last_start = manifest.parts()[-1][0]
            if source.end_of(snapshot.tid, last_start) == meta['size']:
                return manifest
            reason = f'{source.path} changed'
    except BackupError as e:  # no manifest, or SourceChanged
        reason = str(e)
    if manifest is not None:
        manifest.close()
    logger.warning('Removed unfinished snapshot %s, which cannot be '
                   'finished: %s', snapshot.path, reason)
    shutil.rmtree(snapshot.path)
    return None


def backup(storage, destination: str, full: bool = False,
           progress: Callable[[int, int], None] | None = None
           ) -> list[BackupResult]:
    """Snapshot `storage` (a zodbblob BlobStorage over a FileStorage).

    The storage may be opened read-only beside a running server.  First
    finishes any unfinished snapshot in `destination`, then takes one of
    the storage's last transaction, unless the newest snapshot holds it
    already.  With `full`, the new snapshot links nothing from earlier
    ones.  Returns a result per snapshot finished or found up to date.

    Raises BackupInterrupted on Ctrl-C (the snapshot is left to be
    resumed), BackupError when the source cannot be read as planned.
    """
    source = _Source(storage)
    try:
        os.makedirs(destination, exist_ok=True)
        destination = os.path.abspath(destination)
        try:
            lock = zc.lockfile.LockFile(os.path.join(destination, LOCK_NAME))
        except zc.lockfile.LockError:
            raise BackupError(f'Another backup is writing into {destination} '
                              f'(lock {LOCK_NAME} is held)') from None
        try:
            return _backup(source, destination, full, progress)
        finally:
            lock.close()
    finally:
        source.close()


def _backup(source: _Source, destination: str, full: bool,
            progress) -> list[BackupResult]:
    kill = _Kill()
    results = []
    for snapshot in snapshots(destination):
        if snapshot.complete:
            continue
        manifest = _open_unfinished(snapshot, source)
        if manifest is None:
            continue
        logger.warning('Resuming unfinished snapshot %s', snapshot.path)
        result = _SnapshotWriter(snapshot.path, source, manifest, progress,
                                 kill, resuming=True).run()
        result.resumed = True
        results.append(result)
    complete = [s for s in snapshots(destination) if s.complete]
    path, up_to_date = _plan(destination, source,
                             complete[-1] if complete else None, full)
    if up_to_date:
        if not any(r.snapshot == path for r in results):
            results.append(BackupResult(path, bytes.fromhex(
                os.path.basename(path)), up_to_date=True))
        return results
    manifest = Manifest(path)
    results.append(_SnapshotWriter(path, source, manifest, progress,
                                   kill).run())
    return results


# checking a snapshot

@dataclasses.dataclass
class CheckReport:
    """What `check` found; no problems means every byte is as recorded."""

    snapshot: str
    tid: bytes | None = None
    parts: int = 0
    blob_files: int = 0
    problems: list = dataclasses.field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return self.problems + [
            f'{self.snapshot}: {self.parts} Data.fs parts, {self.blob_files} '
            f'blob files, '
            + ('clean' if self.clean else f'{len(self.problems)} problems')]


def _open_snapshot(snapshot: str) -> tuple[Manifest, dict]:
    if not os.path.exists(os.path.join(snapshot, MANIFEST_NAME)):
        raise BackupError(f'{snapshot} is not a snapshot: it has no '
                          f'{MANIFEST_NAME}')
    complete = os.path.exists(os.path.join(snapshot, COMPLETE_NAME))
    manifest = Manifest(snapshot, read_only=complete)
    meta = manifest.meta()
    if meta.get('format') != FORMAT:
        manifest.close()
        raise BackupError(f'{snapshot}: snapshot format {meta.get("format")}'
                          f' is not format {FORMAT}')
    return manifest, meta


def _mismatch(path: str, actual: bytes, recorded: bytes) -> str:
    return (f'checksum mismatch: {path} has sha256 {actual.hex()}, the '
            f'manifest recorded {recorded.hex()}')


def _check_parts(snapshot: str, manifest: Manifest, meta: dict,
                 problems: list, hash_files: bool = True) -> list[str]:
    """The part paths of `snapshot` in order; what is wrong to `problems`."""
    paths = []
    position = 0
    for start, end, sha256, state in manifest.parts():
        path = os.path.join(snapshot, part_name(start, end))
        paths.append(path)
        if start != position:
            problems.append(f'gap: no Data.fs part holds bytes {position} '
                            f'to {start}')
        position = end
        if state != DONE:
            continue
        try:
            size, actual = _hash_file(path) if hash_files else (
                os.stat(path).st_size, sha256)
        except OSError as e:
            problems.append(f'unreadable: {path}: {e.strerror or e}')
            continue
        if size != end - start:
            problems.append(f'size mismatch: {path} is {size} bytes, the '
                            f'manifest recorded {end - start}')
        elif actual != sha256:
            problems.append(_mismatch(path, actual, sha256))
    if position != meta['size']:
        problems.append(f'gap: the Data.fs parts end at {position}, the '
                        f'snapshot at {meta["size"]}')
    return paths


def check(snapshot: str,
          progress: Callable[[int, int], None] | None = None) -> CheckReport:
    """Re-hash every file of `snapshot` against its manifest."""
    snapshot = os.path.abspath(snapshot)
    manifest, meta = _open_snapshot(snapshot)
    report = CheckReport(snapshot, bytes.fromhex(meta['tid']))
    problems = report.problems
    try:
        if not os.path.exists(os.path.join(snapshot, COMPLETE_NAME)):
            problems.append(f'unfinished: {snapshot} has no {COMPLETE_NAME} '
                            f'marker; run the backup again to finish it')
        report.parts = len(_check_parts(snapshot, manifest, meta, problems))
        helper = FilesystemHelper(os.path.join(snapshot, BLOBS_NAME),
                                  meta['layout'])
        total = sum(manifest.counts().values())
        for done, (oid, tid, size, sha256, state) in enumerate(
                manifest.blobs(), 1):
            path = helper.getBlobFilename(oid, tid)
            if state == MISSING:
                problems.append(
                    f'missing: the blob file of oid {oid_repr(oid)} tid '
                    f'{oid_repr(tid)} was not in the source when the '
                    f'snapshot was taken')
            elif state == DONE:
                report.blob_files += 1
                try:
                    actual_size, actual = _hash_file(path)
                except OSError as e:
                    problems.append(f'unreadable: {path}: {e.strerror or e}')
                else:
                    if actual_size != size:
                        problems.append(
                            f'size mismatch: {path} is {actual_size} bytes, '
                            f'the manifest recorded {size}')
                    elif actual != sha256:
                        problems.append(_mismatch(path, actual, sha256))
            if progress is not None:
                progress(done, total)
        for oid, tid, path in helper.iter_blobs():
            row = manifest.lookup(oid, tid)
            if row is None or row[2] != DONE:
                problems.append(f'unexpected: the manifest does not list '
                                f'{path}')
    finally:
        manifest.close()
    return report


# restoring a snapshot

@dataclasses.dataclass
class RestoreResult:
    directory: str
    tid: bytes
    data_fs_size: int
    blob_files: int
    missing: int

    def lines(self) -> list[str]:
        result = [f'{self.directory}: restored transaction {self.tid.hex()} '
                  f'({tid_time(self.tid)}): Data.fs {self.data_fs_size} '
                  f'bytes, {self.blob_files} blob files']
        if self.missing:
            result.append(f'  {self.missing} blob files were missing from '
                          f'the source when the snapshot was taken; '
                          f'`zodbblob verify` reports them')
        return result


def _refuse_occupied(directory: str) -> None:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise BackupError(f'{directory} is not a directory')
    data_fs = os.path.join(directory, 'Data.fs')
    blob_dir = os.path.join(directory, BLOBS_NAME)
    if os.path.lexists(data_fs):
        raise BackupError(f'{data_fs} exists: restore into a directory '
                          f'without a Data.fs')
    # A Data.fs.index of another database would be taken for the
    # restored file's own.
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith('Data.fs.'):
                raise BackupError(
                    f'{os.path.join(directory, name)} exists: restore into a '
                    f'directory without Data.fs files')
    if os.path.lexists(blob_dir) and (not os.path.isdir(blob_dir)
                                      or os.listdir(blob_dir)):
        raise BackupError(f'{blob_dir} exists and is not empty: restore into '
                          f'a directory without a blob directory')


def restore(snapshot: str, directory: str,
            progress: Callable[[int, int], None] | None = None
            ) -> RestoreResult:
    """Make ``directory/Data.fs`` and ``directory/blobs`` of `snapshot`.

    Refuses, changing nothing, when `directory` holds a Data.fs (or its
    index) or a non-empty ``blobs``, and when the snapshot is unfinished.
    Every byte read is checked against the manifest; both are written
    under hidden names and renamed into place at the end, so a failed or
    interrupted restore leaves nothing behind.  The blob directory gets
    zodbblob's catalog, so the first open need not scan it.
    """
    snapshot = os.path.abspath(snapshot)
    directory = os.path.abspath(directory)
    if not os.path.exists(os.path.join(snapshot, COMPLETE_NAME)):
        if os.path.exists(os.path.join(snapshot, MANIFEST_NAME)):
            raise BackupError(f'{snapshot} is unfinished (no {COMPLETE_NAME}'
                              f' marker): run the backup again to finish it')
        raise BackupError(f'{snapshot} is not a snapshot: it has no '
                          f'{COMPLETE_NAME} marker')
    _refuse_occupied(directory)
    manifest, meta = _open_snapshot(snapshot)
    created = not os.path.exists(directory)
    os.makedirs(directory, exist_ok=True)
    staged_data = os.path.join(directory, '.Data.fs.restoring')
    staged_blobs = os.path.join(directory, '.blobs.restoring')
    remove_if_exists(staged_data)
    shutil.rmtree(staged_blobs, ignore_errors=True)
    try:
        result = _restore(snapshot, manifest, meta, directory, staged_data,
                          staged_blobs, progress)
    except BaseException:
        remove_if_exists(staged_data)
        shutil.rmtree(staged_blobs, ignore_errors=True)
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    finally:
        manifest.close()
    return result


def _restore(snapshot, manifest, meta, directory, staged_data, staged_blobs,
             progress) -> RestoreResult:
    tid = bytes.fromhex(meta['tid'])
    problems: list[str] = []
    parts = _check_parts(snapshot, manifest, meta, problems,
                         hash_files=False)
    if problems:
        raise BackupError(f'{snapshot}: {problems[0]}')
    files = _Files(directory)
    digests = [sha256 for *_, sha256, state in manifest.parts()]
    with open(staged_data, 'wb') as out:
        for path, expected in zip(parts, digests):
            digest = hashlib.sha256()
            with open(path, 'rb') as part:
                while chunk := part.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.digest() != expected:
                raise BackupError(_mismatch(path, digest.digest(), expected)
                                  + '; nothing restored')
        out.flush()
        os.fsync(out.fileno())

    layout = get_layout(meta['layout'])
    os.mkdir(staged_blobs)
    _write_marker(staged_blobs, LAYOUT_MARKER, meta['layout'])
    counts = manifest.counts()
    total = counts.get(DONE, 0)
    catalog = []
    for oid, blob_tid, size, sha256, state in manifest.blobs(DONE):
        relative = layout.getBlobFilePath(oid, blob_tid)
        path = os.path.join(snapshot, BLOBS_NAME, relative)
        fd = os.open(path, os.O_RDONLY)
        try:
            info = os.fstat(fd)
            actual_size, actual = files.copy(
                fd, os.path.join(staged_blobs, relative),
                stat.S_IMODE(info.st_mode), 0, info.st_size)
        finally:
            os.close(fd)
        if actual_size != size:
            raise BackupError(f'size mismatch: {path} is {actual_size} '
                              f'bytes, the manifest recorded {size}; nothing '
                              f'restored')
        if actual != sha256:
            raise BackupError(_mismatch(path, actual, sha256)
                              + '; nothing restored')
        catalog.append((oid, blob_tid, size))
        if progress is not None:
            progress(len(catalog), total)
    journal = Journal(staged_blobs)
    try:
        journal.rebuild(catalog)
        journal.set_meta(state='closed', last_tid=tid)
    finally:
        journal.close()
    files.sync()
    os.replace(staged_blobs, os.path.join(directory, BLOBS_NAME))
    os.replace(staged_data, os.path.join(directory, 'Data.fs'))
    fsync_directory(directory)
    return RestoreResult(directory, tid, meta['size'], len(catalog),
                         counts.get(MISSING, 0))


# the commands

def add_backup_arguments(parser: argparse.ArgumentParser) -> None:
    from zodbblob.cli import add_storage_arguments
    parser.description = (
        'Take a snapshot of a FileStorage and its blob directory, '
        'consistent at its last committed transaction, into DEST/<tid>.  '
        'Reads the storage without locking it: safe while a server serves '
        'and commits.  A new snapshot hard-links what the previous one has '
        'and copies only what changed; an interrupted backup is resumed '
        'by running it again.  Exit status 0 when complete, 1 when blob '
        'files were missing from the source, 130 when interrupted.')
    add_storage_arguments(parser)
    parser.add_argument('destination', metavar='DEST',
                        help='directory of the snapshots, created if missing')
    parser.add_argument('--full', action='store_true',
                        help='copy everything, linking nothing from earlier '
                             'snapshots')


def _interrupted_line(progress) -> str:
    # After a progress bar, start on a new line.
    return '\n' if progress.enabled and progress.shown >= 0 else ''


def backup_command(args: argparse.Namespace) -> int:
    from zodbblob.cli import Progress, open_storage
    prog = args.parser.prog
    progress = Progress('backup', quiet=args.quiet)
    storage = None
    try:
        storage = open_storage(args, read_only=True)
        results = backup(storage, args.destination, full=args.full,
                         progress=progress)
    except BackupInterrupted as e:
        print(f'{_interrupted_line(progress)}{prog}: interrupted; snapshot '
              f'{e.snapshot} is unfinished: run the same command again to '
              f'finish it', file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f'{_interrupted_line(progress)}{prog}: interrupted before a '
              f'snapshot was planned; no snapshot was written',
              file=sys.stderr)
        return 130
    except (BackupError, OSError) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 1
    finally:
        if storage is not None:
            storage.close()
    for result in results:
        lines = result.lines()
        for line in lines if not args.quiet else lines[:1] + [
                line for line in lines if 'missing:' in line]:
            print(line)
    return 1 if any(result.missing for result in results) else 0


def add_restore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Restore a snapshot that `zodbblob backup` took: write DEST_DIR/'
        'Data.fs and DEST_DIR/blobs, checking every byte against the '
        'manifest.  Refuses a DEST_DIR that has a Data.fs or a non-empty '
        'blobs directory.  With --check, first re-hash every file of '
        'SNAPSHOT and report mismatches (exit status 1); without DEST_DIR, '
        'only check.')
    parser.add_argument('directory', metavar='DEST_DIR', nargs='?',
                        help='where to write Data.fs and blobs/')
    parser.add_argument('snapshot', metavar='SNAPSHOT',
                        help='a snapshot directory, DEST/<tid>')
    parser.add_argument('--check', action='store_true',
                        help='re-hash every file of the snapshot against '
                             'its manifest')
    parser.add_argument('--quiet', action='store_true',
                        help='no progress, only problems and the result')


def restore_command(args: argparse.Namespace) -> int:
    from zodbblob.cli import Progress
    prog = args.parser.prog
    if args.directory is None and not args.check:
        args.parser.error('name the directory to restore into: DEST_DIR '
                          'SNAPSHOT (or --check SNAPSHOT to only check it)')
    if not os.path.isdir(args.snapshot):
        args.parser.error(f'{args.snapshot}: no such directory')
    try:
        if args.check:
            report = check(args.snapshot,
                           progress=Progress('check', quiet=args.quiet))
            for line in report.lines():
                print(line)
            if not report.clean or args.directory is None:
                return 0 if report.clean else 1
        result = restore(args.snapshot, args.directory,
                         progress=Progress('restore', quiet=args.quiet))
    except KeyboardInterrupt:
        newline = '\n' if sys.stderr.isatty() and not args.quiet else ''
        print(f'{newline}{prog}: interrupted; nothing was restored',
              file=sys.stderr)
        return 130
    except (BackupError, OSError) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 1
    for line in result.lines():
        print(line)
    return 0

