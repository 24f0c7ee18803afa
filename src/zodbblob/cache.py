"""The ZEO client blob cache: files, their index, and one download per blob.

Files sit where stock ZEO puts them (layout ``zeocache``:
``<oid % 997>/<oid // 997>.<tid hex>.blob``), so a stock cache directory is
adopted as it is.  Beside them, an SQLite index (``.zodbblob-cache.sqlite``,
WAL mode) knows every file, so nothing after the first open walks the
directory:

``blobs``
    One row per ``(oid, tid)``: ``size``, ``accessed`` (time of the last
    access folded in from the log), ``state`` (``complete``;
    ``in-progress`` while a download runs, with the ``token`` of its owner
    and the time it ``started``).  Indexed by ``accessed`` for eviction
    (complete rows only) and by ``token`` (rows that have one).
``accesses``
    The access log: one row per batch of accesses, its ``(oid, tid,
    time)`` records packed in one ``batch`` value (`ACCESS_RECORD`).
    Appending a batch writes a page or two, wherever in the index its
    files' rows are.  A prune (and ``stats``, and a flush that finds the
    log long) folds it into ``blobs.accessed``, each file's row once, and
    empties it, in one write transaction.
``evicting``
    The rows of the files a pruner is removing, moved here from ``blobs``
    with the pruner's ``token``, and dropped when it is done.
``unsynced``
    The files put in place whose bytes a thread has not yet written to
    disk (``fdatasync``), with the ``token`` of the process and the
    ``boot`` of the machine that wrote them: a reader does not wait for
    the disk, and a cache opened after the machine restarted removes
    those files (a power loss may have left them with their size but not
    their bytes).
``cache``
    One row: ``files`` and ``bytes`` of the complete rows (kept by triggers
    when a row becomes complete, and by whoever deletes complete rows),
    ``hits`` and ``misses``, the number of accesses ``logged``, and the
    prune lease (``pruner``, ``pruned_at``).

Every change of a file under its final name happens inside a write
transaction of the index (``BEGIN IMMEDIATE``, the index's one writer
lock), in the same transaction that changes its row; the one exception is
the removal of a file whose row is in ``evicting``, which belongs to the
pruner that moved it there.  Whoever decides on a file by its row, decides
under that lock and looks at the file again there; no download or
admission puts a file under a name in ``evicting`` until its pruner has
dropped that row (or ended).

A download is claimed by inserting an in-progress row with a fresh token
(``<host>-<pid>-<incarnation>-<thread>-<nonce>``), fetched into
``.tmp/<token>``, and completed by renaming that file to its final name.
Threads of one process wait for each other on an event per ``(oid, tid)``;
processes poll the row.  A row whose owner process ended, or whose token is
older than the download timeout, is taken over with a fresh file.

A hit costs one ``os.stat`` (compared with the size the index gave for
that revision, remembered for the most recently used files and preloaded
when the cache opens) and an entry in an in-memory batch of accesses,
appended to the log in one transaction per ~1024 entries or ~2 s; none
if this process recorded an access of that file within the resolution of
access times (1% of the cache's age, at most a minute).  Eviction folds
the log, moves the oldest complete rows to ``evicting`` (what was used in
the last `grace` seconds plus that resolution, which covers the batches
other processes hold and the hits not recorded, last, and only if the
older files are not enough: the size is a bound), removes their files
with a few threads outside the writer lock (more if removing a file
waits for the disk), then drops those rows.  The size is checked after
each download and admission, and, in a thread, on a hit while the total
last read is over and when a cache opens over its size.

A claim's temporary file exists before its row: a claim without it was
given up (its install failed, and the index could not record the
cancel), and the next reader takes it over at once.  An index found
damaged (at open by ``quick_check``, or by an error in use) is moved
aside and rebuilt from a scan, once: the others see its new inode.

The processes sharing a directory must run on one host: WAL mode needs
shared memory, and a claim's owner is judged alive by its pid.  POSIX only
(``flock``, ``kill(pid, 0)``).  Open a cache after forking, not before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import queue
import re
import secrets
import shutil
import socket
import sqlite3
import stat
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import zope.interface

from zodbblob.interfaces import IBlobCache
from zodbblob.layout import (BLOB_SUFFIX, LAYOUT_MARKER, fsync_path,
                             process_alive, read_marker, remove_if_exists)

logger = logging.getLogger(__name__)

LAYOUT = 'zeocache'
BUCKETS = 997
INDEX = '.zodbblob-cache.sqlite'
OPEN_LOCK = '.zodbblob-cache.lock'
TEMPORARY = '.tmp'
SCHEMA_VERSION = 3

# The errors of SQLite that say the machine (a lock held, a full disk, a
# read-only file), not the index, is at fault.
TRANSIENT = ('SQLITE_BUSY', 'SQLITE_LOCKED', 'SQLITE_FULL', 'SQLITE_READONLY',
             'SQLITE_CANTOPEN', 'SQLITE_PERM', 'SQLITE_NOMEM', 'SQLITE_IOERR',
             'SQLITE_INTERRUPT', 'SQLITE_AUTH')
TRANSIENT_MESSAGES = ('database is locked', 'database table is locked',
                      'database or disk is full',
                      'attempt to write a readonly database',
                      'unable to open database file', 'disk I/O error',
                      'out of memory', 'interrupted', 'not authorized')

COMPLETE = 'complete'
IN_PROGRESS = 'in-progress'

ACCESS_BATCH = 1024          # accesses appended to the log at once ...
ACCESS_BATCH_AGE = 2.0       # ... or when the oldest is this many s old
ACCESS_LOG_LIMIT = 262144    # a flush that leaves more rows folds the log
POLL_FIRST = 0.01            # waiting for another process's download
POLL_LAST = 0.2
PRUNE_CHUNK = 1024           # files a prune marks first, then twice as
PRUNE_CHUNK_MAX = 32768      # ... many at a time, up to this many
REMOVAL_BATCH = 64           # files per task of the threads removing them:
REMOVAL_THREADS = 2          # ... so many where removing a file only works,
PRUNE_THREADS = 8            # ... so many where it waits for the disk
PRUNE_LEASE = 60.0           # a pruner silent this long has lost its lease
BACKGROUND_CHECK = 1.0       # s at least between two checks in a thread
BUSY_TIMEOUT = 60.0
KNOWN_SIZES = 131072         # sizes remembered for the one-stat hit path
# Access times are kept to within this fraction of the cache's age (the
# time since its least recently used file was used), at most
# ACCESS_RESOLUTION_MAX seconds: a hit that comes sooner after the access
# this process last recorded for that file records nothing.
ACCESS_RESOLUTION = 0.01
ACCESS_RESOLUTION_MAX = 60.0
SYNC_IDLE = 1.0             # the syncing thread ends after so long idle
BUILD_CACHE_KIB = 262144     # SQLite's page cache while building the index
FOLD_CACHE_KIB = 65536       # ... and while folding the access log

# Files that stock ZEO leaves in a bucket when a process dies: a partial
# download (``.dl``) and the temporary files of ``storeBlob``.  Their owner
# is unknown, so only their age says that it is gone.
STOCK_TEMPORARY = ('.dl', '.tmp', '.tmp-', '.blob-')

_CACHE_FILE = re.compile(r'(0|[1-9][0-9]*)\.([0-9a-f]{16})\.blob\Z')

# Tells this process from an earlier one that had the same pid (a restarted
# container): a token of this pid and another incarnation is a dead one.
_INCARNATION = secrets.token_hex(4)


def _boot_id() -> str:
    """This boot of the machine: a file written since is in the page
    cache or on disk.  Where the kernel does not say, a value no later
    process has, so that every file not synced counts as lost."""
    try:
        with open('/proc/sys/kernel/random/boot_id') as f:
            return f.read().strip()
    except OSError:
        return f'unknown-{_INCARNATION}'


_BOOT = _boot_id()

TABLES = (
    """CREATE TABLE blobs (
        oid BLOB NOT NULL,
        tid BLOB NOT NULL,
        size INTEGER NOT NULL,
        accessed REAL NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('complete', 'in-progress')),
        token TEXT,
        started REAL,
        PRIMARY KEY (oid, tid)) WITHOUT ROWID""",
    'CREATE TABLE accesses (batch BLOB NOT NULL)',
    """CREATE TABLE evicting (
        oid BLOB NOT NULL,
        tid BLOB NOT NULL,
        size INTEGER NOT NULL,
        accessed REAL NOT NULL,
        token TEXT NOT NULL,
        PRIMARY KEY (oid, tid)) WITHOUT ROWID""",
    """CREATE TABLE unsynced (
        oid BLOB NOT NULL,
        tid BLOB NOT NULL,
        token TEXT NOT NULL,
        boot TEXT NOT NULL,
        PRIMARY KEY (oid, tid)) WITHOUT ROWID""",
    """CREATE TABLE cache (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL,
        files INTEGER NOT NULL DEFAULT 0,
        bytes INTEGER NOT NULL DEFAULT 0,
        hits INTEGER NOT NULL DEFAULT 0,
        misses INTEGER NOT NULL DEFAULT 0,
        logged INTEGER NOT NULL DEFAULT 0,
        pruner TEXT,
        pruned_at REAL)""",
)

# A record of the access log: oid, tid (ZODB's 8-byte strings) and the
# time of the access.
ACCESS_RECORD = struct.Struct('>8s8sd')

# Created once the rows of a build are in: the indexes are then sorted in
# one pass, and the totals are counted once instead of per row.  A row that
# becomes complete counts itself in; whoever deletes complete rows counts
# them out in the same transaction (`_count_out`: `_forget`, a prune, a
# file lost to a restart), as a trigger per row costs as much as the delete.
DERIVED = (
    """CREATE INDEX blobs_by_access ON blobs (accessed, oid, tid)
        WHERE state = 'complete'""",
    """CREATE INDEX blobs_by_token ON blobs (token)
        WHERE token IS NOT NULL""",
    """CREATE TRIGGER blobs_insert AFTER INSERT ON blobs
        WHEN new.state = 'complete' BEGIN
            UPDATE cache SET files = files + 1, bytes = bytes + new.size;
        END""",
    """CREATE TRIGGER blobs_update AFTER UPDATE OF state, size ON blobs
        BEGIN
            UPDATE cache SET
                files = files + (new.state = 'complete')
                              - (old.state = 'complete'),
                bytes = bytes
                    + CASE WHEN new.state = 'complete' THEN new.size ELSE 0 END
                    - CASE WHEN old.state = 'complete' THEN old.size ELSE 0 END;
        END""",
)

# An index of an older schema version is brought to this one in one write
# transaction, keeping its files, access times and counts.
MIGRATIONS = {
    1: (
        'DROP TRIGGER blobs_insert',
        'DROP TRIGGER blobs_delete',
        'DROP TRIGGER blobs_update',
        'DROP INDEX blobs_by_access',
        'DROP INDEX blobs_in_progress',
        'ALTER TABLE blobs RENAME TO blobs_1',
        *TABLES[:4],
        'ALTER TABLE cache ADD COLUMN logged INTEGER NOT NULL DEFAULT 0',
        """INSERT INTO blobs (oid, tid, size, accessed, state)
            SELECT oid, tid, size, accessed, state FROM blobs_1
            WHERE state = 'complete'""",
        'DROP TABLE blobs_1',
        """UPDATE cache SET
            files = (SELECT count(*) FROM blobs),
            bytes = (SELECT coalesce(sum(size), 0) FROM blobs),
            pruner = NULL""",
        *DERIVED,
    ),
    # Version 2 marked the rows of the files being evicted in place
    # (state 'evicting', still allowed by its table's check); they move to
    # their own table, uncounted as they were.
    2: (
        'DROP TRIGGER blobs_delete',
        TABLES[2],
        TABLES[3],
        """INSERT INTO evicting (oid, tid, size, accessed, token)
            SELECT oid, tid, size, accessed, token FROM blobs
            WHERE state = 'evicting'""",
        "DELETE FROM blobs WHERE state = 'evicting'",
    ),
}

def _size_of(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _evict_file(path: str) -> OSError | None:
    """Remove the file `path`; the error that kept it, if one did."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        return e
    return None


def _sync_file(path: str) -> None:
    """Write the file `path` to disk, if it is still there."""
    with contextlib.suppress(FileNotFoundError):
        fsync_path(path, data_only=True)


def _committed_mode(path: str, directory: str) -> int:
    """The mode of a committed file `path` in `directory`, as stock ZODB
    and ZEO give it (``ZODB.blob.set_not_writable``): not writable, and
    readable as `directory` is (0444 under 0755)."""
    readable = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
    writable = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    return ((stat.S_IMODE(os.lstat(path).st_mode) & ~writable)
            | (stat.S_IMODE(os.lstat(directory).st_mode) & readable))


def _damaged(error: sqlite3.Error) -> bool:
    """Whether `error` says the index file is damaged (not busy, full or
    unwritable, which pass)."""
    name = getattr(error, 'sqlite_errorname', None)
    if name is not None:
        return name.startswith(('SQLITE_CORRUPT', 'SQLITE_NOTADB'))
    return type(error) is sqlite3.DatabaseError


def _recovering(method):
    """Run `method`; if the index turns out damaged, move it aside,
    rebuild it from the directory and run `method` again."""
    @functools.wraps(method)
    def recovering(self, *args, **kw):
        try:
            return method(self, *args, **kw)
        except sqlite3.DatabaseError as e:
            if not _damaged(e):
                raise
            self._recover_index(e)
        return method(self, *args, **kw)
    return recovering


def removal_threads(wall: float, cpu: float) -> int:
    """How many threads remove a prune's files, after its first batch
    took `wall` seconds, `cpu` of them on this thread's CPU: more if
    removing waited for the disk (see `BlobCache._start_removals`)."""
    return PRUNE_THREADS if wall > 2 * cpu else REMOVAL_THREADS


def _count_out(db, files: int, size: int) -> None:
    """Take `files` complete files of `size` bytes in all out of the
    totals (the deletes of complete rows do; a trigger per row would cost
    as much as the delete)."""
    db.execute('UPDATE cache SET files = files - ?, bytes = bytes - ?',
               (files, size))


def _parse_token(token: str) -> tuple[str, int, str] | None:
    """``(host, pid, incarnation)`` of a token; None for another name."""
    parts = token.rsplit('-', 4)
    if len(parts) != 5 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


def _index_version(db: sqlite3.Connection) -> int | None:
    """The schema version of the index `db`; None if it has no tables.

    Raises DatabaseError for tables without a readable ``cache`` row: a
    damaged page can read back as NULLs, which is no version at all."""
    if not db.execute("SELECT count(*) FROM sqlite_master "
                      "WHERE type = 'table'").fetchone()[0]:
        return None
    row = db.execute('SELECT version, files, bytes FROM cache').fetchone()
    if row is None:
        raise sqlite3.DatabaseError('no row in table cache')
    if not all(type(value) is int for value in row):
        raise sqlite3.DatabaseError(
            f'the row of table cache reads (version, files, bytes) = {row!r}'
            f', expected integers')
    return row[0]


def _transient(error: sqlite3.Error) -> bool:
    """Whether `error` is the machine's, not the index file's (busy, full,
    unwritable): moving the index aside would not help."""
    name = getattr(error, 'sqlite_errorname', None)
    if name is not None:
        return name.startswith(TRANSIENT)
    # Python 3.10 gives only SQLite's message.
    return str(error).startswith(TRANSIENT_MESSAGES)


@zope.interface.implementer(IBlobCache)
class BlobCache:
    """A blob cache directory shared by the threads and processes of a host.

    `grace` is how many seconds a file is safe from eviction after it was
    accessed or admitted: it covers the readers in other processes whose
    accesses are still in their batch.
    """

    def __init__(self, directory: str, size_limit: int | None = None,
                 check_percent: float = 10,
                 download_timeout: float = 300.0, grace: float = 10.0):
        self.directory = os.path.abspath(directory)
        self.size_limit = size_limit
        self.check_percent = check_percent
        self.download_timeout = download_timeout
        self.grace = grace
        self._temporary = os.path.join(self.directory, TEMPORARY)
        self._buckets = [os.path.join(self.directory, str(bucket), '')
                         for bucket in range(BUCKETS)]
        self._host = re.sub(r'[^A-Za-z0-9.]', '_', socket.gethostname())
        # _lock guards the in-memory state below; _db_lock the connection.
        # Neither is held while taking the other.
        self._lock = threading.Lock()
        self._db_lock = threading.RLock()
        self._accesses: dict[tuple[bytes, bytes], float] = {}
        self._hits = self._misses = 0
        self._batch_started: float | None = None
        self._downloads: dict[tuple[bytes, bytes], threading.Event] = {}
        # oid + tid -> [size, time of the access recorded last], least
        # recently used first.
        self._known_sizes: OrderedDict[bytes, list] = OrderedDict()
        self._resolution = 0.0
        self._warned_pinned = False
        # One prune of this process at a time, the others wait for it:
        # each then checks the total it left (the lease only keeps other
        # processes out).
        self._pruning = threading.Lock()
        # Bytes of the complete files as last read from the index: a hit
        # while it is over the size starts a prune in the background.
        self._total = 0
        self._reading: tuple[bytes, bytes] | None = None
        self._db = None
        self._index_ino = None
        self._closing = threading.Event()
        self._checkpointing: threading.Thread | None = None
        self._to_sync: queue.SimpleQueue = queue.SimpleQueue()
        self._syncing: threading.Thread | None = None
        self._background_prune: threading.Thread | None = None
        self._background_started = float('-inf')
        created = self._check_layout()
        # zodbblob leaves its open lock in every directory it opened.
        adopted = not os.path.exists(os.path.join(self.directory, OPEN_LOCK))
        os.makedirs(self._temporary, exist_ok=True)
        with self._open_lock():
            self._open_index(created, adopted)
            self._remove_dead_claims()
        with self._db_lock:
            self._resolution = self._resolution_in(self._db, time.time())
            self._total, = self._db.execute(
                'SELECT bytes FROM cache').fetchone()
        self._preloading = threading.Thread(
            target=self._preload_known_sizes, daemon=True,
            name=f'zodbblob-cache-preload {self.directory}')
        self._preloading.start()
        # A cache left over its size (a smaller size now, another client's
        # downloads) is brought down without waiting for a download.
        if self._over(self._total):
            self._prune_if_over_soon()

    def __repr__(self):
        return f'<BlobCache {self.directory}>'

    # paths

    def path(self, oid: bytes, tid: bytes) -> str:
        base, bucket = divmod(int.from_bytes(oid, 'big'), BUCKETS)
        return f'{self._buckets[bucket]}{base}.{tid.hex()}{BLOB_SUFFIX}'

    def _temporary_path(self, token: str) -> str:
        return os.path.join(self._temporary, token)

    # reading

    @_recovering
    def lookup(self, oid: bytes, tid: bytes,
               counted: bool = True) -> str | None:
        return self._lookup(oid, tid, counted)

    def _lookup(self, oid, tid, counted):
        path = self.path(oid, tid)
        try:
            size = os.stat(path).st_size
        except (FileNotFoundError, NotADirectoryError):
            size = None
        # The size of a revision never changes, so a size remembered from
        # the index vouches for the file without asking the index again.
        key = oid + tid
        with self._lock:
            known = self._known_sizes.get(key)
            if known is not None:
                self._known_sizes.move_to_end(key)
        if size is None or known is None or size != known[0]:
            known = self._check_indexed(oid, tid, path, size)
            if known is None:
                self._count(None, counted)
                return None
        self._count((oid, tid), counted, known)
        return path

    def _check_indexed(self, oid, tid, path, size) -> list | None:
        """The remembered ``[size, accessed]`` of an indexed file whose
        size is `size`; None if there is no such file."""
        with self._db_lock:
            row = self._db.execute(
                'SELECT size, accessed FROM blobs WHERE oid = ? AND tid = ? '
                'AND state = ?', (oid, tid, COMPLETE)).fetchone()
        if row is None:
            return None
        if size == row[0]:
            return self._remember_size(oid, tid, size, row[1])
        if self._forget(oid, tid, path):
            return self._remember_size(oid, tid, size, 0.0)
        return None

    def _forget(self, oid, tid, path) -> bool:
        """Drop the row of a file removed or changed by hand.

        True if, looked at again under the index's lock, the file is fine
        after all (a download completed it meanwhile).
        """
        with self._writing() as db:
            row = db.execute(
                'SELECT size FROM blobs WHERE oid = ? AND tid = ? '
                'AND state = ?', (oid, tid, COMPLETE)).fetchone()
            if row is None:
                return False
            size = _size_of(path)
            if size == row[0]:
                return True
            db.execute('DELETE FROM blobs WHERE oid = ? AND tid = ?',
                       (oid, tid))
            _count_out(db, 1, row[0])
            if size is not None:
                remove_if_exists(path)
        with self._lock:
            self._known_sizes.pop(oid + tid, None)
        if size is None:
            logger.debug('Blob cache file %s was removed: forgotten', path)
        else:
            logger.warning('Blob cache file %s has %d bytes, not the %d '
                           'indexed: removed', path, size, row[0])
        return False

    def _remember_size(self, oid, tid, size, accessed) -> list:
        known = [size, accessed]
        with self._lock:
            self._known_sizes[oid + tid] = known
            self._known_sizes.move_to_end(oid + tid)
            if len(self._known_sizes) > KNOWN_SIZES:
                # The least recently used: forgetting it costs one index
                # read on its next hit, keeping every size memory per file
                # ever read (about 200 bytes each).
                self._known_sizes.popitem(last=False)
        return known

    def _preload_known_sizes(self) -> None:
        """Remember the sizes of the most recently used files, read from
        the index in one query (about 3 us a file) instead of one query
        per file at its first hit (about 20 us); in a thread of its own,
        with a connection of its own, so that opening does not wait."""
        try:
            db = self._connect(os.path.join(self.directory, INDEX))
            try:
                rows = db.execute(
                    'SELECT oid, tid, size, accessed FROM blobs '
                    'WHERE state = ? ORDER BY accessed DESC LIMIT ?',
                    (COMPLETE, KNOWN_SIZES)).fetchall()
            finally:
                db.close()
        except sqlite3.Error as e:
            logger.debug('Blob cache %s: sizes not preloaded: %s',
                         self.directory, e)
            return
        # Most recently used first, each put in front of the ones before:
        # behind whatever a hit remembered meanwhile, oldest at the front.
        for start in range(0, len(rows), 4096):
            if self._closing.is_set():
                return
            with self._lock:
                known = self._known_sizes
                for oid, tid, size, accessed in rows[start:start + 4096]:
                    if len(known) >= KNOWN_SIZES:
                        return
                    key = oid + tid
                    if key not in known:
                        known[key] = [size, accessed]
                        known.move_to_end(key, last=False)

    def _count(self, key, counted, known=None):
        """Batch an access of `key` (None: a miss) and the hit counts.

        `known` is the file's remembered ``[size, accessed]``: an access
        within the resolution of the one recorded last is not recorded.
        """
        now = time.time()
        with self._lock:
            if key is not None:
                self._reading = key
                if known is None or now - known[1] >= self._resolution:
                    self._accesses[key] = now
                    if known is not None:
                        known[1] = now
                self._hits += counted
            else:
                self._misses += counted
            if self._batch_started is None:
                self._batch_started = now
            due = (len(self._accesses) >= ACCESS_BATCH
                   or now - self._batch_started >= ACCESS_BATCH_AGE)
        if key is not None and self._over(self._total):
            self._prune_if_over_soon()
        if due:
            try:
                self.flush()
            except sqlite3.OperationalError as e:
                # A busy index must not fail a read; the batch is kept.
                logger.warning('Blob cache %s: accesses not recorded yet: '
                               '%s', self.directory, e)

    @_recovering
    def flush(self) -> None:
        total = self._flush()
        # The downloads of other processes are seen here.
        if self._over(total):
            self._prune_if_over_soon()

    def _flush(self) -> int | None:
        """Write the batch of accesses; the total bytes then (None if
        there was nothing to write)."""
        with self._lock:
            accesses, hits, misses = self._accesses, self._hits, self._misses
            self._accesses, self._hits, self._misses = {}, 0, 0
            self._batch_started = None
        if not (accesses or hits or misses):
            return None
        try:
            with self._writing() as db:
                # Appended, not updated in place: the rows of a batch are
                # spread over the whole index, the log's end is one page.
                if accesses:
                    db.execute(
                        'INSERT INTO accesses (batch) VALUES (?)',
                        (b''.join([ACCESS_RECORD.pack(oid, tid, when)
                                   for (oid, tid), when in accesses.items()
                                   ]),))
                db.execute('UPDATE cache SET hits = hits + ?, '
                           'misses = misses + ?, logged = logged + ?',
                           (hits, misses, len(accesses)))
                logged, total = db.execute(
                    'SELECT logged, bytes FROM cache').fetchone()
                if logged > ACCESS_LOG_LIMIT:
                    self._fold(db)
                resolution = self._resolution_in(db, time.time())
        except BaseException:
            with self._lock:
                for key, when in accesses.items():
                    if self._accesses.get(key, 0) < when:
                        self._accesses[key] = when
                self._hits += hits
                self._misses += misses
                if self._batch_started is None:
                    self._batch_started = time.time()
            raise
        with self._lock:
            self._resolution = resolution
        self._total = total
        return total

    @staticmethod
    def _resolution_in(db, now: float) -> float:
        """The resolution of access times for the cache in `db`, now."""
        oldest, = db.execute('SELECT min(accessed) FROM blobs WHERE state = ?',
                             (COMPLETE,)).fetchone()
        if oldest is None:
            return 0.0
        return min(max(now - oldest, 0.0) * ACCESS_RESOLUTION,
                   ACCESS_RESOLUTION_MAX)

    def _fold(self, db) -> None:
        """Fold the access log into ``blobs.accessed``, inside `db`'s
        write transaction."""
        size = ACCESS_RECORD.size
        records = sorted(
            batch[start:start + size]
            for batch, in db.execute('SELECT batch FROM accesses')
            for start in range(0, len(batch), size))
        if not records:
            return
        # Sorted as bytes, records are in (oid, tid, time) order (a
        # positive big-endian double sorts as its value): a file's last
        # record is its latest access, and the rows come in their order.
        latest = {record[:16]: record for record in records}
        # The rows of the log's files are spread over the whole index: a
        # page cache that holds it reads and writes each page once.
        with self._page_cache(FOLD_CACHE_KIB):
            db.executemany(
                'UPDATE blobs SET accessed = ? WHERE oid = ? AND tid = ? '
                'AND state = ? AND accessed < ?',
                [(at, oid, tid, COMPLETE, at) for oid, tid, at
                 in map(ACCESS_RECORD.unpack, latest.values())])
        db.execute('DELETE FROM accesses')
        db.execute('UPDATE cache SET logged = 0')

    @contextlib.contextmanager
    def _page_cache(self, kib: int) -> Iterator[None]:
        """SQLite's page cache at `kib` KiB (for a long write), then back
        to its size before, which frees the pages beyond that."""
        with self._db_lock:
            previous, = self._db.execute('PRAGMA cache_size').fetchone()
            self._db.execute(f'PRAGMA cache_size = -{kib}')
            try:
                yield
            finally:
                self._db.execute(f'PRAGMA cache_size = {previous}')

    @contextlib.contextmanager
    def _checkpoint_after(self) -> Iterator[None]:
        """No checkpoint of the write-ahead log at each commit (for a
        series of large writes, which would each copy their pages into the
        index and sync it), and one after them, in a thread of its own
        with a connection of its own: the writes are committed, and
        whoever waits for them need not wait for the copy as well."""
        with self._db_lock:
            previous, = self._db.execute(
                'PRAGMA wal_autocheckpoint').fetchone()
            self._db.execute('PRAGMA wal_autocheckpoint = 0')
        try:
            yield
        finally:
            with self._db_lock:
                self._db.execute(f'PRAGMA wal_autocheckpoint = {previous}')
            with self._lock:
                if not self._closing.is_set() and (
                        self._checkpointing is None
                        or not self._checkpointing.is_alive()):
                    self._checkpointing = threading.Thread(
                        target=self._checkpoint, daemon=True,
                        name=f'zodbblob-cache-checkpoint {self.directory}')
                    self._checkpointing.start()

    def _checkpoint(self) -> None:
        """Copy the write-ahead log into the index, as far as no reader
        needs it (a passive checkpoint: writers go on meanwhile)."""
        try:
            db = self._connect(os.path.join(self.directory, INDEX))
            try:
                db.execute('PRAGMA wal_checkpoint(PASSIVE)').fetchone()
            finally:
                db.close()
        except sqlite3.Error as e:
            # The next commit past the log's limit checkpoints instead.
            logger.debug('Blob cache %s: not checkpointed: %s',
                         self.directory, e)

    # downloading

    @_recovering
    def load(self, oid: bytes, tid: bytes,
             fetch: Callable[[str], object], counted: bool = True) -> str:
        path = self._lookup(oid, tid, counted)
        if path is not None:
            return path
        key = (oid, tid)
        while True:
            with self._lock:
                downloading = self._downloads.get(key)
                if downloading is None:
                    downloading = self._downloads[key] = threading.Event()
                    break
            # Another thread of this process has it: wait, then look again
            # (and claim it ourselves if that download failed).
            downloading.wait()
            path = self._lookup(oid, tid, counted=False)
            if path is not None:
                return path
        try:
            path, total = self._download(oid, tid, fetch)
        finally:
            with self._lock:
                del self._downloads[key]
            downloading.set()
        self._prune_if_over(total, keep=key)
        return path

    def _download(self, oid, tid, fetch):
        """``(path, total bytes or None)``, after one download at most."""
        delay = POLL_FIRST
        while True:
            with self._db_lock:
                row = self._db.execute(
                    'SELECT state, token, started FROM blobs '
                    'WHERE oid = ? AND tid = ?', (oid, tid)).fetchone()
            if row is not None and row[0] == COMPLETE:
                path = self._lookup(oid, tid, counted=False)
                if path is not None:
                    return path, None
                continue  # forgotten: missing now
            if row is not None and self._owner_alive(*row[1:]):
                # Another download of this file is under way.
                time.sleep(delay)
                delay = min(delay * 2, POLL_LAST)
                continue
            token = self._claim(oid, tid, row and row[1])
            if token is not None:
                return self._fetch(oid, tid, token, fetch)

    def _claim(self, oid, tid, previous: str | None) -> str | None:
        """A fresh token owning the download of ``(oid, tid)``, or None.

        `previous` is the token of a claim seen dead or too old, None if
        there was no row.  None is returned when another caller got there
        first.
        """
        token = self._new_token()
        # The claim's file exists before its row and goes before the row
        # is dropped: a claim without its file was given up (an install
        # that failed, a cancel the index could not record), and anyone
        # may take it over at once.
        temporary = self._temporary_path(token)
        open(temporary, 'xb').close()
        now = time.time()
        try:
            with self._writing() as db:
                claimed = self._claim_row(db, oid, tid, previous, token, now)
        except BaseException:
            remove_if_exists(temporary)
            raise
        if not claimed:
            remove_if_exists(temporary)
            return None
        if previous is not None:
            dead = self._owner_dead(previous)
            if dead:
                # Never appended to: its partial file goes, ours is fresh.
                remove_if_exists(self._temporary_path(previous))
            logger.warning(
                'Blob cache file %s: taking over its download from %s, '
                'which %s', self.path(oid, tid), previous,
                'ended' if dead else
                'gave it up' if not os.path.exists(
                    self._temporary_path(previous)) else
                f'has not finished in {self.download_timeout:g} s')
        return token

    @staticmethod
    def _claim_row(db, oid, tid, previous, token, now) -> bool:
        """Write the claim of `token` (see `_claim`); whether it holds."""
        if previous is None:
            return bool(db.execute(
                'INSERT OR IGNORE INTO blobs '
                '(oid, tid, size, accessed, state, token, started) '
                'VALUES (?, ?, 0, ?, ?, ?, ?)',
                (oid, tid, now, IN_PROGRESS, token, now)).rowcount)
        return bool(db.execute(
            'UPDATE blobs SET token = ?, started = ? '
            'WHERE oid = ? AND tid = ? AND state = ? AND token = ?',
            (token, now, oid, tid, IN_PROGRESS, previous)).rowcount)

    def _fetch(self, oid, tid, token, fetch):
        temporary = self._temporary_path(token)
        try:
            fetch(temporary)
            return self._complete(oid, tid, temporary)
        except BaseException:
            self._cancel(oid, tid, token, temporary)
            raise

    def _complete(self, oid, tid, temporary):
        """Give `temporary` its final name; ``(path, total bytes)``.

        The claim is not checked: the bytes of a revision are the same
        whoever fetched them, so the first complete file wins even if its
        claim was taken over, and the row says complete exactly when the
        file is there.  A later finisher finds it and drops its own file.
        """
        size = os.stat(temporary).st_size
        path = self.path(oid, tid)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.chmod(temporary, _committed_mode(temporary, os.path.dirname(path)))
        delay = POLL_FIRST
        placed = []
        try:
            while True:
                installed = self._install_unless_evicting(
                    oid, tid, temporary, path, size, placed)
                if installed is not None:
                    break
                # Its pruner removes the file under this name, then drops
                # the row: a file put there before would be removed with it.
                time.sleep(delay)
                delay = min(delay * 2, POLL_LAST)
        except BaseException as e:
            # A file the index does not know would never be evicted (its
            # row was not committed: a full disk); but a damaged index is
            # rebuilt from the files there.
            if placed and not (isinstance(e, sqlite3.DatabaseError)
                               and _damaged(e)):
                remove_if_exists(path)
            raise
        size, unsynced, total = installed
        self._total = total
        self._reading = (oid, tid)
        if unsynced is not None:
            self._sync_later(oid, tid, unsynced)
        self._remember_size(oid, tid, size, time.time())
        return path, total

    def _install_unless_evicting(self, oid, tid, temporary, path, size,
                                 placed) -> tuple | None:
        """`_install` in a write transaction, unless a live pruner is
        removing the file of that name: ``(size, unsynced token, total
        bytes)``, or None."""
        with self._writing() as db:
            evicting = db.execute(
                'SELECT token FROM evicting WHERE oid = ? AND tid = ?',
                (oid, tid)).fetchone()
            if evicting is not None and self._owner_dead(evicting[0]):
                # Whatever its pruner left under this name is replaced.
                db.execute('DELETE FROM evicting WHERE oid = ? '
                           'AND tid = ?', (oid, tid))
                logger.warning('Blob cache file %s: replacing it; its '
                               'pruner %s ended before removing it',
                               path, evicting[0])
                evicting = None
            if evicting is not None:
                return None
            row = db.execute(
                'SELECT state, size FROM blobs '
                'WHERE oid = ? AND tid = ?', (oid, tid)).fetchone()
            size, unsynced = self._install(
                db, oid, tid, temporary, path, size, row, placed)
            total, = db.execute('SELECT bytes FROM cache').fetchone()
        return size, unsynced, total

    def _install(self, db, oid, tid, temporary, path, size, row, placed):
        """Put `temporary` under `path` unless a complete file is there;
        the size of the file there now, and the token of its row in
        ``unsynced`` if it is the one put there (then `path` is appended
        to `placed`: the caller removes it if the transaction fails)."""
        now = time.time()
        if row is not None and row[0] == COMPLETE and _size_of(path) == row[1]:
            os.remove(temporary)
            db.execute('UPDATE blobs SET accessed = ? '
                       'WHERE oid = ? AND tid = ?', (now, oid, tid))
            return row[1], None
        token = self._new_token()
        os.replace(temporary, path)
        placed.append(path)
        db.execute(
            'INSERT INTO blobs (oid, tid, size, accessed, state) '
            'VALUES (?, ?, ?, ?, ?) ON CONFLICT (oid, tid) '
            'DO UPDATE SET size = excluded.size, '
            'accessed = excluded.accessed, '
            'state = excluded.state, token = NULL, started = NULL',
            (oid, tid, size, now, COMPLETE))
        db.execute('INSERT OR REPLACE INTO unsynced '
                   '(oid, tid, token, boot) VALUES (?, ?, ?, ?)',
                   (oid, tid, token, _BOOT))
        return size, token

    # syncing

    def _sync_later(self, oid, tid, token) -> None:
        """Have the file of ``(oid, tid)`` written to disk by the syncing
        thread, which then drops its row in ``unsynced`` (if `token` is
        still that row's).

        Its reader does not wait for the disk (a 10 MiB file takes ~20 ms
        to sync here, as long as its download).  Until then the row says
        that a power loss may have left the file with its size but not its
        bytes: a cache opened after the machine restarted drops such files
        (`_remove_dead_claims`).
        """
        with self._lock:
            self._to_sync.put((oid, tid, token))
            if self._syncing is None:
                self._syncing = threading.Thread(
                    target=self._sync_files, daemon=True,
                    name=f'zodbblob-cache-sync {self.directory}')
                self._syncing.start()

    def _sync_files(self) -> None:
        # Ends when idle (and is started again by the next file): a
        # client's threads end with the work they were started for.
        while True:
            try:
                items = [self._to_sync.get(timeout=SYNC_IDLE)]
            except queue.Empty:
                with self._lock:
                    if self._to_sync.empty():
                        self._syncing = None
                        return
                continue
            while True:
                try:
                    items.append(self._to_sync.get_nowait())
                except queue.Empty:
                    break
            done = [item for item in items if item is not None]
            for oid, tid, _ in done:
                _sync_file(self.path(oid, tid))
            if done:
                try:
                    with self._writing() as db:
                        db.executemany(
                            'DELETE FROM unsynced WHERE oid = ? AND tid = ? '
                            'AND token = ?', done)
                except sqlite3.Error as e:
                    # Synced all the same; the next open drops the rows.
                    logger.warning('Blob cache %s: could not record files '
                                   'as synced: %s', self.directory, e)
            if None in items:
                return

    def _cancel(self, oid, tid, token, temporary):
        remove_if_exists(temporary)
        try:
            with self._writing() as db:
                db.execute('DELETE FROM blobs WHERE oid = ? AND tid = ? '
                           'AND state = ? AND token = ?',
                           (oid, tid, IN_PROGRESS, token))
        except sqlite3.Error as e:
            # The caller sees the fetch's error; without its file, the
            # claim is taken over by the next reader.
            logger.warning('Blob cache %s: could not drop the claim %s: %s',
                           self.path(oid, tid), token, e)

    # owners

    def _new_token(self) -> str:
        return (f'{self._host}-{os.getpid()}-{_INCARNATION}-'
                f'{threading.get_ident()}-{secrets.token_hex(6)}')

    def _owner_dead(self, token: str) -> bool:
        """True only if the process that made `token` has surely ended."""
        owner = _parse_token(token)
        if owner is None or owner[0] != self._host:
            return False
        _, pid, incarnation = owner
        if pid == os.getpid():
            return incarnation != _INCARNATION
        return not process_alive(pid)

    def _owner_alive(self, token, started) -> bool:
        """Whether the download of an in-progress row is still its
        owner's: not too old, its owner running, and its file there (see
        `_claim`)."""
        return (time.time() - started < self.download_timeout
                and not self._owner_dead(token)
                and os.path.exists(self._temporary_path(token)))

    # admitting

    def admit(self, oid: bytes, tid: bytes, filename: str) -> str:
        temporary = self._temporary_path(self._new_token())
        try:
            os.replace(filename, temporary)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            logger.warning('Copying %s to %s: not on the blob cache\'s '
                           'filesystem', filename, self.path(oid, tid))
            try:
                shutil.copyfile(filename, temporary)
            except BaseException:
                remove_if_exists(temporary)
                raise
            os.remove(filename)
        try:
            try:
                path, total = self._complete(oid, tid, temporary)
            except sqlite3.DatabaseError as e:
                if not _damaged(e):
                    raise
                # The file is the only copy this side of the server: into
                # the rebuilt index with it (a file already put under its
                # name is found there by the rebuild).
                self._recover_index(e)
                if os.path.exists(temporary):
                    path, total = self._complete(oid, tid, temporary)
                else:
                    path, total = self.path(oid, tid), self._total
        except BaseException:
            remove_if_exists(temporary)
            raise
        self._prune_if_over(total, keep=(oid, tid))
        return path

    # evicting

    def _over(self, total: int | None) -> bool:
        return (total is not None and self.size_limit is not None
                and total > self.size_limit)

    def _prune_if_over(self, total: int | None, keep=None) -> None:
        """Prune if `total` is over the size: the check after a download
        or an admission; `keep` is the ``(oid, tid)`` being read."""
        if self._over(total):
            try:
                self.prune(keep=keep)
            except sqlite3.OperationalError as e:
                # The blob is there for its reader; the next one prunes.
                logger.warning('Blob cache %s not pruned: %s',
                               self.directory, e)

    def _prune_if_over_soon(self) -> None:
        """Check the total in a thread of its own, unless one runs: for
        an open and a hit, which do not wait for a prune."""
        if self.size_limit is None:
            return
        now = time.monotonic()
        with self._lock:
            # Not a thread per hit while another process holds the lease
            # (or a file larger than the cache is being read).
            if self._closing.is_set() or (
                    now - self._background_started < BACKGROUND_CHECK) or (
                    self._background_prune is not None
                    and self._background_prune.is_alive()):
                return
            self._background_started = now
            self._background_prune = threading.Thread(
                target=self._prune_in_background, daemon=True,
                name=f'zodbblob-cache-prune {self.directory}')
            self._background_prune.start()

    def _prune_in_background(self) -> None:
        try:
            with self._db_lock:
                total, = self._db.execute(
                    'SELECT bytes FROM cache').fetchone()
            self._total = total
            # The file this process read last may be the one a reader is
            # about to open.
            self._prune_if_over(total, keep=self._reading)
        except Exception:
            logger.exception('Blob cache %s: pruning failed',
                             self.directory)

    @_recovering
    def prune(self, size_limit: int | None = None,
              keep: tuple[bytes, bytes] | None = None) -> tuple[int, int]:
        limit = self.size_limit if size_limit is None else size_limit
        if limit is None:
            return 0, 0
        target = limit - int(limit * self.check_percent / 100)
        self._flush()
        # A thread that finds another pruning waits, then checks the total
        # that one left: the bound holds after every check.
        with self._pruning:
            # A caller that names the size reports the outcome itself
            # (the CLI's one line); the automatic checks warn here.
            return self._prune(target, keep, warn=size_limit is None)

    def _prune(self, target, keep, warn=True) -> tuple[int, int]:
        token = self._new_token()
        if not self._take_lease(token):
            logger.debug('Blob cache %s: another process prunes',
                         self.directory)
            return 0, 0
        removals = []
        with contextlib.ExitStack() as stack:
            try:
                total = self._mark_for_removal(token, target, stack,
                                               removals, keep)
            finally:
                try:
                    files, removed = self._drop_evicted(removals, token)
                finally:
                    self._release_lease(token)
        if total is None or self._closing.is_set():
            pass  # the lease was taken over, or the cache closes
        elif total <= target:
            self._warned_pinned = False
        elif warn and not self._warned_pinned:
            self._warned_pinned = True
            logger.warning(
                'Blob cache %s holds %d bytes, more than its target of %d: '
                'the file being read is larger, or files could not be '
                'removed', self.directory, total, target)
        logger.debug('Blob cache %s: evicted %d files, %d bytes',
                     self.directory, files, removed)
        return files, removed

    def _mark_for_removal(self, token, target, stack, removals, keep):
        """Mark the files to evict, chunk by chunk, and hand each chunk to
        threads that remove the files while the next is marked; the total
        without them (None if the lease was lost).

        The files used in the last `grace` seconds (and within the
        resolution of access times) go last, and only if the others are
        not enough; the file `keep` (being read) never.

        `stack` gets what has to end after the removals (their threads;
        the deferred checkpoint); `removals` the batches and their futures.
        """
        cutoff = total = None
        after = (float('-inf'), b'', b'')
        chunk = PRUNE_CHUNK
        pool = None
        with contextlib.ExitStack() as marking:
            while True:
                if self._closing.is_set():
                    return total
                with self._writing() as db:
                    total = self._total_if_leased(db, token)
                    if total is None or total <= target:
                        return total
                    self._fold(db)
                    if cutoff is None:
                        # The rows marked are spread over the index: a
                        # page cache that holds it reads each page once;
                        # they are checkpointed once, after the prune.
                        stack.enter_context(self._checkpoint_after())
                        marking.enter_context(
                            self._page_cache(FOLD_CACHE_KIB))
                        # A file used within the resolution of its last
                        # recorded access may show only that one.
                        now = time.time()
                        cutoff = (now - self.grace
                                  - self._resolution_in(db, now))
                    victims = self._mark_evicting(
                        db, token, cutoff, after, total - target, chunk,
                        keep=keep)
                if not victims:
                    if cutoff == float('inf'):
                        return total
                    # The grace orders the victims, it never keeps the
                    # cache over its size: the recently used files go too,
                    # oldest first (a reader whose file went away fetches
                    # it again).
                    logger.debug('Blob cache %s: evicting files used in '
                                 'the last %g s', self.directory, self.grace)
                    cutoff = float('inf')
                    continue
                # A chunk's commit writes every page it changed: the first
                # is small so that removing starts soon, the next ones
                # larger so that fewer commits write the same pages again.
                chunk = min(chunk * 2, PRUNE_CHUNK_MAX)
                after = victims[-1][:3]
                if pool is None:
                    victims, pool = self._start_removals(victims, removals)
                    stack.callback(pool.shutdown)
                for start in range(0, len(victims), REMOVAL_BATCH):
                    batch = victims[start:start + REMOVAL_BATCH]
                    removals.append(
                        (batch, pool.submit(self._remove_files, batch)))

    def _mark_evicting(self, db, token, cutoff, after, excess,
                       limit=PRUNE_CHUNK, keep=None) -> list:
        """Move the oldest complete rows after `after` that make up
        `excess` bytes (at most `limit` rows; not the row of `keep`) from
        ``blobs`` to ``evicting``, by `token`, counting them out of the
        totals; those rows ``(accessed, oid, tid, size)``, oldest first."""
        victims = []
        size = 0
        kept = keep or (b'', b'')
        for row in db.execute(
                'SELECT accessed, oid, tid, size FROM blobs '
                'WHERE state = ? AND accessed < ? '
                'AND (accessed, oid, tid) > (?, ?, ?) '
                'AND (oid, tid) != (?, ?) '
                'ORDER BY accessed, oid, tid LIMIT ?',
                (COMPLETE, cutoff, *after, *kept, limit)).fetchall():
            victims.append(row)
            size += row[3]
            if size >= excess:
                break
        if victims:
            # They are all the complete rows of that range of the index:
            # the writer lock is held since they were read.  A row left in
            # evicting by a pruner that ended is replaced: that eviction
            # was over when the file was downloaded again.
            chosen = ('FROM blobs WHERE state = ? '
                      'AND (accessed, oid, tid) > (?, ?, ?) '
                      'AND (accessed, oid, tid) <= (?, ?, ?) '
                      'AND (oid, tid) != (?, ?)')
            bounds = (COMPLETE, *after, *victims[-1][:3], *kept)
            db.execute('INSERT OR REPLACE INTO evicting '
                       '(oid, tid, size, accessed, token) '
                       f'SELECT oid, tid, size, accessed, ? {chosen}',
                       (token, *bounds))
            db.execute(f'DELETE {chosen}', bounds)
            _count_out(db, len(victims), size)
        return victims

    def _start_removals(self, victims, removals) -> tuple[list, Executor]:
        """Remove the first batch of `victims` here, timed, and add it to
        `removals`; the other victims, and the threads to remove them.

        A removal that waits for the disk (synchronous discards measured
        150-220 us a file, 44 us of it on the CPU) is done sooner by
        PRUNE_THREADS at once; one that only works (a journaled filesystem,
        30-40 us on the CPU; tmpfs) gets slower with more threads than
        cores: see bench/README.md.
        """
        batch, rest = victims[:REMOVAL_BATCH], victims[REMOVAL_BATCH:]
        wall, cpu = time.perf_counter(), time.thread_time()
        done: Future = Future()
        removals.append((batch, done))
        try:
            done.set_result(self._remove_files(batch))
        except BaseException as e:
            done.set_exception(e)
            raise
        threads = removal_threads(time.perf_counter() - wall,
                                  time.thread_time() - cpu)
        logger.debug('Blob cache %s: removing files with %d threads',
                     self.directory, threads)
        return rest, ThreadPoolExecutor(
            threads, thread_name_prefix='zodbblob-prune')

    def _remove_files(self, victims) -> list[OSError | None]:
        """Remove the files of `victims`, outside the writer lock: their
        rows are evicting, by this pruner.  For each, the error that kept
        it, if one did."""
        return [_evict_file(self.path(oid, tid)) for _, oid, tid, _ in victims]

    def _drop_evicted(self, removals, token) -> tuple[int, int]:
        """Wait for the `removals`; drop the rows of `token` in
        ``evicting``, putting back as complete those of the files not
        removed (a file kept by an error, or never handed to a removal).
        ``(files, bytes)`` removed."""
        files = removed = 0
        results = []
        for victims, removal in removals:
            try:
                errors = removal.result()
            except BaseException:
                # Which of them went is unknown: back to complete, the rows
                # of the files gone are forgotten at their next lookup.
                logger.exception('Blob cache %s: evicting files failed',
                                 self.directory)
                continue
            results.append((victims, errors))
            for (_, oid, tid, size), error in zip(victims, errors):
                if error is None:
                    files += 1
                    removed += size
                else:
                    logger.warning('Blob cache file %s not evicted: %s',
                                   self.path(oid, tid), error)
        with self._writing() as db:
            marked, = db.execute('SELECT count(*) FROM evicting '
                                 'WHERE token = ?', (token,)).fetchone()
            if marked > files:
                gone = {(oid, tid)
                        for victims, errors in results
                        for (_, oid, tid, _), error in zip(victims, errors)
                        if error is None}
                db.executemany(
                    'INSERT OR IGNORE INTO blobs '
                    '(oid, tid, size, accessed, state) '
                    'SELECT oid, tid, size, accessed, ? FROM evicting '
                    'WHERE oid = ? AND tid = ?',
                    [(COMPLETE, oid, tid) for oid, tid in db.execute(
                        'SELECT oid, tid FROM evicting WHERE token = ?',
                        (token,)).fetchall()
                     if (oid, tid) not in gone])
            if marked:
                db.execute('DELETE FROM evicting WHERE token = ?', (token,))
            self._total, = db.execute('SELECT bytes FROM cache').fetchone()
        return files, removed

    def _release_lease(self, token) -> None:
        with self._writing() as db:
            db.execute('UPDATE cache SET pruner = NULL WHERE pruner = ?',
                       (token,))

    def _take_lease(self, token) -> bool:
        now = time.time()
        with self._writing() as db:
            pruner, pruned_at = db.execute(
                'SELECT pruner, pruned_at FROM cache').fetchone()
            if (pruner is not None and now - pruned_at < PRUNE_LEASE
                    and not self._owner_dead(pruner)):
                return False
            db.execute('UPDATE cache SET pruner = ?, pruned_at = ?',
                       (token, now))
        return True

    def _total_if_leased(self, db, token) -> int | None:
        if not db.execute('UPDATE cache SET pruned_at = ? WHERE pruner = ?',
                          (time.time(), token)).rowcount:
            return None
        return db.execute('SELECT bytes FROM cache').fetchone()[0]

    # the index

    @_recovering
    def stats(self) -> dict:
        self.flush()
        with self._writing() as db:
            self._fold(db)
            files, size, hits, misses = db.execute(
                'SELECT files, bytes, hits, misses FROM cache').fetchone()
            oldest, = db.execute(
                'SELECT min(accessed) FROM blobs WHERE state = ?',
                (COMPLETE,)).fetchone()
        return dict(files=files, bytes=size, oldest_access=oldest,
                    hits=hits, misses=misses)

    def close(self) -> None:
        if self._db is None:
            return
        self._closing.set()
        self._preloading.join()
        with self._lock:
            checkpointing, syncing = self._checkpointing, self._syncing
            pruning = self._background_prune
            self._to_sync.put(None)
        if pruning is not None:
            pruning.join()
        if syncing is not None:
            syncing.join()
        if checkpointing is not None:
            checkpointing.join()
        try:
            self.flush()
        finally:
            with self._db_lock:
                self._close_index()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, holding the index's writer lock from its
        start: no other process changes a row or a file meanwhile (but
        the files in ``evicting``, which their pruners remove)."""
        with self._db_lock:
            self._begin()
            try:
                yield self._db
                self._db.execute('COMMIT')
            except BaseException:
                # A COMMIT that failed (a full disk) leaves the transaction
                # open: every later BEGIN would fail.
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute('ROLLBACK')
                raise

    def _begin(self) -> None:
        """Begin a write transaction on the index file that is in place
        now: one moved aside and rebuilt by another process meanwhile is
        left for the new one (its rows are not seen, its writes lost)."""
        while True:
            self._db.execute('BEGIN IMMEDIATE')
            if self._index_in_place():
                return
            self._db.execute('ROLLBACK')
            with self._open_lock():
                self._close_index()
                self._open_index(created=False, adopted=False)

    def _index_in_place(self) -> bool:
        try:
            return (os.stat(os.path.join(self.directory, INDEX)).st_ino
                    == self._index_ino)
        except FileNotFoundError:
            return False

    def _recover_index(self, error: sqlite3.Error) -> None:
        """Move the damaged index aside and rebuild it (unless another
        thread or process did since `error`), with one WARNING."""
        with self._db_lock, self._open_lock():
            damaged = self._index_in_place()
            self._close_index()
            self._open_index(created=False, adopted=False,
                             damaged=error if damaged else None)

    # opening

    def _check_layout(self) -> bool:
        """Check the marker, writing it in a new directory; True if new.

        Raises ValueError, changing nothing, for another layout's marker
        or a used directory without one.
        """
        marked = read_marker(self.directory)
        if marked == LAYOUT:
            return False
        if marked is not None:
            raise ValueError(
                f'Directory layout `{LAYOUT}` selected for blob cache '
                f'directory {self.directory}, but marker found for layout '
                f'`{marked}`')
        if os.path.isdir(self.directory) and any(
                not name.startswith('.')
                for name in os.listdir(self.directory)):
            raise ValueError(
                f'Blob cache directory {self.directory} is used but has no '
                f'{LAYOUT_MARKER} marker: expected layout `{LAYOUT}`')
        os.makedirs(self.directory, exist_ok=True)
        fd, staged = tempfile.mkstemp(dir=self.directory,
                                      prefix=LAYOUT_MARKER + '-')
        try:
            with os.fdopen(fd, 'w') as f:
                f.write(LAYOUT)
            os.chmod(staged, 0o644)
            # A link never replaces the marker of a process that created
            # the directory at the same time.
            with contextlib.suppress(FileExistsError):
                os.link(staged, os.path.join(self.directory, LAYOUT_MARKER))
        finally:
            os.remove(staged)
        if read_marker(self.directory) != LAYOUT:
            return self._check_layout()
        return True

    @contextlib.contextmanager
    def _open_lock(self):
        # Held while the index is checked, rebuilt or moved aside, so two
        # processes opening at once never both rebuild.
        fd = os.open(os.path.join(self.directory, OPEN_LOCK),
                     os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _connect(self, index):
        db = sqlite3.connect(index, timeout=BUSY_TIMEOUT,
                             isolation_level=None, check_same_thread=False)
        try:
            db.execute('PRAGMA journal_mode = WAL')
            # WAL with NORMAL survives any process crash; a power loss may
            # lose the last transactions, which leaves rows the protocol
            # repairs (a dead claim, a row without its file).
            db.execute('PRAGMA synchronous = NORMAL')
            # Some builds zero what a delete frees; nothing here is secret,
            # and a fold would write every page of the log twice.
            db.execute('PRAGMA secure_delete = OFF')
        except BaseException:
            db.close()
            raise
        return db

    def _open_index(self, created: bool, adopted: bool,
                    damaged: sqlite3.Error | None = None) -> None:
        """Open the index, rebuilding or migrating it as needed; the
        caller holds the open lock.  `damaged` is an error that showed
        the index damaged in use."""
        self._open_index_file(created, adopted, damaged)

    def _connect_index(self, index: str) -> None:
        self._db = self._connect(index)
        # Under the open lock: nobody moves the index aside meanwhile.
        self._index_ino = os.stat(index).st_ino

    def _open_index_file(self, created, adopted, damaged) -> None:
        index = os.path.join(self.directory, INDEX)
        try:
            problem = label = None
            if damaged is not None:
                raise damaged
            self._connect_index(index)
            version = _index_version(self._db)
            if version is None:
                if created:
                    reason = None
                elif adopted:
                    reason = ('adopted a stock ZEO cache directory (no '
                              'zodbblob index yet)')
                else:
                    reason = 'the index is missing; rebuilt'
                self._build(reason)
                return
            # Damaged pages (the header intact) fail only the reads that
            # reach them: look at every page once, now.
            checked = self._db.execute('PRAGMA quick_check').fetchall()
            if checked != [('ok',)]:
                raise sqlite3.DatabaseError(
                    f'quick_check found: {checked[0][0]}')
            if version == SCHEMA_VERSION:
                return
            label = f'version-{version}'
            if version not in MIGRATIONS:
                problem = (f'is of schema version {version}, not '
                           f'{SCHEMA_VERSION}')
            else:
                try:
                    self._migrate(version)
                    return
                except sqlite3.DatabaseError as e:
                    if _transient(e):
                        raise
                    problem = (f'could not be brought from schema version '
                               f'{version} to {SCHEMA_VERSION} ({e})')
        except sqlite3.DatabaseError as e:
            # Anything else the index says at open (an error, tables
            # without a version, a build that finds tables there) is
            # damage: kept, it would fail every open, in every process.
            self._close_index()
            if _transient(e):
                raise
            if problem is None:
                problem, label = f'was unreadable ({e})', 'corrupt'
        except BaseException:
            self._close_index()
            raise
        try:
            self._close_index()
            aside = self._move_aside(index, label)
            self._connect_index(index)
            self._build(f'the index {problem}; moved to {aside} and rebuilt')
        except BaseException:
            self._close_index()
            raise

    def _close_index(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _move_aside(self, index: str, label: str) -> str:
        aside = f'{index}.{label}-{time.strftime("%Y%m%dT%H%M%S")}'
        aside += f'-{os.getpid()}'
        # The write-ahead log goes too: replayed into a new index, its
        # pages would belong to the old one.
        for suffix in ('', '-wal', '-shm'):
            with contextlib.suppress(FileNotFoundError):
                os.replace(index + suffix, aside + suffix)
        return aside

    def _migrate(self, version: int) -> None:
        with self._writing() as db:
            for statement in MIGRATIONS[version]:
                db.execute(statement)
            db.execute('UPDATE cache SET version = ?', (SCHEMA_VERSION,))
        logger.info('Blob cache %s: index brought from schema version %d '
                    'to %d', self.directory, version, SCHEMA_VERSION)

    def _build(self, reason: str | None) -> None:
        """Create the index and fill it from one scan of the directory.

        `reason` says why, for the log; None for a new directory.
        """
        leftovers = []
        # Rows come in the order of the scan, random for the primary key:
        # a page cache that holds the whole table keeps those inserts from
        # reading and writing pages again and again.
        with self._writing() as db, self._page_cache(BUILD_CACHE_KIB):
            for statement in TABLES:
                db.execute(statement)
            db.executemany(
                'INSERT INTO blobs (oid, tid, size, accessed, state) '
                'VALUES (?, ?, ?, ?, ?)', self._scan(leftovers))
            files, size = db.execute(
                'SELECT count(*), coalesce(sum(size), 0) FROM blobs'
            ).fetchone()
            db.execute('INSERT INTO cache (id, version, files, bytes) '
                       'VALUES (1, ?, ?, ?)', (SCHEMA_VERSION, files, size))
            for statement in DERIVED:
                db.execute(statement)
        if reason is None:
            logger.debug('Blob cache %s created', self.directory)
            return
        logger.warning(
            'Blob cache %s: %s: %d files, %d bytes indexed from one scan of '
            'the directory, %d leftover temporary files removed',
            self.directory, reason, files, size, len(leftovers))

    def _scan(self, leftovers: list) -> Iterator[tuple]:
        """Rows of the blob files in the buckets; removes stock leftovers.

        Access times start from the files' times (stock ZEO records an
        access in the atime); from then on only the index counts.
        """
        now = time.time()
        with os.scandir(self.directory) as buckets:
            buckets = [entry for entry in buckets
                       if entry.name.isdigit()
                       and entry.is_dir(follow_symlinks=False)]
        for bucket in buckets:
            with os.scandir(bucket.path) as entries:
                for entry in entries:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    found = entry.stat(follow_symlinks=False)
                    match = _CACHE_FILE.match(entry.name)
                    if match is not None:
                        oid = (int(match[1]) * BUCKETS
                               + int(bucket.name)).to_bytes(8, 'big')
                        tid = bytes.fromhex(match[2])
                        if self.path(oid, tid) == entry.path:
                            yield (oid, tid, found.st_size,
                                   max(found.st_atime, found.st_mtime),
                                   COMPLETE)
                    elif (entry.name.endswith(STOCK_TEMPORARY)
                          and now - found.st_mtime > self.download_timeout):
                        remove_if_exists(entry.path)
                        leftovers.append(entry.path)

    def _remove_dead_claims(self) -> None:
        """Drop the claims and temporary files of processes that ended,
        and finish their evictions.

        Looks only at rows with a token, at ``evicting``, ``unsynced``
        and in ``.tmp``.
        """
        with self._db_lock:
            claims = self._db.execute(
                'SELECT oid, tid, token FROM blobs '
                'WHERE token IS NOT NULL').fetchall()
            evicting = self._db.execute(
                'SELECT oid, tid, token FROM evicting').fetchall()
            unsynced = self._db.execute(
                'SELECT oid, tid, token, boot FROM unsynced').fetchall()
        dead = [claim for claim in claims if self._owner_dead(claim[2])]
        evictions = [row for row in evicting if self._owner_dead(row[2])]
        unsynced = [row for row in unsynced
                    if row[3] != _BOOT or self._owner_dead(row[2])]
        lost = self._finish_syncs(unsynced)
        now = time.time()
        if dead or evictions:
            with self._writing() as db:
                for oid, tid, token in evictions:
                    # Its pruner ended between moving the row here and
                    # dropping it; the file was counted out already.  A
                    # row of that name in ``blobs`` is a download since.
                    if db.execute(
                            'DELETE FROM evicting WHERE oid = ? AND tid = ? '
                            'AND token = ?', (oid, tid, token)).rowcount \
                            and db.execute(
                                'SELECT 1 FROM blobs WHERE oid = ? '
                                'AND tid = ?', (oid, tid)).fetchone() is None:
                        remove_if_exists(self.path(oid, tid))
                for oid, tid, token in dead:
                    # Only a complete file gets its final name: one found
                    # there is its owner's download, killed before it could
                    # commit the row.  Dropping the row would hide it from
                    # eviction for good.
                    size = _size_of(self.path(oid, tid))
                    if size is None:
                        db.execute('DELETE FROM blobs WHERE oid = ? '
                                   'AND tid = ? AND state = ? AND token = ?',
                                   (oid, tid, IN_PROGRESS, token))
                    else:
                        db.execute('UPDATE blobs SET state = ?, size = ?, '
                                   'accessed = ?, token = NULL, '
                                   'started = NULL WHERE oid = ? AND tid = ? '
                                   'AND state = ? AND token = ?',
                                   (COMPLETE, size, now, oid, tid,
                                    IN_PROGRESS, token))
        removed = []
        with os.scandir(self._temporary) as entries:
            for entry in entries:
                owner = _parse_token(entry.name)
                if self._owner_dead(entry.name) or (
                        (owner is None or owner[0] != self._host)
                        and now - entry.stat().st_mtime
                        > self.download_timeout):
                    remove_if_exists(entry.path)
                    removed.append(entry.name)
        if dead or removed or evictions:
            logger.warning(
                'Blob cache %s: dropped %d downloads and %d temporary files '
                'of processes that ended, and finished %d of their '
                'evictions', self.directory, len(dead), len(removed),
                len(evictions))
        if lost:
            logger.warning(
                'Blob cache %s: removed %d files written before the machine '
                'restarted and not synced to disk then', self.directory,
                lost)

    def _finish_syncs(self, unsynced) -> int:
        """Settle the `unsynced` rows of processes that ended: a file
        written since this boot is in the page cache or on disk, so it is
        synced now; one written before is removed with its row (a power
        loss may have left it with its size but not its bytes).  How many
        were removed."""
        lost = 0
        if not unsynced:
            return lost
        with self._writing() as db:
            for oid, tid, token, boot in unsynced:
                path = self.path(oid, tid)
                if boot == _BOOT:
                    _sync_file(path)
                else:
                    row = db.execute(
                        'SELECT size FROM blobs WHERE oid = ? AND tid = ? '
                        'AND state = ?', (oid, tid, COMPLETE)).fetchone()
                    if row is not None:
                        db.execute('DELETE FROM blobs WHERE oid = ? '
                                   'AND tid = ?', (oid, tid))
                        _count_out(db, 1, row[0])
                    remove_if_exists(path)
                    lost += 1
                db.execute('DELETE FROM unsynced WHERE oid = ? AND tid = ? '
                           'AND token = ?', (oid, tid, token))
        return lost
