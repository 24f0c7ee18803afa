"""Removing snapshots, and the pool files that no snapshot lists any more.

Removing a snapshot (`prune`, or deleting its directory) leaves pool
files (contents, and the files of the format-2 pool) that may be no
snapshot's any more; `collect` removes them.  The
links in ``.manifests`` tell it which to consider: a link whose snapshot
is gone lists them, and a file goes only when no remaining manifest
lists it.  The link goes last, so a collection that is interrupted is
finished by the next backup or prune.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sqlite3

from zodbblob.layout import (
    fsync_directory,
    remove_if_exists,
)
from zodbblob.storage.catalog import (
    sync_filesystem,
    syncfs_works,
)
from zodbblob.tools.backup.destination import (
    _finish_removals,
    _locked,
    _read_destination,
    _remove_snapshot,
    _same_manifest,
    snapshots,
)
from zodbblob.tools.backup.errors import BackupError
from zodbblob.tools.backup.files import (
    COLLECT_KILL_VARIABLE,
    _Kill,
)
from zodbblob.tools.backup.manifest import (
    IN_PROGRESS,
    MANIFEST_NAME,
    MANIFEST_SUFFIX,
    MANIFESTS_NAME,
    PARTIAL_SUFFIX,
    _sqlite_uri,
    content_path,
    pool_path,
    tid_time,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CollectResult:
    """What `collect` removed from the pool: the snapshots, and the files
    (and their bytes) it freed, those whose last name went."""

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
    doomed, contents, partials = _unlisted(removed, remaining.values())
    kill = _Kill(COLLECT_KILL_VARIABLE)
    touched = set()
    for oid, tid in partials:
        remove_if_exists(pool_path(destination, oid, tid) + PARTIAL_SUFFIX)
    paths = [pool_path(destination, oid, tid) for oid, tid in doomed] + [
        content_path(destination, sha256) for sha256, in contents]
    for path in paths:
        try:
            info = os.lstat(path)
            os.remove(path)
        except FileNotFoundError:
            continue  # removed by a collection that was interrupted
        if info.st_nlink == 1:
            # Its last name: a format-2 file linked into the pool by
            # content frees nothing until that name goes too.
            result.files += 1
            result.bytes += info.st_size
        touched.add(os.path.dirname(path))
        kill.after_one()
    # The removals durable before the links that list them go: a power
    # cut then leaves no file that nothing would collect.
    if syncfs_works(destination):
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
        logger.debug('Removed %d blob files (%d bytes) from the pool of '
                     '%s: no remaining snapshot lists them', result.files,
                     result.bytes, destination)
    return result


def _unlisted(removed: list[str], remaining) -> tuple[list, list, list]:
    """``(oid, tid)`` of the format-2 pool's files the `removed` manifests
    list and no `remaining` one does, ``(sha256,)`` of the contents
    likewise; and ``(oid, tid)`` of the files they list as in progress.

    A manifest of format 2 names files of the older pool, one of format
    3 contents; one of format 3 whose rows are still to be linked in
    from the older pool (a base of format 2) keeps those files too.
    """
    db = sqlite3.connect(':memory:', isolation_level=None)
    try:
        db.execute('CREATE TABLE candidate (oid BLOB, tid BLOB, '
                   'PRIMARY KEY (oid, tid)) WITHOUT ROWID')
        db.execute('CREATE TABLE content (sha256 BLOB PRIMARY KEY) '
                   'WITHOUT ROWID')
        partials = []
        for path in removed:
            with _attached(db, _sqlite_uri(path, mode='ro', immutable=1),
                           path):
                if _format(db) == 2:
                    db.execute('INSERT OR IGNORE INTO candidate '
                               'SELECT oid, tid FROM listed.blob')
                    partials += db.execute(
                        'SELECT oid, tid FROM listed.blob WHERE state = ?',
                        (IN_PROGRESS,)).fetchall()
                else:
                    db.execute('INSERT OR IGNORE INTO content SELECT sha256 '
                               'FROM listed.blob WHERE sha256 IS NOT NULL')
        for path, complete in remaining:
            # An unfinished manifest may have rows in its WAL: read it as
            # SQLite reads a live database.
            uri = _sqlite_uri(path, mode='ro', **(
                {'immutable': 1} if complete else {}))
            with _attached(db, uri, path):
                older = _format(db) == 2
                db.execute('DELETE FROM candidate WHERE EXISTS (SELECT 1 '
                           'FROM listed.blob b WHERE b.oid = candidate.oid '
                           'AND b.tid = candidate.tid AND (? OR (b.state = '
                           '? AND b.sha256 IS NOT NULL)))',
                           (older, IN_PROGRESS))
                if not older:
                    db.execute('DELETE FROM content WHERE EXISTS (SELECT 1 '
                               'FROM listed.blob b WHERE b.sha256 = '
                               'content.sha256)')
        doomed = db.execute('SELECT oid, tid FROM candidate').fetchall()
        contents = db.execute('SELECT sha256 FROM content').fetchall()
    finally:
        db.close()
    return doomed, contents, partials


def _format(db: sqlite3.Connection) -> int:
    row = db.execute(
        "SELECT value FROM listed.meta WHERE name = 'format'").fetchone()
    return row[0] if row else 2


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
    if _read_destination(destination) is None:
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
