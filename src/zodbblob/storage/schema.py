"""The catalog's tables, and the migrations of older catalogs.

Kept apart from the `Journal` that uses them: what a catalog of each
zodbblob version looked like, and how it becomes today's, is one idea;
reading and writing rows is another.  Every function here runs on the
journal's connection; those that change the database run inside the
write transaction the journal opens, so that a crash leaves the old
catalog (migrated again at the next open) or the new one.
"""

from __future__ import annotations

import sqlite3

# `digest` is the file's content digest (``digest.py``), NULL where it is
# not known yet: a file adopted from a stock directory, rows rebuilt from
# a scan, or a catalog from before digests; ``verify --checksum`` fills it.
# `superseded` is the tid of the oid's next revision (NULL while the row
# is the oid's latest): the index on it is where a pack finds the
# revisions it may drop.  Partial: the latest rows are most rows.  The
# index on `digest` is where a commit with dedup on finds a committed file
# of the same content (``dedup.py``): one indexed lookup per file.
# The index of the rows without a digest, oldest first, is the background
# scrubber's queue (``scrub.py``); partial, so it holds only those.
SCHEMA = """
CREATE TABLE IF NOT EXISTS blob (
    oid BLOB NOT NULL,
    tid BLOB NOT NULL,
    size INTEGER NOT NULL,
    superseded BLOB,
    digest BLOB,
    PRIMARY KEY (oid, tid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blob_superseded ON blob (superseded)
    WHERE superseded IS NOT NULL;
CREATE INDEX IF NOT EXISTS blob_digest ON blob (digest)
    WHERE digest IS NOT NULL;
CREATE INDEX IF NOT EXISTS blob_undigested ON blob (tid, oid)
    WHERE digest IS NULL;
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


def _columns(db: sqlite3.Connection) -> list[str]:
    return [row[1] for row in db.execute("PRAGMA table_info('blob')")]


def has_pending_rows(db: sqlite3.Connection) -> bool:
    """Whether this is a catalog of zodbblob before the commit log, which
    kept pending rows in the catalog (a `state` column)."""
    return 'state' in _columns(db)


def drop_catalog(db: sqlite3.Connection) -> None:
    """Drop the rows and their total: a scan rebuilds them."""
    db.executescript("DROP TABLE blob; DELETE FROM meta WHERE name IN "
                     "('state', 'total_size');")


def lacks_superseded(db: sqlite3.Connection) -> bool:
    """Whether this is a catalog of zodbblob before the superseded
    column (and not a new, empty database)."""
    columns = _columns(db)
    return bool(columns) and 'superseded' not in columns


def add_superseded(db: sqlite3.Connection) -> int:
    """Add the column and fill it in; the count of superseded rows."""
    db.execute('ALTER TABLE blob ADD COLUMN superseded BLOB')
    return fill_superseded(db)


def fill_superseded(db: sqlite3.Connection) -> int:
    """Mark each row that a later row of its oid follows as superseded by
    the first of those; the count marked.  One pass over the rows, each a
    primary-key range lookup."""
    return db.execute(
        'UPDATE blob SET superseded = ('
        '  SELECT min(later.tid) FROM blob AS later'
        '  WHERE later.oid = blob.oid AND later.tid > blob.tid) '
        'WHERE EXISTS ('
        '  SELECT 1 FROM blob AS later'
        '  WHERE later.oid = blob.oid AND later.tid > blob.tid)').rowcount


def lacks_digest(db: sqlite3.Connection) -> bool:
    """Whether this is a catalog of zodbblob before content digests (and
    not a new, empty database)."""
    columns = _columns(db)
    return bool(columns) and 'digest' not in columns


def has_digest(db: sqlite3.Connection) -> bool:
    """Whether the catalog's rows have a digest column (a read-only open
    of an older catalog does not migrate it)."""
    return 'digest' in _columns(db)


def add_digest(db: sqlite3.Connection) -> int:
    """Add the column: every row's digest is NULL, not known yet; the
    count of rows."""
    db.execute('ALTER TABLE blob ADD COLUMN digest BLOB')
    return db.execute('SELECT count(*) FROM blob').fetchone()[0]


def _has_index(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' "
                      "AND name = ?", (name,)).fetchone() is not None


def lacks_digest_index(db: sqlite3.Connection) -> bool:
    """Whether a catalog with a digest column lacks its index (one from
    before dedup)."""
    return 'digest' in _columns(db) and not _has_index(db, 'blob_digest')


def add_digest_index(db: sqlite3.Connection) -> int:
    """Index the digests; the count of rows that have one."""
    db.execute('CREATE INDEX blob_digest ON blob (digest) '
               'WHERE digest IS NOT NULL')
    return db.execute('SELECT count(*) FROM blob '
                      'WHERE digest IS NOT NULL').fetchone()[0]


def lacks_undigested_index(db: sqlite3.Connection) -> bool:
    """Whether a catalog with a digest column lacks the index of its
    rows without one (one from before the scrubber)."""
    return 'digest' in _columns(db) and not _has_index(db,
                                                       'blob_undigested')


def add_undigested_index(db: sqlite3.Connection) -> int:
    """Index the rows without a digest; their count."""
    db.execute('CREATE INDEX blob_undigested ON blob (tid, oid) '
               'WHERE digest IS NULL')
    return db.execute('SELECT count(*) FROM blob '
                      'WHERE digest IS NULL').fetchone()[0]


def migrations(db: sqlite3.Connection):
    """The changes an older catalog needs, in order, each ``(change,
    message)``: `change(db)` runs in a write transaction, and `message`
    (with its result) is what the journal logs.  Asked one at a time, so
    that each is asked of the catalog the one before left."""
    if lacks_superseded(db):
        yield add_superseded, ('added the superseded column (%d revisions '
                               'superseded by a later one)')
    if lacks_digest(db):
        yield add_digest, ('added the digest column (its %d rows have no '
                           'digest yet: verify --checksum records them)')
    if lacks_digest_index(db):
        yield add_digest_index, ('indexed the digests of %d rows (where '
                                 'dedup finds equal contents)')
    if lacks_undigested_index(db):
        yield add_undigested_index, ('indexed the %d rows without a digest '
                                     '(the background scrub hashes them)')
