"""Eviction: the cache's size is a bound, the least recently used go first.

A prune folds the access log, moves the oldest complete rows to
``evicting`` (what was used in the last `grace` seconds plus the
resolution of access times, which covers the batches other processes hold
and the hits not recorded, last, and only if the older files are not
enough: the size is a bound), removes their files with a few threads
outside the writer lock (more if removing a file waits for the disk),
then drops those rows.  One process prunes at a time, holding the prune
lease in the index's ``cache`` row.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor

from zodbblob.cache.accesslog import AccessLog
from zodbblob.cache.directory import CacheDirectory
from zodbblob.cache.index import FOLD_CACHE_KIB, Index, count_out
from zodbblob.cache.owners import Owners
from zodbblob.cache.schema import COMPLETE

logger = logging.getLogger(__name__)

PRUNE_CHUNK = 1024           # files a prune marks first, then twice as
PRUNE_CHUNK_MAX = 32768      # ... many at a time, up to this many
REMOVAL_BATCH = 64           # files per task of the threads removing them:
REMOVAL_THREADS = 2          # ... so many where removing a file only works,
PRUNE_THREADS = 8            # ... so many where it waits for the disk
PRUNE_LEASE = 60.0           # a pruner silent this long has lost its lease


def _evict_file(path: str) -> OSError | None:
    """Remove the file `path`; the error that kept it, if one did."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        return e
    return None


def removal_threads(wall: float, cpu: float) -> int:
    """How many threads remove a prune's files, after its first batch
    took `wall` seconds, `cpu` of them on this thread's CPU: more if
    removing waited for the disk (see `Evictor._start_removals`)."""
    return PRUNE_THREADS if wall > 2 * cpu else REMOVAL_THREADS


class Evictor:
    """Removes the least recently used files of the open cache directory
    `cache` (indexed by `index`, accessed as `accesslog` says) down to a
    target; `seen(total)` is told the total bytes of the cache when a
    prune ends."""

    def __init__(self, cache: CacheDirectory, index: Index,
                 accesslog: AccessLog, owners: Owners,
                 seen: Callable[[int], None]):
        self.cache = cache
        self._index = index
        self._accesslog = accesslog
        self._owners = owners
        self._seen = seen
        # One prune of this process at a time, the others wait for it:
        # each then checks the total it left (the lease only keeps other
        # processes out).
        self._pruning = threading.Lock()
        self._warned_pinned = False

    def prune(self, target: int, keep: tuple[bytes, bytes] | None = None,
              warn: bool = True) -> tuple[int, int]:
        """Evict down to `target` bytes, never the file `keep` (being
        read); ``(files, bytes)`` removed.  `warn` says once when the
        target cannot be reached."""
        # A thread that finds another pruning waits, then checks the total
        # that one left: the bound holds after every check.
        with self._pruning:
            return self._prune(target, keep, warn)

    def _prune(self, target, keep, warn=True) -> tuple[int, int]:
        token = self._owners.new_token()
        if not self._take_lease(token):
            logger.debug('Blob cache %s: another process prunes',
                         self.cache.directory)
            return 0, 0
        removals = []
        with contextlib.ExitStack() as stack:
            try:
                total = self._mark_for_removal(token, target, stack,
                                               removals, keep)
            finally:
                try:
                    files, removed = self._drop_evicted(removals, token)
                finally:
                    self._release_lease(token)
        if total is None or self.cache.closing.is_set():
            pass  # the lease was taken over, or the cache closes
        elif total <= target:
            self._warned_pinned = False
        elif warn and not self._warned_pinned:
            self._warned_pinned = True
            logger.warning(
                'Blob cache %s holds %d bytes, more than its target of %d: '
                'the file being read is larger, or files could not be '
                'removed', self.cache.directory, total, target)
        logger.debug('Blob cache %s: evicted %d files, %d bytes',
                     self.cache.directory, files, removed)
        return files, removed

    def _mark_for_removal(self, token, target, stack, removals, keep):
        """Mark the files to evict, chunk by chunk, and hand each chunk to
        threads that remove the files while the next is marked; the total
        without them (None if the lease was lost).

        The files used in the last `grace` seconds (and within the
        resolution of access times) go last, and only if the others are
        not enough; the file `keep` (being read) never.

        `stack` gets what has to end after the removals (their threads;
        the deferred checkpoint); `removals` the batches and their futures.
        """
        cutoff = total = None
        after = (float('-inf'), b'', b'')
        chunk = PRUNE_CHUNK
        pool = None
        with contextlib.ExitStack() as marking:
            while True:
                if self.cache.closing.is_set():
                    return total
                with self._index.writing() as db:
                    total = self._total_if_leased(db, token)
                    if total is None or total <= target:
                        return total
                    self._accesslog.fold(db)
                    if cutoff is None:
                        # The rows marked are spread over the index: a
                        # page cache that holds it reads each page once;
                        # they are checkpointed once, after the prune.
                        stack.enter_context(self._index.checkpoint_after())
                        marking.enter_context(
                            self._index.page_cache(FOLD_CACHE_KIB))
                        # A file used within the resolution of its last
                        # recorded access may show only that one.
                        now = time.time()
                        cutoff = (now - self.cache.grace
                                  - self._accesslog.resolution_in(db, now))
                    victims = self._mark_evicting(
                        db, token, cutoff, after, total - target, chunk,
                        keep=keep)
                if not victims:
                    if cutoff == float('inf'):
                        return total
                    # The grace orders the victims, it never keeps the
                    # cache over its size: the recently used files go too,
                    # oldest first (a reader whose file went away fetches
                    # it again).
                    logger.debug('Blob cache %s: evicting files used in '
                                 'the last %g s', self.cache.directory,
                                 self.cache.grace)
                    cutoff = float('inf')
                    continue
                # A chunk's commit writes every page it changed: the first
                # is small so that removing starts soon, the next ones
                # larger so that fewer commits write the same pages again.
                chunk = min(chunk * 2, PRUNE_CHUNK_MAX)
                after = victims[-1][:3]
                if pool is None:
                    victims, pool = self._start_removals(victims, removals)
                    stack.callback(pool.shutdown)
                for start in range(0, len(victims), REMOVAL_BATCH):
                    batch = victims[start:start + REMOVAL_BATCH]
                    removals.append(
                        (batch, pool.submit(self._remove_files, batch)))

    def _mark_evicting(self, db, token, cutoff, after, excess,
                       limit=PRUNE_CHUNK, keep=None) -> list:
        """Move the oldest complete rows after `after` that make up
        `excess` bytes (at most `limit` rows; not the row of `keep`) from
        ``blobs`` to ``evicting``, by `token`, counting them out of the
        totals; those rows ``(accessed, oid, tid, size)``, oldest first."""
        victims = []
        size = 0
        kept = keep or (b'', b'')
        for row in db.execute(
                'SELECT accessed, oid, tid, size FROM blobs '
                'WHERE state = ? AND accessed < ? '
                'AND (accessed, oid, tid) > (?, ?, ?) '
                'AND (oid, tid) != (?, ?) '
                'ORDER BY accessed, oid, tid LIMIT ?',
                (COMPLETE, cutoff, *after, *kept, limit)).fetchall():
            victims.append(row)
            size += row[3]
            if size >= excess:
                break
        if victims:
            # They are all the complete rows of that range of the index:
            # the writer lock is held since they were read.  A row left in
            # evicting by a pruner that ended is replaced: that eviction
            # was over when the file was downloaded again.
            chosen = ('FROM blobs WHERE state = ? '
                      'AND (accessed, oid, tid) > (?, ?, ?) '
                      'AND (accessed, oid, tid) <= (?, ?, ?) '
                      'AND (oid, tid) != (?, ?)')
            bounds = (COMPLETE, *after, *victims[-1][:3], *kept)
            db.execute('INSERT OR REPLACE INTO evicting '
                       '(oid, tid, size, accessed, token) '
                       f'SELECT oid, tid, size, accessed, ? {chosen}',
                       (token, *bounds))
            db.execute(f'DELETE {chosen}', bounds)
            count_out(db, len(victims), size)
        return victims

    def _start_removals(self, victims, removals) -> tuple[list, Executor]:
        """Remove the first batch of `victims` here, timed, and add it to
        `removals`; the other victims, and the threads to remove them.

        A removal that waits for the disk (synchronous discards measured
        150-220 us a file, 44 us of it on the CPU) is done sooner by
        PRUNE_THREADS at once; one that only works (a journaled filesystem,
        30-40 us on the CPU; tmpfs) gets slower with more threads than
        cores: see bench/README.md.
        """
        batch, rest = victims[:REMOVAL_BATCH], victims[REMOVAL_BATCH:]
        wall, cpu = time.perf_counter(), time.thread_time()
        done: Future = Future()
        removals.append((batch, done))
        try:
            done.set_result(self._remove_files(batch))
        except BaseException as e:
            done.set_exception(e)
            raise
        threads = removal_threads(time.perf_counter() - wall,
                                  time.thread_time() - cpu)
        logger.debug('Blob cache %s: removing files with %d threads',
                     self.cache.directory, threads)
        return rest, ThreadPoolExecutor(
            threads, thread_name_prefix='zodbblob-prune')

    def _remove_files(self, victims) -> list[OSError | None]:
        """Remove the files of `victims`, outside the writer lock: their
        rows are evicting, by this pruner.  For each, the error that kept
        it, if one did."""
        return [_evict_file(self.cache.path(oid, tid))
                for _, oid, tid, _ in victims]

    def _drop_evicted(self, removals, token) -> tuple[int, int]:
        """Wait for the `removals`; drop the rows of `token` in
        ``evicting``, putting back as complete those of the files not
        removed (a file kept by an error, or never handed to a removal).
        ``(files, bytes)`` removed."""
        files = removed = 0
        results = []
        for victims, removal in removals:
            try:
                errors = removal.result()
            except BaseException:
                # Which of them went is unknown: back to complete, the rows
                # of the files gone are forgotten at their next lookup.
                logger.exception('Blob cache %s: evicting files failed',
                                 self.cache.directory)
                continue
            results.append((victims, errors))
            for (_, oid, tid, size), error in zip(victims, errors):
                if error is None:
                    files += 1
                    removed += size
                else:
                    logger.warning('Blob cache file %s not evicted: %s',
                                   self.cache.path(oid, tid), error)
        with self._index.writing() as db:
            marked, = db.execute('SELECT count(*) FROM evicting '
                                 'WHERE token = ?', (token,)).fetchone()
            if marked > files:
                gone = {(oid, tid)
                        for victims, errors in results
                        for (_, oid, tid, _), error in zip(victims, errors)
                        if error is None}
                db.executemany(
                    'INSERT OR IGNORE INTO blobs '
                    '(oid, tid, size, accessed, state) '
                    'SELECT oid, tid, size, accessed, ? FROM evicting '
                    'WHERE oid = ? AND tid = ?',
                    [(COMPLETE, oid, tid) for oid, tid in db.execute(
                        'SELECT oid, tid FROM evicting WHERE token = ?',
                        (token,)).fetchall()
                     if (oid, tid) not in gone])
            if marked:
                db.execute('DELETE FROM evicting WHERE token = ?', (token,))
            total, = db.execute('SELECT bytes FROM cache').fetchone()
            self._seen(total)
        return files, removed

    def _release_lease(self, token) -> None:
        with self._index.writing() as db:
            db.execute('UPDATE cache SET pruner = NULL WHERE pruner = ?',
                       (token,))

    def _take_lease(self, token) -> bool:
        now = time.time()
        with self._index.writing() as db:
            pruner, pruned_at = db.execute(
                'SELECT pruner, pruned_at FROM cache').fetchone()
            if (pruner is not None and now - pruned_at < PRUNE_LEASE
                    and not self._owners.dead(pruner)):
                return False
            db.execute('UPDATE cache SET pruner = ?, pruned_at = ?',
                       (token, now))
        return True

    def _total_if_leased(self, db, token) -> int | None:
        if not db.execute('UPDATE cache SET pruned_at = ? WHERE pruner = ?',
                          (time.time(), token)).rowcount:
            return None
        return db.execute('SELECT bytes FROM cache').fetchone()[0]
