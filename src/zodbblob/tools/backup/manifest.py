"""The names a destination is made of, and the manifest of one snapshot.

A snapshot's ``manifest.sqlite`` lists every file the snapshot needs,
each with its size, SHA-256 and state (in progress, done, or missing from
the source): a resumed backup skips what is done, `check` and `restore`
compare every byte with it, and `collect` reads it to learn which pool
files a removed snapshot listed.  The names below are the on-disk format
(format 3, described in `zodbblob.tools.backup`): changing one makes a
new format.  A format-2 snapshot's manifest is the same; its blob files
are in the older pool, ``.blobs``, named by oid and tid.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import sqlite3
import urllib.parse
from collections.abc import Iterator

from persistent.TimeStamp import TimeStamp

from zodbblob.layout import (
    BlobTree,
    fsync_path,
    get_layout,
    open_blob_file,
)
from zodbblob.tools.backup.errors import BackupError

FORMAT = 3
# The formats this zodbblob reads: format 2 pooled a file per (oid, tid)
# in POOL_NAME; format 3 pools each content once in CONTENTS_NAME.
FORMATS = (2, 3)
DESTINATION_MARKER = '.zodbblob-backup'
POOL_NAME = '.blobs'
POOL_LAYOUT = get_layout('chunky')
CONTENTS_NAME = '.contents'
# Where a content is copied before it has its name in CONTENTS_NAME;
# emptied by every backup before it writes.
INCOMING_NAME = '.incoming'
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
CHUNK = 1 << 20

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


def content_path(destination: str, sha256: bytes) -> str:
    """Where the pool of `destination` keeps the content of `sha256`.

    256 directories, named by the first two hex digits: a pool of a few
    wide directories, as the chunky layout of format 2 was, all made by
    the first backup of a store of a few thousand blobs, so that a later
    backup makes none.  Ten million contents are some 40000 names a
    directory, which ext4 and XFS index.
    """
    name = sha256.hex()
    return os.path.join(destination, CONTENTS_NAME, name[:2], name)


def blob_path(destination: str, meta: dict, oid: bytes, tid: bytes,
              sha256: bytes | None) -> str:
    """The pooled file of a snapshot's row, in the pool of its format."""
    if meta.get('format') == 2:
        return pool_path(destination, oid, tid)
    return content_path(destination, sha256)


def _sqlite_uri(path: str, **parameters) -> str:
    query = urllib.parse.urlencode(parameters)
    return f'file:{urllib.parse.quote(os.path.abspath(path))}?{query}'


def _hash_fd(fd: int, length: int | None = None) -> tuple[int, bytes]:
    """The size and SHA-256 of the open file `fd` from its start, up to
    `length` bytes (or its end)."""
    digest = hashlib.sha256()
    size = 0
    while length is None or size < length:
        want = CHUNK if length is None else min(CHUNK, length - size)
        chunk = os.pread(fd, want, size)
        if not chunk:
            break
        digest.update(chunk)
        size += len(chunk)
    return size, digest.digest()


def _hash_file(path: str, tree: BlobTree | None = None) -> tuple[int, str]:
    # Pool files and parts are the backup's own, but the destination is
    # a directory like any other: a link there is not followed either,
    # nor (for a pool file, with its `tree`) a link to a directory above.
    fd = open_blob_file(path) if tree is None else tree.open(path)
    try:
        return _hash_fd(fd)
    finally:
        os.close(fd)


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
