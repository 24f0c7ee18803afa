"""Have the kernel read the files of a walk in, a little ahead of it.

``verify --checksum`` reads every byte of every blob file, one file after
the other: on a cold page cache each file's first read waits for the
disk, and the disk serves one request at a time (a queue depth of one),
as ``cat`` of the same files does.  `read_ahead` passes the walk's items
on unchanged, and for the item `AHEAD` places further on opens the file
and asks the kernel to read its first bytes in
(``posix_fadvise(..., POSIX_FADV_WILLNEED)``, which starts the reads and
returns), then closes it at once: the disk gets a queue of requests, and
the reads of the walk find most bytes in the page cache.  No threads (the
kernel does the reading), and no descriptor kept: the caller opens,
checks and reads each file in its turn as it would without this, so a
name that changed meanwhile (a directory swapped for a link) is seen as
it is then.  Only advice: a file that cannot be opened ahead is passed
over here, and the caller finds out why in its turn.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Iterator

# Files asked for ahead of the one read: a few dozen requests in the
# disk's queue.
AHEAD = 32
# Bytes of each file asked for: its first ones (the kernel's own
# readahead follows a file read from start to end).
WILLNEED_BYTES = 4 << 20


def read_ahead(items: Iterable[tuple], tree,
               ahead: int | None = None) -> Iterator[tuple]:
    """Each item of `items` (tuples whose last member is a blob file's
    path), in order; the file of each is opened through `tree` (a
    ``BlobTree`` of the caller's own: its open checks what the walk's
    does) and advised `ahead` (default `AHEAD`) items before it is
    yielded."""
    ahead = AHEAD if ahead is None else ahead
    advise = getattr(os, 'posix_fadvise', None)
    window: collections.deque = collections.deque()
    for item in items:
        if advise is not None:
            _advise(advise, tree, item[-1])
        window.append(item)
        if len(window) > ahead:
            yield window.popleft()
    while window:
        yield window.popleft()


def _advise(advise, tree, path: str) -> None:
    try:
        fd = tree.open(path)
    except OSError:
        return   # its turn says why
    try:
        advise(fd, 0, WILLNEED_BYTES, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)
