"""BlobTree: a blob directory's files, reached without following a link."""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from zodbblob.layout.files import (
    LINKED_DIRECTORY,
    NotABlobFile,
    file_kind,
    open_regular,
)


class BlobTree:
    """The blob files under blob directory `root`, opened and checked
    without following a symbolic link anywhere below `root`.

    `root` itself may be a link or sit under one (/srv/blobs ->
    /mnt/disk2/blobs); a link below it (``0x01`` -> /home/someone) would
    hand a tool files from elsewhere under blob names.  A check of the
    directories by path, then an open by path, leaves a window in which
    a directory can be swapped for a link (``O_NOFOLLOW`` guards only the
    last component); so every directory is opened from its parent's
    descriptor with ``O_NOFOLLOW``, and the file from its directory's,
    and no name below `root` is ever resolved through a link.

    The directories above a file's own are held open while the tool's
    walk is below them (one chain, as deep as the layout), so a run over
    millions of files costs one ``open`` per directory, not per level and
    file.  A file's own directory is opened afresh for each file in it:
    a swap there is refused the next time.  A held directory swapped
    meanwhile is still read as the directory it was, never the link.
    `close` lets the descriptors go.
    """

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self._root_fd: int | None = None
        # (name, fd) from the root down: directories held for the walk.
        self._held: list[tuple[str, int]] = []

    def close(self) -> None:
        """Close the descriptors the tree holds; it may be used again."""
        while self._held:
            os.close(self._held.pop()[1])
        if self._root_fd is not None:
            fd, self._root_fd = self._root_fd, None
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _names(self, path: str) -> tuple[list[str], str]:
        """The directory names between `root` and `path`, and its name."""
        absolute = os.path.abspath(path)
        prefix = self.root.rstrip(os.sep) + os.sep
        if not absolute.startswith(prefix) or absolute == prefix:
            raise ValueError(f'{path} is not under blob directory '
                             f'{self.root}: expected a blob file there')
        *directories, name = absolute[len(prefix):].split(os.sep)
        return directories, name

    def _open_directory(self, parent_fd: int, name: str, path: str) -> int:
        try:
            return os.open(name, os.O_RDONLY | os.O_DIRECTORY
                           | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        except OSError as e:
            # Linux says ENOTDIR for a link, as for a file; others ELOOP.
            if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            try:
                linked = stat.S_ISLNK(os.stat(name, dir_fd=parent_fd,
                                              follow_symlinks=False).st_mode)
            except OSError:
                linked = False
            if not linked:
                raise
        raise NotABlobFile(path, LINKED_DIRECTORY)

    def _directory(self, path: str) -> tuple[int, str, int]:
        """``(fd, name, own)`` for blob file `path`: a descriptor of its
        directory, its name there, and the descriptor to close after use
        (-1 when the tree holds it: the root's, for a file at the top).
        """
        directories, name = self._names(path)
        if self._root_fd is None:
            # The root is the one name that may be (or sit under) a link.
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY
                                    | os.O_CLOEXEC)
        above, leaf = directories[:-1], directories[-1:]
        kept = 0
        while (kept < len(self._held) and kept < len(above)
               and self._held[kept][0] == above[kept]):
            kept += 1
        while len(self._held) > kept:
            os.close(self._held.pop()[1])
        where = self.root
        for held_name, _ in self._held:
            where = os.path.join(where, held_name)
        fd = self._held[-1][1] if self._held else self._root_fd
        for directory in above[kept:]:
            where = os.path.join(where, directory)
            fd = self._open_directory(fd, directory, where)
            self._held.append((directory, fd))
        if not leaf:
            return fd, name, -1
        own = self._open_directory(fd, leaf[0], os.path.join(where, leaf[0]))
        return own, name, own

    def check_directories(self, path: str) -> None:
        """NotABlobFile naming the link if a directory between `root`
        and blob file `path` is a symbolic link."""
        _, _, own = self._directory(path)
        if own != -1:
            os.close(own)

    def check(self, path: str) -> os.stat_result:
        """`check_blob_file`, and no link above `path` below `root`."""
        with self._regular_file(path) as (_, _, info):
            return info

    @contextlib.contextmanager
    def _regular_file(self, path: str):
        """``(directory fd, name, stat)`` of blob file `path`, which is
        a regular file (NotABlobFile if not), its directory held open
        for the block."""
        directory, name, own = self._directory(path)
        try:
            # lstat first: opening a device can act on it (a tape rewinds).
            info = os.stat(name, dir_fd=directory, follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode):
                raise NotABlobFile(path, file_kind(info.st_mode))
            yield directory, name, info
        finally:
            if own != -1:
                os.close(own)

    def open(self, path: str) -> int:
        """`open_blob_file`, and no link above `path` below `root`."""
        with self._regular_file(path) as (directory, name, _):
            return open_regular(path, name, directory)

    def link(self, path: str, target: str) -> None:
        """Hard-link blob file `path` as `target` (a new name, as
        ``os.link``), never a link nor anything but a regular file.

        The name is linked from its directory's descriptor without
        following it; what was linked is checked under `target` and
        removed again if a swap made it anything else.
        """
        with self._regular_file(path) as (directory, name, _):
            os.link(name, target, src_dir_fd=directory,
                    follow_symlinks=False)
        mode = os.lstat(target).st_mode
        if not stat.S_ISREG(mode):
            os.remove(target)
            raise NotABlobFile(path, file_kind(mode))
