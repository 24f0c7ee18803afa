"""The cache's access log: accesses reach the log in batches, folds
keep the latest, and access times are kept to within a resolution.
"""

import time
from unittest import mock

from ZODB.utils import p64

import zodbblob.cache
from zodbblob.cache.tests.test_cache import TID
from zodbblob.cache.tests.test_cache import CacheTestCase
from zodbblob.cache.tests.test_cache import make_stock_cache


class AccessLogTests(CacheTestCase):

    @mock.patch.object(zodbblob.cache.accesslog, 'ACCESS_BATCH', 16)
    def test_accesses_reach_the_log_in_batches_not_per_read(self):
        cache = self.open()
        for number in range(16):
            self.admit(cache, number, b'x')
        admitted = {row[0]: row[3] for row in self.index_rows()}
        time.sleep(0.01)
        for number in range(15):
            cache.lookup(p64(number), TID)
        self.assertEqual(self.logged(), [])
        cache.lookup(p64(15), TID)
        logged = self.logged()
        self.assertEqual(sorted(oid for oid, tid, at in logged),
                         sorted(admitted))
        for oid, tid, at in logged:
            self.assertGreater(at, admitted[oid])
        # Appended to the log; the rows stay as they were until a fold.
        self.assertEqual({row[0]: row[3] for row in self.index_rows()},
                         admitted)
        self.assertEqual(cache.stats()['hits'], 16)

    def test_a_single_access_is_written_by_flush(self):
        cache = self.open()
        self.admit(cache, 1, b'x')
        [(_, _, _, admitted, _)] = self.index_rows()
        time.sleep(0.01)
        cache.lookup(p64(1), TID)
        self.assertEqual(self.logged(), [])
        cache.flush()
        [(oid, tid, at)] = self.logged()
        self.assertEqual((oid, tid), (p64(1), TID))
        self.assertGreater(at, admitted)

    def test_stats_folds_the_log_into_the_rows(self):
        cache = self.open()
        for number in (1, 2, 3):
            self.admit(cache, number, b'x')
        time.sleep(0.01)
        cache.lookup(p64(2), TID)
        cache.lookup(p64(1), TID)
        cache.flush()
        logged = {oid: at for oid, tid, at in self.logged()}
        admitted = {row[0]: row[3] for row in self.index_rows()}
        self.assertEqual(cache.stats()['oldest_access'], admitted[p64(3)])
        self.assertEqual(self.logged(), [])
        self.assertEqual({row[0]: row[3] for row in self.index_rows()},
                         {**admitted, **logged})

    def test_fold_keeps_the_latest_access_whatever_order_it_was_logged_in(
            self):
        first, second = self.open(), self.open()
        self.admit(first, 1, b'x')
        time.sleep(0.01)
        first.lookup(p64(1), TID)
        time.sleep(0.01)
        second.lookup(p64(1), TID)
        second.flush()
        first.flush()
        [(_, _, later), (_, _, earlier)] = self.logged()
        self.assertLess(earlier, later)
        self.assertEqual(first.stats()['oldest_access'], later)

    def test_flush_that_makes_the_log_long_folds_it(self):
        cache = self.open()
        self.admit(cache, 1, b'x')
        self.admit(cache, 2, b'x')
        with mock.patch.object(zodbblob.cache.accesslog,
                               'ACCESS_LOG_LIMIT', 3):
            for lookups in range(3):
                cache.lookup(p64(1), TID)
                cache.flush()
                self.assertEqual(len(self.logged()), lookups + 1)
            latest = self.logged()[-1][2]
            cache.lookup(p64(2), TID)
            cache.flush()
        self.assertEqual(self.logged(), [])
        [one, two] = self.index_rows()
        self.assertEqual(one[3], latest)
        self.assertGreater(two[3], latest)


class AccessResolutionTests(CacheTestCase):
    """Access times are kept to within 1% of the cache's age, at most a
    minute: a hit that soon after the recorded one records nothing."""

    def make_cache(self, hours_ago):
        now = time.time()
        make_stock_cache(
            self.dir, {number: b'x' * 100 for number in hours_ago},
            accessed={number: now - 3600 * hours
                      for number, hours in hours_ago.items()})
        with self.assertLogs('zodbblob.cache', 'WARNING'):
            return self.open(grace=0, check_percent=0)

    def test_a_hit_soon_after_the_recorded_access_records_nothing(self):
        # Oldest access an hour ago: a resolution of 36 s.
        cache = self.make_cache({1: 1, 2: 0.5})
        for _ in range(3):
            self.assertIsNotNone(cache.lookup(p64(1), TID))
            cache.flush()
        [(oid, tid, first)] = self.logged()
        self.assertEqual(oid, p64(1))
        self.assertEqual(cache.stats()['hits'], 3)
        # Later than the resolution, it is recorded again.
        with mock.patch.object(zodbblob.cache.accesslog.time, 'time',
                               return_value=first + 37):
            cache.lookup(p64(1), TID)
            cache.flush()
        self.assertEqual([at for oid, tid, at in self.logged()],
                         [first + 37])

    def test_without_age_every_hit_is_recorded(self):
        cache = self.open(grace=0)
        self.admit(cache, 1, b'x')
        for _ in range(3):
            time.sleep(0.01)
            cache.lookup(p64(1), TID)
            cache.flush()
        self.assertEqual(len(self.logged()), 3)

    def test_files_used_within_the_resolution_go_last(self):
        # Resolution 36 s: file 2, whose access was recorded 20 s ago, may
        # have had unrecorded hits since: 1 and 3 go first, although 2 is
        # older than 3 by its recorded access.
        cache = self.make_cache({1: 1, 2: 20 / 3600, 3: 1 / 60})
        self.assertEqual(cache.prune(100), (2, 200))
        self.assertEqual(self.cached(cache), [2])

    def test_files_used_within_the_resolution_go_when_needed(self):
        # The size is a bound all the same.
        cache = self.make_cache({1: 1, 2: 20 / 3600})
        self.assertEqual(cache.prune(0), (2, 200))
        self.assertEqual(self.cached(cache), [])

    def test_sizes_of_the_most_recently_used_files_are_preloaded(self):
        cache = self.make_cache({1: 3, 2: 1, 3: 2})
        cache.close()
        with mock.patch.object(zodbblob.cache.sizes, 'KNOWN_SIZES', 2):
            cache = self.open()
            cache._preloading.join()
            self.assertEqual(
                [(key[:8], known) for key, known in
                 cache._known_sizes._sizes.items()],
                [(p64(3), [100, mock.ANY]), (p64(2), [100, mock.ANY])])
            # A hit of a preloaded file does not read the index.
            statements = []
            cache._index.db.set_trace_callback(statements.append)
            self.assertIsNotNone(cache.lookup(p64(2), TID))
            self.assertIsNotNone(cache.lookup(p64(1), TID))
            self.assertEqual(len(statements), 1)
            self.assertIn('SELECT size, accessed FROM blobs', statements[0])
