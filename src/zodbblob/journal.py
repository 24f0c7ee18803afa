"""The catalog of a blob directory, and the commit protocol's helpers.

One SQLite database (``<blob_dir>/.zodbblob/journal.sqlite``, WAL mode)
holds a row per committed blob file: ``(oid, tid, size)``.  The rows are
the catalog: the total size (``getSize`` in O(1)) and the set of blob files
that pack compares with the base storage's live records, without walking
the directory.  A transaction's rows are added after the base storage has
committed it, without a sync: until the next checkpoint, its record in the
commit log (``zodbblob.commitlog``) is what recovery goes by, and a
checkpoint makes the rows durable before it lets the record go.

Also here: the files a pack is removing (``garbage``, so that a killed pack
is finished), ``meta`` values, the crash tests' kill points and
``sync_filesystem``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sqlite3
import threading
from collections.abc import Iterable

import zope.interface

from zodbblob.interfaces import IBlobJournal


logger = logging.getLogger(__name__)

STATE_DIR = '.zodbblob'
JOURNAL_NAME = 'journal.sqlite'

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blob (
    oid BLOB NOT NULL,
    tid BLOB NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (oid, tid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS garbage (
    oid BLOB NOT NULL,
    tid BLOB NOT NULL,
    PRIMARY KEY (oid, tid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value
);
"""


# Catalog rows added after commits are written in batches of this many.
SAVE_EVERY = 64

KILL_POINT_VARIABLE = 'ZODBBLOB_KILL_POINT'
KILL_POINTS = (
    'after_store_blob', 'after_base_vote', 'after_staging_fsync',
    'after_journal_begin', 'mid_publish', 'after_publish',
    'after_base_finish', 'after_journal_commit', 'mid_recovery',
    'mid_checkpoint', 'after_base_pack', 'mid_pack_removal',
)


def _kill_point_setting() -> tuple[str | None, int]:
    value = os.environ.get(KILL_POINT_VARIABLE)
    if not value:
        return None, 0
    name, _, count = value.partition(':')
    if name not in KILL_POINTS:
        raise ValueError('%s names unknown kill point %r; known: %s'
                         % (KILL_POINT_VARIABLE, name, ', '.join(KILL_POINTS)))
    return name, int(count or 1)


_kill_point, _kill_at = _kill_point_setting()
_kill_hits: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Die here (SIGKILL) if ZODBBLOB_KILL_POINT names this point.

    The crash tests set ``ZODBBLOB_KILL_POINT=name`` or ``name:N`` (the
    Nth time the point is reached) in a child process, to prove that a
    crash at every step of commit, pack and recovery loses nothing
    committed and leaves nothing uncommitted.  Unset, this is one compare.
    """
    if name != _kill_point:
        return
    _kill_hits[name] = _kill_hits.get(name, 0) + 1
    if _kill_hits[name] >= _kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


def _load_syncfs():
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    syncfs.argtypes = [ctypes.c_int]
    return syncfs


_syncfs = _load_syncfs()
SYNCFS_AVAILABLE = _syncfs is not None


def sync_filesystem(path: str) -> None:
    """Flush every dirty file and directory entry of `path`'s filesystem.

    One ``syncfs(2)`` makes a whole transaction durable (its staged files,
    their names and the journal's WAL) for the price of one fsync; per
    file and per directory fsyncs cost that many times over.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        if _syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, 'syncfs failed: %s' % os.strerror(error),
                          path)
    finally:
        os.close(fd)


class JournalError(Exception):
    """The journal database cannot be used."""


def journal_path(blob_dir: str) -> str:
    return os.path.join(blob_dir, STATE_DIR, JOURNAL_NAME)


@zope.interface.implementer(IBlobJournal)
class Journal:
    """The journal of one blob directory.

    Thread-safe: MVCC instances of one storage share a journal.
    """

    def __init__(self, blob_dir: str, read_only: bool = False):
        self.path = journal_path(blob_dir)
        self.read_only = read_only
        self._lock = threading.Lock()
        self._unsaved: list[tuple[bytes, bytes, int]] = []
        if read_only:
            # immutable: a reader must not create the -shm and -wal files.
            uri = 'file:%s?mode=ro&immutable=1' % self.path
            self._db = sqlite3.connect(uri, uri=True,
                                       check_same_thread=False)
        else:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False,
                                       isolation_level=None)
        try:
            if not read_only:
                self._db.execute('PRAGMA journal_mode=WAL')
                self._drop_old_catalog()
                self._db.executescript(_SCHEMA)
            self._total = self._read_total()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise JournalError('Cannot use blob journal %s: %s'
                               % (self.path, e)) from e

    def _drop_old_catalog(self) -> None:
        # zodbblob before the commit log kept pending rows in the catalog
        # (a `state` column).  Such a catalog is rebuilt from a scan.
        columns = [row[1] for row in self._db.execute(
            "PRAGMA table_info('blob')")]
        if 'state' in columns:
            logger.warning('Blob catalog %s has an older format; it is '
                           'rebuilt from a scan', self.path)
            self._db.executescript(
                "DROP TABLE blob; DELETE FROM meta WHERE name IN "
                "('state', 'total_size');")

    def _read_total(self) -> int:
        row = self._db.execute(
            "SELECT value FROM meta WHERE name = 'total_size'").fetchone()
        if row is None:
            row = self._db.execute(
                'SELECT total(size) FROM blob').fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            if not self.read_only:
                self._save()
            self._db.close()

    # meta values: the clean-shutdown mark and the base's last tid

    def get_meta(self, name: str):
        row = self._db.execute('SELECT value FROM meta WHERE name = ?',
                               (name,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, **values) -> None:
        with self._lock, self._db:
            self._db.execute('BEGIN')
            self._db.executemany(
                'INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)',
                values.items())

    # the commit protocol: rows are added once the base has committed

    def add(self, rows: Iterable[tuple[bytes, bytes, int]]) -> None:
        """Record committed blob files ``(oid, tid, size)``.

        Neither written nor synced at once: rows are kept and written in
        batches (every SAVE_EVERY rows, before anything reads the catalog,
        at ``flush`` and ``sync``).  The commit log holds their
        transactions until a checkpoint, which flushes and syncs them
        first.  Adding a row that is there already changes nothing.
        """
        with self._lock:
            self._unsaved.extend(rows)
            if len(self._unsaved) >= SAVE_EVERY:
                self._save()

    def _save(self) -> None:
        # Called with the lock held.
        if not self._unsaved:
            return
        rows, self._unsaved = self._unsaved, []
        self._db.execute('PRAGMA synchronous=NORMAL')
        with self._db:
            self._db.execute('BEGIN IMMEDIATE')
            added = 0
            for oid, tid, size in rows:
                if self._db.execute(
                        'INSERT OR IGNORE INTO blob (oid, tid, size) '
                        'VALUES (?, ?, ?)', (oid, tid, size)).rowcount:
                    added += size
            self._store_total(self._total + added)

    def flush(self) -> None:
        """Write the rows added so far (without a sync)."""
        with self._lock:
            self._save()

    def sync(self) -> None:
        """Make every row added so far durable (a full WAL checkpoint)."""
        with self._lock:
            self._save()
            self._db.execute('PRAGMA wal_checkpoint(FULL)')

    def _query(self, sql: str, parameters=()) -> list:
        with self._lock:
            self._save()
            return self._db.execute(sql, parameters).fetchall()

    def known(self, pairs: Iterable[tuple[bytes, bytes]]) -> set:
        """The ``(oid, tid)`` of `pairs` that the catalog has."""
        return {pair for pair in pairs if self._query(
            'SELECT 1 FROM blob WHERE oid = ? AND tid = ?', pair)}

    def _store_total(self, total: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO meta (name, value) "
            "VALUES ('total_size', ?)", (total,))
        self._total = total

    # the catalog

    def total_size(self) -> int:
        with self._lock:
            return self._total + sum(size for oid, tid, size in self._unsaved)

    def revisions(self, oid: bytes) -> list[bytes]:
        return [tid for (tid,) in self._query(
            'SELECT tid FROM blob WHERE oid = ? ORDER BY tid', (oid,))]

    def committed(self) -> Iterable[tuple[bytes, bytes, int]]:
        """``(oid, tid, size)`` of every committed blob file."""
        return self._query('SELECT oid, tid, size FROM blob')

    def __len__(self):
        return self._query('SELECT count(*) FROM blob')[0][0]

    def mark_garbage(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """Durably record that pack is about to remove these files.

        A pack killed while removing leaves this list behind, and the next
        open finishes the removal.
        """
        with self._lock:
            self._db.execute('PRAGMA synchronous=FULL')
            with self._db:
                self._db.execute('BEGIN IMMEDIATE')
                self._db.executemany(
                    'INSERT OR REPLACE INTO garbage (oid, tid) VALUES (?, ?)',
                    pairs)

    def garbage(self) -> list[tuple[bytes, bytes]]:
        """The files a pack marked for removal and has not yet removed."""
        return self._db.execute('SELECT oid, tid FROM garbage').fetchall()

    def remove(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """Forget the files `pairs` (removed by pack, or rolled back)."""
        pairs = list(pairs)
        with self._lock, self._db:
            self._save()
            self._db.execute('BEGIN IMMEDIATE')
            removed = 0
            self._db.executemany(
                'DELETE FROM garbage WHERE oid = ? AND tid = ?', pairs)
            for oid, tid in pairs:
                row = self._db.execute(
                    'DELETE FROM blob WHERE oid = ? AND tid = ? '
                    'RETURNING size', (oid, tid)).fetchone()
                if row is not None:
                    removed += row[0]
            self._store_total(self._total - removed)

    def rebuild(self, blobs: Iterable[tuple[bytes, bytes, int]]) -> None:
        """Replace the catalog by `blobs` (from a scan of the directory)."""
        with self._lock, self._db:
            self._unsaved = []
            self._db.execute('BEGIN IMMEDIATE')
            self._db.execute('DELETE FROM blob')
            total = 0
            rows = []
            for oid, tid, size in blobs:
                rows.append((oid, tid, size))
                total += size
            self._db.executemany(
                'INSERT OR REPLACE INTO blob (oid, tid, size) '
                'VALUES (?, ?, ?)', rows)
            self._store_total(total)
