"""The blob directory an old ZEXP file's blobs are read from.

Files written without their blobs' bytes (see `zodbblob.tools.zexp`) are
imported with the bytes of a copy of the blob directory they came from,
found by the oid the file gives.
"""

from __future__ import annotations

import os

from ZODB.TimeStamp import TimeStamp
from ZODB.utils import p64, u64

from zodbblob.cache import BUCKETS as ZEOCACHE_BUCKETS
from zodbblob.cache import LAYOUT as ZEOCACHE_LAYOUT
from zodbblob.layout import (
    BLOB_SUFFIX,
    BlobTree,
    auto_layout_select,
    get_layout,
    read_marker,
)


class SourceBlobDirectory:
    """The committed blob files of another blob directory, by oid; read-only.

    Its layout is read from its marker, or guessed as ZODB does
    (`zodbblob.layout.auto_layout_select`); a ZEO client cache (layout
    ``zeocache``) will do too.
    """

    def __init__(self, base_dir: str):
        if not os.path.isdir(base_dir):
            raise ValueError(f'Source blob directory {base_dir} is not a '
                             f'directory')
        self.base_dir = os.path.abspath(base_dir)
        self.tree = BlobTree(self.base_dir)
        if read_marker(base_dir) == ZEOCACHE_LAYOUT:
            self.layout_name, self.layout = ZEOCACHE_LAYOUT, None
        else:
            self.layout_name = auto_layout_select(base_dir)
            self.layout = get_layout(self.layout_name, base_dir)
        # Directories shared by many oids (chunky, flat, zeocache) are
        # listed once, not once per blob.
        self._listings: dict[str, dict[bytes, list]] = {}

    def __repr__(self):
        return f'<SourceBlobDirectory {self.base_dir} ({self.layout_name})>'

    def revisions(self, oid: bytes) -> list[tuple[bytes, str]]:
        """``(tid, path)`` of every file of `oid`, oldest first."""
        if self.layout is None:
            directory = str(u64(oid) % ZEOCACHE_BUCKETS)
        else:
            directory = self.layout.oid_directory(oid)
        listing = self._listings.get(directory)
        if listing is None:
            listing = self._list(directory)
            if self.layout is None or not self.layout.directory_per_oid:
                self._listings[directory] = listing
        return sorted(listing.get(oid, ()))

    def choose(self, oid: bytes, written_at: float):
        """``(path, number of revisions)`` of the file meant, or None.

        A ZEXP file holds the revision that was current when it was
        written: the newest one no newer than the file, if the file's time
        says so, else the newest.
        """
        revisions = self.revisions(oid)
        if not revisions:
            return None
        older = [(tid, path) for tid, path in revisions
                 if TimeStamp(tid).timeTime() <= written_at]
        return (older or revisions)[-1][1], len(revisions)

    def _list(self, directory: str) -> dict[bytes, list]:
        listing: dict[bytes, list] = {}
        try:
            names = os.listdir(os.path.join(self.base_dir, directory))
        except (FileNotFoundError, NotADirectoryError):
            return listing
        for name in names:
            relative = os.path.join(directory, name)
            try:
                oid, tid = self._split(directory, name, relative)
            except ValueError:
                continue
            listing.setdefault(oid, []).append(
                (tid, os.path.join(self.base_dir, relative)))
        return listing

    def _split(self, directory: str, name: str, relative: str):
        if self.layout is not None:
            return self.layout.blob_path_to_oid_tid(relative)
        # zeocache: <oid % 997>/<oid // 997>.<tid hex>.blob
        quotient, dot, rest = name.partition('.')
        tid_hex = rest[:-len(BLOB_SUFFIX)]
        if not (dot and quotient.isdigit() and rest.endswith(BLOB_SUFFIX)
                and len(tid_hex) == 16):
            raise ValueError(name)
        number = int(quotient) * ZEOCACHE_BUCKETS + int(directory)
        return p64(number), bytes.fromhex(tid_hex)
