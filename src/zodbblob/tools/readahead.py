"""Open the files of a walk a little ahead, and have the kernel read them in.

``verify --checksum`` reads every byte of every blob file, one file after
the other: on a cold page cache each file's first read waits for the
disk, and the disk serves one request at a time (a queue depth of one),
as ``cat`` of the same files does.  `opened_ahead` opens the files
`AHEAD` places before they are read and asks the kernel to read their
first bytes in (``posix_fadvise(..., POSIX_FADV_WILLNEED)``, which
starts the reads and returns), so that the disk has many requests at a
time and the hashing finds most bytes in the page cache.  No threads: the
kernel does the reading.  Where ``posix_fadvise`` does not exist, the
files are only opened ahead.
"""

from __future__ import annotations

import collections
import errno
import os
from collections.abc import Callable, Iterable, Iterator

# Files open ahead of the one read: a few dozen requests in the disk's
# queue; as many descriptors.
AHEAD = 32
# Bytes of each file asked for ahead: its first ones (the kernel's own
# readahead follows a file read from start to end).
WILLNEED_BYTES = 4 << 20


def opened_ahead(items: Iterable[tuple], open_file: Callable[[str], int],
                 ahead: int | None = None) -> Iterator[tuple]:
    """``item + (fd or the OSError opening it raised,)`` for each item of
    `items` (tuples whose last member is a path), in order; each file is
    opened by `open_file` `ahead` (default `AHEAD`) items before it is
    yielded.  A file opened ahead is read from the directory it was
    opened in, whatever happens to its name meanwhile (a directory
    swapped for a link is seen by the opens after the swap).

    The caller closes each fd it is given; those not yet yielded when
    the iteration stops are closed here.  Once the process runs out of
    descriptors (a low ``ulimit -n``), the items come without an fd
    (`fd_of` opens each file in its turn, the window's fds closed by
    then), not with that error: a file is unreadable for what it is.
    """
    ahead = AHEAD if ahead is None else ahead
    window: collections.deque = collections.deque()
    scarce = False   # out of descriptors: the rest are opened in turn
    try:
        for item in items:
            opened = () if scarce else (_open(open_file, item[-1]),)
            if opened and isinstance(opened[0], OSError) and (
                    opened[0].errno in (errno.EMFILE, errno.ENFILE)):
                scarce, opened = True, ()
            window.append(item + opened)
            if len(window) > ahead:
                yield window.popleft()
        while window:
            yield window.popleft()
    finally:
        for item in window:
            if isinstance(item[-1], int):
                os.close(item[-1])


def fd_of(opened: list, open_file: Callable[[str], int], path: str) -> int:
    """The fd `opened_ahead` gave for `path`, ``[fd]`` (raising the
    OSError it gave instead), or, given ``[]``, `path` opened now."""
    if not opened:
        return open_file(path)
    if isinstance(opened[0], OSError):
        raise opened[0]
    return opened[0]


def _open(open_file: Callable[[str], int], path: str) -> int | OSError:
    try:
        fd = open_file(path)
    except OSError as e:
        return e
    advise = getattr(os, 'posix_fadvise', None)
    if advise is not None:
        try:
            advise(fd, 0, WILLNEED_BYTES, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass   # only advice: the read finds the bytes either way
    return fd
