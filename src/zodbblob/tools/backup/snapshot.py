"""Taking a snapshot: finish what a run left, plan the next one, write it.

A committed blob file never changes (one (oid, tid) is one content), so
the pool holds its content once, however many snapshots, revisions and
oids have it (``contents``).  A new snapshot
is incremental: its manifest is the previous one's rows, copied by one
SQL statement, plus the blob records of the transactions committed since;
its parts are hard links to the previous snapshot's plus the bytes
appended since; it copies into the pool only the new contents.  What a
backup writes grows with what changed, not with the store.  When
``Data.fs`` was packed since the previous snapshot (its bytes no longer
match), the new snapshot copies it whole and reads all its records, and
still takes from the pool every file the previous manifest lists.  A
base of format 2 has its files in the older pool: the new snapshot's rows
of them carry their recorded size and sha256, in progress, and the
writer links each into the pool by content.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable

from ZODB.utils import z64

from zodbblob.layout import fsync_directory, makedirs_durable
from zodbblob.tools.backup.contents import clear_incoming, repair_pool
from zodbblob.tools.backup.destination import (
    Snapshot,
    _finish_removals,
    _locked,
    _prepare_destination,
    _read_destination,
    _remove_snapshot,
    _unmake_destination,
    snapshots,
)
from zodbblob.tools.backup.errors import (
    BackupError,
    SourcePacked,
)
from zodbblob.tools.backup.files import (
    _boot_id,
    _Kill,
)
from zodbblob.tools.backup.manifest import (
    COMPLETE_NAME,
    DONE,
    FORMAT,
    IN_PROGRESS,
    MANIFEST_NAME,
    Manifest,
    _sqlite_uri,
)
from zodbblob.tools.backup.pruning import collect
from zodbblob.tools.backup.source import _Source
from zodbblob.tools.backup.writer import (
    BackupResult,
    _SnapshotWriter,
)

logger = logging.getLogger(__name__)


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


def _refuse_inside_source(destination: str, source: _Source) -> None:
    """Raise BackupError when `destination` is the source's blob
    directory, inside it, or holds it: a backup would then copy itself,
    or its files would be taken for the store's."""
    real_destination = os.path.realpath(destination)
    real_blob_dir = os.path.realpath(source.blob_dir)
    if (real_destination == real_blob_dir
            or real_destination.startswith(real_blob_dir + os.sep)):
        raise BackupError(f'{destination} is inside the blob directory '
                          f'{source.blob_dir} it would back up: back up '
                          f'into a directory outside it')
    if real_blob_dir.startswith(real_destination + os.sep):
        raise BackupError(f'{destination} holds the blob directory '
                          f'{source.blob_dir} it would back up: back up '
                          f'into a directory outside it')


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
    # The base's rows are done where the pool by content has them: a base
    # of format 2 has its files in the older pool, to be linked in by
    # their recorded content (and --full checks every content).
    pooled = DONE
    try:
        if base is not None:
            db.execute('ATTACH DATABASE ? AS base', (_sqlite_uri(
                os.path.join(base.path, MANIFEST_NAME), mode='ro',
                immutable=1),))
            base_format = db.execute(
                "SELECT value FROM base.meta WHERE name = 'format'"
            ).fetchone()[0]
            if full or base_format != FORMAT:
                pooled = IN_PROGRESS
        with db:
            db.execute('BEGIN')
            manifest.set_meta(
                format=FORMAT, tid=tid.hex(), size=end,
                layout=source.layout_name, source=source.path,
                blob_dir=source.blob_dir, started=time.time(),
                base=base.name if base is not None else '',
                state='planned', boot_id=_boot_id() or '',
                plan=secrets.token_hex(16), full=int(full))
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
                    'SELECT oid, tid, CASE state WHEN ? THEN size END, '
                    'CASE state WHEN ? THEN sha256 END, CASE state WHEN ? '
                    'THEN ? ELSE ? END FROM base.blob',
                    (DONE, DONE, DONE, pooled, IN_PROGRESS))
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
                    (pooled, DONE))
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
        elif meta.get('format') != FORMAT:
            reason = (f'it is of backup format {meta.get("format")}; the '
                      f'next snapshot is taken in format {FORMAT}')
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
    from the source if it is missing or damaged; when the newest snapshot
    holds the last transaction already, the pool files it lists are read
    and repaired so (`repair_pool`).  Returns a result per
    snapshot finished or found up to date.

    Raises BackupInterrupted on Ctrl-C (the snapshot is left to be
    resumed), BackupError when the destination is not one of this
    storage's or the source cannot be read as planned, SourcePacked when
    a pack ran beside the snapshot (which is dropped: the destination is
    left as it was).
    """
    destination = os.path.abspath(destination)
    existed = os.path.lexists(destination)
    dropped = False
    source = _Source(storage)
    try:
        _refuse_inside_source(destination, source)
        found = _read_destination(destination)
        new = found is None
        if source.packed():
            raise SourcePacked(source.path)
        _refuse_another_database(destination, source)
        # Durable: a snapshot inside a destination that a power cut forgets
        # would go with it.
        makedirs_durable(destination)
        with _locked(destination):
            _prepare_destination(destination, found)
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


def _backup(source: _Source, destination: str, full: bool,
            progress) -> list[BackupResult]:
    kill = _Kill()
    _finish_removals(destination)
    collect(destination)
    clear_incoming(destination)
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
            result = BackupResult(path, bytes.fromhex(
                os.path.basename(path)), up_to_date=True)
            if full:
                # Nothing to copy but what the pool lost: every snapshot
                # lists the newest one's pool files too.
                result.checked, result.repaired, result.unrepaired = (
                    repair_pool(destination, path, source, kill))
            results.append(result)
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
        # Its contents copied so far are listed, for collect to remove.
        writer._flush()
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
