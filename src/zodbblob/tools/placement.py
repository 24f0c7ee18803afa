"""Where migrate puts each source file: a link, or else a copy.

A link to the source file where both directories are on one filesystem;
otherwise a copy, written under a temporary name and renamed.  Names of
the source that share an inode (dedup's links, undo's) share one in the
destination too: a file whose source inode was copied already becomes a
link to that copy, so a deduplicated directory migrates into a
deduplicated one, across filesystems as well.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil

from zodbblob.layout import BlobTree
from zodbblob.layout import open_blob_file

# Its warnings are migrate's, and said in migrate's name.
logger = logging.getLogger('zodbblob.tools.migrate')

# os.link fails with these where a copy still works: another filesystem,
# a filesystem without hard links, a file of another user under
# fs.protected_hardlinks, a file with too many links already.
_NO_LINK = frozenset((errno.EXDEV, errno.EPERM, errno.ENOTSUP,
                      errno.EOPNOTSUPP, errno.EMLINK))


def copy_blob_file(source_file: str, target: str,
                   tree: BlobTree | None = None) -> None:
    """Copy blob file `source_file` to the new file `target`, with its
    mode and times, as ``shutil.copy2`` would; but a link is never
    followed, nor a FIFO waited on (NotABlobFile); nor, with the `tree`
    it is in, a link to a directory below the tree's root."""
    fd = open_blob_file(source_file) if tree is None else tree.open(
        source_file)
    try:
        with open(fd, 'rb', closefd=False) as source, \
                open(target, 'xb') as copy:
            shutil.copyfileobj(source, copy, 1 << 20)
        info = os.fstat(fd)
        os.chmod(target, info.st_mode & 0o7777)
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    finally:
        os.close(fd)


class Writer:
    """Puts source files at destination names: a link, or else a copy."""

    def __init__(self, source: str, destination: str, temporary: str,
                 report):
        self.source = source
        self.tree = BlobTree(source)
        self.destination = destination
        self.temporary = temporary
        self.report = report
        self.linking = True
        self.warned = False
        self._names = itertools.count()
        # (st_dev, st_ino) of a source file of more than one name: the
        # destination name that has its bytes.
        self._copies: dict[tuple[int, int], str] = {}

    def _temporary_name(self) -> str:
        return os.path.join(self.temporary, str(next(self._names)))

    def put(self, source_file: str, final: str) -> None:
        if self.linking and self._link(source_file, final):
            self.report.linked += 1
            return
        staged = self._temporary_name()
        key = _shared_inode(source_file)
        first = self._copies.get(key)
        if first is not None and _link_copy(first, staged):
            os.replace(staged, final)
            self.report.linked += 1
            return
        copy_blob_file(source_file, staged, self.tree)
        os.replace(staged, final)
        self.report.copied += 1
        if key is not None:
            self._copies[key] = final

    def kept(self, source_file: str, final: str) -> None:
        """`final`, there from an earlier run, has `source_file`'s bytes:
        the source's other names of its inode may link to it."""
        key = _shared_inode(source_file)
        if key is not None:
            self._copies.setdefault(key, final)

    def _link(self, source_file: str, final: str) -> bool:
        # A link appears whole under its name, so it may take the final
        # name at once; only a file that is there already (of the wrong
        # size, from an earlier run) is replaced through a temporary name.
        try:
            # Never a link to a symbolic link, which would carry the
            # link over, nor through one to a directory.
            try:
                self.tree.link(source_file, final)
            except FileExistsError:
                staged = self._temporary_name()
                self.tree.link(source_file, staged)
                os.replace(staged, final)
        except OSError as e:
            if e.errno not in _NO_LINK:
                raise
            if e.errno != errno.EMLINK:
                self.linking = False
            if not self.warned:
                self.warned = True
                logger.warning(
                    'Copying blob files from %s to %s: hard links between '
                    'them are not possible (%s), so the copies take as much '
                    'space again', self.source, self.destination,
                    e.strerror)
            return False
        return True


def _shared_inode(path: str) -> tuple[int, int] | None:
    """`path`'s (st_dev, st_ino) if it has more than one name."""
    info = os.lstat(path)
    return (info.st_dev, info.st_ino) if info.st_nlink > 1 else None


def _link_copy(first: str, staged: str) -> bool:
    try:
        os.link(first, staged)
    except OSError as e:
        if e.errno not in _NO_LINK:
            raise
        return False   # too many links already, say: copied once more
    return True
