"""Restoring a snapshot: a Data.fs with its index, and a blob directory.

Everything is written under hidden names in the target directory and
renamed into place at the end, with a marker (``.zodbblob-restoring``)
written before the renames and removed after them: a failed restore
leaves nothing behind, and one interrupted among its renames is
finished by the next restore of the same snapshot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable

import ZODB.FileStorage
from ZODB.utils import oid_repr

from zodbblob.layout import (
    LAYOUT_MARKER,
    BlobTree,
    fsync_directory,
    fsync_path,
    get_layout,
    remove_if_exists,
)
from zodbblob.storage import (
    BlobDirectoryInUse,
    hold_blob_directory,
)
from zodbblob.storage.catalog import Journal
from zodbblob.tools.backup.checking import (
    _check_parts,
    _mismatch,
    _open_snapshot,
    _pool,
)
from zodbblob.tools.backup.errors import BackupError
from zodbblob.tools.backup.files import (
    RESTORE_KILL_VARIABLE,
    _Files,
    _Kill,
    _write_marker,
)
from zodbblob.tools.backup.manifest import (
    CHUNK,
    DONE,
    MISSING,
    _hash_file,
    blob_path,
    tid_time,
)

logger = logging.getLogger(__name__)

# Written before restore's final renames, removed after them: a restore
# interrupted between them is finished by the next run.
RESTORING_NAME = '.zodbblob-restoring'


@dataclasses.dataclass
class RestoreResult:
    directory: str
    tid: bytes
    data_fs_size: int
    blob_files: int
    missing: int
    linked: int = 0
    shared: int = 0

    def lines(self) -> list[str]:
        result = [f'{self.directory}: restored transaction {self.tid.hex()} '
                  f'({tid_time(self.tid)}): Data.fs {self.data_fs_size} '
                  f'bytes, {self.blob_files} blob files']
        if self.linked:
            others = self.blob_files - self.linked - self.shared
            result.append(f'  {self.linked} blob files are hard links to '
                          f'the backup\'s files, {others} are copies')
        if self.shared:
            result.append(f'  {self.shared} blob files are hard links to a '
                          f'restored file of the same content')
        if self.missing:
            result.append(f'  {self.missing} blob files were missing from '
                          f'the source when the snapshot was taken; '
                          f'`zodbblob verify` reports them')
        return result


def _refuse_occupied(directory: str) -> None:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise BackupError(f'{directory} is not a directory')
    data_fs = os.path.join(directory, 'Data.fs')
    blob_dir = os.path.join(directory, 'blobs')
    if os.path.lexists(data_fs):
        raise BackupError(f'{data_fs} exists: restore into a directory '
                          f'without a Data.fs')
    # A Data.fs.index of another database would be taken for the
    # restored file's own.
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith('Data.fs.'):
                raise BackupError(
                    f'{os.path.join(directory, name)} exists: restore into a '
                    f'directory without Data.fs files')
    if os.path.islink(blob_dir):
        # The staged blob directory is renamed into place at the end,
        # which would replace the link, not fill the directory it names.
        raise BackupError(
            f'{blob_dir} is a symbolic link (to {os.readlink(blob_dir)}): '
            f'restore into a directory on that volume and link to its '
            f'blobs afterwards')
    if os.path.lexists(blob_dir) and not os.path.isdir(blob_dir):
        raise BackupError(f'{blob_dir} exists and is not a directory: '
                          f'restore into a directory without it')
    if os.path.lexists(blob_dir) and os.listdir(blob_dir):
        try:
            lock = hold_blob_directory(blob_dir)
        except BlobDirectoryInUse as e:
            raise BackupError(f'{e}: restore into a directory no storage '
                              f'uses') from None
        except OSError:
            lock = None
        if lock is not None:
            lock.close()
        raise BackupError(f'{blob_dir} exists and is not empty: restore into '
                          f'a directory without a blob directory')


def restore(snapshot: str, directory: str, link: bool = False,
            layout: str | None = None,
            progress: Callable[[int, int], None] | None = None,
            links: bool = True) -> RestoreResult:
    """Make ``directory/Data.fs`` (with its index) and ``directory/blobs``.

    The blob directory gets `layout` (by default the source's), and
    copies of the pool's files; with `link`, hard links to them where
    the filesystem allows.  With `links` (the default) the blob files of
    one content are hard links to one restored file, as a deduplicated
    store has them (committed blob files are never changed in place, so
    a store without dedup reads them just as well); without, each is a
    copy.  Refuses, changing nothing, when `directory`
    holds a Data.fs (or its index) or a non-empty ``blobs``, and when the
    snapshot is unfinished.  Every byte read is checked against the
    manifest; everything is written under hidden names and renamed into
    place at the end, so a failed or interrupted restore leaves nothing
    behind.  The blob directory gets zodbblob's catalog and Data.fs its
    ``Data.fs.index``, so the first open need scan neither.
    """
    snapshot = os.path.abspath(snapshot)
    directory = os.path.abspath(directory)
    manifest, meta = _open_snapshot(snapshot)
    try:
        try:
            chosen = get_layout(layout or meta['layout'])
        except ValueError as e:
            raise BackupError(str(e)) from None
        finished = _finish_interrupted_restore(directory, meta)
        if finished is not None:
            return finished
        _refuse_occupied(directory)
        created = not os.path.exists(directory)
        os.makedirs(directory, exist_ok=True)
        staged_data = os.path.join(directory, '.Data.fs.restoring')
        staged_blobs = os.path.join(directory, '.blobs.restoring')
        staged = [staged_data] + [staged_data + suffix for suffix in (
            '.index', '.lock', '.tmp', '.index.index_tmp')]
        for path in staged:
            remove_if_exists(path)
        shutil.rmtree(staged_blobs, ignore_errors=True)
        try:
            return _restore(snapshot, manifest, meta, chosen, link,
                            directory, staged_data, staged_blobs, progress,
                            links)
        except BaseException:
            for path in staged:
                remove_if_exists(path)
            shutil.rmtree(staged_blobs, ignore_errors=True)
            if created:
                shutil.rmtree(directory, ignore_errors=True)
            raise
    finally:
        manifest.close()


def _write_index(data_fs: str) -> str:
    """Write ``Data.fs.index`` of `data_fs`, the way FileStorage does.

    FileStorage writes its index when it opens a file without one, and
    changes nothing else of a file that ends with a committed
    transaction, as a snapshot's does.  Returns the index's path.
    """
    ZODB.FileStorage.FileStorage(data_fs).close()
    for suffix in ('.lock', '.tmp'):
        remove_if_exists(data_fs + suffix)
    index = data_fs + '.index'
    if not os.path.exists(index):
        raise BackupError(f'FileStorage wrote no index {index}')
    fsync_path(index)
    return index


def _check_pooled(path: str, actual_size: int, actual: bytes, size: int,
                  sha256: bytes) -> None:
    if actual_size != size:
        raise BackupError(f'size mismatch: {path} is {actual_size} bytes, '
                          f'the manifest recorded {size}; nothing restored')
    if actual != sha256:
        raise BackupError(_mismatch(path, actual, sha256)
                          + '; nothing restored')


def _restore(snapshot, manifest, meta, layout, link, directory, staged_data,
             staged_blobs, progress, links) -> RestoreResult:
    tid = bytes.fromhex(meta['tid'])
    destination = os.path.dirname(snapshot)
    problems: list[str] = []
    parts = _check_parts(snapshot, manifest, meta, problems,
                         hash_files=False)
    if problems:
        raise BackupError(f'{snapshot}: {problems[0]}')
    files = _Files(directory)
    digests = [sha256 for *_, sha256, state in manifest.parts()]
    with open(staged_data, 'wb') as out:
        for path, expected in zip(parts, digests):
            digest = hashlib.sha256()
            with open(path, 'rb') as part:
                while chunk := part.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.digest() != expected:
                raise BackupError(_mismatch(path, digest.digest(), expected)
                                  + '; nothing restored')
        out.flush()
        os.fsync(out.fileno())
    _write_index(staged_data)

    os.mkdir(staged_blobs)
    _write_marker(staged_blobs, LAYOUT_MARKER, layout.name)
    counts = manifest.counts()
    total = counts.get(DONE, 0)
    catalog = []
    linked = shared = 0
    # The contents more than one row has, and the first file restored of
    # each: the others become links to it.
    repeated = {sha256 for sha256, in manifest.db.execute(
        'SELECT sha256 FROM blob WHERE state = ? GROUP BY sha256 '
        'HAVING count(*) > 1', (DONE,))} if links else set()
    # sha256 -> (that file, whether it is a link to the pool's).
    restored: dict[bytes, tuple[str, bool]] = {}
    with BlobTree(_pool(destination, meta)) as pool_tree:
        for oid, blob_tid, size, sha256, state in manifest.blobs(DONE):
            path = blob_path(destination, meta, oid, blob_tid, sha256)
            if not os.path.lexists(path):
                raise BackupError(
                    f'{snapshot}: the pool lacks {path}, the file of oid '
                    f'{oid_repr(oid)} tid {oid_repr(blob_tid)} its manifest '
                    f'lists; nothing restored')
            target = os.path.join(staged_blobs,
                                  layout.getBlobFilePath(oid, blob_tid))
            placed = from_pool = False
            if sha256 in restored:
                # Checked when it was restored: the same bytes.
                first, from_pool = restored[sha256]
                placed = files.link(first, target)
                if placed and from_pool:
                    # The first is the pool's file: so is this one.
                    linked += 1
                elif placed:
                    shared += 1
                else:
                    # The link limit, say: this copy takes its place.
                    del restored[sha256]
                    from_pool = False
            if not placed and link:
                _check_pooled(path, *_hash_file(path, pool_tree), size, sha256)
                placed = from_pool = files.link(path, target, pool_tree)
                if placed:
                    linked += 1
                else:
                    logger.warning('Cannot hard-link %s into %s: copying the '
                                   'blob files instead', path, directory)
                    link = False
            if not placed:
                fd = pool_tree.open(path)
                try:
                    info = os.fstat(fd)
                    actual_size, actual = files.copy(
                        fd, target, stat.S_IMODE(info.st_mode), 0, info.st_size)
                finally:
                    os.close(fd)
                _check_pooled(path, actual_size, actual, size, sha256)
            if sha256 in repeated and sha256 not in restored:
                restored[sha256] = target, from_pool
            catalog.append((oid, blob_tid, size))
            if progress is not None:
                progress(len(catalog), total)
    journal = Journal(staged_blobs)
    try:
        journal.rebuild(catalog)
        journal.set_meta(state='closed', last_tid=tid)
    finally:
        journal.close()
    files.sync()
    result = RestoreResult(directory, tid, meta['size'], len(catalog),
                           counts.get(MISSING, 0), linked, shared)
    _write_marker(directory, RESTORING_NAME, json.dumps(
        dataclasses.asdict(result) | {'tid': tid.hex()}) + '\n')
    _rename_restored(directory, _Kill(RESTORE_KILL_VARIABLE))
    return result


def _rename_restored(directory: str, kill: _Kill | None = None) -> None:
    """Give the staged Data.fs, its index and blobs their names; done
    with the restore's marker last.  What is renamed already is skipped."""
    for staged, final in (('.blobs.restoring', 'blobs'),
                          ('.Data.fs.restoring.index', 'Data.fs.index'),
                          ('.Data.fs.restoring', 'Data.fs')):
        staged = os.path.join(directory, staged)
        if os.path.lexists(staged):
            os.replace(staged, os.path.join(directory, final))
            if kill is not None:
                kill.after_one()
    for name in ('blobs', 'Data.fs.index', 'Data.fs'):
        if not os.path.lexists(os.path.join(directory, name)):
            raise BackupError(
                f'{directory}: the interrupted restore lost its '
                f'{name} ({RESTORING_NAME} is left): remove what it '
                f'restored and restore again')
    fsync_directory(directory)
    os.remove(os.path.join(directory, RESTORING_NAME))
    fsync_directory(directory)


def _finish_interrupted_restore(directory: str, meta: dict
                                ) -> RestoreResult | None:
    """Finish the restore of this snapshot that `directory` holds,
    interrupted among its final renames; None when there is none.

    BackupError for an interrupted restore of another snapshot: its
    files are in place in part, and only that snapshot finishes them.
    """
    marker = os.path.join(directory, RESTORING_NAME)
    try:
        with open(marker) as f:
            recorded = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        raise BackupError(f'{marker}: cannot read the marker of an '
                          f'interrupted restore: {e}') from None
    if recorded.get('tid') != meta['tid']:
        raise BackupError(
            f'{directory} holds a restore of snapshot {recorded.get("tid")} '
            f'that was interrupted ({marker}): restore that snapshot again '
            f'to finish it')
    _rename_restored(directory)
    logger.warning('Finished the restore into %s that was interrupted '
                   'during its final renames', directory)
    return RestoreResult(
        directory, bytes.fromhex(recorded['tid']),
        recorded['data_fs_size'], recorded['blob_files'],
        recorded['missing'], recorded['linked'], recorded.get('shared', 0))
