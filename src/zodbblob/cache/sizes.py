"""The sizes of the most recently used files: a hit without the index.

The size of a revision never changes, so a size remembered from the index
vouches for the file at one ``os.stat``, without asking the index again.
A size not remembered is read from the index; a file whose size is not
the indexed one was removed or changed by hand, and is forgotten.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections import OrderedDict

from zodbblob.cache.directory import CacheDirectory, size_of
from zodbblob.cache.index import INDEX, Index, count_out
from zodbblob.cache.schema import COMPLETE
from zodbblob.layout import remove_if_exists

logger = logging.getLogger(__name__)

KNOWN_SIZES = 131072         # sizes remembered for the one-stat hit path


class KnownSizes:
    """Remembered ``[size, time of the access recorded last]`` per file
    of the open cache directory `cache` (indexed by `index`), guarded by
    its lock."""

    def __init__(self, cache: CacheDirectory, index: Index):
        self.cache = cache
        self._index = index
        # oid + tid -> [size, time of the access recorded last], least
        # recently used first.
        self._sizes: OrderedDict[bytes, list] = OrderedDict()

    def vouch(self, oid: bytes, tid: bytes, path: str,
              size: int | None) -> list | None:
        """The remembered ``[size, accessed]`` of the file `path` of
        ``(oid, tid)``, which has `size` bytes (None: there is no file),
        if it is the indexed file; None if it is not."""
        known = self.get(oid + tid)
        if size is None or known is None or size != known[0]:
            known = self._check_indexed(oid, tid, path, size)
        return known

    def _check_indexed(self, oid, tid, path, size) -> list | None:
        """The remembered ``[size, accessed]`` of an indexed file whose
        size is `size`; None if there is no such file."""
        with self._index.db_lock:
            row = self._index.db.execute(
                'SELECT size, accessed FROM blobs WHERE oid = ? AND tid = ? '
                'AND state = ?', (oid, tid, COMPLETE)).fetchone()
        if row is None:
            return None
        if size == row[0]:
            return self.remember(oid, tid, size, row[1])
        if self._forget(oid, tid, path):
            return self.remember(oid, tid, size, 0.0)
        return None

    def _forget(self, oid, tid, path) -> bool:
        """Drop the row of a file removed or changed by hand.

        True if, looked at again under the index's lock, the file is fine
        after all (a download completed it meanwhile).
        """
        with self._index.writing() as db:
            row = db.execute(
                'SELECT size FROM blobs WHERE oid = ? AND tid = ? '
                'AND state = ?', (oid, tid, COMPLETE)).fetchone()
            if row is None:
                return False
            size = size_of(path)
            if size == row[0]:
                return True
            db.execute('DELETE FROM blobs WHERE oid = ? AND tid = ?',
                       (oid, tid))
            count_out(db, 1, row[0])
            if size is not None:
                remove_if_exists(path)
        self.forget(oid + tid)
        if size is None:
            logger.debug('Blob cache file %s was removed: forgotten', path)
        else:
            logger.warning('Blob cache file %s has %d bytes, not the %d '
                           'indexed: removed', path, size, row[0])
        return False

    def get(self, key: bytes) -> list | None:
        """The remembered ``[size, accessed]`` of `key` (oid + tid), now
        the most recently used; None if it is not remembered."""
        with self.cache.lock:
            known = self._sizes.get(key)
            if known is not None:
                self._sizes.move_to_end(key)
        return known

    def forget(self, key: bytes) -> None:
        with self.cache.lock:
            self._sizes.pop(key, None)

    def remember(self, oid, tid, size, accessed) -> list:
        known = [size, accessed]
        with self.cache.lock:
            self._sizes[oid + tid] = known
            self._sizes.move_to_end(oid + tid)
            if len(self._sizes) > KNOWN_SIZES:
                # The least recently used: forgetting it costs one index
                # read on its next hit, keeping every size memory per file
                # ever read (about 200 bytes each).
                self._sizes.popitem(last=False)
        return known

    def preload(self) -> None:
        """Remember the sizes of the most recently used files, read from
        the index in one query (about 3 us a file) instead of one query
        per file at its first hit (about 20 us); in a thread of its own,
        with a connection of its own, so that opening does not wait."""
        try:
            db = self._index.connect(
                os.path.join(self.cache.directory, INDEX))
            try:
                rows = db.execute(
                    'SELECT oid, tid, size, accessed FROM blobs '
                    'WHERE state = ? ORDER BY accessed DESC LIMIT ?',
                    (COMPLETE, KNOWN_SIZES)).fetchall()
            finally:
                db.close()
        except sqlite3.Error as e:
            logger.debug('Blob cache %s: sizes not preloaded: %s',
                         self.cache.directory, e)
            return
        # Most recently used first, each put in front of the ones before:
        # behind whatever a hit remembered meanwhile, oldest at the front.
        for start in range(0, len(rows), 4096):
            if self.cache.closing.is_set():
                return
            with self.cache.lock:
                known = self._sizes
                for oid, tid, size, accessed in rows[start:start + 4096]:
                    if len(known) >= KNOWN_SIZES:
                        return
                    key = oid + tid
                    if key not in known:
                        known[key] = [size, accessed]
                        known.move_to_end(key, last=False)
