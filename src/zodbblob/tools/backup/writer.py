"""Filling one planned snapshot, and the pool, from the source; resumable.

An interrupted backup resumes: the manifest lists every file the
snapshot needs, each in progress, done or missing (from the source).
New contents are copied into ``.contents/.incoming``, listed in the
manifest, named in the pool, then marked done (`_SnapshotWriter._flush`),
so a rerun skips what is done, finds in the pool what was named,
discards what was only staged and copies the rest
(after a reboot, it first checks the files it had copied: see
`_SnapshotWriter`).  ``COMPLETE`` is written only once everything is
durable; a snapshot without it is resumed, never built upon.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import stat
import time

from ZODB.utils import oid_repr

from zodbblob.layout import (
    LINKED_DIRECTORY,
    BlobTree,
    NotABlobFile,
    fsync_directory,
    remove_if_exists,
)
from zodbblob.tools.backup.contents import _Contents
from zodbblob.tools.backup.destination import _link_manifest
from zodbblob.tools.backup.errors import (
    BackupInterrupted,
    SourceChanged,
    SourcePacked,
)
from zodbblob.tools.backup.files import (
    _boot_id,
    _Files,
    _Kill,
    _write_marker,
)
from zodbblob.tools.backup.manifest import (
    COMPLETE_NAME,
    DONE,
    FORMAT,
    IN_PROGRESS,
    MISSING,
    PARTIAL_SUFFIX,
    POOL_NAME,
    Manifest,
    _hash_file,
    part_name,
    pool_path,
    tid_time,
)
from zodbblob.tools.backup.source import _Source

logger = logging.getLogger(__name__)

# Finished files are marked done in the manifest in batches: at most a
# batch is copied again after a crash.
BATCH_FILES = 256
BATCH_BYTES = 256 << 20


@dataclasses.dataclass
class BackupResult:
    """What one snapshot holds, and what taking it wrote."""

    snapshot: str
    tid: bytes
    up_to_date: bool = False
    resumed: bool = False
    data_fs_size: int = 0
    data_fs_copied: int = 0
    blob_files: int = 0
    copied: int = 0
    pooled: int = 0
    bytes_copied: int = 0
    missing: list = dataclasses.field(default_factory=list)
    not_files: list = dataclasses.field(default_factory=list)
    # --full when up to date: the pool files read, those copied again
    # from the source, and those it could not give back.
    checked: int = 0
    repaired: list = dataclasses.field(default_factory=list)
    unrepaired: list = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        when = f'transaction {self.tid.hex()} ({tid_time(self.tid)})'
        if self.up_to_date:
            result = [f'{self.snapshot}: up to date, holds {when}']
            if self.checked:
                result.append(f'  pool: {self.checked} files read, '
                              f'{len(self.repaired)} missing or damaged '
                              f'copied again from the source')
            for path in self.unrepaired:
                result.append(f'  damaged: {path} is missing or damaged in '
                              f'the pool, and the source no longer has its '
                              f'content')
            return result
        result = [f'{self.snapshot}: {"resumed and " if self.resumed else ""}'
                  f'complete, holds {when}',
                  f'  Data.fs: {self.data_fs_size} bytes, '
                  f'{self.data_fs_copied} copied',
                  f'  blob files: {self.blob_files}, {self.copied} copied '
                  f'({self.bytes_copied} bytes), {self.pooled} already '
                  f'backed up']
        for path in self.missing:
            result.append(f'  missing: {path} was not in the source blob '
                          f'directory')
        for path, kind in self.not_files:
            if kind == LINKED_DIRECTORY:
                result.append(f'  not followed: {path} is {kind}; the blob '
                              f'files below it are not backed up')
                continue
            result.append(f'  not a file: {path} is {kind} under a blob '
                          f'name, not a regular file; not backed up')
        return result


class _SnapshotWriter:
    """Fills one snapshot (and the pool) from the source; resumable.

    The manifest arrives planned: every blob file the snapshot needs is a
    row, done already where the pool has it, in progress where it is to
    be copied (or, after ``--full``, in progress with the size and sha256
    the pool's file must have).  Finished files are marked done a batch
    at a time, without a sync: after a crash of the process, the files it
    wrote are intact.  Only a crash of the machine can lose them, so a run
    that resumes in another boot than the one that wrote them checks every
    file this snapshot copied again.  Everything is synced before
    ``COMPLETE``.
    """

    def __init__(self, path: str, source: _Source, manifest: Manifest,
                 progress, kill: _Kill, resuming: bool = False):
        self.path = path
        self.destination = os.path.dirname(path)
        self.source = source
        self.manifest = manifest
        self.progress = progress
        self.resuming = resuming
        self.files = _Files(path, kill)
        self.source_tree = BlobTree(source.blob_dir)
        self.contents = _Contents(self.destination, self.files, kill)
        # The pool of format 2, where a destination has one: its files
        # are linked in by content, not copied again.
        self.old_tree = BlobTree(os.path.join(self.destination, POOL_NAME))
        # Source paths not backed up for what is under their name (one
        # link to a directory stands for all the files below it).
        self.not_file_paths: set[str] = set()
        self.meta = manifest.meta()
        self.tid = bytes.fromhex(self.meta['tid'])
        self.base = (os.path.join(self.destination, self.meta['base'])
                     if self.meta['base'] else None)
        self.result = BackupResult(path, self.tid,
                                   data_fs_size=self.meta['size'])
        self.done_rows: list[tuple] = []
        self.batch_bytes = 0
        # sha256 -> the file in .incoming of the contents copied since
        # the last flush.
        self.staged: dict[bytes, str] = {}
        # On a bucket by content: each content read, by the catalog's
        # digest, in a private temporary database on disk ('').
        self.read_contents = sqlite3.connect('')
        self.read_contents.execute(
            'CREATE TABLE content (digest BLOB PRIMARY KEY, size INTEGER, '
            'sha256 BLOB) WITHOUT ROWID')

    def run(self) -> BackupResult:
        try:
            return self._run()
        finally:
            self.source_tree.close()
            self.read_contents.close()
            self.contents.close()
            self.old_tree.close()

    def _run(self) -> BackupResult:
        if self.resuming:
            self._prepare_resume()
        _link_manifest(self.destination, self.path, self.manifest)
        counts = self.manifest.counts()
        parts = self.manifest.parts()
        total = sum(counts.values()) + len(parts)
        done = counts.get(DONE, 0) + counts.get(MISSING, 0) + sum(
            1 for part in parts if part[3] == DONE)
        self.result.blob_files = sum(counts.values())
        self._progress(done, total)
        try:
            for start, end, sha256, state in parts:
                if state != DONE:
                    self._part(start, end, sha256)
                    done += 1
                    self._progress(done, total)
            for oid, tid, size, sha256, _ in self.manifest.blobs(
                    IN_PROGRESS):
                self._blob(oid, tid, size, sha256)
                done += 1
                self._progress(done, total)
                if (len(self.done_rows) >= BATCH_FILES
                        or self.batch_bytes >= BATCH_BYTES):
                    self._flush()
            self._flush()
        except KeyboardInterrupt:
            self._flush()
            raise BackupInterrupted(self.path) from None
        # Every file is copied: if no pack has removed one meanwhile, the
        # snapshot is consistent, whatever a pack does from here on.
        if self.source.packed():
            raise SourcePacked(self.source.path)
        for oid, tid, *_ in self.manifest.blobs(MISSING):
            path = self._source_path(oid, tid)
            if path not in self.not_file_paths:
                self.result.missing.append(path)
        self.result.pooled = (self.result.blob_files - self.result.copied
                              - len(self.result.missing)
                              - len(self.not_file_paths))
        self._finish()
        return self.result

    def _prepare_resume(self) -> None:
        """Remove partial files; after a reboot, check what was copied."""
        boot = _boot_id()
        recheck = boot is None or self.meta.get('boot_id') != boot
        bad: set[bytes] = set()
        if recheck:
            for _, _, size, sha256, _ in self.manifest.blobs(
                    DONE, copied=True):
                if sha256 not in bad and not self.contents.holds(size,
                                                                 sha256):
                    bad.add(sha256)
                    self.contents.discard(sha256)
            # Rows whose contents a flush had named but not yet marked
            # done: a resumed row takes a content of the right size.
            for _, _, size, sha256, _ in self.manifest.blobs(IN_PROGRESS):
                if (sha256 is not None and self.contents.has(size, sha256)
                        and not self.contents.holds(size, sha256)):
                    self.contents.discard(sha256)
        redo = len(bad)
        for start, end, sha256, state in self.manifest.parts():
            path = os.path.join(self.path, part_name(start, end))
            remove_if_exists(path + PARTIAL_SUFFIX)
            if state == DONE and recheck:
                try:
                    actual = _hash_file(path)
                except OSError:
                    actual = None
                if actual != (end - start, sha256):
                    remove_if_exists(path)
                    self.manifest.db.execute(
                        'UPDATE part SET state = ? WHERE start = ?',
                        (IN_PROGRESS, start))
                    redo += 1
        with self.manifest.db:
            self.manifest.db.execute('BEGIN')
            # Copied again from the source, not checked against these:
            # every row of a content whose copy a power cut damaged.
            self.manifest.db.executemany(
                'UPDATE blob SET state = ?, size = NULL, sha256 = NULL, '
                'copied = 0 WHERE sha256 = ?',
                [(IN_PROGRESS, sha256) for sha256 in bad])
            self.manifest.set_meta(boot_id=boot or '')
        if recheck:
            logger.warning('Snapshot %s was interrupted before the machine '
                           'restarted: checked the files it had finished; '
                           '%d to copy again', self.path, redo)

    def _progress(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)

    def _source_path(self, oid: bytes, tid: bytes) -> str:
        return self.source.fshelper.getBlobFilename(oid, tid)

    def _open_source(self, oid: bytes, tid: bytes) -> tuple[str, int]:
        """The name of the blob file of `tid` of `oid` (as the messages
        say it) and a descriptor of it (a bucket's: its download)."""
        path = self.source.blob_path(oid, tid)
        try:
            fd = self.source_tree.open(path)
        except BaseException:
            if path != self._source_path(oid, tid):
                remove_if_exists(path)
            raise
        self.source.opened(path)
        return path, fd

    def _part(self, start: int, end: int, sha256: bytes | None) -> None:
        name = part_name(start, end)
        target = os.path.join(self.path, name)
        if sha256 is not None and self.base is not None:
            # The previous snapshot's part: linked, or (if that snapshot
            # is gone) copied from the source and checked.
            if (self.files.link(os.path.join(self.base, name), target)
                    and os.stat(target).st_size == end - start):
                self._done_part(start, sha256)
                return
            remove_if_exists(target)
        size, actual = self.files.copy(self.source.file.fileno(), target,
                                       0o444, start, end - start)
        if size != end - start:
            raise SourceChanged(f'{self.source.path} ends at {start + size}, '
                                f'before the end of transaction '
                                f'{self.tid.hex()} at {end}')
        if sha256 is not None and actual != sha256:
            remove_if_exists(target)
            raise SourceChanged(f'{self.source.path}: bytes {start} to {end} '
                                f'are not those of snapshot {self.base} '
                                f'(packed?)')
        self.result.data_fs_copied += size
        self._done_part(start, actual)

    def _done_part(self, start: int, sha256: bytes) -> None:
        with self.manifest.db:
            self.manifest.db.execute('BEGIN')
            self.manifest.db.execute(
                'UPDATE part SET sha256 = ?, state = ? WHERE start = ?',
                (sha256, DONE, start))

    def _blob(self, oid, tid, known_size, known_sha256) -> None:
        if known_sha256 is not None:
            copied = self._known(oid, tid, known_size, known_sha256)
            if copied is not None:
                self.done_rows.append(
                    (known_size, known_sha256, DONE, copied, oid, tid))
                return
        content = self.source.content(oid, tid)
        if content is not None:
            read = self.read_contents.execute(
                'SELECT size, sha256 FROM content WHERE digest = ?',
                (content,)).fetchone()
            if read is not None:   # downloaded once already
                self.done_rows.append((*read, DONE, 0, oid, tid))
                return
        source = self._source_path(oid, tid)
        try:
            source, fd = self._open_source(oid, tid)
        except NotABlobFile as e:
            # Never followed nor read: a link may point at a file only
            # root may read, and a FIFO would block the backup for ever.
            logger.warning('Blob file %s of oid %s tid %s is not backed '
                           'up: %s', source, oid_repr(oid), oid_repr(tid), e)
            if (e.path, e.kind) not in self.result.not_files:
                self.result.not_files.append((e.path, e.kind))
            self.not_file_paths.add(source)
            self.done_rows.append((None, None, MISSING, 0, oid, tid))
            return
        except FileNotFoundError:
            if self.source.packed():
                # Removed by the pack, not lost: never marked missing.
                raise SourcePacked(self.source.path) from None
            logger.warning('Blob file %s of oid %s tid %s is missing from '
                           'the source', source, oid_repr(oid), oid_repr(tid))
            self.done_rows.append((None, None, MISSING, 0, oid, tid))
            return
        try:
            info = os.fstat(fd)
            size, sha256 = self.contents.source_digest(fd, info)
            copied = 0
            if sha256 not in self.staged and not self.contents.has(size,
                                                                   sha256):
                size, sha256, staged = self.contents.stage(
                    fd, stat.S_IMODE(info.st_mode), info.st_size, oid, tid)
                self.staged[sha256] = staged
                copied = 1
                self.result.copied += 1
                self.result.bytes_copied += size
                self.batch_bytes += size
        finally:
            os.close(fd)
        if content is not None:
            self.read_contents.execute(
                'INSERT OR IGNORE INTO content VALUES (?, ?, ?)',
                (content, size, sha256))
        self.done_rows.append((size, sha256, DONE, copied, oid, tid))

    def _known(self, oid, tid, size, sha256) -> int | None:
        """For a row whose content is known (a base of format 2, or
        ``--full``): 0 when the pool has it, 1 when it was linked in from
        the format-2 pool; None when it is to be copied from the source."""
        full = bool(self.meta.get('full'))
        if self.contents.holds(size, sha256) if full else self.contents.has(
                size, sha256):
            return 0
        if full and self.contents.has(size, sha256):
            logger.warning('Content %s in the pool is damaged: copying it '
                           'again from the source',
                           self.contents.path(sha256))
            self.contents.discard(sha256)
        old = pool_path(self.destination, oid, tid)
        try:
            # Read whole before it is named for a content, once per
            # content: a damaged format-2 file named by its recorded
            # sha256 would make every later snapshot fail its check.
            found = _hash_file(old, self.old_tree)
        except OSError:
            return None
        if found == (size, sha256) and self.contents.link_in(
                old, self.old_tree, sha256):
            return 1
        return None

    def _flush(self) -> None:
        """Mark the files finished since the last flush done.

        The contents copied meanwhile are in ``.incoming``: their rows
        get their sha256 first (still in progress), then they get their
        names in the pool.  A pool content is thus always listed, by a
        row a resumed run finds done or, in progress, in the pool; and a
        snapshot removed unfinished lists it for `collect`.
        """
        if self.staged:
            with self.manifest.db:
                self.manifest.db.execute('BEGIN')
                self.manifest.db.executemany(
                    'UPDATE blob SET size = ?, sha256 = ? WHERE oid = ? AND '
                    'tid = ?', [(size, sha256, oid, tid) for size, sha256,
                                _, copied, oid, tid in self.done_rows
                                if copied and sha256 in self.staged])
            for sha256, staged in self.staged.items():
                self.contents.place(staged, sha256)
            self.staged = {}
        with self.manifest.db:
            self.manifest.db.execute('BEGIN')
            self.manifest.db.executemany(
                'UPDATE blob SET size = ?, sha256 = ?, state = ?, copied = ? '
                'WHERE oid = ? AND tid = ?', self.done_rows)
        self.done_rows = []
        self.batch_bytes = 0

    def _finish(self) -> None:
        # Every file, name and directory on disk before the manifest says
        # complete, and the manifest before the marker.
        self.files.sync()
        counts = self.manifest.counts()
        self.manifest.set_meta(state='complete', finished=time.time())
        self.manifest.seal()
        _write_marker(self.path, COMPLETE_NAME, json.dumps({
            'format': FORMAT, 'tid': self.tid.hex(),
            'size': self.meta['size'], 'blob_files': counts.get(DONE, 0),
            'missing': counts.get(MISSING, 0)}) + '\n')
        fsync_directory(self.destination)
