"""A destination: its marker, lock, snapshots and their manifests' links.

A directory is taken for a destination only with its
``.zodbblob-backup`` marker of a format this zodbblob reads (2 or 3); a
non-empty directory without it, or of another format, is refused, naming
it, and nothing is changed.  The first backup into a format-2
destination makes it format 3 (its marker, one atomic rename, logged):
new snapshots pool by content beside the old ones, which keep their
files in ``.blobs`` until pruned.  One backup or prune writes into a
destination at a time (its ``.lock``).  A snapshot is removed by
renaming it away first, so that no half-deleted directory is ever taken
for a snapshot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import sqlite3

import logging

import zc.lockfile

from zodbblob.layout import (
    fsync_directory,
    fsync_path,
    remove_if_exists,
)
from zodbblob.tools.backup.errors import BackupError
from zodbblob.tools.backup.files import _write_marker
from zodbblob.tools.backup.manifest import (
    COMPLETE_NAME,
    CONTENTS_NAME,
    DESTINATION_MARKER,
    FORMAT,
    FORMATS,
    LOCK_NAME,
    MANIFEST_SUFFIX,
    MANIFESTS_NAME,
    PARTIAL_SUFFIX,
    POOL_NAME,
    REMOVING_PREFIX,
    SNAPSHOT_NAME,
    Manifest,
    _sqlite_uri,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Snapshot:
    path: str
    tid: bytes
    complete: bool

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def snapshots(destination: str) -> list[Snapshot]:
    """The snapshots in `destination`, oldest transaction first."""
    try:
        names = os.listdir(destination)
    except FileNotFoundError:
        return []
    result = []
    for name in sorted(names):
        path = os.path.join(destination, name)
        if SNAPSHOT_NAME.match(name) and os.path.isdir(path):
            result.append(Snapshot(path, bytes.fromhex(name), os.path.exists(
                os.path.join(path, COMPLETE_NAME))))
    return result


def _read_destination(destination: str) -> int | None:
    """The format of backup destination `destination`, one this
    zodbblob reads.

    None where it is new: missing, or empty.  Raises BackupError, naming
    the path, for anything else (a file, a destination of another format,
    a directory of other things), having changed nothing.
    """
    if not os.path.lexists(destination):
        return None
    if not os.path.isdir(destination):
        raise BackupError(f'{destination} is not a directory')
    marker = os.path.join(destination, DESTINATION_MARKER)
    try:
        with open(marker) as f:
            text = f.read()
    except FileNotFoundError:
        names = sorted(n for n in os.listdir(destination) if n != LOCK_NAME)
        if not names:
            return None
        older = [n for n in names if SNAPSHOT_NAME.match(n)]
        if older:
            raise BackupError(
                f'{destination} holds snapshots of an older backup format '
                f'({os.path.join(destination, older[0])} and others, and no '
                f'{DESTINATION_MARKER}); this zodbblob reads and writes '
                f'format {FORMAT}: back up into a new destination') from None
        raise BackupError(
            f'{destination} is not a backup destination (it has no '
            f'{DESTINATION_MARKER}) and is not empty: give a new or empty '
            f'directory') from None
    try:
        found = json.loads(text)['format']
    except (ValueError, KeyError, TypeError):
        raise BackupError(f'{marker} is not a zodbblob backup marker: '
                          f'{text[:80]!r}') from None
    if found not in FORMATS:
        raise BackupError(
            f'{destination} is a backup destination of format {found!r} '
            f'({marker}); this zodbblob reads formats '
            f'{" and ".join(map(str, FORMATS))}: use the zodbblob that '
            f'wrote it, or back up into a new destination')
    return found


def _prepare_destination(destination: str,
                         found: int | None = None) -> None:
    """Make `destination` one of this format: its marker, pools and
    manifests' links.  `found`: the format it had (None: new)."""
    # The marker first: a directory with a pool but no marker would be
    # refused as someone else's.  A format-2 destination's is replaced
    # whole, in one rename: its snapshots stay as they are, read from
    # .blobs, and the next snapshots pool by content.  Nothing else is
    # rewritten, which for a large destination would take hours.
    if found != FORMAT:
        _write_marker(destination, DESTINATION_MARKER, json.dumps({
            'format': FORMAT, 'pool': CONTENTS_NAME}) + '\n')
        if found is not None:
            logger.warning(
                'Backup destination %s is now of format %d: new snapshots '
                'keep each content once in %s; the snapshots of format %d '
                'keep their files in %s until pruned (each is read once, '
                'against its recorded sha256, as it is linked into %s)',
                destination, FORMAT, CONTENTS_NAME, found, POOL_NAME,
                CONTENTS_NAME)
    for name in (CONTENTS_NAME, MANIFESTS_NAME):
        os.makedirs(os.path.join(destination, name), exist_ok=True)


@contextlib.contextmanager
def _locked(destination: str):
    """Hold `destination`'s lock: one backup or prune at a time."""
    try:
        lock = zc.lockfile.LockFile(os.path.join(destination, LOCK_NAME))
    except zc.lockfile.LockError:
        raise BackupError(f'Another backup is writing into {destination} '
                          f'(lock {LOCK_NAME} is held)') from None
    try:
        yield
    finally:
        lock.close()


def _manifest_link(destination: str, name: str) -> str:
    return os.path.join(destination, MANIFESTS_NAME, name + MANIFEST_SUFFIX)


def _link_manifest(destination: str, snapshot: str,
                   manifest: Manifest) -> None:
    """Give `snapshot`'s manifest its name in ``.manifests``.

    Done before the snapshot copies anything into the pool: `collect`
    learns from these names which pool files a removed snapshot listed.
    The planned rows are checkpointed into the one file first, so the
    link (or, where links fail, the copy) holds them all.
    """
    manifest.checkpoint()
    target = _manifest_link(destination, os.path.basename(snapshot))
    with contextlib.suppress(FileNotFoundError):
        if os.path.samefile(target, manifest.path):
            return
    staged = target + PARTIAL_SUFFIX
    remove_if_exists(staged)
    try:
        os.link(manifest.path, staged)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK,
                           errno.ENOTSUP):
            raise
        shutil.copyfile(manifest.path, staged)
        fsync_path(staged)
    os.replace(staged, target)
    fsync_directory(os.path.dirname(target))


def _plan_token(path: str, **parameters) -> str | None:
    try:
        db = sqlite3.connect(_sqlite_uri(path, mode='ro', **parameters),
                             uri=True)
        try:
            row = db.execute(
                "SELECT value FROM meta WHERE name = 'plan'").fetchone()
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return None
    return row[0] if row else None


def _same_manifest(link: str, manifest: str) -> bool:
    with contextlib.suppress(OSError):
        if os.path.samefile(link, manifest):
            return True
    # A copy, where the destination's filesystem has no hard links.
    token = _plan_token(link, immutable=1)
    return token is not None and token == _plan_token(manifest)


def _unmake_destination(destination: str) -> None:
    """Take back what `_prepare_destination` made in a new destination;
    with its lock held, which goes too (after it, nobody can tell)."""
    for name in (POOL_NAME, CONTENTS_NAME, MANIFESTS_NAME):
        shutil.rmtree(os.path.join(destination, name), ignore_errors=True)
    remove_if_exists(os.path.join(destination, DESTINATION_MARKER))
    remove_if_exists(os.path.join(destination, LOCK_NAME))


def _remove_snapshot(snapshot: Snapshot) -> None:
    """Take `snapshot` out of the destination, then delete it.

    Renamed first, in one step, so that no half-deleted directory is ever
    taken for a snapshot; a rename left by a crash is deleted by the next
    backup or prune.  Its pool files stay until `collect`.
    """
    destination = os.path.dirname(snapshot.path)
    removing = os.path.join(destination, REMOVING_PREFIX + snapshot.name)
    shutil.rmtree(removing, ignore_errors=True)
    os.rename(snapshot.path, removing)
    fsync_directory(destination)
    shutil.rmtree(removing)


def _finish_removals(destination: str) -> None:
    for name in os.listdir(destination):
        if name.startswith(REMOVING_PREFIX):
            shutil.rmtree(os.path.join(destination, name))
