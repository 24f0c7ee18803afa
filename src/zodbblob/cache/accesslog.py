"""The access log: when each file was used last, at the cost of a page.

A hit costs one ``os.stat`` (`zodbblob.cache.sizes`) and an entry in an
in-memory batch of accesses, appended to the log in one transaction per
~1024 entries or ~2 s; none if this process recorded an access of that
file within the resolution of access times (1% of the cache's age, at
most a minute).  A prune, ``stats`` and a flush that leaves the log long
fold it into ``blobs.accessed``.
"""

from __future__ import annotations

import logging
import struct
import time

from zodbblob.cache.directory import CacheDirectory
from zodbblob.cache.index import FOLD_CACHE_KIB, Index
from zodbblob.cache.schema import COMPLETE

logger = logging.getLogger(__name__)

ACCESS_BATCH = 1024          # accesses appended to the log at once ...
ACCESS_BATCH_AGE = 2.0       # ... or when the oldest is this many s old
ACCESS_LOG_LIMIT = 262144    # a flush that leaves more rows folds the log
# Access times are kept to within this fraction of the cache's age (the
# time since its least recently used file was used), at most
# ACCESS_RESOLUTION_MAX seconds: a hit that comes sooner after the access
# this process last recorded for that file records nothing.
ACCESS_RESOLUTION = 0.01
ACCESS_RESOLUTION_MAX = 60.0

# A record of the access log: oid, tid (ZODB's 8-byte strings) and the
# time of the access.
ACCESS_RECORD = struct.Struct('>8s8sd')


class AccessLog:
    """The accesses and hit counts of this process not yet in the log of
    `index`, the index of the open cache directory `cache`, whose lock
    guards them and the remembered access times they update."""

    def __init__(self, cache: CacheDirectory, index: Index):
        self.cache = cache
        self._index = index
        self._accesses: dict[tuple[bytes, bytes], float] = {}
        self._hits = self._misses = 0
        self._batch_started: float | None = None
        self.resolution = 0.0

    def record(self, key, counted, known=None) -> bool:
        """Batch an access of `key` (None: a miss) and the hit counts;
        whether the batch is due to be written.

        `known` is the file's remembered ``[size, accessed]``: an access
        within the resolution of the one recorded last is not recorded.
        """
        now = time.time()
        with self.cache.lock:
            if key is not None:
                if known is None or now - known[1] >= self.resolution:
                    self._accesses[key] = now
                    if known is not None:
                        known[1] = now
                self._hits += counted
            else:
                self._misses += counted
            if self._batch_started is None:
                self._batch_started = now
            return (len(self._accesses) >= ACCESS_BATCH
                    or now - self._batch_started >= ACCESS_BATCH_AGE)

    def flush(self) -> int | None:
        """Write the batch of accesses; the total bytes then (None if
        there was nothing to write)."""
        with self.cache.lock:
            accesses, hits, misses = self._accesses, self._hits, self._misses
            self._accesses, self._hits, self._misses = {}, 0, 0
            self._batch_started = None
        if not (accesses or hits or misses):
            return None
        try:
            with self._index.writing() as db:
                # Appended, not updated in place: the rows of a batch are
                # spread over the whole index, the log's end is one page.
                if accesses:
                    db.execute(
                        'INSERT INTO accesses (batch) VALUES (?)',
                        (b''.join([ACCESS_RECORD.pack(oid, tid, when)
                                   for (oid, tid), when in accesses.items()
                                   ]),))
                db.execute('UPDATE cache SET hits = hits + ?, '
                           'misses = misses + ?, logged = logged + ?',
                           (hits, misses, len(accesses)))
                logged, total = db.execute(
                    'SELECT logged, bytes FROM cache').fetchone()
                if logged > ACCESS_LOG_LIMIT:
                    self.fold(db)
                resolution = self.resolution_in(db, time.time())
        except BaseException:
            with self.cache.lock:
                for key, when in accesses.items():
                    if self._accesses.get(key, 0) < when:
                        self._accesses[key] = when
                self._hits += hits
                self._misses += misses
                if self._batch_started is None:
                    self._batch_started = time.time()
            raise
        with self.cache.lock:
            self.resolution = resolution
        return total

    @staticmethod
    def resolution_in(db, now: float) -> float:
        """The resolution of access times for the cache in `db`, now."""
        oldest, = db.execute('SELECT min(accessed) FROM blobs WHERE state = ?',
                             (COMPLETE,)).fetchone()
        if oldest is None:
            return 0.0
        return min(max(now - oldest, 0.0) * ACCESS_RESOLUTION,
                   ACCESS_RESOLUTION_MAX)

    def fold(self, db) -> None:
        """Fold the access log into ``blobs.accessed``, inside `db`'s
        write transaction."""
        size = ACCESS_RECORD.size
        records = sorted(
            batch[start:start + size]
            for batch, in db.execute('SELECT batch FROM accesses')
            for start in range(0, len(batch), size))
        if not records:
            return
        # Sorted as bytes, records are in (oid, tid, time) order (a
        # positive big-endian double sorts as its value): a file's last
        # record is its latest access, and the rows come in their order.
        latest = {record[:16]: record for record in records}
        # The rows of the log's files are spread over the whole index: a
        # page cache that holds it reads and writes each page once.
        with self._index.page_cache(FOLD_CACHE_KIB):
            db.executemany(
                'UPDATE blobs SET accessed = ? WHERE oid = ? AND tid = ? '
                'AND state = ? AND accessed < ?',
                [(at, oid, tid, COMPLETE, at) for oid, tid, at
                 in map(ACCESS_RECORD.unpack, latest.values())])
        db.execute('DELETE FROM accesses')
        db.execute('UPDATE cache SET logged = 0')
