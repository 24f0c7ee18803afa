"""The cache directory: where a revision's file sits, and its marker.

Files sit where stock ZEO puts them (layout ``zeocache``:
``<oid % 997>/<oid // 997>.<tid hex>.blob``), so a stock cache directory is
adopted as it is; beside them, the index (`zodbblob.cache.index`), its
open lock, and ``.tmp`` for the downloads under way.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile

from zodbblob.layout import LAYOUT_MARKER, read_marker

LAYOUT = 'zeocache'
BUCKETS = 997
TEMPORARY = '.tmp'

# Files that stock ZEO leaves in a bucket when a process dies: a partial
# download (``.dl``) and the temporary files of ``storeBlob``.  Their owner
# is unknown, so only their age says that it is gone.
STOCK_TEMPORARY = ('.dl', '.tmp', '.tmp-', '.blob-')

_CACHE_FILE = re.compile(r'(0|[1-9][0-9]*)\.([0-9a-f]{16})\.blob\Z')


def _size_of(path: str) -> int | None:
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
