"""Downloads: one per blob across threads and processes, claims taken
over, admissions, and what ended processes left behind.
"""

import contextlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading

from ZEO.ClientStorage import BlobCacheLayout
from ZODB.utils import p64

from zodbblob.cache.tests.test_cache import SIZE
from zodbblob.cache.tests.test_cache import TID
from zodbblob.cache.tests.test_cache import CacheTestCase
from zodbblob.cache.tests.test_cache import content
from zodbblob.cache.tests.test_cache import mount_tiny_filesystem
from zodbblob.cache.tests.test_cache import not_called
from zodbblob.cache.tests.test_cache import read
from zodbblob.cache.tests.test_cache import writing


def start_readers(cache, oid, fetches, start, count, delay):
    """Start `count` threads that each wait at the barrier `start`,
    then load `oid` from `cache` (a fetch that appends to the list or
    file `fetches` and takes `delay` s) and read it; the threads, and
    the list of what they read."""
    contents = []

    def reader():
        start.wait()
        path = cache.load(oid, TID,
                          writing(content(oid), fetches, delay=delay))
        contents.append(read(path))

    threads = [threading.Thread(target=reader) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads, contents


class DownloadTests(CacheTestCase):

    def test_download_whose_install_failed_is_taken_over_at_once(self):
        # The cache on its own small filesystem, filled by someone else
        # while a blob downloads: the index's COMMIT finds no space.
        mount_tiny_filesystem(self, self.dir)
        cache = self.open(download_timeout=300)
        filler = os.path.join(self.dir, 'filler')
        oid = p64(4)

        def filling(path):
            with open(path, 'wb') as f:
                f.write(content(oid, 8192))
            with contextlib.suppress(OSError), open(filler, 'wb') as f:
                while True:
                    f.write(b'\0' * 4096)
                    f.flush()

        with self.assertRaises(sqlite3.OperationalError):
            cache.load(oid, TID, filling)
        os.remove(filler)
        # Another process (a cache of its own) and this one read it next:
        # neither waits for the failed claim's 300 s.
        other = self.open(download_timeout=300)
        for reader in (other, cache):
            paths = []
            thread = threading.Thread(target=lambda: paths.append(
                reader.load(oid, TID, writing(content(oid, 8192)))),
                daemon=True)
            thread.start()
            thread.join(60)
            self.assertFalse(thread.is_alive(), 'the reader waits for the '
                             'failed download\'s claim')
            self.assertEqual(read(paths[0]), content(oid, 8192))
        self.assertEqual([row[4] for row in self.index_rows()],
                         ['complete'])

    def test_files_are_readable_as_their_directory_and_not_writable(self):
        # As stock ZODB and ZEO leave committed files.
        self.addCleanup(os.umask, os.umask(0o022))
        cache = self.open()
        os.chmod(cache.directory, 0o755)
        downloaded = cache.load(p64(1), TID, writing(b'downloaded'))
        admitted = self.admit(cache, 2, b'admitted')
        for path in (downloaded, admitted):
            self.assertEqual(stat.S_IMODE(os.stat(
                os.path.dirname(path)).st_mode), 0o755)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o444)

    def test_failed_fetch_leaves_no_claim_and_no_file(self):
        cache = self.open()
        oid = p64(3)

        def broken(path):
            with open(path, 'wb') as f:
                f.write(b'half')
            raise ConnectionError('server went away')

        with self.assertRaises(ConnectionError):
            cache.load(oid, TID, broken)
        self.assertEqual(self.index_rows(), [])
        self.assertEqual(self.temporary_files(), [])
        self.assertFalse(os.path.exists(cache.path(oid, TID)))
        fetches = []
        self.assertEqual(
            read(cache.load(oid, TID, writing(content(oid), fetches))),
            content(oid))
        self.assertEqual(len(fetches), 1)

    def test_eight_threads_fetch_once_and_all_read_every_byte(self):
        cache = self.open()
        oid = p64(4)
        fetches = []
        threads, contents = start_readers(
            cache, oid, fetches, threading.Barrier(8), 8, delay=0.2)
        for thread in threads:
            thread.join(10)
        self.assertEqual(len(fetches), 1)
        self.assertEqual(contents, [content(oid)] * 8)

    def test_downloads_of_different_blobs_run_at_the_same_time(self):
        cache = self.open()
        # Each fetch returns only once the other one runs too.
        both = threading.Barrier(2, timeout=5)
        errors, paths = [], []

        def fetching(oid):
            def fetch(path):
                both.wait()
                writing(content(oid))(path)
            try:
                paths.append(cache.load(oid, TID, fetch))
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=fetching, args=(p64(n),))
                   for n in (5, 6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        self.assertEqual(errors, [])
        self.assertEqual(len(paths), 2)

    def test_claim_older_than_the_timeout_is_taken_over(self):
        slow = self.open()
        impatient = self.open(download_timeout=0.3)
        oid = p64(8)
        started, release = threading.Event(), threading.Event()
        fetches, results = [], []

        def stalled(path):
            fetches.append(path)
            with open(path, 'wb') as f:
                f.write(content(oid)[:100])
                f.flush()
                started.set()
                release.wait(10)
                f.write(content(oid)[100:])

        thread = threading.Thread(
            target=lambda: results.append(slow.load(oid, TID, stalled)))
        thread.start()
        started.wait(10)
        with self.assertLogs('zodbblob.cache', 'WARNING') as logs:
            path = impatient.load(oid, TID, writing(content(oid), fetches))
        self.assertIn('has not finished in 0.3 s', logs.output[0])
        self.assertEqual(read(path), content(oid))
        release.set()
        thread.join(10)
        self.assertEqual(results, [path])
        self.assertEqual(read(path), content(oid))
        self.assertEqual(len(fetches), 2)
        self.assertEqual(self.temporary_files(), [])
        self.assertEqual(impatient.stats()['files'], 1)

    def test_admit_moves_the_file_in_and_counts_it(self):
        cache = self.open()
        source = os.path.join(self.outside, 'committed')
        with open(source, 'wb') as f:
            f.write(content(p64(9)))
        path = cache.admit(p64(9), TID, source)
        self.assertEqual(path, cache.path(p64(9), TID))
        self.assertFalse(os.path.exists(source))
        self.assertEqual(read(path), content(p64(9)))
        self.assertEqual(cache.load(p64(9), TID, not_called), path)
        stats = cache.stats()
        self.assertEqual((stats['files'], stats['bytes']), (1, SIZE))


    def test_admit_from_another_filesystem_copies_and_says_so(self):
        os.makedirs(self.dir)
        elsewhere = next((path for path in ('/dev/shm', tempfile.gettempdir())
                          if os.path.isdir(path) and os.stat(path).st_dev
                          != os.stat(self.dir).st_dev), None)
        if elsewhere is None:
            self.skipTest('no second filesystem to admit a file from')
        there = tempfile.TemporaryDirectory(dir=elsewhere)
        self.addCleanup(there.cleanup)
        source = os.path.join(there.name, 'committed')
        with open(source, 'wb') as f:
            f.write(content(p64(10)))
        cache = self.open()
        with self.assertLogs('zodbblob.cache', 'WARNING') as logs:
            path = cache.admit(p64(10), TID, source)
        self.assertIn(source, logs.output[0])
        self.assertIn(path, logs.output[0])
        self.assertFalse(os.path.exists(source))
        self.assertEqual(read(path), content(p64(10)))
        self.assertEqual(self.temporary_files(), [])


class ProcessTests(CacheTestCase):
    """Downloads shared with, and left behind by, other processes."""

    def child(self, *args):
        process = subprocess.Popen(
            [sys.executable, '-m', 'zodbblob.cache.tests.test_cache']
            + [str(arg) for arg in args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(process.wait)
        self.addCleanup(process.stderr.close)
        self.addCleanup(process.stdout.close)
        self.addCleanup(process.kill)
        return process

    def assertReady(self, child):
        line = child.stdout.readline()
        if line != 'ready\n':
            child.kill()
            self.fail(f'child said {line!r}: {child.stderr.read()}')

    def test_two_processes_and_threads_fetch_once(self):
        self.open()
        oid = p64(11)
        fetches = os.path.join(self.outside, 'fetches')
        go = os.path.join(self.outside, 'go')
        children = [self.child('load', self.dir, 11, fetches, go)
                    for i in range(2)]
        for child in children:
            self.assertReady(child)
        cache = self.open()
        start = threading.Barrier(5)
        threads, contents = start_readers(
            cache, oid, fetches, start, 4, delay=0.3)
        open(go, 'w').close()
        start.wait()
        for thread in threads:
            thread.join(20)
        for child in children:
            output, errors = child.communicate(timeout=20)
            self.assertEqual(output, 'ok\n', errors)
        self.assertEqual(contents, [content(oid)] * 4)
        with open(fetches) as f:
            self.assertEqual(len(f.readlines()), 1)

    def kill_downloader(self, oid):
        child = self.child('partial', self.dir, oid)
        self.assertReady(child)
        [partial] = self.temporary_files()
        self.assertEqual(
            os.path.getsize(os.path.join(self.dir, '.tmp', partial)),
            SIZE // 2)
        child.send_signal(signal.SIGKILL)
        child.wait()

    def test_download_of_a_killed_process_is_taken_over(self):
        cache = self.open()
        oid = p64(12)
        self.kill_downloader(12)
        fetches = []
        with self.assertLogs('zodbblob.cache', 'WARNING') as logs:
            path = cache.load(oid, TID, writing(content(oid), fetches))
        self.assertIn('taking over', logs.output[0])
        self.assertIn('ended', logs.output[0])
        self.assertEqual(read(path), content(oid))
        self.assertEqual(len(fetches), 1)
        self.assertEqual(self.temporary_files(), [])
        self.assertEqual(cache.stats()['bytes'], SIZE)

    def test_downloads_of_ended_processes_are_dropped_at_open(self):
        self.open().close()
        self.kill_downloader(13)
        with self.assertLogs('zodbblob.cache', 'WARNING') as logs:
            cache = self.open()
        self.assertIn('dropped 1 downloads and 1 temporary files',
                      logs.output[0])
        self.assertEqual(self.temporary_files(), [])
        self.assertEqual(self.index_rows(), [])
        self.assertEqual(read(cache.load(p64(13), TID,
                                         writing(content(p64(13))))),
                         content(p64(13)))


    def test_download_killed_after_its_rename_is_kept_at_open(self):
        self.open().close()
        self.kill_downloader(14)
        # As if it was killed between renaming its complete file and
        # committing the row that says so.
        oid = p64(14)
        [partial] = self.temporary_files()
        os.remove(os.path.join(self.dir, '.tmp', partial))
        path = os.path.join(self.dir,
                            BlobCacheLayout().getBlobFilePath(oid, TID))
        os.makedirs(os.path.dirname(path))
        with open(path, 'wb') as f:
            f.write(content(oid))
        with self.assertLogs('zodbblob.cache', 'WARNING'):
            cache = self.open()
        self.assertEqual(read(cache.load(oid, TID, not_called)),
                         content(oid))
        stats = cache.stats()
        self.assertEqual((stats['files'], stats['bytes']), (1, SIZE))

    def test_accesses_of_another_process_order_the_eviction(self):
        cache = self.open(grace=0, check_percent=0)
        for number in range(1, 7):
            self.admit(cache, number, b'x' * 100)
        reader = self.child('read', self.dir, 2, 4, 6)
        output, errors = reader.communicate(timeout=60)
        self.assertEqual(output, 'ok\n', errors)
        # In the log, not yet in the rows: the prune folds them in.
        self.assertEqual(sorted(oid for oid, tid, at in self.logged()),
                         [p64(2), p64(4), p64(6)])
        self.assertEqual(cache.prune(300), (3, 300))
        self.assertEqual(self.cached(cache), [2, 4, 6])
        self.assertEqual(self.logged(), [])

    def kill_pruner(self, size):
        """A process that marked the files of `size` bytes evicting and
        was killed before it removed them."""
        pruner = self.child('evict', self.dir, size)
        self.assertReady(pruner)
        pruner.send_signal(signal.SIGKILL)
        pruner.wait()

    def test_eviction_of_a_killed_pruner_is_finished_at_open(self):
        cache = self.open(grace=0)
        for number in range(1, 6):
            self.admit(cache, number, b'x' * 100)
        cache.close()
        self.kill_pruner(250)
        self.assertEqual([row[0] for row in self.index_rows()],
                         [p64(4), p64(5)])
        self.assertEqual([row[0] for row in self.evicting_rows()],
                         [p64(1), p64(2), p64(3)])
        self.assertEqual(self.cached(cache), [1, 2, 3, 4, 5])
        with self.assertLogs('zodbblob.cache', 'WARNING') as logs:
            cache = self.open()
        self.assertIn('finished 3 of their evictions', logs.output[0])
        self.assertEqual(self.cached(cache), [4, 5])
        self.assertEqual([row[0] for row in self.index_rows()],
                         [p64(4), p64(5)])
        self.assertEqual(self.evicting_rows(), [])
        stats = cache.stats()
        self.assertEqual((stats['files'], stats['bytes']), (2, 200))

    def test_file_whose_pruner_was_killed_is_fetched_again(self):
        # Opened before the pruner ran, and not knowing the file's size
        # (its preloading done before the file came: on a busy machine,
        # a late preload would remember it, and the load would be a hit).
        cache = self.open()
        cache._preloading.join()
        admitting = self.open()
        self.admit(admitting, 1, content(p64(1)))
        self.kill_pruner(1)
        fetches = []
        with self.assertLogs('zodbblob.cache', 'WARNING') as logs:
            path = cache.load(p64(1), TID, writing(content(p64(1)), fetches))
        self.assertIn('replacing it; its pruner', logs.output[0])
        self.assertIn('ended before removing it', logs.output[0])
        self.assertEqual(len(fetches), 1)
        self.assertEqual(read(path), content(p64(1)))
        self.assertEqual([row[4] for row in self.index_rows()], ['complete'])
        self.assertEqual(self.evicting_rows(), [])
        self.assertEqual(cache.stats()['bytes'], SIZE)
