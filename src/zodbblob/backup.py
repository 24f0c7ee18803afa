"""Snapshots of a FileStorage and its blob directory, consistent at one tid.

``backup(storage, destination)`` reads a storage that a ZEO server may be
serving and committing to: it opens nothing for writing and takes no lock
of the storage's.  The snapshot holds the database as of one transaction
*T*, the last one committed when the backup started: ``Data.fs`` up to the
end of *T* (a valid ``Data.fs``; FileStorage only appends, so those bytes
no longer change), and the file of every blob record in those bytes.

A destination holds the snapshots of one database, in format 2::

    DEST/.zodbblob-backup    {"format": 2}: what the directory is
    DEST/.blobs/             the pool: each blob file once, in the chunky
                             layout, named for its oid and tid
    DEST/.manifests/         <tid>.sqlite: a hard link to each snapshot's
                             manifest, for `collect`
    DEST/03f0c4a1b2c3d4e5/   a snapshot, named for its tid:
      Data.fs.0000000000000000-00000000000a3f20  Data.fs bytes 0 to 0xa3f20
      Data.fs.00000000000a3f20-00000000000b0010  the bytes appended since
      manifest.sqlite                            every file, its sha256
      COMPLETE                                   written last

The ``Data.fs.*`` parts, concatenated in name order, are the ``Data.fs``
of the snapshot (``cat Data.fs.* > Data.fs`` would do).  ``restore``
concatenates them and builds a blob directory of the source's layout
from the pool, checking every byte against the manifest.

A committed blob file never changes (one (oid, tid) is one content), so
the pool holds it once, however many snapshots list it.  A new snapshot
is incremental: its manifest is the previous one's rows, copied by one
SQL statement, plus the blob records of the transactions committed since;
its parts are hard links to the previous snapshot's plus the bytes
appended since; it copies into the pool only the new blob files.  What a
backup writes grows with what changed, not with the store.  When
``Data.fs`` was packed since the previous snapshot (its bytes no longer
match), the new snapshot copies it whole and reads all its records, and
still takes from the pool every file the previous manifest lists.

Removing a snapshot (`prune`, or deleting its directory) leaves pool
files that may be no snapshot's any more; `collect` removes them.  The
links in ``.manifests`` tell it which to consider: a link whose snapshot
is gone lists them, and a file goes only when no remaining manifest
lists it.  The link goes last, so a collection that is interrupted is
finished by the next backup or prune.

An interrupted backup resumes: the manifest lists every file the
snapshot needs, each in progress, done or missing (from the source).
Files are copied to ``.partial`` names and renamed, then marked done, so
a rerun skips what is done, discards partial files and copies the rest
(after a reboot, it first checks the files it had copied: see
`_SnapshotWriter`).  ``COMPLETE`` is written only once everything is
durable; a snapshot without it is resumed, never built upon.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import os
import re
import secrets
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

from zodbblob.cli.arguments import (
    add_layout_argument,
    add_storage_arguments,
    open_storage,
)
from zodbblob.journal import (
    SYNCFS_AVAILABLE,
    Journal,
    pack_under_way,
    sync_filesystem,
)
from zodbblob.layout import (
    LAYOUT_MARKER,
    LINKED_DIRECTORY,
    BlobTree,
    NotABlobFile,
    fsync_directory,
    fsync_path,
    get_layout,
    makedirs_durable,
    open_blob_file,
    remove_if_exists,
)
from zodbblob.tools.progress import Progress
from zodbblob.storage import (
    BlobDirectoryInUse,
    held_by_a_storage,
    hold_blob_directory,
)

logger = logging.getLogger(__name__)

FORMAT = 2
DESTINATION_MARKER = '.zodbblob-backup'
POOL_NAME = '.blobs'
POOL_LAYOUT = get_layout('chunky')
MANIFESTS_NAME = '.manifests'
MANIFEST_SUFFIX = '.sqlite'
REMOVING_PREFIX = '.removing-'
MANIFEST_NAME = 'manifest.sqlite'
COMPLETE_NAME = 'COMPLETE'
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
# The tests' crash points, N[:SIGNAL].  ZODBBLOB_BACKUP_KILL_AFTER: after
# N files copied, the process sends itself SIGNAL (default KILL) while
# the next copy is half written.  ZODBBLOB_BACKUP_KILL_COLLECT_AFTER:
# after N pool files removed by `collect`.
# ZODBBLOB_RESTORE_KILL_AFTER: after N of restore's final renames.
KILL_VARIABLE = 'ZODBBLOB_BACKUP_KILL_AFTER'
COLLECT_KILL_VARIABLE = 'ZODBBLOB_BACKUP_KILL_COLLECT_AFTER'
RESTORE_KILL_VARIABLE = 'ZODBBLOB_RESTORE_KILL_AFTER'
# Written before restore's final renames, removed after them: a restore
# interrupted between them is finished by the next run.
RESTORING_NAME = '.zodbblob-restoring'

# ``copied`` is 1 for the blob files this snapshot put into the pool: the
# ones to check again when a backup resumes after a reboot.  A row costs
# about 70 bytes: the manifest is what a snapshot writes in proportion to
# all its files.
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
    copied INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (oid, tid)
) WITHOUT ROWID;
"""


class BackupError(Exception):
    """A backup, check or restore cannot go on, as the message says."""


class SourceChanged(BackupError):
    """Data.fs no longer holds the bytes a snapshot was planned from."""


class SourcePacked(BackupError):
    """A pack of the source ran during the snapshot, which was dropped."""

    def __init__(self, path: str):
        super().__init__(f'{path} was packed while the snapshot was taken; '
                         f'run backup again')


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


def pool_path(destination: str, oid: bytes, tid: bytes) -> str:
    """Where the pool of `destination` keeps the blob file of (oid, tid)."""
    return os.path.join(destination, POOL_NAME,
                        POOL_LAYOUT.getBlobFilePath(oid, tid))


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _sqlite_uri(path: str, **parameters) -> str:
    query = urllib.parse.urlencode(parameters)
    return f'file:{urllib.parse.quote(os.path.abspath(path))}?{query}'


def _hash_file(path: str, tree: BlobTree | None = None) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    # Pool files and parts are the backup's own, but the destination is
    # a directory like any other: a link there is not followed either,
    # nor (for a pool file, with its `tree`) a link to a directory above.
    fd = open_blob_file(path) if tree is None else tree.open(path)
    with open(fd, 'rb') as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.digest()


# the manifest

class Manifest:
    """The ``manifest.sqlite`` of one snapshot.

    ``meta`` holds what the snapshot is (``format``, ``tid``, ``size``: the
    end of Data.fs, ``layout``: the source's, ``source``, ``base``: the
    snapshot it was built on, ``state``, ``plan``: a token of this plan);
    ``part`` a row per Data.fs part and ``blob`` a row per blob file, each
    with its size, SHA-256 (32 bytes: ``hex(sha256)`` in SQL) and state
    (0: in progress, 1: done, 2: missing from the source).

    `read_only` opens a complete snapshot's manifest as the one file it
    is, never written again (readable from read-only media, with no -shm
    file), and an unfinished one read-only.
    """

    def __init__(self, snapshot: str, create: bool = False,
                 read_only: bool = False):
        self.path = os.path.join(snapshot, MANIFEST_NAME)
        if read_only:
            sealed = os.path.exists(os.path.join(snapshot, COMPLETE_NAME))
            target = _sqlite_uri(self.path, mode='ro', **(
                {'immutable': 1} if sealed else {}))
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

    def checkpoint(self) -> None:
        """Move what the WAL holds into the one file."""
        self.db.execute('PRAGMA wal_checkpoint(TRUNCATE)')

    def seal(self) -> None:
        """Fold the WAL into the one file and close: the snapshot is done."""
        self.checkpoint()
        self.db.execute('PRAGMA journal_mode=DELETE')
        self.db.close()
        fsync_path(self.path)

    def meta(self) -> dict:
        return dict(self.db.execute('SELECT name, value FROM meta'))

    def set_meta(self, **values) -> None:
        self.db.executemany(
            'INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)',
            values.items())

    def parts(self) -> list[tuple[int, int, bytes | None, int]]:
        return self.db.execute(
            'SELECT start, "end", sha256, state FROM part ORDER BY start'
        ).fetchall()

    def blobs(self, state: int | None = None, copied: bool = False
              ) -> Iterator[tuple[bytes, bytes, int, bytes, int]]:
        """``(oid, tid, size, sha256, state)`` in (oid, tid) order.

        Only those in `state`, if given; only those this snapshot copied
        into the pool, if `copied`.
        """
        conditions = ['state = ?'] if state is not None else []
        if copied:
            conditions.append('copied = 1')
        where = ''.join(f'{condition} AND ' for condition in conditions)
        return self._pages(
            f'SELECT oid, tid, size, sha256, state FROM blob '
            f'WHERE {where}(oid, tid) > (?, ?) ORDER BY oid, tid LIMIT ?',
            () if state is None else (state,))

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

    def counts(self) -> dict[int, int]:
        return dict(self.db.execute(
            'SELECT state, count(*) FROM blob GROUP BY state'))


# the destination and its snapshots

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


def _read_destination(destination: str) -> bool:
    """Whether `destination` is a backup destination of this format.

    False where it is new: missing, or empty.  Raises BackupError, naming
    the path, for anything else (a file, a destination of another format,
    a directory of other things), having changed nothing.
    """
    if not os.path.lexists(destination):
        return False
    if not os.path.isdir(destination):
        raise BackupError(f'{destination} is not a directory')
    marker = os.path.join(destination, DESTINATION_MARKER)
    try:
        with open(marker) as f:
            text = f.read()
    except FileNotFoundError:
        names = sorted(n for n in os.listdir(destination) if n != LOCK_NAME)
        if not names:
            return False
        older = [n for n in names if SNAPSHOT_NAME.match(n)]
        if older:
            raise BackupError(
                f'{destination} holds snapshots of an older backup format '
                f'({os.path.join(destination, older[0])} and others, and no '
                f'{DESTINATION_MARKER}); this zodbblob reads and writes '
                f'format {FORMAT}: back up into a new destination') from None
        raise BackupError(
            f'{destination} is not a backup destination (it has no '
            f'{DESTINATION_MARKER}) and is not empty: give a new or empty '
            f'directory') from None
    try:
        found = json.loads(text)['format']
    except (ValueError, KeyError, TypeError):
        raise BackupError(f'{marker} is not a zodbblob backup marker: '
                          f'{text[:80]!r}') from None
    if found != FORMAT:
        raise BackupError(
            f'{destination} is a backup destination of format {found} '
            f'({marker}); this zodbblob reads and writes format {FORMAT}: '
            f'back up into a new destination')
    return True


def _prepare_destination(destination: str) -> None:
    """Make `destination` one: its marker, pool and manifests' links."""
    # The marker first: a directory with a pool but no marker would be
    # refused as someone else's.
    if not os.path.exists(os.path.join(destination, DESTINATION_MARKER)):
        _write_marker(destination, DESTINATION_MARKER, json.dumps({
            'format': FORMAT, 'pool_layout': POOL_LAYOUT.name}) + '\n')
    for name in (POOL_NAME, MANIFESTS_NAME):
        os.makedirs(os.path.join(destination, name), exist_ok=True)


@contextlib.contextmanager
def _locked(destination: str):
    """Hold `destination`'s lock: one backup or prune at a time."""
    try:
        lock = zc.lockfile.LockFile(os.path.join(destination, LOCK_NAME))
    except zc.lockfile.LockError:
        raise BackupError(f'Another backup is writing into {destination} '
                          f'(lock {LOCK_NAME} is held)') from None
    try:
        yield
    finally:
        lock.close()


def _manifest_link(destination: str, name: str) -> str:
    return os.path.join(destination, MANIFESTS_NAME, name + MANIFEST_SUFFIX)


def _link_manifest(destination: str, snapshot: str,
                   manifest: Manifest) -> None:
    """Give `snapshot`'s manifest its name in ``.manifests``.

    Done before the snapshot copies anything into the pool: `collect`
    learns from these names which pool files a removed snapshot listed.
    The planned rows are checkpointed into the one file first, so the
    link (or, where links fail, the copy) holds them all.
    """
    manifest.checkpoint()
    target = _manifest_link(destination, os.path.basename(snapshot))
    with contextlib.suppress(FileNotFoundError):
        if os.path.samefile(target, manifest.path):
            return
    staged = target + PARTIAL_SUFFIX
    remove_if_exists(staged)
    try:
        os.link(manifest.path, staged)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK,
                           errno.ENOTSUP):
            raise
        shutil.copyfile(manifest.path, staged)
        fsync_path(staged)
    os.replace(staged, target)
    fsync_directory(os.path.dirname(target))


def _plan_token(path: str, **parameters) -> str | None:
    try:
        db = sqlite3.connect(_sqlite_uri(path, mode='ro', **parameters),
                             uri=True)
        try:
            row = db.execute(
                "SELECT value FROM meta WHERE name = 'plan'").fetchone()
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return None
    return row[0] if row else None


def _same_manifest(link: str, manifest: str) -> bool:
    with contextlib.suppress(OSError):
        if os.path.samefile(link, manifest):
            return True
    # A copy, where the destination's filesystem has no hard links.
    token = _plan_token(link, immutable=1)
    return token is not None and token == _plan_token(manifest)


# reading the source

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



# writing files durably

class _Kill:
    """A crash point for the tests: `KILL_VARIABLE` by default."""

    def __init__(self, variable: str = KILL_VARIABLE):
        value = os.environ.get(variable, '')
        count, _, name = value.partition(':')
        self.after = int(count) if count else None
        self.signal = getattr(signal, 'SIG' + (name or 'KILL').upper())
        self.copied = 0

    def mid_copy(self) -> None:
        if self.after is not None and self.copied >= self.after:
            self.after = None
            os.kill(os.getpid(), self.signal)

    def after_one(self) -> None:
        self.copied += 1
        self.mid_copy()


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
        # The directories that did not exist before: a snapshot dropped
        # for a pack leaves none of them behind.
        self.created: list[str] = []
        self.touched: set[str] = set()

    def makedirs(self, directory: str) -> None:
        if directory in self.made:
            return
        missing = directory
        while not os.path.isdir(missing) and missing != self.root:
            self.created.append(missing)
            missing = os.path.dirname(missing)
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

    def link(self, existing: str, target: str,
             tree: BlobTree | None = None) -> bool:
        """Hard-link `existing` as `target`; False where links fail.

        With the `tree` that holds `existing`, no link is followed on
        the way to it (`BlobTree.link`).
        """
        directory = os.path.dirname(target)
        self.makedirs(directory)
        link = os.link if tree is None else tree.link
        try:
            link(existing, target)
        except FileExistsError:
            os.remove(target)
            link(existing, target)
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
    pooled: int = 0
    bytes_copied: int = 0
    missing: list = dataclasses.field(default_factory=list)
    not_files: list = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        when = f'transaction {self.tid.hex()} ({tid_time(self.tid)})'
        if self.up_to_date:
            return [f'{self.snapshot}: up to date, holds {when}']
        result = [f'{self.snapshot}: {"resumed and " if self.resumed else ""}'
                  f'complete, holds {when}',
                  f'  Data.fs: {self.data_fs_size} bytes, '
                  f'{self.data_fs_copied} copied',
                  f'  blob files: {self.blob_files}, {self.copied} copied '
                  f'({self.bytes_copied} bytes), {self.pooled} already '
                  f'backed up']
        for path in self.missing:
            result.append(f'  missing: {path} was not in the source blob '
                          f'directory')
        for path, kind in self.not_files:
            if kind == LINKED_DIRECTORY:
                result.append(f'  not followed: {path} is {kind}; the blob '
                              f'files below it are not backed up')
                continue
            result.append(f'  not a file: {path} is {kind} under a blob '
                          f'name, not a regular file; not backed up')
        return result


class _SnapshotWriter:
    """Fills one snapshot (and the pool) from the source; resumable.

    The manifest arrives planned: every blob file the snapshot needs is a
    row, done already where the pool has it, in progress where it is to
    be copied (or, after ``--full``, in progress with the size and sha256
    the pool's file must have).  Finished files are marked done a batch
    at a time, without a sync: after a crash of the process, the files it
    wrote are intact.  Only a crash of the machine can lose them, so a run
    that resumes in another boot than the one that wrote them checks every
    file this snapshot copied again.  Everything is synced before
    ``COMPLETE``.
    """

    def __init__(self, path: str, source: _Source, manifest: Manifest,
                 progress, kill: _Kill, resuming: bool = False):
        self.path = path
        self.destination = os.path.dirname(path)
        self.source = source
        self.manifest = manifest
        self.progress = progress
        self.resuming = resuming
        self.files = _Files(path, kill)
        self.source_tree = BlobTree(source.blob_dir)
        self.pool_tree = BlobTree(os.path.join(self.destination, POOL_NAME))
        # Source paths not backed up for what is under their name (one
        # link to a directory stands for all the files below it).
        self.not_file_paths: set[str] = set()
        self.meta = manifest.meta()
        self.tid = bytes.fromhex(self.meta['tid'])
        self.base = (os.path.join(self.destination, self.meta['base'])
                     if self.meta['base'] else None)
        self.result = BackupResult(path, self.tid,
                                   data_fs_size=self.meta['size'])
        self.done_rows: list[tuple] = []
        self.batch_bytes = 0

    def run(self) -> BackupResult:
        try:
            return self._run()
        finally:
            self.source_tree.close()
            self.pool_tree.close()

    def _run(self) -> BackupResult:
        if self.resuming:
            self._prepare_resume()
        _link_manifest(self.destination, self.path, self.manifest)
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
                    self._part(start, end, sha256)
                    done += 1
                    self._progress(done, total)
            for oid, tid, size, sha256, _ in self.manifest.blobs(
                    IN_PROGRESS):
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
        # Every file is copied: if no pack has removed one meanwhile, the
        # snapshot is consistent, whatever a pack does from here on.
        if self.source.packed():
            raise SourcePacked(self.source.path)
        for oid, tid, *_ in self.manifest.blobs(MISSING):
            path = self._source_path(oid, tid)
            if path not in self.not_file_paths:
                self.result.missing.append(path)
        self.result.pooled = (self.result.blob_files - self.result.copied
                              - len(self.result.missing)
                              - len(self.not_file_paths))
        self._finish()
        return self.result

    def _prepare_resume(self) -> None:
        """Remove partial files; after a reboot, check what was copied."""
        boot = _boot_id()
        recheck = boot is None or self.meta.get('boot_id') != boot
        for oid, tid, *_ in self.manifest.blobs(IN_PROGRESS):
            remove_if_exists(self._pool_path(oid, tid) + PARTIAL_SUFFIX)
        redo = []
        if recheck:
            for oid, tid, size, sha256, _ in self.manifest.blobs(
                    DONE, copied=True):
                try:
                    actual = _hash_file(self._pool_path(oid, tid),
                                        self.pool_tree)
                except OSError:
                    actual = None
                if actual != (size, sha256):
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
                    remove_if_exists(path)
                    self.manifest.db.execute(
                        'UPDATE part SET state = ? WHERE start = ?',
                        (IN_PROGRESS, start))
                    redo.append(None)
        with self.manifest.db:
            self.manifest.db.execute('BEGIN')
            # Copied again from the source, not checked against these.
            self.manifest.db.executemany(
                'UPDATE blob SET state = ?, size = NULL, sha256 = NULL, '
                'copied = 0 WHERE oid = ? AND tid = ?',
                [row for row in redo if row is not None])
            self.manifest.set_meta(boot_id=boot or '')
        if recheck:
            logger.warning('Snapshot %s was interrupted before the machine '
                           'restarted: checked the files it had finished; '
                           '%d to copy again', self.path, len(redo))

    def _progress(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)

    def _pool_path(self, oid: bytes, tid: bytes) -> str:
        return pool_path(self.destination, oid, tid)

    def _source_path(self, oid: bytes, tid: bytes) -> str:
        return self.source.fshelper.getBlobFilename(oid, tid)

    def _part(self, start: int, end: int, sha256: bytes | None) -> None:
        name = part_name(start, end)
        target = os.path.join(self.path, name)
        if sha256 is not None and self.base is not None:
            # The previous snapshot's part: linked, or (if that snapshot
            # is gone) copied from the source and checked.
            if (self.files.link(os.path.join(self.base, name), target)
                    and os.stat(target).st_size == end - start):
                self._done_part(start, sha256)
                return
            remove_if_exists(target)
        size, actual = self.files.copy(self.source.file.fileno(), target,
                                       0o444, start, end - start)
        if size != end - start:
            raise SourceChanged(f'{self.source.path} ends at {start + size}, '
                                f'before the end of transaction '
                                f'{self.tid.hex()} at {end}')
        if sha256 is not None and actual != sha256:
            remove_if_exists(target)
            raise SourceChanged(f'{self.source.path}: bytes {start} to {end} '
                                f'are not those of snapshot {self.base} '
                                f'(packed?)')
        self.result.data_fs_copied += size
        self._done_part(start, actual)

    def _done_part(self, start: int, sha256: bytes) -> None:
        with self.manifest.db:
            self.manifest.db.execute('BEGIN')
            self.manifest.db.execute(
                'UPDATE part SET sha256 = ?, state = ? WHERE start = ?',
                (sha256, DONE, start))

    def _blob(self, oid, tid, pooled_size, pooled_sha256) -> None:
        target = self._pool_path(oid, tid)
        if pooled_sha256 is not None:
            # --full: keep the pool's file if it is still what an earlier
            # snapshot recorded.
            try:
                actual = _hash_file(target, self.pool_tree)
            except OSError:
                actual = None
            if actual == (pooled_size, pooled_sha256):
                self.done_rows.append(
                    (pooled_size, pooled_sha256, DONE, 0, oid, tid))
                return
            logger.warning('Blob file %s in the pool is missing or damaged: '
                           'copied it again from the source', target)
        source = self._source_path(oid, tid)
        try:
            fd = self.source_tree.open(source)
        except NotABlobFile as e:
            # Never followed nor read: a link may point at a file only
            # root may read, and a FIFO would block the backup for ever.
            logger.warning('Blob file %s of oid %s tid %s is not backed '
                           'up: %s', source, oid_repr(oid), oid_repr(tid), e)
            if (e.path, e.kind) not in self.result.not_files:
                self.result.not_files.append((e.path, e.kind))
            self.not_file_paths.add(source)
            self.done_rows.append((None, None, MISSING, 0, oid, tid))
            return
        except FileNotFoundError:
            if self.source.packed():
                # Removed by the pack, not lost: never marked missing.
                raise SourcePacked(self.source.path) from None
            logger.warning('Blob file %s of oid %s tid %s is missing from '
                           'the source', source, oid_repr(oid), oid_repr(tid))
            self.done_rows.append((None, None, MISSING, 0, oid, tid))
            return
        try:
            info = os.fstat(fd)
            # Replaces a file an interrupted run copied but had not yet
            # marked done: the same bytes.
            size, sha256 = self.files.copy(
                fd, target, stat.S_IMODE(info.st_mode), 0, info.st_size)
        finally:
            os.close(fd)
        self.result.copied += 1
        self.result.bytes_copied += size
        self.batch_bytes += size
        self.done_rows.append((size, sha256, DONE, 1, oid, tid))

    def _flush(self) -> None:
        """Mark the files finished since the last flush done."""
        with self.manifest.db:
            self.manifest.db.execute('BEGIN')
            self.manifest.db.executemany(
                'UPDATE blob SET size = ?, sha256 = ?, state = ?, copied = ? '
                'WHERE oid = ? AND tid = ?', self.done_rows)
        self.done_rows = []
        self.batch_bytes = 0

    def _finish(self) -> None:
        # Every file, name and directory on disk before the manifest says
        # complete, and the manifest before the marker.
        self.files.sync()
        counts = self.manifest.counts()
        self.manifest.set_meta(state='complete', finished=time.time())
        self.manifest.seal()
        _write_marker(self.path, COMPLETE_NAME, json.dumps({
            'format': FORMAT, 'tid': self.tid.hex(),
            'size': self.meta['size'], 'blob_files': counts.get(DONE, 0),
            'missing': counts.get(MISSING, 0)}) + '\n')
        fsync_directory(self.destination)


def _refuse_another_database(destination: str, source: _Source) -> None:
    """Raise BackupError unless the destination's snapshots are `source`'s.

    They are when the newest was taken of the same path, or when the
    source still holds the bytes of its last Data.fs part (the database
    was moved).  One destination, one database: the pool names files by
    oid and tid, which only one database's history keeps apart.
    """
    for snapshot in reversed(snapshots(destination)):
        try:
            manifest = Manifest(snapshot.path, read_only=True)
        except BackupError:
            continue  # interrupted before its plan: no one's
        try:
            meta = manifest.meta()
            if meta.get('source') == source.path:
                return
            done = [part for part in manifest.parts() if part[3] == DONE]
            moved = bool(done) and source.holds(*done[-1][:3])
        finally:
            manifest.close()
        if moved:
            logger.warning('Snapshots in %s were taken of %s; %s holds the '
                           'same transactions: continuing with it',
                           destination, meta.get('source'), source.path)
            return
        raise BackupError(
            f'{destination} holds snapshots of {meta.get("source")}, and '
            f'{source.path} is another database (it does not hold the '
            f'Data.fs bytes of {snapshot.path}): back up each database into '
            f'its own destination')


def _plan(destination: str, source: _Source, base: Snapshot | None,
          full: bool) -> tuple[str, bool]:
    """Plan a snapshot of the source's last committed transaction.

    Creates its directory and manifest, which lists every file the
    snapshot needs, written in one transaction: a snapshot directory
    without that plan is garbage, removed by the next run.  Returns the
    snapshot's path, and whether it was there already, complete (nothing
    was committed since).
    """
    base_manifest = None
    base_parts: list[tuple[int, int, bytes, int]] = []
    start = 0
    if base is not None:
        base_manifest = Manifest(base.path, read_only=True)
    try:
        if base is not None and not full:
            parts = base_manifest.parts()
            last_start, last_end, last_sha256, _ = parts[-1]
            if source.holds(last_start, last_end, last_sha256):
                base_parts = parts
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
    finally:
        if base_manifest is not None:
            base_manifest.close()
    os.mkdir(path)
    try:
        _write_manifest(path, source, tid, end, base, base_parts, start, full)
    except BaseException:
        # Interrupted while reading Data.fs, say: no half plan is left.
        shutil.rmtree(path, ignore_errors=True)
        raise
    fsync_directory(destination)
    return path, False


def _write_manifest(path, source, tid, end, base, base_parts, start,
                    full) -> None:
    manifest = Manifest(path, create=True)
    db = manifest.db
    try:
        if base is not None:
            db.execute('ATTACH DATABASE ? AS base', (_sqlite_uri(
                os.path.join(base.path, MANIFEST_NAME), mode='ro',
                immutable=1),))
        with db:
            db.execute('BEGIN')
            manifest.set_meta(
                format=FORMAT, tid=tid.hex(), size=end,
                layout=source.layout_name, source=source.path,
                blob_dir=source.blob_dir, started=time.time(),
                base=base.name if base is not None else '',
                state='planned', boot_id=_boot_id() or '',
                plan=secrets.token_hex(16))
            db.executemany(
                'INSERT INTO part (start, "end", sha256, state) '
                'VALUES (?, ?, ?, ?)',
                [(s, e, sha256, IN_PROGRESS) for s, e, sha256, _
                 in base_parts] + [(start, end, None, IN_PROGRESS)])
            if start:
                # The base's files are those of every blob record before
                # `start`, which the source still holds byte for byte: the
                # pool has them (the missing ones are tried again).
                db.execute(
                    'INSERT INTO blob (oid, tid, size, sha256, state) '
                    'SELECT oid, tid, size, sha256, CASE state WHEN ? THEN '
                    '? ELSE ? END FROM base.blob',
                    (DONE, DONE, IN_PROGRESS))
            db.executemany(
                'INSERT OR IGNORE INTO blob (oid, tid, state) '
                'VALUES (?, ?, ?)',
                ((oid, record_tid, IN_PROGRESS) for oid, record_tid
                 in source.blob_records(start, tid)))
            if base is not None and not start:
                # Data.fs read whole: of its files, those the base lists
                # are in the pool, done (or, with --full, to be checked).
                db.execute(
                    'UPDATE blob SET (size, sha256, state) = (SELECT '
                    'b.size, b.sha256, ? FROM base.blob b WHERE b.oid = '
                    'blob.oid AND b.tid = blob.tid) WHERE EXISTS (SELECT 1 '
                    'FROM base.blob b WHERE b.oid = blob.oid AND b.tid = '
                    'blob.tid AND b.state = ?)',
                    (IN_PROGRESS if full else DONE, DONE))
        if base is not None:
            db.execute('DETACH DATABASE base')
    finally:
        manifest.close()


def _open_unfinished(snapshot: Snapshot, source: _Source) -> Manifest | None:
    """The manifest of an unfinished snapshot that can be finished.

    None (and a warning) when it cannot: no plan, or a source that no
    longer holds its transaction.  Such a snapshot is removed; its pool
    files are left to `collect`.
    """
    manifest = None
    try:
        manifest = Manifest(snapshot.path)
        meta = manifest.meta()
        if meta.get('state') != 'planned':
            reason = 'it was interrupted before its plan was written'
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
    _remove_snapshot(snapshot)
    return None


def backup(storage, destination: str, full: bool = False,
           progress: Callable[[int, int], None] | None = None
           ) -> list[BackupResult]:
    """Snapshot `storage` (a zodbblob BlobStorage over a FileStorage).

    The storage may be opened read-only beside a running server.  First
    finishes what an interrupted run left (a snapshot, a removal), then
    takes a snapshot of the storage's last transaction, unless the newest
    snapshot holds it already.  With `full`, Data.fs is copied whole and
    every blob file the pool has already is read again, and copied again
    from the source if it is missing or damaged.  Returns a result per
    snapshot finished or found up to date.

    Raises BackupInterrupted on Ctrl-C (the snapshot is left to be
    resumed), BackupError when the destination is not one of this
    storage's or the source cannot be read as planned, SourcePacked when
    a pack ran beside the snapshot (which is dropped: the destination is
    left as it was).
    """
    destination = os.path.abspath(destination)
    existed = os.path.lexists(destination)
    new = not _read_destination(destination)
    dropped = False
    source = _Source(storage)
    try:
        if source.packed():
            raise SourcePacked(source.path)
        _refuse_another_database(destination, source)
        os.makedirs(destination, exist_ok=True)
        with _locked(destination):
            _prepare_destination(destination)
            try:
                return _backup(source, destination, full, progress)
            except (BackupError, OSError) as e:
                # Whatever failed, a pack meanwhile is the reason: its
                # plan is dropped, and a rerun takes one of the new file.
                if not isinstance(e, SourcePacked) and not source.packed():
                    raise
                if new:
                    _unmake_destination(destination)
                    dropped = True
                if isinstance(e, SourcePacked):
                    raise
                raise SourcePacked(source.path) from e
    finally:
        source.close()
        if dropped and not existed:
            # Empty unless another backup began in it since: then it stays.
            with contextlib.suppress(OSError):
                os.rmdir(destination)


def _unmake_destination(destination: str) -> None:
    """Take back what `_prepare_destination` made in a new destination;
    with its lock held, which goes too (after it, nobody can tell)."""
    for name in (POOL_NAME, MANIFESTS_NAME):
        shutil.rmtree(os.path.join(destination, name), ignore_errors=True)
    remove_if_exists(os.path.join(destination, DESTINATION_MARKER))
    remove_if_exists(os.path.join(destination, LOCK_NAME))


def _backup(source: _Source, destination: str, full: bool,
            progress) -> list[BackupResult]:
    kill = _Kill()
    _finish_removals(destination)
    collect(destination)
    results = []
    removed = False
    for snapshot in snapshots(destination):
        if snapshot.complete:
            continue
        manifest = _open_unfinished(snapshot, source)
        if manifest is None:
            removed = True
            continue
        logger.warning('Resuming unfinished snapshot %s', snapshot.path)
        result = _SnapshotWriter(snapshot.path, source, manifest, progress,
                                 kill, resuming=True).run()
        result.resumed = True
        results.append(result)
    if removed:
        collect(destination)
    complete = [s for s in snapshots(destination) if s.complete]
    path, up_to_date = _plan(destination, source,
                             complete[-1] if complete else None, full)
    if up_to_date:
        if not any(r.snapshot == path for r in results):
            results.append(BackupResult(path, bytes.fromhex(
                os.path.basename(path)), up_to_date=True))
        return results
    manifest = Manifest(path)
    writer = _SnapshotWriter(path, source, manifest, progress, kill)
    try:
        results.append(writer.run())
    except (BackupError, OSError) as e:
        # A pack that removed files this snapshot lists, or replaced
        # Data.fs under its reading: its plan no longer holds.
        if not isinstance(e, SourcePacked) and not source.packed():
            raise
        manifest.close()
        _drop_snapshot(destination, path, writer.files.created)
        if isinstance(e, SourcePacked):
            raise
        raise SourcePacked(source.path) from e
    return results


def _drop_snapshot(destination: str, path: str, created: list[str]) -> None:
    """Remove the unfinished snapshot `path`, the pool files only it
    lists, its manifest's link, and the directories it made: the
    destination is as it was before it was planned."""
    _remove_snapshot(Snapshot(path, bytes.fromhex(os.path.basename(path)),
                              False))
    collect(destination)
    for directory in sorted(created, key=len, reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(directory)


# removing snapshots

def _remove_snapshot(snapshot: Snapshot) -> None:
    """Take `snapshot` out of the destination, then delete it.

    Renamed first, in one step, so that no half-deleted directory is ever
    taken for a snapshot; a rename left by a crash is deleted by the next
    backup or prune.  Its pool files stay until `collect`.
    """
    destination = os.path.dirname(snapshot.path)
    removing = os.path.join(destination, REMOVING_PREFIX + snapshot.name)
    shutil.rmtree(removing, ignore_errors=True)
    os.rename(snapshot.path, removing)
    fsync_directory(destination)
    shutil.rmtree(removing)


def _finish_removals(destination: str) -> None:
    for name in os.listdir(destination):
        if name.startswith(REMOVING_PREFIX):
            shutil.rmtree(os.path.join(destination, name))


@dataclasses.dataclass
class CollectResult:
    """What `collect` removed from the pool."""

    snapshots: list = dataclasses.field(default_factory=list)
    files: int = 0
    bytes: int = 0


def collect(destination: str) -> CollectResult:
    """Remove the pool files of removed snapshots that no snapshot lists.

    A removed snapshot is a link in ``.manifests`` without its snapshot
    directory (or whose directory holds another plan).  Its files are
    candidates; every remaining manifest, complete or not, strikes those
    it lists; the rest are removed, then the links.  Safe to kill at any
    point: until its link goes, a removed snapshot is collected again,
    and a file a remaining manifest lists is never a candidate.  Call it
    with the destination's lock held.
    """
    destination = os.path.abspath(destination)
    result = CollectResult()
    directory = os.path.join(destination, MANIFESTS_NAME)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return result
    remaining = {}
    for snapshot in snapshots(destination):
        path = os.path.join(snapshot.path, MANIFEST_NAME)
        if os.path.exists(path):
            remaining[snapshot.name] = (path, snapshot.complete)
    removed = []
    for name in names:
        link = os.path.join(directory, name)
        if name.endswith(PARTIAL_SUFFIX):
            remove_if_exists(link)  # a link that was being made
            continue
        found = remaining.get(name[:-len(MANIFEST_SUFFIX)])
        if found is None or not _same_manifest(link, found[0]):
            removed.append(link)
    if not removed:
        return result
    doomed, partials = _unlisted(removed, remaining.values())
    kill = _Kill(COLLECT_KILL_VARIABLE)
    touched = set()
    for oid, tid in partials:
        remove_if_exists(pool_path(destination, oid, tid) + PARTIAL_SUFFIX)
    for oid, tid in doomed:
        path = pool_path(destination, oid, tid)
        try:
            size = os.stat(path).st_size
            os.remove(path)
        except FileNotFoundError:
            continue  # removed by a collection that was interrupted
        result.files += 1
        result.bytes += size
        touched.add(os.path.dirname(path))
        kill.after_one()
    # The removals durable before the links that list them go: a power
    # cut then leaves no file that nothing would collect.
    if SYNCFS_AVAILABLE:
        sync_filesystem(destination)
    else:
        for path in touched:
            fsync_directory(path)
    for link in removed:
        os.remove(link)
        result.snapshots.append(os.path.basename(link)[:-len(
            MANIFEST_SUFFIX)])
    fsync_directory(directory)
    if result.files:
        logger.debug('Removed %d blob files (%d bytes) from %s: no '
                     'remaining snapshot lists them', result.files,
                     result.bytes, os.path.join(destination, POOL_NAME))
    return result


def _unlisted(removed: list[str], remaining) -> tuple[list, list]:
    """``(oid, tid)`` of the files the `removed` manifests list and no
    `remaining` one does; and of those they list as in progress."""
    db = sqlite3.connect(':memory:', isolation_level=None)
    try:
        db.execute('CREATE TABLE candidate (oid BLOB, tid BLOB, '
                   'PRIMARY KEY (oid, tid)) WITHOUT ROWID')
        partials = []
        for path in removed:
            with _attached(db, _sqlite_uri(path, mode='ro', immutable=1),
                           path):
                db.execute('INSERT OR IGNORE INTO candidate '
                           'SELECT oid, tid FROM listed.blob')
                partials += db.execute(
                    'SELECT oid, tid FROM listed.blob WHERE state = ?',
                    (IN_PROGRESS,)).fetchall()
        for path, complete in remaining:
            # An unfinished manifest may have rows in its WAL: read it as
            # SQLite reads a live database.
            uri = _sqlite_uri(path, mode='ro', **(
                {'immutable': 1} if complete else {}))
            with _attached(db, uri, path):
                db.execute('DELETE FROM candidate WHERE EXISTS (SELECT 1 '
                           'FROM listed.blob b WHERE b.oid = candidate.oid '
                           'AND b.tid = candidate.tid)')
        doomed = db.execute('SELECT oid, tid FROM candidate').fetchall()
    finally:
        db.close()
    return doomed, partials


@contextlib.contextmanager
def _attached(db: sqlite3.Connection, uri: str, path: str):
    try:
        db.execute('ATTACH DATABASE ? AS listed', (uri,))
    except sqlite3.DatabaseError as e:
        raise BackupError(f'Cannot read snapshot manifest {path}: {e}; '
                          f'nothing was removed from the pool') from e
    try:
        yield
    except sqlite3.DatabaseError as e:
        raise BackupError(f'Cannot read snapshot manifest {path}: {e}; '
                          f'nothing was removed from the pool') from e
    finally:
        db.execute('DETACH DATABASE listed')


@dataclasses.dataclass
class PruneResult:
    """The snapshots `prune` removed, and the pool files it freed."""

    destination: str
    removed: list = dataclasses.field(default_factory=list)
    files: int = 0
    bytes: int = 0

    def lines(self) -> list[str]:
        result = [f'{self.destination}: removed snapshot {snapshot.name} '
                  f'({tid_time(snapshot.tid)})' for snapshot in self.removed]
        if self.removed or self.files:
            result.append(f'  freed {self.files} blob files ({self.bytes} '
                          f'bytes) that no remaining snapshot lists')
        return result


def prune(destination: str, keep: int) -> PruneResult:
    """Keep the newest `keep` complete snapshots of `destination`.

    Removes the older complete ones (an unfinished snapshot is left to the
    next backup, which finishes it), then the pool files that only they
    listed.  Killed at any point, it removes nothing a remaining snapshot
    needs, and the next backup or prune finishes it.
    """
    if keep < 1:
        raise BackupError(f'keep {keep} snapshots: at least 1 is needed')
    destination = os.path.abspath(destination)
    if not _read_destination(destination):
        raise BackupError(f'{destination} is not a backup destination: no '
                          f'snapshot to remove')
    result = PruneResult(destination)
    with _locked(destination):
        _finish_removals(destination)
        complete = [s for s in snapshots(destination) if s.complete]
        for snapshot in complete[:-keep]:
            _remove_snapshot(snapshot)
            result.removed.append(snapshot)
        collected = collect(destination)
    result.files, result.bytes = collected.files, collected.bytes
    return result


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


def _open_snapshot(snapshot: str, complete: bool = True
                   ) -> tuple[Manifest, dict]:
    """The manifest of `snapshot`, a snapshot of this format whose pool
    is there; unfinished ones too unless `complete`."""
    if os.path.exists(os.path.join(snapshot, DESTINATION_MARKER)):
        taken = [s for s in snapshots(snapshot) if s.complete]
        example = taken[-1].path if taken else os.path.join(snapshot,
                                                            '<tid>')
        raise BackupError(f'{snapshot} is a backup destination, not a '
                          f'snapshot: name one of its snapshots, such as '
                          f'{example}')
    has_manifest = os.path.exists(os.path.join(snapshot, MANIFEST_NAME))
    if complete and not os.path.exists(os.path.join(snapshot,
                                                    COMPLETE_NAME)):
        if has_manifest:
            raise BackupError(f'{snapshot} is unfinished (no {COMPLETE_NAME}'
                              f' marker): run the backup again to finish it')
        raise BackupError(f'{snapshot} is not a backup snapshot: no '
                          f'{COMPLETE_NAME} marker')
    if not has_manifest:
        raise BackupError(f'{snapshot} is not a backup snapshot: no '
                          f'{MANIFEST_NAME}')
    manifest = Manifest(snapshot, read_only=True)
    try:
        meta = manifest.meta()
        if meta.get('format') != FORMAT:
            raise BackupError(
                f'{snapshot} is a snapshot of backup format '
                f'{meta.get("format")}; this zodbblob reads format {FORMAT}')
        destination = os.path.dirname(snapshot)
        pool = os.path.join(destination, POOL_NAME)
        if not os.path.isdir(pool):
            raise BackupError(
                f'{snapshot}: its blob files are in {pool}, which does not '
                f'exist: a snapshot is read where it was taken, beside '
                f'the pool of its destination')
        _read_destination(destination)
    except BaseException:
        manifest.close()
        raise
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
    """Re-hash every file of `snapshot`, in it and in the pool, against
    its manifest."""
    snapshot = os.path.abspath(snapshot)
    manifest, meta = _open_snapshot(snapshot, complete=False)
    destination = os.path.dirname(snapshot)
    report = CheckReport(snapshot, bytes.fromhex(meta['tid']))
    problems = report.problems
    pool_tree = None
    try:
        if not os.path.exists(os.path.join(snapshot, COMPLETE_NAME)):
            problems.append(f'unfinished: {snapshot} has no {COMPLETE_NAME} '
                            f'marker; run the backup again to finish it')
        report.parts = len(_check_parts(snapshot, manifest, meta, problems))
        total = sum(manifest.counts().values())
        pool_tree = BlobTree(os.path.join(destination, POOL_NAME))
        for done, (oid, tid, size, sha256, state) in enumerate(
                manifest.blobs(), 1):
            if state == MISSING:
                problems.append(
                    f'missing: the blob file of oid {oid_repr(oid)} tid '
                    f'{oid_repr(tid)} was not in the source when the '
                    f'snapshot was taken')
            elif state == DONE:
                report.blob_files += 1
                path = pool_path(destination, oid, tid)
                try:
                    actual_size, actual = _hash_file(path, pool_tree)
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
    finally:
        manifest.close()
        if pool_tree is not None:
            pool_tree.close()
    return report


# restoring a snapshot

@dataclasses.dataclass
class RestoreResult:
    directory: str
    tid: bytes
    data_fs_size: int
    blob_files: int
    missing: int
    linked: int = 0

    def lines(self) -> list[str]:
        result = [f'{self.directory}: restored transaction {self.tid.hex()} '
                  f'({tid_time(self.tid)}): Data.fs {self.data_fs_size} '
                  f'bytes, {self.blob_files} blob files']
        if self.linked:
            copies = self.blob_files - self.linked
            result.append(f'  {self.linked} blob files are hard links to '
                          f'the backup\'s files, {copies} are copies')
        if self.missing:
            result.append(f'  {self.missing} blob files were missing from '
                          f'the source when the snapshot was taken; '
                          f'`zodbblob verify` reports them')
        return result


def _refuse_occupied(directory: str) -> None:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise BackupError(f'{directory} is not a directory')
    data_fs = os.path.join(directory, 'Data.fs')
    blob_dir = os.path.join(directory, 'blobs')
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
        try:
            lock = hold_blob_directory(blob_dir)
        except BlobDirectoryInUse as e:
            raise BackupError(f'{e}: restore into a directory no storage '
                              f'uses') from None
        except OSError:
            lock = None
        if lock is not None:
            lock.close()
        raise BackupError(f'{blob_dir} exists and is not empty: restore into '
                          f'a directory without a blob directory')


def restore(snapshot: str, directory: str, link: bool = False,
            layout: str | None = None,
            progress: Callable[[int, int], None] | None = None
            ) -> RestoreResult:
    """Make ``directory/Data.fs`` (with its index) and ``directory/blobs``.

    The blob directory gets `layout` (by default the source's), and
    copies of the pool's files; with `link`, hard links to them where
    the filesystem allows.  Refuses, changing nothing, when `directory`
    holds a Data.fs (or its index) or a non-empty ``blobs``, and when the
    snapshot is unfinished.  Every byte read is checked against the
    manifest; everything is written under hidden names and renamed into
    place at the end, so a failed or interrupted restore leaves nothing
    behind.  The blob directory gets zodbblob's catalog and Data.fs its
    ``Data.fs.index``, so the first open need scan neither.
    """
    snapshot = os.path.abspath(snapshot)
    directory = os.path.abspath(directory)
    manifest, meta = _open_snapshot(snapshot)
    try:
        try:
            chosen = get_layout(layout or meta['layout'])
        except ValueError as e:
            raise BackupError(str(e)) from None
        finished = _finish_interrupted_restore(directory, meta)
        if finished is not None:
            return finished
        _refuse_occupied(directory)
        created = not os.path.exists(directory)
        os.makedirs(directory, exist_ok=True)
        staged_data = os.path.join(directory, '.Data.fs.restoring')
        staged_blobs = os.path.join(directory, '.blobs.restoring')
        staged = [staged_data] + [staged_data + suffix for suffix in (
            '.index', '.lock', '.tmp', '.index.index_tmp')]
        for path in staged:
            remove_if_exists(path)
        shutil.rmtree(staged_blobs, ignore_errors=True)
        try:
            return _restore(snapshot, manifest, meta, chosen, link,
                            directory, staged_data, staged_blobs, progress)
        except BaseException:
            for path in staged:
                remove_if_exists(path)
            shutil.rmtree(staged_blobs, ignore_errors=True)
            if created:
                shutil.rmtree(directory, ignore_errors=True)
            raise
    finally:
        manifest.close()


def _write_index(data_fs: str) -> str:
    """Write ``Data.fs.index`` of `data_fs`, the way FileStorage does.

    FileStorage writes its index when it opens a file without one, and
    changes nothing else of a file that ends with a committed
    transaction, as a snapshot's does.  Returns the index's path.
    """
    ZODB.FileStorage.FileStorage(data_fs).close()
    for suffix in ('.lock', '.tmp'):
        remove_if_exists(data_fs + suffix)
    index = data_fs + '.index'
    if not os.path.exists(index):
        raise BackupError(f'FileStorage wrote no index {index}')
    fsync_path(index)
    return index


def _check_pooled(path: str, actual_size: int, actual: bytes, size: int,
                  sha256: bytes) -> None:
    if actual_size != size:
        raise BackupError(f'size mismatch: {path} is {actual_size} bytes, '
                          f'the manifest recorded {size}; nothing restored')
    if actual != sha256:
        raise BackupError(_mismatch(path, actual, sha256)
                          + '; nothing restored')


def _restore(snapshot, manifest, meta, layout, link, directory, staged_data,
             staged_blobs, progress) -> RestoreResult:
    tid = bytes.fromhex(meta['tid'])
    destination = os.path.dirname(snapshot)
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
    _write_index(staged_data)

    os.mkdir(staged_blobs)
    _write_marker(staged_blobs, LAYOUT_MARKER, layout.name)
    counts = manifest.counts()
    total = counts.get(DONE, 0)
    catalog = []
    linked = 0
    with BlobTree(os.path.join(destination, POOL_NAME)) as pool_tree:
        for oid, blob_tid, size, sha256, state in manifest.blobs(DONE):
            path = pool_path(destination, oid, blob_tid)
            target = os.path.join(staged_blobs,
                                  layout.getBlobFilePath(oid, blob_tid))
            placed = False
            if link:
                _check_pooled(path, *_hash_file(path, pool_tree), size, sha256)
                placed = files.link(path, target, pool_tree)
                if placed:
                    linked += 1
                else:
                    logger.warning('Cannot hard-link %s into %s: copying the '
                                   'blob files instead', path, directory)
                    link = False
            if not placed:
                fd = pool_tree.open(path)
                try:
                    info = os.fstat(fd)
                    actual_size, actual = files.copy(
                        fd, target, stat.S_IMODE(info.st_mode), 0, info.st_size)
                finally:
                    os.close(fd)
                _check_pooled(path, actual_size, actual, size, sha256)
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
    result = RestoreResult(directory, tid, meta['size'], len(catalog),
                           counts.get(MISSING, 0), linked)
    _write_marker(directory, RESTORING_NAME, json.dumps(
        dataclasses.asdict(result) | {'tid': tid.hex()}) + '\n')
    _rename_restored(directory, _Kill(RESTORE_KILL_VARIABLE))
    return result


def _rename_restored(directory: str, kill: _Kill | None = None) -> None:
    """Give the staged Data.fs, its index and blobs their names; done
    with the restore's marker last.  What is renamed already is skipped."""
    for staged, final in (('.blobs.restoring', 'blobs'),
                          ('.Data.fs.restoring.index', 'Data.fs.index'),
                          ('.Data.fs.restoring', 'Data.fs')):
        staged = os.path.join(directory, staged)
        if os.path.lexists(staged):
            os.replace(staged, os.path.join(directory, final))
            if kill is not None:
                kill.after_one()
    for name in ('blobs', 'Data.fs.index', 'Data.fs'):
        if not os.path.lexists(os.path.join(directory, name)):
            raise BackupError(
                f'{directory}: the interrupted restore lost its '
                f'{name} ({RESTORING_NAME} is left): remove what it '
                f'restored and restore again')
    fsync_directory(directory)
    os.remove(os.path.join(directory, RESTORING_NAME))
    fsync_directory(directory)


def _finish_interrupted_restore(directory: str, meta: dict
                                ) -> RestoreResult | None:
    """Finish the restore of this snapshot that `directory` holds,
    interrupted among its final renames; None when there is none.

    BackupError for an interrupted restore of another snapshot: its
    files are in place in part, and only that snapshot finishes them.
    """
    marker = os.path.join(directory, RESTORING_NAME)
    try:
        with open(marker) as f:
            recorded = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        raise BackupError(f'{marker}: cannot read the marker of an '
                          f'interrupted restore: {e}') from None
    if recorded.get('tid') != meta['tid']:
        raise BackupError(
            f'{directory} holds a restore of snapshot {recorded.get("tid")} '
            f'that was interrupted ({marker}): restore that snapshot again '
            f'to finish it')
    _rename_restored(directory)
    logger.warning('Finished the restore into %s that was interrupted '
                   'during its final renames', directory)
    return RestoreResult(
        directory, bytes.fromhex(recorded['tid']),
        recorded['data_fs_size'], recorded['blob_files'],
        recorded['missing'], recorded['linked'])


# the commands

def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number of '
                                         f'snapshots (1 or more)')
    return value


def add_backup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Take a snapshot of a FileStorage and its blob directory, '
        'consistent at its last committed transaction, into DEST/<tid>.  '
        'Reads the storage without locking it: safe while a server serves '
        'and commits.  Blob files are kept once per destination, in '
        'DEST/.blobs: a new snapshot copies only the files committed since '
        'the previous one.  An interrupted backup is resumed by running it '
        'again.  Exit status 0 when complete, 1 when blob files were '
        'missing from the source (or not regular files: never copied), 2 '
        'when it could not run, 130 when interrupted.')
    add_storage_arguments(parser)
    parser.add_argument('destination', metavar='DEST',
                        help='directory of the snapshots of this database, '
                             'created if missing')
    parser.add_argument('--full', action='store_true',
                        help='copy Data.fs whole, and read every blob file '
                             'DEST has again, copying from the source those '
                             'missing or damaged')
    parser.add_argument('--keep', metavar='N', type=_positive,
                        help='after the backup, remove all but the newest N '
                             'snapshots, and the blob files only they had')


def _interrupted_line(progress) -> str:
    # After a progress bar, start on a new line.
    return '\n' if progress.enabled and progress.shown >= 0 else ''


def backup_command(args: argparse.Namespace) -> int:
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
        return 2
    finally:
        if storage is not None:
            storage.close()
    for result in results:
        lines = result.lines()
        for line in lines if not args.quiet else lines[:1] + [
                line for line in lines if 'missing:' in line
                or 'not a file:' in line or 'not followed:' in line]:
            print(line)
    status = 1 if any(result.missing or result.not_files
                      for result in results) else 0
    if args.keep is not None:
        try:
            pruned = prune(args.destination, args.keep)
        except KeyboardInterrupt:
            print(f'{prog}: interrupted while removing old snapshots; run '
                  f'the same command again to finish', file=sys.stderr)
            return 130
        except (BackupError, OSError) as e:
            print(f'{prog}: error: {e}', file=sys.stderr)
            return 2
        for line in pruned.lines():
            print(line)
    return status


def add_restore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Restore a snapshot that `zodbblob backup` took, as cp copies: '
        'SNAPSHOT first, then where to.  Writes DEST_DIR/Data.fs, its '
        'index, and DEST_DIR/blobs, checking every byte against the '
        'manifest.  Refuses a DEST_DIR that has a Data.fs or a non-empty '
        'blobs directory.  With --check, first re-hash every file of '
        'SNAPSHOT and report mismatches (exit status 1); without DEST_DIR, '
        'only check.')
    parser.add_argument('snapshot', metavar='SNAPSHOT',
                        help='a snapshot directory, DEST/<tid>, as backup '
                             'named it')
    parser.add_argument('directory', metavar='DEST_DIR', nargs='?',
                        help='where to write Data.fs and blobs/')
    parser.add_argument('--check', action='store_true',
                        help='re-hash every file of the snapshot against '
                             'its manifest')
    parser.add_argument('--link', action='store_true',
                        help='hard-link the blob files to the backup\'s '
                             'where one filesystem holds both (fast, but '
                             'the restored files are the backup\'s: see '
                             'doc/backup.rst); copies by default')
    add_layout_argument(parser, "layout of the restored blob directory "
                                "(default: the source's)")
    parser.add_argument('--quiet', action='store_true',
                        help='no progress, only problems and the result')


def _looks_like_a_snapshot(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name))
               for name in (MANIFEST_NAME, COMPLETE_NAME))


def _refuse_not_a_snapshot(snapshot: str, directory: str | None) -> None:
    """BackupError when `snapshot` is no snapshot at all, before anything
    is opened or created; a hint when the arguments look swapped."""
    if os.path.isdir(snapshot):
        if (os.path.exists(os.path.join(snapshot, DESTINATION_MARKER))
                or os.path.exists(os.path.join(snapshot, MANIFEST_NAME))):
            return   # a destination, or a snapshot: _open_snapshot says
        problem = f'no {MANIFEST_NAME}'
    elif os.path.lexists(snapshot):
        problem = 'not a directory'
    else:
        problem = 'no such directory'
    hint = ''
    if directory is not None and _looks_like_a_snapshot(directory):
        hint = (f'; {directory} is one: the snapshot comes first, as in '
                f'restore SNAPSHOT DEST_DIR')
    raise BackupError(f'{snapshot} is not a backup snapshot: {problem}'
                      f'{hint}')


def restore_command(args: argparse.Namespace) -> int:
    prog = args.parser.prog
    if args.directory is None and not args.check:
        args.parser.error('name the directory to restore into: SNAPSHOT '
                          'DEST_DIR (or --check SNAPSHOT to only check it)')
    try:
        _refuse_not_a_snapshot(args.snapshot, args.directory)
        if args.check:
            report = check(args.snapshot,
                           progress=Progress('check', quiet=args.quiet))
            for line in report.lines():
                print(line)
            if not report.clean or args.directory is None:
                return 0 if report.clean else 1
        result = restore(args.snapshot, args.directory, link=args.link,
                         layout=args.layout,
                         progress=Progress('restore', quiet=args.quiet))
    except KeyboardInterrupt:
        newline = '\n' if sys.stderr.isatty() and not args.quiet else ''
        print(f'{newline}{prog}: interrupted; nothing was restored',
              file=sys.stderr)
        return 130
    except (BackupError, OSError) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    for line in result.lines():
        print(line)
    return 0
