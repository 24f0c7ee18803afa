"""The cache directory: where a revision's file sits, and its marker.

Files sit where stock ZEO puts them (layout ``zeocache``:
``<oid % 997>/<oid // 997>.<tid hex>.blob``), so a stock cache directory is
adopted as it is; beside them, the index (`zodbblob.cache.index`), its
open lock, and ``.tmp`` for the downloads under way.

`CacheDirectory` is one open cache directory as the parts of its
`BlobCache` share it: every part takes it, and the parts it needs besides.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading

from zodbblob.layout import BLOB_SUFFIX, LAYOUT_MARKER, read_marker

LAYOUT = 'zeocache'
BUCKETS = 997
TEMPORARY = '.tmp'

# Files that stock ZEO leaves in a bucket when a process dies: a partial
# download (``.dl``) and the temporary files of ``storeBlob``.  Their owner
# is unknown, so only their age says that it is gone.
STOCK_TEMPORARY = ('.dl', '.tmp', '.tmp-', '.blob-')

CACHE_FILE = re.compile(r'(0|[1-9][0-9]*)\.([0-9a-f]{16})\.blob\Z')


class CacheDirectory:
    """The cache `directory` (absolute) as one process opened it: the
    names of its files (`path`, `temporary_path`), the settings its parts
    act on (`download_timeout`, `grace`: see `BlobCache`), the lock of the
    process's in-memory state of it (`lock`) and the event set when the
    cache closes (`closing`)."""

    def __init__(self, directory: str, download_timeout: float,
                 grace: float):
        self.directory = os.path.abspath(directory)
        self.temporary = os.path.join(self.directory, TEMPORARY)
        self.download_timeout = download_timeout
        self.grace = grace
        # Guards the in-memory state, in every part; the index's db_lock
        # guards its connection.  Neither is held while taking the other.
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self._buckets = [os.path.join(self.directory, str(bucket), '')
                         for bucket in range(BUCKETS)]

    def path(self, oid: bytes, tid: bytes) -> str:
        """The file of ``(oid, tid)``."""
        base, bucket = divmod(int.from_bytes(oid, 'big'), BUCKETS)
        return f'{self._buckets[bucket]}{base}.{tid.hex()}{BLOB_SUFFIX}'

    def temporary_path(self, token: str) -> str:
        """The file in ``.tmp`` of the download or admission `token`."""
        return os.path.join(self.temporary, token)


def size_of(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def check_layout(directory: str) -> bool:
    """Check the marker of `directory`, writing it in a new one; True if new.

    Raises ValueError, changing nothing, for another layout's marker
    or a used directory without one.
    """
    marked = read_marker(directory)
    if marked == LAYOUT:
        return False
    if marked is not None:
        raise ValueError(
            f'Directory layout `{LAYOUT}` selected for blob cache '
            f'directory {directory}, but marker found for layout '
            f'`{marked}`')
    if os.path.isdir(directory) and any(
            not name.startswith('.')
            for name in os.listdir(directory)):
        raise ValueError(
            f'Blob cache directory {directory} is used but has no '
            f'{LAYOUT_MARKER} marker: expected layout `{LAYOUT}`')
    os.makedirs(directory, exist_ok=True)
    fd, staged = tempfile.mkstemp(dir=directory,
                                  prefix=LAYOUT_MARKER + '-')
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(LAYOUT)
        os.chmod(staged, 0o644)
        # A link never replaces the marker of a process that created
        # the directory at the same time.
        with contextlib.suppress(FileExistsError):
            os.link(staged, os.path.join(directory, LAYOUT_MARKER))
    finally:
        os.remove(staged)
    if read_marker(directory) != LAYOUT:
        return check_layout(directory)
    return True
