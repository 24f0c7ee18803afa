"""The blob files of a blob directory, or of a ZEO client blob cache.

What ``zodbblob migrate`` reads from its source and checks its
destination with: ``(oid, tid, path)`` of every blob file, by the
directory's layout, and an inventory ``{(oid, tid): (size, path)}`` of
the regular files among them.  Only a listing: nothing here opens a
blob file for reading or writes anything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from zodbblob.cache import BUCKETS
from zodbblob.cache import LAYOUT as ZEOCACHE
from zodbblob.layout import BlobTree, NotABlobFile, check_blob_file, get_layout

_ZEOCACHE_BUCKET = re.compile(r'0|[1-9][0-9]*')
_ZEOCACHE_FILE = re.compile(r'(0|[1-9][0-9]*)\.([0-9a-f]{16})\.blob\Z')

Inventory = dict[tuple[bytes, bytes], tuple[int, str]]


def iter_zeocache(directory: str) -> Iterator[tuple[bytes, bytes, str]]:
    """``(oid, tid, path)`` of every blob file of a blob cache directory.

    Only the buckets' ``.blob`` files count: not the index, download
    temporaries (``.tmp/``, ``.dl``) or stock ZEO's lock files.
    """
    buckets = []
    with os.scandir(directory) as listing:
        for entry in listing:
            # One spelling per blob: ``01/`` is no bucket, nor is ``997/``.
            if _ZEOCACHE_BUCKET.fullmatch(entry.name) and int(
                    entry.name) < BUCKETS and _is_directory(entry):
                buckets.append((int(entry.name), entry.path))
    for bucket, bucket_path in sorted(buckets):
        for name in sorted(os.listdir(bucket_path)):
            match = _ZEOCACHE_FILE.match(name)
            if match is None:
                continue
            number = int(match[1]) * BUCKETS + bucket
            if number < 2 ** 64:
                yield (number.to_bytes(8, 'big'), bytes.fromhex(match[2]),
                       os.path.join(bucket_path, name))


def _is_directory(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def iter_source(directory: str, layout: str, not_files: list | None = None
                ) -> Iterator[tuple[bytes, bytes, str]]:
    """``(oid, tid, path)`` of every blob file of `directory`; what is
    passed over under a blob name (a link to a directory, a directory)
    goes to `not_files` as ``(path, kind)``."""
    if layout == ZEOCACHE:
        return iter_zeocache(directory)
    return get_layout(layout).iter_blob_paths(directory, not_files)


def inventory(blobs: Iterator[tuple[bytes, bytes, str]],
              not_files: list | None = None,
              tree: BlobTree | None = None) -> Inventory:
    """``{(oid, tid): (size, path)}`` of `blobs`.

    Only regular files count; anything else under a blob name (a link, a
    FIFO, a device), or a link to a directory above one below `tree`'s
    root, goes to `not_files` as ``(path, kind)``.
    """
    found = {}
    for oid, tid, path in blobs:
        try:
            info = (check_blob_file(path) if tree is None
                    else tree.check(path))
        except FileNotFoundError:
            continue  # evicted from a cache since the listing
        except NotABlobFile as e:
            if not_files is not None and (e.path, e.kind) not in not_files:
                not_files.append((e.path, e.kind))
        else:
            found[oid, tid] = (info.st_size, path)
    return found


def source_inventory(source: str, source_layout: str,
                      not_files: list) -> Inventory:
    with BlobTree(source) as tree:
        return inventory(iter_source(source, source_layout, not_files),
                         not_files, tree)
