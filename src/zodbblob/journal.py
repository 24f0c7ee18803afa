"""The commit journal of a blob directory, which is also its catalog.

One SQLite database (``<blob_dir>/.zodbblob/journal.sqlite``, WAL mode)
holds a row per blob file: ``(oid, tid, size, state)``.  A transaction's
rows are written as *pending* and fsynced before its files get their final
names and before the base storage commits; they become *committed* after
the base storage has committed.  After a crash, the pending rows are the
complete list of what the interrupted transaction may have left behind.

The committed rows are the catalog: the total size (``getSize`` in O(1))
and the set of blob files that pack compares with the base storage's live
records, without walking the directory.
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
PENDING, COMMITTED = 0, 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blob (
    oid BLOB NOT NULL,
    tid BLOB NOT NULL,
    size INTEGER NOT NULL,
    state INTEGER NOT NULL,
    staged TEXT,
    PRIMARY KEY (oid, tid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blob_pending ON blob (state, tid);
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


KILL_POINT_VARIABLE = 'ZODBBLOB_KILL_POINT'
KILL_POINTS = (
    'after_store_blob', 'after_base_vote', 'after_staging_fsync',
    'after_journal_begin', 'mid_publish', 'after_publish',
    'after_base_finish', 'after_journal_commit', 'mid_recovery',
    'after_base_pack', 'mid_pack_removal',
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
                self._db.executescript(_SCHEMA)
            self._total = self._read_total()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise JournalError('Cannot use blob journal %s: %s'
                               % (self.path, e)) from e

    def _read_total(self) -> int:
        row = self._db.execute(
            "SELECT value FROM meta WHERE name = 'total_size'").fetchone()
        if row is None:
            row = self._db.execute(
                'SELECT total(size) FROM blob WHERE state = ?',
                (COMMITTED,)).fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
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

    # the commit protocol

    def begin(self, tid: bytes, entries: Iterable[tuple[bytes, int, str]],
              durable: bool = True) -> None:
        with self._lock:
            # FULL makes this commit fsync the WAL: the intent is on disk
            # before any file of the transaction gets its final name.  A
            # caller that syncs the whole filesystem right after passes
            # durable=False and saves the fsync.
            self._db.execute('PRAGMA synchronous=%s'
                             % ('FULL' if durable else 'OFF'))
            with self._db:
                self._db.execute('BEGIN IMMEDIATE')
                self._db.executemany(
                    'INSERT OR REPLACE INTO blob '
                    '(oid, tid, size, state, staged) VALUES (?, ?, ?, ?, ?)',
                    [(oid, tid, size, PENDING, staged)
                     for oid, size, staged in entries])

    def commit(self, tid: bytes,
               retired: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """Mark `tid` committed; forget the staged names of `retired`.

        `retired` are ``(oid, tid)`` of earlier transactions whose final
        names are known to be durable, so their staged names can go.
        """
        with self._lock:
            # Losing this commit to a power cut is harmless: replay finds
            # the rows pending, sees the base has `tid`, and rolls forward.
            self._db.execute('PRAGMA synchronous=NORMAL')
            with self._db:
                self._db.execute('BEGIN IMMEDIATE')
                added = self._db.execute(
                    'SELECT total(size) FROM blob WHERE tid = ? AND state = ?',
                    (tid, PENDING)).fetchone()[0]
                self._db.execute(
                    'UPDATE blob SET state = ? WHERE tid = ? AND state = ?',
                    (COMMITTED, tid, PENDING))
                self._db.executemany(
                    'UPDATE blob SET staged = NULL WHERE oid = ? AND tid = ?',
                    retired)
                self._store_total(self._total + int(added))

    def retire(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """Forget the staged names of ``(oid, tid)`` in `pairs`."""
        with self._lock, self._db:
            self._db.execute('BEGIN IMMEDIATE')
            self._db.executemany(
                'UPDATE blob SET staged = NULL WHERE oid = ? AND tid = ?',
                pairs)

    def staged(self) -> list[tuple[bytes, bytes, int, str]]:
        """``(oid, tid, state, staged)`` of every file still staged.

        Pending rows, and committed rows whose final names may not be
        durable yet: recovery restores a lost final name from these.
        """
        return self._db.execute(
            'SELECT oid, tid, state, staged FROM blob '
            'WHERE staged IS NOT NULL ORDER BY tid, oid').fetchall()

    def discard(self, tid: bytes) -> None:
        with self._lock, self._db:
            self._db.execute('BEGIN IMMEDIATE')
            self._db.execute('DELETE FROM blob WHERE tid = ? AND state = ?',
                             (tid, PENDING))

    def _store_total(self, total: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO meta (name, value) "
            "VALUES ('total_size', ?)", (total,))
        self._total = total

    def pending(self) -> dict[bytes, list[tuple[bytes, int, str]]]:
        result: dict[bytes, list[tuple[bytes, int, str]]] = {}
        for oid, tid, size, staged in self._db.execute(
                'SELECT oid, tid, size, staged FROM blob WHERE state = ? '
                'ORDER BY tid, oid', (PENDING,)):
            result.setdefault(tid, []).append((oid, size, staged))
        return result

    # the catalog

    def total_size(self) -> int:
        return self._total

    def revisions(self, oid: bytes) -> list[bytes]:
        return [tid for (tid,) in self._db.execute(
            'SELECT tid FROM blob WHERE oid = ? AND state = ? ORDER BY tid',
            (oid, COMMITTED))]

    def committed(self) -> Iterable[tuple[bytes, bytes, int]]:
        """``(oid, tid, size)`` of every committed blob file."""
        return self._db.execute(
            'SELECT oid, tid, size FROM blob WHERE state = ?',
            (COMMITTED,)).fetchall()

    def __len__(self):
        return self._db.execute('SELECT count(*) FROM blob WHERE state = ?',
                                (COMMITTED,)).fetchone()[0]

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
        pairs = list(pairs)
        with self._lock, self._db:
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
            self._db.execute('BEGIN IMMEDIATE')
            self._db.execute('DELETE FROM blob')
            total = 0
            rows = []
            for oid, tid, size in blobs:
                rows.append((oid, tid, size, COMMITTED))
                total += size
            self._db.executemany(
                'INSERT OR REPLACE INTO blob (oid, tid, size, state) '
                'VALUES (?, ?, ?, ?)', rows)
            self._store_total(total)
