"""Eviction: least recently used first, down to the size; chunks,
leases and the removal threads.
"""

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

from ZODB.utils import p64

import zodbblob.cache
from zodbblob.cache import INDEX
from zodbblob.cache.tests.test_cache import TID
from zodbblob.cache.tests.test_cache import CacheTestCase
from zodbblob.cache.tests.test_cache import cache_bytes
from zodbblob.cache.tests.test_cache import content
from zodbblob.cache.tests.test_cache import mark_evicting
from zodbblob.cache.tests.test_cache import read
from zodbblob.cache.tests.test_cache import writing


class EvictionTests(CacheTestCase):

    def wait_for_bytes(self, size, timeout=60.0):
        """Wait until the files on disk make up at most `size` bytes (a
        prune in the background)."""
        deadline = time.monotonic() + timeout
        while cache_bytes(self.dir) > size:
            if time.monotonic() > deadline:
                self.fail(f'{self.dir} holds {cache_bytes(self.dir)} bytes '
                          f'after {timeout} s, more than {size}')
            time.sleep(0.01)

    def test_least_recently_accessed_go_first_down_to_the_low_water_mark(
            self):
        cache = self.open(size_limit=1000, check_percent=30, grace=0)
        for number in range(1, 11):
            self.admit(cache, number, b'x' * 100)
        # Accessed in another order than admitted.
        for number in (4, 2, 9, 1, 7, 3, 10, 5, 8, 6):
            time.sleep(0.002)
            cache.lookup(p64(number), TID)
        self.admit(cache, 11, b'x' * 100)
        self.assertEqual(self.cached(cache), [3, 5, 6, 7, 8, 10, 11])
        stats = cache.stats()
        self.assertEqual((stats['files'], stats['bytes']), (7, 700))

    def test_prune_returns_what_it_removed(self):
        cache = self.open(grace=0)
        for number in range(5):
            self.admit(cache, number, b'x' * 100)
        self.assertEqual(cache.prune(250), (3, 300))
        self.assertEqual(self.cached(cache), [3, 4])
        self.assertEqual(cache.prune(), (0, 0))  # no size limit

    def test_recently_used_files_go_when_the_others_are_not_enough(self):
        # All used within the grace: the least recently used go all the
        # same, and the one being read stays.
        cache = self.open(size_limit=250, check_percent=0)
        with self.assertNoLogs('zodbblob.cache', 'WARNING'):
            for number in range(6):
                self.admit(cache, number, b'x' * 100)
                time.sleep(0.002)
                self.assertLessEqual(cache_bytes(self.dir), 250)
        self.assertEqual(self.cached(cache), [4, 5])
        stats = cache.stats()
        self.assertEqual((stats['files'], stats['bytes']), (2, 200))

    def test_file_larger_than_the_cache_stays_for_its_reader_said_once(self):
        cache = self.open(size_limit=250, check_percent=0)
        self.admit(cache, 1, b'x' * 100)
        with self.assertLogs('zodbblob.cache', 'WARNING') as logs:
            path = cache.load(p64(2), TID, writing(b'y' * 400))
            self.assertEqual(read(path), b'y' * 400)
            self.assertEqual(self.cached(cache), [2])
            # A hit of it checks the size again, in the background.
            self.assertEqual(cache.lookup(p64(2), TID), path)
            cache._background_prune.join(60)
            self.assertEqual(self.cached(cache), [2])
        [warning] = logs.output
        self.assertIn('holds 400 bytes, more than its target of 250: the '
                      'file being read is larger', warning)
        # The next file read pushes it out.
        self.admit(cache, 3, b'x' * 100)
        self.assertEqual(self.cached(cache), [3])

    def test_reading_faster_than_the_grace_stays_within_the_size(self):
        # 10 files fit; 40 different ones read in a loop, three times,
        # well within the grace of 10 s.
        size = 10 * 1000
        cache = self.open(size_limit=size)
        for _ in range(3):
            for number in range(40):
                oid = p64(number)
                path = cache.load(oid, TID, writing(content(oid, 1000)))
                self.assertEqual(read(path), content(oid, 1000))
                self.assertLessEqual(cache_bytes(self.dir), size)
        self.assertLessEqual(cache.stats()['bytes'], size)

    def test_cache_opened_over_its_size_prunes_in_the_background(self):
        cache = self.open()
        for number in range(20):
            self.admit(cache, number, b'x' * 100)
        cache.close()
        cache = self.open(size_limit=1000)
        # The open started the prune in a thread: once that ends, the
        # cache is down to its target (the size less 10%), not merely
        # under the size (which it passes on the way).
        pruning = cache._background_prune
        self.assertIsNotNone(pruning)
        pruning.join(60)
        self.assertFalse(pruning.is_alive())
        self.assertEqual(self.cached(cache), list(range(11, 20)))

    def test_a_hit_checks_the_size_when_the_total_is_over(self):
        cache = self.open(size_limit=1000)
        self.admit(cache, 0, b'x' * 100)
        # Another process without a size fills the cache.
        other = self.open()
        for number in range(1, 20):
            self.admit(other, number, b'x' * 100)
        other.flush()
        # This one learns the total with its next batch of accesses ...
        self.assertIsNotNone(cache.lookup(p64(19), TID))
        cache.flush()
        # ... and from then on, each hit checks it.
        self.assertIsNotNone(cache.lookup(p64(19), TID))
        self.wait_for_bytes(1000)
        self.assertIn(19, self.cached(cache))

    def test_prune_in_chunks_evicts_exactly_the_oldest(self):
        cache = self.open(grace=0, check_percent=0)
        for number in range(12):
            self.admit(cache, number, b'x' * 100)
            time.sleep(0.002)
        with mock.patch.multiple(zodbblob.cache.evictor, PRUNE_CHUNK=2,
                                 PRUNE_CHUNK_MAX=4, REMOVAL_BATCH=1):
            marks = mock.patch.object(cache._evictor, '_mark_evicting',
                                      wraps=cache._evictor._mark_evicting)
            with marks as marking:
                self.assertEqual(cache.prune(300), (9, 900))
        # Chunks of 2, 4 and 4 rows: 3 of the last one make up the bytes.
        self.assertEqual([call.args[5] for call in marking.call_args_list],
                         [2, 4, 4])
        self.assertEqual(self.cached(cache), [9, 10, 11])
        self.assertEqual(self.evicting_rows(), [])
        stats = cache.stats()
        self.assertEqual((stats['files'], stats['bytes']), (3, 300))

    def test_files_of_a_failed_removal_stay_indexed(self):
        cache = self.open(grace=0, check_percent=0)
        for number in range(6):
            self.admit(cache, number, b'x' * 100)
        failing = mock.patch.object(cache._evictor, '_remove_files',
                                    side_effect=RuntimeError('no way'))
        with failing, self.assertLogs('zodbblob.cache', 'ERROR'):
            with self.assertRaises(RuntimeError):
                cache.prune(300)
        self.assertEqual(self.cached(cache), [0, 1, 2, 3, 4, 5])
        self.assertEqual([row[4] for row in self.index_rows()],
                         ['complete'] * 6)
        self.assertEqual(self.evicting_rows(), [])
        stats = cache.stats()
        self.assertEqual((stats['files'], stats['bytes']), (6, 600))
        # The lease went with it: the next prune evicts.
        self.assertEqual(cache.prune(300), (3, 300))

    def test_prune_checkpoints_the_index_after_it(self):
        cache = self.open(grace=0, check_percent=0)
        for number in range(20):
            self.admit(cache, number, b'x' * 100)
        # The index file holds the 20 rows; the prune's changes are in
        # the write-ahead log until a checkpoint.  (The cache's connection
        # only under its lock: its syncing thread writes meanwhile.)
        with cache._index.db_lock:
            cache._index.db.execute(
                'PRAGMA wal_checkpoint(TRUNCATE)').fetchone()
        cache.prune(1000)
        cache._index.checkpointing.join(10)
        with cache._index.db_lock:
            self.assertEqual(
                cache._index.db.execute(
                    'PRAGMA wal_autocheckpoint').fetchone(),
                (1000,))
        # The index file alone, without its write-ahead log, has the rows.
        copy = os.path.join(self.outside, 'index-alone.sqlite')
        shutil.copyfile(os.path.join(self.dir, INDEX), copy)
        with contextlib.closing(sqlite3.connect(copy)) as db:
            self.assertEqual(db.execute('SELECT count(*) FROM blobs')
                             .fetchone(), (10,))

    def test_removal_threads_are_many_when_removing_waited(self):
        # Whether removing waits is measured on the first batch (bench/
        # README.md has the measurements); the choice, given them:
        self.assertEqual(zodbblob.cache.removal_threads(0.010, 0.002),
                         zodbblob.cache.PRUNE_THREADS)
        self.assertEqual(zodbblob.cache.removal_threads(0.010, 0.009),
                         zodbblob.cache.REMOVAL_THREADS)

    def test_removals_after_the_first_batch_use_the_threads_chosen(self):
        cache = self.open()
        victims = [(0.0, p64(number), TID, 1) for number in range(200)]
        measured = []

        def choosing(wall, cpu):
            measured.append((wall, cpu))
            return 3

        removals = []
        with mock.patch.object(zodbblob.cache.evictor, 'removal_threads',
                               choosing), \
                mock.patch.object(cache._evictor, '_remove_files',
                                  lambda batch: [None] * len(batch)), \
                self.assertLogs('zodbblob.cache', 'DEBUG') as logs:
            rest, pool = cache._evictor._start_removals(victims, removals)
        pool.shutdown()
        self.assertEqual(rest, victims[zodbblob.cache.REMOVAL_BATCH:])
        self.assertEqual([batch for batch, _ in removals],
                         [victims[:zodbblob.cache.REMOVAL_BATCH]])
        [(wall, cpu)] = measured
        self.assertGreaterEqual(wall, 0)
        self.assertGreaterEqual(cpu, 0)
        self.assertEqual(pool._max_workers, 3)
        self.assertIn('removing files with 3 threads', logs.output[0])

    def test_file_being_downloaded_is_not_evicted(self):
        cache = self.open(grace=0)
        self.admit(cache, 1, b'x' * 100)
        started, release = threading.Event(), threading.Event()

        def stalled(path):
            with open(path, 'wb') as f:
                f.write(b'y' * 50)
                f.flush()
                started.set()
                release.wait(10)
                f.write(b'y' * 50)

        thread = threading.Thread(
            target=lambda: cache.load(p64(2), TID, stalled))
        thread.start()
        started.wait(10)
        self.assertEqual(cache.prune(0), (1, 100))
        [temporary] = self.temporary_files()
        release.set()
        thread.join(10)
        self.assertEqual(read(cache.path(p64(2), TID)), b'y' * 100)
        self.assertEqual(self.cached(cache), [2])

    def test_file_admitted_while_its_name_is_evicted_is_kept(self):
        cache = self.open(grace=0)
        self.admit(cache, 1, b'old')
        token, victims = mark_evicting(cache, 1)
        admitted = []
        admitting = threading.Thread(
            target=lambda: admitted.append(self.admit(cache, 1, b'new')))
        admitting.start()
        # Time for an admission that did not wait to put its file where
        # the pruner is about to remove one.
        admitting.join(0.5)
        with ThreadPoolExecutor(1) as pool:
            removal = pool.submit(cache._evictor._remove_files, victims)
            self.assertEqual(
                cache._evictor._drop_evicted([(victims, removal)], token),
                (1, 3))
        admitting.join(10)
        self.assertEqual(admitted, [cache.path(p64(1), TID)])
        self.assertEqual(read(admitted[0]), b'new')
        self.assertEqual([row[2:] for row in self.index_rows()],
                         [(3, self.index_rows()[0][3], 'complete')])
        stats = cache.stats()
        self.assertEqual((stats['files'], stats['bytes']), (1, 3))

    def test_file_being_evicted_is_a_miss(self):
        cache = self.open(grace=0)
        # Another process, which does not know the file's size yet (its
        # open preloaded the sizes of the files there were then).
        other = self.open()
        other._preloading.join()
        self.admit(cache, 1, b'x')
        mark_evicting(cache, 1)
        self.assertIsNone(other.lookup(p64(1), TID))

    def test_prune_never_walks_the_directory(self):
        cache = self.open(check_percent=0, grace=0)
        for number in range(50):
            self.admit(cache, number, b'x' * 10)
        walks = {name: mock.patch(f'os.{name}', wraps=getattr(os, name))
                 for name in ('scandir', 'listdir', 'walk')}
        with contextlib.ExitStack() as stack:
            counted = {name: stack.enter_context(patch)
                       for name, patch in walks.items()}
            self.assertEqual(cache.prune(200), (30, 300))
        self.assertEqual({name: call.call_count
                          for name, call in counted.items()},
                         dict(scandir=0, listdir=0, walk=0))

    def test_one_pruner_at_a_time(self):
        cache = self.open(grace=0)
        for number in range(5):
            self.admit(cache, number, b'x' * 100)
        other = self.open(grace=0)
        self.assertTrue(other._evictor._take_lease(other._owners.new_token()))
        self.assertEqual(cache.prune(0), (0, 0))
        self.assertEqual(cache.stats()['files'], 5)

    def test_lease_of_an_ended_process_does_not_stop_pruning(self):
        cache = self.open(grace=0)
        for number in range(5):
            self.admit(cache, number, b'x' * 100)
        ended = subprocess.run([sys.executable, '-c',
                                'import os; print(os.getpid())'],
                               capture_output=True, text=True, check=True)
        token = cache._owners.new_token().split('-')
        token[-4] = ended.stdout.strip()
        self.assertTrue(cache._evictor._take_lease('-'.join(token)))
        self.assertEqual(cache.prune(0), (5, 500))
