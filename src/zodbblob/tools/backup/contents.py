"""The pool by content: each content once, named by its SHA-256.

A destination of format 3 keeps in ``.contents/`` every content its
snapshots list, once, whichever oids and tids had it: ``.contents/
<2 hex digits>/<the 64 hex digits of its SHA-256>``.  The manifest
records the SHA-256 of every blob file anyway (check and restore compare
every byte with it), so that name costs no second hash, needs no table
of its own, and is what `check` verifies; a collision of SHA-256 is
beyond anyone's reach, so two files with one name are one content.  (The
store's own digest, BLAKE3, is NULL until the scrub got to a file, and is
the store's choice, not the backup's.)

A blob file is hashed before it is copied: a content the pool has costs
a read, no write.  The files of a deduplicated store that share an inode
are hashed once a run.  A new content is copied into ``.contents/
.incoming/`` (a ``.partial`` name, then whole) and renamed to its name
(`_SnapshotWriter` does so a batch at a time, once the manifest lists
the batch's contents): a name in the pool always holds the whole content
it is named for.  Every backup empties ``.incoming`` first, under the
destination's lock.
"""

from __future__ import annotations

import logging
import os
import stat

from ZODB.utils import oid_repr

from zodbblob.layout import BlobTree, remove_if_exists
from zodbblob.tools.backup.files import _Files, _Kill
from zodbblob.tools.backup.manifest import (
    CONTENTS_NAME,
    DONE,
    INCOMING_NAME,
    POOL_NAME,
    Manifest,
    _hash_fd,
    _hash_file,
    blob_path,
    content_path,
)

logger = logging.getLogger(__name__)


def clear_incoming(destination: str) -> None:
    """Remove what an interrupted backup left half copied.

    The directory stays: a backup that copies a few contents makes no
    directory but its snapshot's.
    """
    incoming = os.path.join(destination, CONTENTS_NAME, INCOMING_NAME)
    try:
        names = os.listdir(incoming)
    except FileNotFoundError:
        return
    for name in names:
        remove_if_exists(os.path.join(incoming, name))


class _Contents:
    """The content pool of one destination, as one snapshot fills it."""

    def __init__(self, destination: str, files: _Files, kill: _Kill):
        self.destination = destination
        self.files = files
        self.kill = kill
        self.tree = BlobTree(os.path.join(destination, CONTENTS_NAME))
        self.incoming = os.path.join(destination, CONTENTS_NAME,
                                     INCOMING_NAME)
        # (st_dev, st_ino) -> (size, sha256) of the source's files with
        # more than one name: a deduplicated store's equal contents.
        self.inodes: dict[tuple[int, int], tuple[int, bytes]] = {}

    def close(self) -> None:
        self.tree.close()

    def path(self, sha256: bytes) -> str:
        return content_path(self.destination, sha256)

    def has(self, size: int, sha256: bytes) -> bool:
        """Whether the pool has the content (its name, of its size)."""
        try:
            return self.tree.check(self.path(sha256)).st_size == size
        except OSError:
            return False

    def holds(self, size: int, sha256: bytes) -> bool:
        """Whether the pool's file of the content has its bytes."""
        try:
            return _hash_file(self.path(sha256), self.tree) == (size, sha256)
        except OSError:
            return False

    def discard(self, sha256: bytes) -> None:
        remove_if_exists(self.path(sha256))

    def source_digest(self, fd: int, info: os.stat_result
                      ) -> tuple[int, bytes]:
        """(size, sha256) of the source file open as `fd`."""
        key = (info.st_dev, info.st_ino)
        if info.st_nlink > 1 and key in self.inodes:
            return self.inodes[key]
        found = _hash_fd(fd, info.st_size)
        if info.st_nlink > 1:
            self.inodes[key] = found
        return found

    def stage(self, fd: int, mode: int, length: int, oid: bytes,
              tid: bytes) -> tuple[int, bytes, str]:
        """Copy the source file `fd` into ``.incoming``; its (size,
        sha256), of what was copied, and where it is, for `place`."""
        staged = os.path.join(self.incoming, (oid + tid).hex())
        size, sha256 = self.files.copy(fd, staged, mode, 0, length)
        return size, sha256, staged

    def place(self, staged: str, sha256: bytes) -> None:
        """Give the `staged` content its name in the pool."""
        self.kill.placing()
        target = self.path(sha256)
        self.files.makedirs(os.path.dirname(target))
        # Over a name another snapshot placed meanwhile: the same bytes.
        os.replace(staged, target)
        if not self.files.syncfs:
            self.files.touched.add(os.path.dirname(target))

    def link_in(self, existing: str, tree: BlobTree, sha256: bytes) -> bool:
        """Give the format-2 pool's file `existing` its content's name
        too (a hard link: no byte is copied); False where links fail."""
        staged = os.path.join(self.incoming, os.path.basename(existing))
        if not self.files.link(existing, staged, tree):
            return False
        self.place(staged, sha256)
        return True


def repair_pool(destination: str, snapshot: str, source, kill: _Kill
                ) -> tuple[int, list[str], list[str]]:
    """Read every pool file complete `snapshot` lists against its
    manifest, and copy again from `source` (a `_Source`) those missing or
    damaged: ``backup --full`` when nothing was committed since.

    Returns how many pool files were read, those copied again, and those
    the source could not give back (gone, or not the recorded bytes).
    A repaired file takes the damaged one's name in one rename, so every
    snapshot that lists it is repaired with it.
    """
    manifest = Manifest(snapshot, read_only=True)
    meta = manifest.meta()
    pool_tree = BlobTree(os.path.join(destination, POOL_NAME if meta.get(
        'format') == 2 else CONTENTS_NAME))
    source_tree = BlobTree(source.blob_dir)
    files = _Files(destination, kill)
    incoming = os.path.join(destination, CONTENTS_NAME, INCOMING_NAME)
    checked: set[str] = set()
    repaired: list[str] = []
    # A content that one source file could not give back may be given by
    # another oid's or tid's file of the same content.
    unrepaired: dict[str, None] = {}
    try:
        for oid, tid, size, sha256, _ in manifest.blobs(DONE):
            path = blob_path(destination, meta, oid, tid, sha256)
            if path in checked:
                continue
            if path not in unrepaired:
                try:
                    if _hash_file(path, pool_tree) == (size, sha256):
                        checked.add(path)
                        continue
                except OSError:
                    pass
                logger.warning('Pool file %s is missing or damaged: copying '
                               'it again from the source', path)
            staged = os.path.join(incoming, (oid + tid).hex())
            blob = source.blob_path(oid, tid)
            try:
                fd = source_tree.open(blob)
            except OSError:
                if blob != source.fshelper.getBlobFilename(oid, tid):
                    remove_if_exists(blob)
                unrepaired[path] = None
                continue
            source.opened(blob)
            try:
                info = os.fstat(fd)
                copied = files.copy(fd, staged, stat.S_IMODE(info.st_mode),
                                    0, info.st_size)
            finally:
                os.close(fd)
            if copied != (size, sha256):
                remove_if_exists(staged)
                unrepaired[path] = None
                logger.warning('Blob file of oid %s tid %s in the source is '
                               'not the content of %s', oid_repr(oid),
                               oid_repr(tid), path)
                continue
            files.makedirs(os.path.dirname(path))
            os.replace(staged, path)
            if not files.syncfs:
                files.touched.add(os.path.dirname(path))
            unrepaired.pop(path, None)
            checked.add(path)
            repaired.append(path)
        files.sync()
    finally:
        manifest.close()
        pool_tree.close()
        source_tree.close()
    return len(checked.union(unrepaired)), repaired, list(unrepaired)
