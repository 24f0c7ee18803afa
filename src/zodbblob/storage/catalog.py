"""The catalog of a blob directory, and the commit protocol's helpers.

One SQLite database (``<blob_dir>/.zodbblob/journal.sqlite``, WAL mode)
holds a row per committed blob file: ``(oid, tid, size, superseded,
digest)``, the digest of its content (``digest.py``) where known.
The rows are the catalog: the total size (``getSize`` in O(1)), and the
blob files pack looks among for its garbage without walking the
directory: ``superseded``, the tid of the oid's next revision (indexed),
gives it the revisions a pack time may drop, and pack and verify read
rows in bounded batches (`Journal.rows`, `Journal.superseded`).  A
transaction's rows are added after the base storage has committed it,
without a sync: until the next checkpoint, its record in the
commit log (``zodbblob.storage.commitlog``) is what recovery goes by, and a
checkpoint makes the rows durable before it lets the record go.  A batch
that cannot be written (a full disk, a damaged page) stays pending: the
commit it belongs to has happened, and the checkpoint that would let its
log records go fails instead, so the next write or the next open adds
the rows.  ``check`` (at open) finds a damaged database, which the storage
moves aside and rebuilds.

Also here: a pack's intent and the files it is removing (``garbage``), so
that a killed pack is finished, and ``meta`` values.  ``sync_filesystem``
and ``syncfs_works`` (``zodbblob.layout.syncfs``'s) and the crash tests'
``kill_point`` (``killpoints.py``'s) are imported here as before.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterable, Iterator

import zope.interface

from zodbblob.interfaces import IBlobJournal
from zodbblob.layout.syncfs import (  # noqa: F401 (their old home)
    SYNCFS_AVAILABLE,
    SYNCFS_FILESYSTEMS,
    filesystem_type,
    sync_filesystem,
    syncfs_works,
)
from zodbblob.storage import schema
from zodbblob.storage.rowdigests import RowDigests
from zodbblob.storage.killpoints import (  # noqa: F401 (their old home)
    KILL_POINT_VARIABLE,
    KILL_POINTS,
    kill_point,
)

logger = logging.getLogger(__name__)

STATE_DIR = '.zodbblob'
JOURNAL_NAME = 'journal.sqlite'

# Catalog rows added after commits are written in batches of this many.
SAVE_EVERY = 64
# Pack and verify read the catalog in batches of this many rows, each one
# query: their memory does not grow with the catalog, and a commit waits
# for one batch, not for the whole read.
READ_BATCH = 5000

class JournalError(Exception):
    """The journal database cannot be used."""


def journal_path(blob_dir: str) -> str:
    return os.path.join(blob_dir, STATE_DIR, JOURNAL_NAME)


def pack_under_way(blob_dir: str) -> bool:
    """Whether a pack of `blob_dir`'s storage has started and not finished.

    For a tool reading beside a live storage: read through the catalog's
    write-ahead log (a read-only `Journal` reads the database file
    alone), where pack records its intent before the base packs and
    clears it once its files are gone.  False when there is no catalog.
    """
    path = journal_path(blob_dir)
    try:
        db = sqlite3.connect(f'file:{urllib.parse.quote(path)}?mode=ro',
                             uri=True)
        try:
            return db.execute("SELECT 1 FROM meta WHERE name = "
                              "'pack_started'").fetchone() is not None
        finally:
            db.close()
    except sqlite3.Error:
        return False


def _read_total(db: sqlite3.Connection) -> int:
    """The bytes of all committed files: kept in meta, or summed."""
    row = db.execute(
        "SELECT value FROM meta WHERE name = 'total_size'").fetchone()
    if row is None:
        row = db.execute('SELECT total(size) FROM blob').fetchone()
    return int(row[0])


def _delete_rows(db: sqlite3.Connection, pairs: list[tuple[bytes, bytes]],
                 marks: bool = True) -> tuple[int, list[bytes]]:
    """Delete the rows `pairs` and (with `marks`) their garbage marks,
    inside a write transaction; their total size, and the oids left
    without rows.

    Each statement takes all the pairs at once from a temporary table: a
    DELETE per pair cost a statement and its round trip per file, and
    finding the oids left without files would have cost a query each.
    """
    db.execute('CREATE TEMP TABLE IF NOT EXISTS removing ('
               '  oid BLOB NOT NULL, tid BLOB NOT NULL,'
               '  PRIMARY KEY (oid, tid)) WITHOUT ROWID')
    db.executemany('INSERT OR IGNORE INTO temp.removing (oid, tid) '
                   'VALUES (?, ?)', pairs)
    removed = sum(size for (size,) in db.execute(
        'DELETE FROM blob WHERE (oid, tid) IN '
        '(SELECT oid, tid FROM temp.removing) RETURNING size'))
    if marks:
        db.execute('DELETE FROM garbage WHERE (oid, tid) IN '
                   '(SELECT oid, tid FROM temp.removing)')
    emptied = [oid for (oid,) in db.execute(
        'SELECT DISTINCT oid FROM temp.removing AS removing '
        'WHERE NOT EXISTS (SELECT 1 FROM blob WHERE blob.oid = removing.oid)')]
    db.execute('DELETE FROM temp.removing')
    return removed, emptied


@zope.interface.implementer(IBlobJournal)
class Journal(RowDigests):
    """The journal of one blob directory.

    Thread-safe: MVCC instances of one storage share a journal.
    """

    def __init__(self, blob_dir: str, read_only: bool = False):
        self.path = journal_path(blob_dir)
        self.read_only = read_only
        self._lock = threading.Lock()
        self.read_batch = READ_BATCH
        # (oid, tid, size) or (oid, tid, size, digest)
        self._unsaved: list[tuple] = []
        # Pending rows when the last batch failed: the next try waits
        # for one more batch.
        self._failed_rows = 0
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
                self._migrate()
                self._db.executescript(schema.SCHEMA)
            self.has_digest = schema.has_digest(self._db)
            self._total = _read_total(self._db)
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise JournalError('Cannot use blob journal %s: %s'
                               % (self.path, e)) from e

    def _drop_old_catalog(self) -> None:
        if schema.has_pending_rows(self._db):
            logger.warning('Blob catalog %s has an older format; it is '
                           'rebuilt from a scan', self.path)
            schema.drop_catalog(self._db)

    def _migrate(self) -> None:
        for change, message in schema.migrations(self._db):
            with self._lock:
                result = self._write(lambda: change(self._db), 'migrate')
            logger.info('Blob catalog %s: ' + message, self.path, result)

    def check(self) -> str | None:
        """What is wrong with the database file, or None if it is sound.

        SQLite's ``quick_check``: every page of every table and index is
        read and its structure checked (not the indexes' contents), so a
        page overwritten in the middle of the file is found here, at open,
        instead of by the first commit that reads it.
        """
        try:
            rows = self._db.execute('PRAGMA quick_check').fetchall()
        except sqlite3.OperationalError as e:
            # Locked, or an I/O error: not a reason to rebuild the catalog.
            raise self._failed('check', e) from e
        except sqlite3.DatabaseError as e:
            return str(e)  # malformed, or not a database
        problems = [row[0] for row in rows if row[0] != 'ok']
        return '; '.join(problems[:3]) if problems else None

    def close(self) -> None:
        """Write the pending rows (if possible) and close the database.

        Rows that cannot be written are left to the commit log, whose
        records the storage keeps when its checkpoint fails.
        """
        with self._lock:
            try:
                if not self.read_only:
                    self._save()
            finally:
                self._db.close()

    def _failed(self, action: str, error: Exception) -> JournalError:
        return JournalError('Cannot %s blob catalog %s: %s'
                            % (action, self.path, error))

    # meta values: the clean-shutdown mark, the base's last tid, a pack

    def get_meta(self, name: str):
        row = self._db.execute('SELECT value FROM meta WHERE name = ?',
                               (name,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, **values) -> None:
        """Set meta values durably; a value of None removes its name."""
        def change():
            for name, value in values.items():
                if value is None:
                    self._db.execute('DELETE FROM meta WHERE name = ?',
                                     (name,))
                else:
                    self._db.execute('INSERT OR REPLACE INTO meta '
                                     '(name, value) VALUES (?, ?)',
                                     (name, value))

        with self._lock:
            self._write(change, 'write meta values to')

    def _write(self, change, action: str, synchronous: str = 'FULL'):
        """Run `change` in one write transaction; JournalError if it fails.

        Called with the lock held.  A failed transaction is rolled back
        (SQLite may already have rolled it back when COMMIT failed), so
        the database and the in-memory state stay as they were.
        """
        try:
            self._db.execute('PRAGMA synchronous=%s' % synchronous)
            self._db.execute('BEGIN IMMEDIATE')
            result = change()
            self._db.execute('COMMIT')
        except sqlite3.Error as e:
            if self._db.in_transaction:
                try:
                    self._db.execute('ROLLBACK')
                except sqlite3.Error:
                    pass
            raise self._failed(action, e) from e
        return result

    # the commit protocol: rows are added once the base has committed

    def add(self, rows: Iterable[tuple]) -> None:
        """Record committed blob files ``(oid, tid, size, digest)``, or
        ``(oid, tid, size)`` where the digest is not known (NULL).

        A row supersedes the oid's revision before it: that row's
        ``superseded`` becomes `tid` (the index pack finds its garbage
        in).  A row whose size is None records a revision of `oid` that
        is no blob file (an undo back to before the blob existed): it
        supersedes, and adds no row.

        Neither written nor synced at once: rows are kept and written in
        batches (every SAVE_EVERY rows, before anything reads the catalog,
        at ``flush`` and ``sync``).  The commit log holds their
        transactions until a checkpoint, which flushes and syncs them
        first.  Adding a row that is there already changes nothing.

        Never raises for the database: the caller's transaction has
        committed.  A batch that cannot be written stays pending, and is
        tried again with the next batch or ``flush``.
        """
        with self._lock:
            self._unsaved.extend(rows)
            if len(self._unsaved) >= SAVE_EVERY + self._failed_rows:
                try:
                    self._save()
                except JournalError as e:
                    # Tried again one batch later, not at every commit.
                    self._failed_rows = len(self._unsaved)
                    logger.warning('%s; %d committed rows stay pending (the '
                                   'commit log keeps their transactions)',
                                   e, len(self._unsaved))

    def _save(self) -> None:
        # Called with the lock held.  The rows leave `_unsaved` only once
        # their transaction has committed: a batch that fails is kept.
        if not self._unsaved:
            return
        rows = list(self._unsaved)

        def insert():
            added = 0
            for oid, tid, size, *digest in rows:
                if size is None:
                    self._supersede(oid, tid)
                elif self._db.execute(
                        'INSERT OR IGNORE INTO blob '
                        '(oid, tid, size, digest, superseded) VALUES '
                        '(?, ?, ?, ?, (SELECT min(tid) FROM blob'
                        '  WHERE oid = ? AND tid > ?))',
                        (oid, tid, size, digest[0] if digest else None,
                         oid, tid)).rowcount:
                    added += size
                    self._supersede(oid, tid)
            self._store_total(self._total + added)
            return added

        added = self._write(insert, 'add %d rows to' % len(rows),
                            synchronous='NORMAL')
        del self._unsaved[:len(rows)]
        self._failed_rows = 0
        self._total += added

    def _supersede(self, oid: bytes, tid: bytes) -> None:
        # Inside a write transaction: the oid's row before `tid` is
        # superseded at `tid`, unless something earlier superseded it
        # (rows may come out of tid order: recovery's, a failed batch's).
        self._db.execute(
            'UPDATE blob SET superseded = ? WHERE oid = ? AND tid = ('
            '  SELECT max(tid) FROM blob WHERE oid = ? AND tid < ?) '
            'AND (superseded IS NULL OR superseded > ?)',
            (tid, oid, oid, tid, tid))

    def flush(self) -> None:
        """Write the rows added so far (without a sync); JournalError if
        they cannot be written (they stay pending)."""
        with self._lock:
            self._save()

    def sync(self) -> None:
        """Make every row added so far durable (a full WAL checkpoint)."""
        with self._lock:
            self._save()
            try:
                self._db.execute('PRAGMA wal_checkpoint(FULL)').fetchall()
            except sqlite3.Error as e:
                raise self._failed('checkpoint', e) from e

    def _query(self, sql: str, parameters=()) -> list:
        with self._lock:
            self._save()
            try:
                return self._db.execute(sql, parameters).fetchall()
            except sqlite3.Error as e:
                raise self._failed('read', e) from e

    def known(self, pairs: Iterable[tuple[bytes, bytes]]) -> set:
        """The ``(oid, tid)`` of `pairs` that the catalog has."""
        return {pair for pair in pairs if self._query(
            'SELECT 1 FROM blob WHERE oid = ? AND tid = ?', pair)}

    def _store_total(self, total: int) -> None:
        # Inside a write transaction; `_total` follows once it committed.
        self._db.execute(
            "INSERT OR REPLACE INTO meta (name, value) "
            "VALUES ('total_size', ?)", (total,))

    # the catalog

    def total_size(self) -> int:
        with self._lock:
            return self._total + sum(row[2] for row in self._unsaved
                                     if row[2] is not None)

    def revisions(self, oid: bytes) -> list[bytes]:
        return [tid for (tid,) in self._query(
            'SELECT tid FROM blob WHERE oid = ? ORDER BY tid', (oid,))]

    def committed(self) -> Iterable[tuple[bytes, bytes, int]]:
        """``(oid, tid, size)`` of every committed blob file."""
        return self._query('SELECT oid, tid, size FROM blob')

    def _read_batch(self, sql: str, parameters) -> list:
        """One batch of a batched read (tests count them)."""
        return self._query(sql, parameters)

    def rows(self, stop: bytes | None = None, digests: bool = False
             ) -> Iterator[list[tuple[bytes, bytes, int]]]:
        """Batches of ``(oid, tid, size)`` rows in ``(oid, tid)`` order;
        with `digests`, ``(oid, tid, size, digest)``.

        With `stop`, the rows superseded at or before it are left out.
        At most `read_batch` rows are read at a time, each batch from
        where the last ended, so rows removed meanwhile are not missed.
        """
        after = (b'', b'')
        superseded = ('' if stop is None else
                      'AND (superseded IS NULL OR superseded > ?) ')
        extra = () if stop is None else (stop,)
        columns = 'oid, tid, size' + (
            (', digest' if self.has_digest else ', NULL') if digests else '')
        while True:
            batch = self._read_batch(
                f'SELECT {columns} FROM blob WHERE (oid, tid) > (?, ?) '
                + superseded + 'ORDER BY oid, tid LIMIT ?',
                (*after, *extra, self.read_batch))
            if not batch:
                return
            after = batch[-1][:2]
            yield batch

    def superseded(self, stop: bytes) -> Iterator[list[tuple[bytes, bytes]]]:
        """Batches of the ``(oid, tid)`` superseded at or before `stop`.

        From the ``superseded`` index: a pack reads its candidates, not
        the catalog.  Batches as `rows`, in the order of supersession.
        """
        after = None
        while True:
            if after is None:
                batch = self._read_batch(
                    'SELECT superseded, oid, tid FROM blob '
                    'WHERE superseded <= ? ORDER BY superseded, oid, tid '
                    'LIMIT ?', (stop, self.read_batch))
            else:
                batch = self._read_batch(
                    'SELECT superseded, oid, tid FROM blob '
                    'WHERE superseded <= ? AND (superseded, oid, tid) > '
                    '(?, ?, ?) ORDER BY superseded, oid, tid LIMIT ?',
                    (stop, *after, self.read_batch))
            if not batch:
                return
            after = batch[-1]
            yield [(oid, tid) for superseded, oid, tid in batch]

    def superseded_at(self, oid: bytes, tid: bytes) -> bytes | None:
        """The tid that superseded revision `tid` of `oid`, or None."""
        rows = self._query('SELECT superseded FROM blob '
                           'WHERE oid = ? AND tid = ?', (oid, tid))
        return rows[0][0] if rows else None

    def __len__(self):
        return self._query('SELECT count(*) FROM blob')[0][0]

    # pack

    def begin_pack(self, packtime: float) -> None:
        """Durably record that a pack starts, before the base packs.

        A pack killed after the base packed and before its garbage was
        marked leaves this mark, and the next open finishes the pack.
        """
        self.set_meta(pack_started=packtime)

    def pack_started(self):
        """The pack time of a pack that started and did not finish."""
        return self.get_meta('pack_started')

    def end_pack(self) -> None:
        self.set_meta(pack_started=None)

    def mark_garbage(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """Durably record that pack is about to remove these files.

        A pack killed while removing leaves this list behind, and the next
        open finishes the removal.
        """
        pairs = list(pairs)
        with self._lock:
            self._write(lambda: self._db.executemany(
                'INSERT OR REPLACE INTO garbage (oid, tid) VALUES (?, ?)',
                pairs), 'mark garbage in')

    def garbage(self) -> list[tuple[bytes, bytes]]:
        """The files a pack marked for removal, not yet durably removed."""
        return self._db.execute('SELECT oid, tid FROM garbage').fetchall()

    def forget_garbage(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """Drop the garbage marks of `pairs`, whose removal is durable."""
        pairs = list(pairs)
        with self._lock:
            self._write(lambda: self._db.executemany(
                'DELETE FROM garbage WHERE oid = ? AND tid = ?', pairs),
                'forget garbage in', synchronous='NORMAL')

    def remove(self, pairs: Iterable[tuple[bytes, bytes]],
               marks: bool = True) -> list[bytes]:
        """Forget the files `pairs` (removed by pack, or rolled back),
        and unless told not to (`marks`), their garbage marks; the oids
        among them left without files (pack removes their directories)."""
        pairs = list(pairs)

        def delete():
            removed, emptied = _delete_rows(self._db, pairs, marks)
            self._store_total(self._total - removed)
            return removed, emptied

        with self._lock:
            self._save()
            removed, emptied = self._write(delete, 'remove rows from',
                                           synchronous='NORMAL')
            self._total -= removed
        return emptied

    def rebuild(self, blobs: Iterable[tuple[bytes, bytes, int]]) -> None:
        """Replace the catalog by `blobs` (``(oid, tid, size[, digest])``
        from a scan), read as they come (not collected); each row a
        later row of its oid follows is marked superseded by it."""
        total = 0

        def counted():
            nonlocal total
            for oid, tid, size, *digest in blobs:
                total += size
                yield oid, tid, size, digest[0] if digest else None

        def replace():
            self._db.execute('DELETE FROM blob')
            self._db.executemany(
                'INSERT OR REPLACE INTO blob (oid, tid, size, digest) '
                'VALUES (?, ?, ?, ?)', counted())
            schema.fill_superseded(self._db)
            self._store_total(total)

        with self._lock:
            self._write(replace, 'rebuild', synchronous='NORMAL')
            self._unsaved = []
            self._failed_rows = 0
            self._total = total
