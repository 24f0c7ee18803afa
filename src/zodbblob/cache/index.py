"""The cache's index: opening it, its writer lock, rebuilding it.

Every change of a file under its final name happens inside a write
transaction of the index (``BEGIN IMMEDIATE``, the index's one writer
lock), in the same transaction that changes its row; the one exception is
the removal of a file whose row is in ``evicting``, which belongs to the
pruner that moved it there.  Whoever decides on a file by its row, decides
under that lock and looks at the file again there; no download or
admission puts a file under a name in ``evicting`` until its pruner has
dropped that row (or ended).

An index found damaged (at open by ``quick_check``, or by an error in
use) is moved aside and rebuilt from a scan, once: the others see its new
inode.  An index of an older schema version is migrated
(`zodbblob.cache.schema`); a directory without one (a stock ZEO cache, a
lost index) is indexed from one scan.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator

from zodbblob.cache.directory import (
    BUCKETS,
    CACHE_FILE,
    STOCK_TEMPORARY,
    CacheDirectory,
)
from zodbblob.cache.schema import (
    COMPLETE,
    DERIVED,
    MIGRATIONS,
    SCHEMA_VERSION,
    TABLES,
)
from zodbblob.layout import remove_if_exists

logger = logging.getLogger(__name__)

INDEX = '.zodbblob-cache.sqlite'
OPEN_LOCK = '.zodbblob-cache.lock'


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

BUSY_TIMEOUT = 60.0
BUILD_CACHE_KIB = 262144     # SQLite's page cache while building the index
FOLD_CACHE_KIB = 65536       # ... and while folding the access log


def index_damaged(error: sqlite3.Error) -> bool:
    """Whether `error` says the index file is damaged (not busy, full or
    unwritable, which pass)."""
    name = getattr(error, 'sqlite_errorname', None)
    if name is not None:
        return name.startswith(('SQLITE_CORRUPT', 'SQLITE_NOTADB'))
    return type(error) is sqlite3.DatabaseError


def count_out(db, files: int, size: int) -> None:
    """Take `files` complete files of `size` bytes in all out of the
    totals (the deletes of complete rows do; a trigger per row would cost
    as much as the delete)."""
    db.execute('UPDATE cache SET files = files - ?, bytes = bytes - ?',
               (files, size))


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


class Index:
    """The index of the open cache directory `cache`: one connection,
    shared by the threads of a process (under `db_lock`), and the write
    transactions that hold the index's writer lock.

    A scan removes stock leftovers older than the cache's download
    timeout; the cache's lock guards `checkpointing`.
    """

    def __init__(self, cache: CacheDirectory):
        self.cache = cache
        # The connection; db_lock guards it.  It is replaced when another
        # process moved the index aside and rebuilt it.
        self.db_lock = threading.RLock()
        self.db: sqlite3.Connection | None = None
        self._index_ino = None
        self.checkpointing: threading.Thread | None = None

    @contextlib.contextmanager
    def writing(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, holding the index's writer lock from its
        start: no other process changes a row or a file meanwhile (but
        the files in ``evicting``, which their pruners remove)."""
        with self.db_lock:
            self._begin()
            try:
                yield self.db
                self.db.execute('COMMIT')
            except BaseException:
                # A COMMIT that failed (a full disk) leaves the transaction
                # open: every later BEGIN would fail.
                if self.db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self.db.execute('ROLLBACK')
                raise

    def _begin(self) -> None:
        """Begin a write transaction on the index file that is in place
        now: one moved aside and rebuilt by another process meanwhile is
        left for the new one (its rows are not seen, its writes lost)."""
        while True:
            self.db.execute('BEGIN IMMEDIATE')
            if self.in_place():
                return
            self.db.execute('ROLLBACK')
            with self.open_lock():
                self.close()
                self.open(created=False, adopted=False)

    def in_place(self) -> bool:
        index = os.path.join(self.cache.directory, INDEX)
        try:
            return os.stat(index).st_ino == self._index_ino
        except FileNotFoundError:
            return False

    def recover(self, error: sqlite3.Error) -> None:
        """Move the damaged index aside and rebuild it (unless another
        thread or process did since `error`), with one WARNING."""
        with self.db_lock, self.open_lock():
            damaged = self.in_place()
            self.close()
            self.open(created=False, adopted=False,
                      damaged=error if damaged else None)

    @contextlib.contextmanager
    def open_lock(self):
        # Held while the index is checked, rebuilt or moved aside, so two
        # processes opening at once never both rebuild.
        fd = os.open(os.path.join(self.cache.directory, OPEN_LOCK),
                     os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def connect(self, index):
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

    def _connect_index(self, index: str) -> None:
        self.db = self.connect(index)
        # Under the open lock: nobody moves the index aside meanwhile.
        self._index_ino = os.stat(index).st_ino

    def open(self, created: bool, adopted: bool,
             damaged: sqlite3.Error | None = None) -> None:
        """Open the index, rebuilding or migrating it as needed; the
        caller holds the open lock.  `damaged` is an error that showed
        the index damaged in use."""
        index = os.path.join(self.cache.directory, INDEX)
        try:
            problem = label = None
            if damaged is not None:
                raise damaged
            self._connect_index(index)
            version = _index_version(self.db)
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
            checked = self.db.execute('PRAGMA quick_check').fetchall()
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
            self.close()
            if _transient(e):
                raise
            if problem is None:
                problem, label = f'was unreadable ({e})', 'corrupt'
        except BaseException:
            self.close()
            raise
        try:
            self.close()
            aside = self._move_aside(index, label)
            self._connect_index(index)
            self._build(f'the index {problem}; moved to {aside} and rebuilt')
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

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
        with self.writing() as db:
            for statement in MIGRATIONS[version]:
                db.execute(statement)
            db.execute('UPDATE cache SET version = ?', (SCHEMA_VERSION,))
        logger.info('Blob cache %s: index brought from schema version %d '
                    'to %d', self.cache.directory, version, SCHEMA_VERSION)

    def _build(self, reason: str | None) -> None:
        """Create the index and fill it from one scan of the directory.

        `reason` says why, for the log; None for a new directory.
        """
        leftovers = []
        # Rows come in the order of the scan, random for the primary key:
        # a page cache that holds the whole table keeps those inserts from
        # reading and writing pages again and again.
        with self.writing() as db, self.page_cache(BUILD_CACHE_KIB):
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
            logger.debug('Blob cache %s created', self.cache.directory)
            return
        logger.warning(
            'Blob cache %s: %s: %d files, %d bytes indexed from one scan of '
            'the directory, %d leftover temporary files removed',
            self.cache.directory, reason, files, size, len(leftovers))

    def _scan(self, leftovers: list) -> Iterator[tuple]:
        """Rows of the blob files in the buckets; removes stock leftovers.

        Access times start from the files' times (stock ZEO records an
        access in the atime); from then on only the index counts.
        """
        now = time.time()
        with os.scandir(self.cache.directory) as buckets:
            buckets = [entry for entry in buckets
                       if entry.name.isdigit()
                       and entry.is_dir(follow_symlinks=False)]
        for bucket in buckets:
            with os.scandir(bucket.path) as entries:
                for entry in entries:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    found = entry.stat(follow_symlinks=False)
                    match = CACHE_FILE.match(entry.name)
                    if match is not None:
                        oid = (int(match[1]) * BUCKETS
                               + int(bucket.name)).to_bytes(8, 'big')
                        tid = bytes.fromhex(match[2])
                        if self.cache.path(oid, tid) == entry.path:
                            yield (oid, tid, found.st_size,
                                   max(found.st_atime, found.st_mtime),
                                   COMPLETE)
                    elif (entry.name.endswith(STOCK_TEMPORARY)
                          and now - found.st_mtime
                          > self.cache.download_timeout):
                        remove_if_exists(entry.path)
                        leftovers.append(entry.path)

    @contextlib.contextmanager
    def page_cache(self, kib: int) -> Iterator[None]:
        """SQLite's page cache at `kib` KiB (for a long write), then back
        to its size before, which frees the pages beyond that."""
        with self.db_lock:
            previous, = self.db.execute('PRAGMA cache_size').fetchone()
            self.db.execute(f'PRAGMA cache_size = -{kib}')
            try:
                yield
            finally:
                self.db.execute(f'PRAGMA cache_size = {previous}')

    @contextlib.contextmanager
    def checkpoint_after(self) -> Iterator[None]:
        """No checkpoint of the write-ahead log at each commit (for a
        series of large writes, which would each copy their pages into the
        index and sync it), and one after them, in a thread of its own
        with a connection of its own: the writes are committed, and
        whoever waits for them need not wait for the copy as well."""
        with self.db_lock:
            previous, = self.db.execute(
                'PRAGMA wal_autocheckpoint').fetchone()
            self.db.execute('PRAGMA wal_autocheckpoint = 0')
        try:
            yield
        finally:
            with self.db_lock:
                self.db.execute(f'PRAGMA wal_autocheckpoint = {previous}')
            with self.cache.lock:
                if not self.cache.closing.is_set() and (
                        self.checkpointing is None
                        or not self.checkpointing.is_alive()):
                    self.checkpointing = threading.Thread(
                        target=self._checkpoint, daemon=True,
                        name='zodbblob-cache-checkpoint '
                             f'{self.cache.directory}')
                    self.checkpointing.start()

    def _checkpoint(self) -> None:
        """Copy the write-ahead log into the index, as far as no reader
        needs it (a passive checkpoint: writers go on meanwhile)."""
        try:
            db = self.connect(os.path.join(self.cache.directory, INDEX))
            try:
                db.execute('PRAGMA wal_checkpoint(PASSIVE)').fetchone()
            finally:
                db.close()
        except sqlite3.Error as e:
            # The next commit past the log's limit checkpoints instead.
            logger.debug('Blob cache %s: not checkpointed: %s',
                         self.cache.directory, e)
