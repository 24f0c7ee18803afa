"""Files of a blob directory: making them durable, and opening them safely.

The fsync helpers every writer uses (a blob file, a directory entry, a
chain of new directories), and the checks a tool makes before it reads,
links or copies what stands under a blob name.
"""

from __future__ import annotations

import errno
import os
import stat

# A file's bytes (and size), without its timestamps; fsync where the
# platform has no fdatasync.
fdatasync = getattr(os, 'fdatasync', os.fsync)


def fsync_path(path: str, data_only: bool = False) -> None:
    """Make `path` durable: a file's bytes, or a directory's entries.

    With `data_only`, an fdatasync: the bytes without the timestamps.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        (fdatasync if data_only else os.fsync)(fd)
    finally:
        os.close(fd)


fsync_directory = fsync_path


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host is alive (another user's too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_if_exists(path: str) -> None:
    """Remove the file `path`; one that is gone already is fine."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def makedirs_durable(path: str) -> None:
    """Create `path` and its missing parents, each entry fsynced.

    A directory that a crash forgets would take the blob files in it
    along, however well those files were synced.
    """
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            continue
        fsync_directory(os.path.dirname(directory))


# Opening a blob name safely, for the tools: anything but a regular file
# under a blob name (a FIFO, a device, a symbolic link to anywhere) is
# damage or an attack, and a tool that opened it blindly would wait on it
# forever, read a device without end, or copy a file it should never see.

_FILE_KINDS = ((stat.S_ISLNK, 'a symbolic link'), (stat.S_ISFIFO, 'a FIFO'),
               (stat.S_ISCHR, 'a character device'),
               (stat.S_ISBLK, 'a block device'), (stat.S_ISSOCK, 'a socket'),
               (stat.S_ISDIR, 'a directory'))


LINKED_DIRECTORY = 'a symbolic link to a directory under the blob directory'


class NotABlobFile(OSError):
    """Something other than a regular file is under a blob name, or a
    link stands where a directory of blob files belongs (`path` names
    the link then)."""

    def __init__(self, path: str, kind: str):
        if kind == LINKED_DIRECTORY:
            message = f'{path} is {kind}: expected a directory, not followed'
        else:
            message = (f'{path} is {kind}, not a regular file: expected a '
                       f'blob file')
        super().__init__(message)
        self.path = path
        self.kind = kind


def file_kind(mode: int) -> str:
    """What `mode` (an ``st_mode``) is, in words: ``a FIFO``."""
    for test, kind in _FILE_KINDS:
        if test(mode):
            return kind
    return 'a regular file' if stat.S_ISREG(mode) else 'not a file'


def check_blob_file(path: str) -> os.stat_result:
    """The ``lstat`` of blob file `path`; NotABlobFile unless regular.

    For a tool about to hard-link `path`: a link to a symbolic link is
    the symbolic link.
    """
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise NotABlobFile(path, file_kind(info.st_mode))
    return info


def open_blob_file(path: str) -> int:
    """A read-only descriptor of blob file `path`; NotABlobFile unless
    it is a regular file.

    Nothing else is opened: a symbolic link is not followed, and neither
    opening a FIFO nor reading a device can wait.  The kind is checked
    again on the descriptor, for a file replaced between the two looks.
    """
    check_blob_file(path)
    return open_regular(path, path)


def open_regular(path: str, name: str, dir_fd: int | None = None) -> int:
    """Open `name` (relative to `dir_fd`, if given) read-only, never
    following a link nor waiting; NotABlobFile, naming `path`, unless the
    descriptor is of a regular file."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotABlobFile(path, 'a symbolic link') from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotABlobFile(path, file_kind(mode))
    return fd
