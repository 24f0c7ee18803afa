"""What a disk that lost power would keep: the durable state of a tree.

The filesystem of ``daemon.py`` passes every change through to a backing
directory, and tells a ``Durability`` before each one, so that it can
remember what the change undoes: the bytes a write overwrites and the
size a file had (until the file's ``fsync`` or ``fdatasync``), its mode
(until its ``fsync``: ``fdatasync`` does not cover metadata), and the
names a directory held (until the directory's ``fsync``).  A removed or
replaced file is first linked into a graveyard beside the backing
directory, and a removed directory moved there, so that a power cut can
bring either back.

``revert()`` is the power cut: every directory gets back the names it had
at its last sync (each name the inode it had), every file the bytes, size
and mode it had at its last sync, and the graveyard is emptied, so what no
durable name reaches is gone.  The rules are POSIX's, read strictly, as
LazyFS and SQLite's crash tests read them: a file's ``fsync`` does not
make its name durable, and a directory's ``fsync`` makes its names durable
but not the bytes of the files they name.
"""

import os
import random
import shutil
import stat


class FileState:
    """What undoes a file's changes since its last sync."""

    def __init__(self, size: int):
        self.size = size                         # the durable size
        self.saves: list[tuple[int, bytes]] = []  # (offset, old bytes)


class Durability:
    """The durable state of the tree under `root`, as changes arrive.

    `root` and `graveyard` must be directories of one filesystem (removed
    files are hard-linked into the graveyard).  Paths given to the methods
    are backing paths, under `root`.
    """

    def __init__(self, root: str, graveyard: str):
        self.root = root
        self.graveyard = graveyard
        self.files: dict[int, FileState] = {}    # ino -> unsynced data
        self.modes: dict[int, int] = {}          # ino -> durable mode
        self.directories: dict[int, dict[str, tuple[bool, int]]] = {}

    # -- before a change ---------------------------------------------------

    def directory_changes(self, directory: str) -> None:
        """`directory` is about to gain, lose or change a name."""
        ino = os.lstat(directory).st_ino
        if ino not in self.directories:
            self.directories[ino] = entries(directory)

    def file_changes(self, fd: int, offset: int, length: int) -> None:
        """Bytes [offset, offset + length) of the open file are rewritten."""
        info = os.fstat(fd)
        state = self.files.get(info.st_ino)
        if state is None:
            state = self.files[info.st_ino] = FileState(info.st_size)
        end = min(offset + length, info.st_size, state.size)
        if end > offset:
            state.saves.append((offset, os.pread(fd, end - offset, offset)))

    def truncates(self, path: str, length: int) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            if length < size:
                self.file_changes(fd, length, size - length)
            else:
                self.file_changes(fd, size, 0)
        finally:
            os.close(fd)

    def mode_changes(self, path: str) -> None:
        info = os.lstat(path)
        self.modes.setdefault(info.st_ino, stat.S_IMODE(info.st_mode))

    def bury(self, path: str) -> None:
        """Keep the file or directory at `path` alive before it is removed.

        A file is hard-linked into the graveyard; a directory is moved
        there (the caller then has nothing left to remove).
        """
        info = os.lstat(path)
        if stat.S_ISDIR(info.st_mode):
            os.rename(path, os.path.join(self.graveyard, 'd%d' % info.st_ino))
        else:
            grave = os.path.join(self.graveyard, str(info.st_ino))
            if not os.path.lexists(grave):
                os.link(path, grave, follow_symlinks=False)

    # -- syncs ------------------------------------------------------------

    def file_synced(self, fd: int, data_only: bool) -> None:
        ino = os.fstat(fd).st_ino
        self.files.pop(ino, None)
        if not data_only:
            self.modes.pop(ino, None)

    def directory_synced(self, directory: str) -> None:
        self.directories.pop(os.lstat(directory).st_ino, None)

    def unsynced(self) -> dict:
        return {'files': len(self.files), 'modes': len(self.modes),
                'directories': len(self.directories)}

    # -- the power cut -----------------------------------------------------

    def revert(self, seed: int | None = None) -> dict:
        """Put the tree back to its durable state; returns what it undid.

        With a `seed`, each file's and each directory's unsynced changes
        are kept or discarded at random, as a disk that had written some
        of its cache when the power went (all of one object's, or none).
        """
        if seed is not None:
            chance = random.Random(seed)
            for table in (self.files, self.modes, self.directories):
                for key in sorted(table):
                    if chance.random() < 0.5:
                        del table[key]
        undone = self.unsynced()
        # Every file the tree still names gets a graveyard link, so that a
        # durable name can be given back its inode whatever happens below.
        for path, is_dir, ino in self._walk(self.root):
            if not is_dir:
                self.bury(path)
        where = self._directories()
        # Take away the names that are not durable: the files' at once, the
        # directories' into the graveyard, deepest first.
        moves = []
        for ino, durable in self.directories.items():
            directory = where.get(ino)
            if directory is None:
                continue
            for name, (is_dir, child) in entries(directory).items():
                if durable.get(name) == (is_dir, child):
                    continue
                if is_dir:
                    moves.append(os.path.join(directory, name))
                else:
                    os.unlink(os.path.join(directory, name))
        for path in sorted(moves, key=lambda p: -p.count(os.sep)):
            self.bury(path)
        # Give back the durable names.
        for ino, durable in self.directories.items():
            directory = self._directories().get(ino)
            if directory is None:
                continue
            for name, (is_dir, child) in durable.items():
                path = os.path.join(directory, name)
                if os.path.lexists(path):
                    continue
                if not is_dir:
                    os.link(os.path.join(self.graveyard, str(child)), path,
                            follow_symlinks=False)
                    continue
                grave = os.path.join(self.graveyard, 'd%d' % child)
                if os.path.isdir(grave):
                    os.rename(grave, path)
                # Otherwise it is named, durably, somewhere else now.
        # The bytes, sizes and modes.
        for ino, state in self.files.items():
            grave = os.path.join(self.graveyard, str(ino))
            if not os.path.isfile(grave):
                continue
            fd = os.open(grave, os.O_WRONLY)
            try:
                os.ftruncate(fd, state.size)
                for offset, data in reversed(state.saves):
                    os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        for ino, mode in self.modes.items():
            grave = os.path.join(self.graveyard, str(ino))
            if os.path.isfile(grave):
                os.chmod(grave, mode)
        for name in os.listdir(self.graveyard):
            path = os.path.join(self.graveyard, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        self.files.clear()
        self.modes.clear()
        self.directories.clear()
        return undone

    def _walk(self, top: str):
        for entry in os.scandir(top):
            is_dir = entry.is_dir(follow_symlinks=False)
            yield entry.path, is_dir, entry.inode()
            if is_dir:
                yield from self._walk(entry.path)

    def _directories(self) -> dict[int, str]:
        """{ino: path} of every directory, in the tree and the graveyard."""
        found = {os.lstat(self.root).st_ino: self.root}
        for top in (self.root, self.graveyard):
            for path, is_dir, ino in self._walk(top):
                if is_dir:
                    found[ino] = path
        return found


def entries(directory: str) -> dict[str, tuple[bool, int]]:
    """{name: (is a directory, inode)} of a directory's entries."""
    return {entry.name: (entry.is_dir(follow_symlinks=False), entry.inode())
            for entry in os.scandir(directory)}
