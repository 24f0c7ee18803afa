"""The cache index's schema: its tables, their version and migrations.

The index (``.zodbblob-cache.sqlite``, WAL mode) knows every file of the
cache directory, so nothing after the first open walks the directory:

``blobs``
    One row per ``(oid, tid)``: ``size``, ``accessed`` (time of the last
    access folded in from the log), ``state`` (``complete``;
    ``in-progress`` while a download runs, with the ``token`` of its owner
    and the time it ``started``).  Indexed by ``accessed`` for eviction
    (complete rows only) and by ``token`` (rows that have one).
``accesses``
    The access log: one row per batch of accesses, its ``(oid, tid,
    time)`` records packed in one ``batch`` value (`ACCESS_RECORD` in
    `zodbblob.cache.accesslog`).  Appending a batch writes a page or two,
    wherever in the index its files' rows are.  A prune (and ``stats``,
    and a flush that finds the log long) folds it into ``blobs.accessed``,
    each file's row once, and empties it, in one write transaction.
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
"""

SCHEMA_VERSION = 3

COMPLETE = 'complete'
IN_PROGRESS = 'in-progress'

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


# Created once the rows of a build are in: the indexes are then sorted in
# one pass, and the totals are counted once instead of per row.  A row that
# becomes complete counts itself in; whoever deletes complete rows counts
# them out in the same transaction (`index.count_out`: a file forgotten, a
# prune, a file lost to a restart), as a trigger per row costs as much as
# the delete.
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
