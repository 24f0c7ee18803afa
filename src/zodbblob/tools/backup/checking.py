"""Checking a snapshot: every byte of its files against its manifest.

A snapshot is never written again once complete, so a byte that differs
from what its manifest recorded is damage (a disk, a hand, a tool that
wrote into a hard-linked file).  `check` reports every such file;
`restore` reads the snapshot the same way (`_open_snapshot`,
`_check_parts`) and refuses it at the first.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from ZODB.utils import oid_repr

from zodbblob.layout import BlobTree
from zodbblob.tools.backup.destination import (
    _read_destination,
    snapshots,
)
from zodbblob.tools.backup.errors import BackupError
from zodbblob.tools.backup.manifest import (
    COMPLETE_NAME,
    CONTENTS_NAME,
    DESTINATION_MARKER,
    DONE,
    FORMATS,
    MANIFEST_NAME,
    MISSING,
    POOL_NAME,
    Manifest,
    _hash_file,
    blob_path,
    part_name,
)


@dataclasses.dataclass
class CheckReport:
    """What `check` found; no problems means every byte is as recorded."""

    snapshot: str
    tid: bytes | None = None
    parts: int = 0
    blob_files: int = 0
    problems: list = dataclasses.field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return self.problems + [
            f'{self.snapshot}: {self.parts} Data.fs parts, {self.blob_files} '
            f'blob files, '
            + ('clean' if self.clean else f'{len(self.problems)} problems')]


def _open_snapshot(snapshot: str, complete: bool = True
                   ) -> tuple[Manifest, dict]:
    """The manifest of `snapshot`, a snapshot of this format whose pool
    is there; unfinished ones too unless `complete`."""
    if os.path.exists(os.path.join(snapshot, DESTINATION_MARKER)):
        taken = [s for s in snapshots(snapshot) if s.complete]
        example = taken[-1].path if taken else os.path.join(snapshot,
                                                            '<tid>')
        raise BackupError(f'{snapshot} is a backup destination, not a '
                          f'snapshot: name one of its snapshots, such as '
                          f'{example}')
    has_manifest = os.path.exists(os.path.join(snapshot, MANIFEST_NAME))
    if complete and not os.path.exists(os.path.join(snapshot,
                                                    COMPLETE_NAME)):
        if has_manifest:
            raise BackupError(f'{snapshot} is unfinished (no {COMPLETE_NAME}'
                              f' marker): run the backup again to finish it')
        raise BackupError(f'{snapshot} is not a backup snapshot: no '
                          f'{COMPLETE_NAME} marker')
    if not has_manifest:
        raise BackupError(f'{snapshot} is not a backup snapshot: no '
                          f'{MANIFEST_NAME}')
    manifest = Manifest(snapshot, read_only=True)
    try:
        meta = manifest.meta()
        if meta.get('format') not in FORMATS:
            raise BackupError(
                f'{snapshot} is a snapshot of backup format '
                f'{meta.get("format")!r}; this zodbblob reads formats '
                f'{" and ".join(map(str, FORMATS))}')
        destination = os.path.dirname(snapshot)
        pool = _pool(destination, meta)
        if not os.path.isdir(pool):
            raise BackupError(
                f'{snapshot}: its blob files are in {pool}, which does not '
                f'exist: a snapshot is read where it was taken, beside '
                f'the pool of its destination')
        _read_destination(destination)
    except BaseException:
        manifest.close()
        raise
    return manifest, meta


def _pool(destination: str, meta: dict) -> str:
    """The pool that holds the blob files of a snapshot of `meta`."""
    return os.path.join(destination, POOL_NAME if meta.get('format') == 2
                        else CONTENTS_NAME)


def _mismatch(path: str, actual: bytes, recorded: bytes) -> str:
    return (f'checksum mismatch: {path} has sha256 {actual.hex()}, the '
            f'manifest recorded {recorded.hex()}')


def _check_parts(snapshot: str, manifest: Manifest, meta: dict,
                 problems: list, hash_files: bool = True) -> list[str]:
    """The part paths of `snapshot` in order; what is wrong to `problems`."""
    paths = []
    position = 0
    for start, end, sha256, state in manifest.parts():
        path = os.path.join(snapshot, part_name(start, end))
        paths.append(path)
        if start != position:
            problems.append(f'gap: no Data.fs part holds bytes {position} '
                            f'to {start}')
        position = end
        if state != DONE:
            continue
        try:
            size, actual = _hash_file(path) if hash_files else (
                os.stat(path).st_size, sha256)
        except OSError as e:
            problems.append(f'unreadable: {path}: {e.strerror or e}')
            continue
        if size != end - start:
            problems.append(f'size mismatch: {path} is {size} bytes, the '
                            f'manifest recorded {end - start}')
        elif actual != sha256:
            problems.append(_mismatch(path, actual, sha256))
    if position != meta['size']:
        problems.append(f'gap: the Data.fs parts end at {position}, the '
                        f'snapshot at {meta["size"]}')
    return paths


def check(snapshot: str,
          progress: Callable[[int, int], None] | None = None) -> CheckReport:
    """Re-hash every file of `snapshot`, in it and in the pool, against
    its manifest."""
    snapshot = os.path.abspath(snapshot)
    manifest, meta = _open_snapshot(snapshot, complete=False)
    destination = os.path.dirname(snapshot)
    report = CheckReport(snapshot, bytes.fromhex(meta['tid']))
    problems = report.problems
    pool_tree = None
    try:
        if not os.path.exists(os.path.join(snapshot, COMPLETE_NAME)):
            problems.append(f'unfinished: {snapshot} has no {COMPLETE_NAME} '
                            f'marker; run the backup again to finish it')
        report.parts = len(_check_parts(snapshot, manifest, meta, problems))
        total = sum(manifest.counts().values())
        pool_tree = BlobTree(_pool(destination, meta))
        for done, (oid, tid, size, sha256, state) in enumerate(
                manifest.blobs(), 1):
            if state == MISSING:
                problems.append(
                    f'missing: the blob file of oid {oid_repr(oid)} tid '
                    f'{oid_repr(tid)} was not in the source when the '
                    f'snapshot was taken')
            elif state == DONE:
                report.blob_files += 1
                path = blob_path(destination, meta, oid, tid, sha256)
                try:
                    actual_size, actual = _hash_file(path, pool_tree)
                except FileNotFoundError:
                    problems.append(
                        f'missing from the pool: {path}, the file of oid '
                        f'{oid_repr(oid)} tid {oid_repr(tid)}')
                except OSError as e:
                    problems.append(f'unreadable: {path}: {e.strerror or e}')
                else:
                    if actual_size != size:
                        problems.append(
                            f'size mismatch: {path} is {actual_size} bytes, '
                            f'the manifest recorded {size}')
                    elif actual != sha256:
                        problems.append(_mismatch(path, actual, sha256))
            if progress is not None:
                progress(done, total)
    finally:
        manifest.close()
        if pool_tree is not None:
            pool_tree.close()
    return report
