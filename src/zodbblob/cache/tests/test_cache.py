"""The ZEO client blob cache, on real files in temporary directories:
its public face (hits and misses, the index across opens) and the
``zodbblob cache`` command; the helpers of the cache's test modules
(``test_cache_*.py``, one per module of `zodbblob.cache`).  The process
tests run this module as a child (``python -m zodbblob.cache.tests.test_cache
MODE ...``).
"""

import contextlib
import glob
import io
import os
import re
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

from ZEO.ClientStorage import BlobCacheLayout
import ZODB
import ZODB.FileStorage
from ZODB.blob import Blob
from ZODB.utils import p64
from zope.interface.verify import verifyObject

from zodbblob import BlobStorage
from zodbblob import cli
from zodbblob.cli.cache import parse_size
from zodbblob.cache import ACCESS_RECORD
from zodbblob.cache import INDEX
from zodbblob.cache import BlobCache
from zodbblob.interfaces import IBlobCache

TID = p64(0x03ED4F1A2B3C4D5E)
SIZE = 64 * 1024


def content(oid: bytes, size: int = SIZE) -> bytes:
    """Bytes that differ from blob to blob and from offset to offset."""
    unit = oid + bytes(range(256))
    return (unit * (size // len(unit) + 1))[:size]


def writing(data: bytes, fetches=None, delay=0.0):
    """A fetch function writing `data`; it appends to the list or file
    `fetches` each time it runs."""
    def fetch(path):
        if isinstance(fetches, list):
            fetches.append(path)
        elif fetches is not None:
            with open(fetches, 'a') as f:
                f.write(f'{os.getpid()} {threading.get_ident()}\n')
        time.sleep(delay)
        with open(path, 'wb') as f:
            f.write(data)
    return fetch


def not_called(path):
    raise AssertionError(f'fetched {path}: it was in the cache')


def read(path):
    with open(path, 'rb') as f:
        return f.read()


def tree(directory):
    """Every file below `directory`: its path, bytes and mtime."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            found[path] = (None if name in dirnames else read(path),
                           os.stat(path).st_mtime)
    return found


def dead_token():
    """A token of this pid in an earlier incarnation: its owner ended."""
    host = re.sub(r'[^A-Za-z0-9.]', '_', socket.gethostname())
    return f'{host}-{os.getpid()}-ended-1-0'


def make_stock_cache(directory, blobs, accessed=None):
    """A cache directory as stock ZEO leaves it: marker, ``.lock`` files
    and read-only blob files, at the paths of ZEO's own layout."""
    layout = BlobCacheLayout()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, '.layout'), 'w') as f:
        f.write('zeocache')
    paths = {}
    for number, data in blobs.items():
        oid = p64(number)
        path = os.path.join(directory, layout.getBlobFilePath(oid, TID))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(os.path.join(os.path.dirname(path), '.lock'), 'w').close()
        with open(path, 'wb') as f:
            f.write(data)
        os.chmod(path, stat.S_IREAD)
        if accessed is not None:
            os.utime(path, (accessed[number], accessed[number]))
        paths[number] = path
    return paths


def cache_bytes(directory):
    """Bytes of the blob files and downloads on disk below `directory`,
    walked (not read from the index)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in filenames:
            if name.endswith('.blob') or os.path.basename(dirpath) == '.tmp':
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def mount_tiny_filesystem(test, directory, size='1m'):
    """Mount a tmpfs of `size` on `directory` (made here) until the
    test's cleanup; skip the test if it cannot be mounted (not root)."""
    if os.geteuid() != 0:
        test.skipTest('mounting a tmpfs needs root')
    os.makedirs(directory)
    mounted = subprocess.run(
        ['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', directory],
        capture_output=True, text=True)
    if mounted.returncode != 0:
        test.skipTest(f'cannot mount a tmpfs: {mounted.stderr.strip()}')

    def unmount():
        if subprocess.run(['umount', directory]).returncode != 0:
            subprocess.run(['umount', '-l', directory], check=True)
    # Registered before the caches opened on it: they close first.
    test.addCleanup(unmount)


def mark_evicting(cache, size):
    """Do the first step of a prune by `cache`: mark its oldest files
    that make up `size` bytes as evicting.  The token and the rows."""
    token = cache._owners.new_token()
    assert cache._evictor._take_lease(token)
    with cache._index.writing() as db:
        victims = cache._evictor._mark_evicting(
            db, token, time.time(), (float('-inf'), b'', b''), size)
    return token, victims


class CacheTestCase(unittest.TestCase):

    def setUp(self):
        temporary = tempfile.TemporaryDirectory(prefix='zodbblob-cache-')
        self.addCleanup(temporary.cleanup)
        self.dir = os.path.join(temporary.name, 'cache')
        self.outside = os.path.join(temporary.name, 'outside')
        os.mkdir(self.outside)

    def open(self, **options):
        cache = BlobCache(self.dir, **options)
        self.addCleanup(cache.close)
        return cache

    def admit(self, cache, number, data):
        source = os.path.join(self.outside, f'{number}.blob')
        with open(source, 'wb') as f:
            f.write(data)
        return cache.admit(p64(number), TID, source)

    def temporary_files(self):
        return os.listdir(os.path.join(self.dir, '.tmp'))

    def index_rows(self, table='blobs', last='state'):
        with contextlib.closing(sqlite3.connect(
                os.path.join(self.dir, INDEX))) as db:
            return db.execute(
                f'SELECT oid, tid, size, accessed, {last} FROM {table} '
                'ORDER BY oid').fetchall()

    def evicting_rows(self):
        return self.index_rows('evicting', 'token')

    def cached(self, cache):
        return sorted(number for number in range(100)
                      if os.path.exists(cache.path(p64(number), TID)))

    def logged(self):
        """The access log's records, oldest batch first."""
        with contextlib.closing(sqlite3.connect(
                os.path.join(self.dir, INDEX))) as db:
            return [record
                    for batch, in db.execute('SELECT batch FROM accesses '
                                             'ORDER BY rowid')
                    for record in ACCESS_RECORD.iter_unpack(batch)]


class LookupTests(CacheTestCase):

    def test_provides_IBlobCache(self):
        self.assertTrue(verifyObject(IBlobCache, self.open()))

    def test_paths_are_those_of_stock_zeo(self):
        cache = self.open()
        layout = BlobCacheLayout()
        for number in (0, 1, 996, 997, 998, 123456789, 2 ** 64 - 1):
            self.assertEqual(
                cache.path(p64(number), TID),
                os.path.join(self.dir,
                             layout.getBlobFilePath(p64(number), TID)))

    def test_miss_then_download_then_hit(self):
        cache = self.open()
        oid = p64(1)
        self.assertIsNone(cache.lookup(oid, TID))
        fetches = []
        path = cache.load(oid, TID, writing(content(oid), fetches))
        self.assertEqual(path, cache.path(oid, TID))
        self.assertEqual(read(path), content(oid))
        self.assertEqual(cache.lookup(oid, TID), path)
        self.assertEqual(cache.load(oid, TID, not_called), path)
        self.assertEqual(len(fetches), 1)
        self.assertEqual(self.temporary_files(), [])
        stats = cache.stats()
        self.assertEqual((stats['files'], stats['bytes']), (1, SIZE))
        self.assertEqual((stats['hits'], stats['misses']), (2, 2))

    def test_hit_costs_one_stat(self):
        cache = self.open()
        oid = p64(2)
        cache.load(oid, TID, writing(content(oid)))
        # os.stat is patched for the whole process: count the calls of
        # this thread, the reader's, not those of the cache's background
        # threads (the preload of the sizes may still run under load).
        reader = threading.get_ident()
        calls = []

        def counting_stat(*args, **kw):
            if threading.get_ident() == reader:
                calls.append(args)
            return real_stat(*args, **kw)

        real_stat = os.stat
        with mock.patch('os.stat', counting_stat):
            self.assertEqual(cache.lookup(oid, TID), cache.path(oid, TID))
        self.assertEqual(len(calls), 1)

    def test_index_survives_reopening(self):
        cache = self.open()
        for number in (1, 2, 3):
            cache.load(p64(number), TID, writing(content(p64(number))))
        cache.lookup(p64(2), TID)
        cache.close()
        cache = self.open()
        for number in (1, 2, 3):
            self.assertEqual(read(cache.load(p64(number), TID, not_called)),
                             content(p64(number)))
        stats = cache.stats()
        self.assertEqual((stats['files'], stats['bytes']), (3, 3 * SIZE))
        self.assertEqual((stats['hits'], stats['misses']), (4, 3))

    def test_file_removed_by_hand_is_a_miss_and_fetched_again(self):
        cache = self.open()
        oid = p64(7)
        path = cache.load(oid, TID, writing(content(oid)))
        os.remove(path)
        self.assertIsNone(cache.lookup(oid, TID))
        self.assertEqual(cache.stats()['files'], 0)
        fetches = []
        self.assertEqual(read(cache.load(oid, TID,
                                         writing(content(oid), fetches))),
                         content(oid))
        self.assertEqual(len(fetches), 1)

    def test_file_of_another_size_is_a_miss_and_removed(self):
        cache = self.open()
        oid = p64(7)
        path = cache.load(oid, TID, writing(content(oid)))
        os.chmod(path, stat.S_IREAD | stat.S_IWRITE)
        with open(path, 'r+b') as f:
            f.truncate(10)
        with self.assertLogs('zodbblob.cache', 'WARNING') as logs:
            self.assertIsNone(cache.lookup(oid, TID))
        self.assertIn(path, logs.output[0])
        self.assertFalse(os.path.exists(path))
        self.assertEqual(cache.stats()['bytes'], 0)


class CommandTests(CacheTestCase):

    def make_cache(self):
        """Five files of 1 KiB adopted from a stock cache, accessed 5, 4,
        3, 2 and 1 hours ago, then 1 and 2 read again."""
        self.adopted = time.time()
        make_stock_cache(
            self.dir, {number: b'x' * 1024 for number in range(1, 6)},
            accessed={number: self.adopted - 3600 * (6 - number)
                      for number in range(1, 6)})
        with self.assertLogs('zodbblob.cache', 'WARNING'):
            cache = BlobCache(self.dir)
        cache.lookup(p64(1), TID)
        cache.lookup(p64(2), TID)
        cache.lookup(p64(2), TID)
        cache.lookup(p64(99), TID)
        cache.close()

    def run_command(self, *args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(list(args))
        return status, out.getvalue(), err.getvalue()

    def test_stats(self):
        self.make_cache()
        status, out, err = self.run_command('cache', 'stats', self.dir)
        self.assertEqual(status, 0, err)
        self.assertIn('files: 5\n', out)
        self.assertIn('bytes: 5120 (5.0 KiB)\n', out)
        oldest = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(
            self.adopted - 3 * 3600))
        self.assertIn(f'oldest access: {oldest}\n', out)
        self.assertIn('hits: 3, misses: 1 (hit ratio 75.0%)', out)
        status, out, err = self.run_command('cache', 'stats', '--quiet',
                                            self.dir)
        self.assertEqual(out, '5 5120\n')

    def test_prune_to_a_size(self):
        self.make_cache()
        status, out, err = self.run_command('cache', 'prune', self.dir,
                                            '--size', '2.5KB')
        self.assertEqual(status, 0, err)
        self.assertEqual(
            out, f'{self.dir}: removed 3 files, 3.0 KiB; 2 files, 2.0 KiB '
                 f'left\n')
        # 1 and 2 were read last; the rest, oldest first, went.
        self.assertEqual(sorted(os.listdir(self.dir)),
                         ['.layout', '.tmp', '.zodbblob-cache.lock',
                          '.zodbblob-cache.sqlite', '1', '2', '3', '4', '5'])
        self.assertEqual(
            sorted(glob.glob(os.path.join(self.dir, '*', '*.blob'))),
            [os.path.join(self.dir, bucket, '0.03ed4f1a2b3c4d5e.blob')
             for bucket in ('1', '2')])

    def test_prune_goes_down_to_the_size_through_recent_files(self):
        self.make_cache()
        status, out, err = self.run_command(
            'cache', 'prune', self.dir, '--size', '2048', '--check-percent',
            '50', '--quiet')
        self.assertEqual((status, out, err), (0, '', ''))
        # 2 was read last.
        self.assertEqual(self.cached(self.open()), [2])

    def test_prune_says_when_another_process_prunes(self):
        self.make_cache()
        other = self.open()
        self.assertTrue(other._evictor._take_lease(other._owners.new_token()))
        status, out, err = self.run_command(
            'cache', 'prune', self.dir, '--size', '2048', '--quiet')
        self.assertEqual((status, out), (1, ''))
        self.assertIn('still above 2.0 KiB: another process is pruning it',
                      err)
        self.assertEqual(other.stats()['files'], 5)

    def test_prune_that_cannot_reach_its_size_says_why_once(self):
        self.make_cache()
        # 3 is the oldest file: the prune's first victim.  A directory in
        # its place cannot be removed, not even by root.
        kept = BlobCache(self.dir)
        path = kept.path(p64(3), TID)
        kept.close()
        os.remove(path)
        os.mkdir(path)
        result = subprocess.run(
            [sys.executable, '-m', 'zodbblob.cli', 'cache', 'prune',
             self.dir, '--size', '2048', '--quiet'],
            capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stdout), (1, ''),
                         result.stderr)
        # The outcome and why, in one line (not also the library's
        # warning before it).
        [line] = result.stderr.splitlines()
        self.assertIn(f'{self.dir}: still above 2.0 KiB: ', line)
        self.assertIn(f'{path} not evicted', line)
        self.assertIn('Is a directory', line)

    def test_directory_that_is_not_a_cache_is_refused_untouched(self):
        empty = os.path.join(self.outside, 'empty')
        os.mkdir(empty)
        # A storage's blob directory, in the default (bushy) layout.
        store = os.path.join(self.outside, 'store')
        os.mkdir(store)
        blob_dir = os.path.join(store, 'blobs')
        db = ZODB.DB(BlobStorage(blob_dir, ZODB.FileStorage.FileStorage(
            os.path.join(store, 'Data.fs'))))
        with db.transaction() as conn:
            conn.root()['blob'] = Blob(b'data')
        db.close()
        plain_file = os.path.join(store, 'Data.fs')
        missing = os.path.join(self.outside, 'missing')
        expected = {
            empty: f"{empty} is not a ZEO client's blob cache (no .layout "
                   f"marker for layout zeocache)",
            blob_dir: f"{blob_dir} is a storage's blob directory (layout "
                      f"bushy), not a ZEO client's blob cache",
            plain_file: f"{plain_file} is not a directory",
            missing: f"{missing} does not exist",
        }
        before = tree(self.outside)
        for directory, message in expected.items():
            for args in (['stats'], ['prune', '--size', '1GB']):
                status, out, err = self.run_command(
                    'cache', args[0], directory, *args[1:])
                self.assertEqual((status, out), (2, ''), err)
                [line] = err.splitlines()
                self.assertTrue(line.startswith('zodbblob cache: error: '
                                                + message), line)
        self.assertEqual(tree(self.outside), before)

    def test_sizes(self):
        for text, size in (('500MB', 500 * 2 ** 20), ('2GB', 2 * 2 ** 30),
                           ('1.5GiB', 3 * 2 ** 29), ('12345', 12345),
                           ('64 kb', 65536)):
            self.assertEqual(parse_size(text), size)
        for text in ('', '-1', '1e3', 'GB', '1.5x', 'inf'):
            with self.assertRaises(Exception):
                parse_size(text)

    def test_console_script(self):
        self.make_cache()
        result = subprocess.run(
            [sys.executable, '-m', 'zodbblob.cli', 'cache', 'stats',
             self.dir], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('files: 5', result.stdout)


def child(argv):
    """A process of the process tests.

    ``load DIR OID FETCHES GO``: say ``ready``, wait for the file GO, load
    the blob (counting a fetch in FETCHES), say ``ok`` if it has every byte.
    ``partial DIR OID``: start a download, write half the blob, say
    ``ready`` and wait to be killed.
    ``read DIR OID...``: look the blobs up, close, say ``ok`` if all hit.
    ``evict DIR BYTES``: take the prune lease, mark the oldest files that
    make up BYTES as evicting, say ``ready`` and wait to be killed.
    """
    mode, directory = argv[0], argv[1]
    cache = BlobCache(directory)
    if mode == 'load':
        oid = p64(int(argv[2]))
        fetches, go = argv[3:5]
        print('ready', flush=True)
        while not os.path.exists(go):
            time.sleep(0.005)
        path = cache.load(oid, TID, writing(content(oid), fetches,
                                            delay=0.3))
        print('ok' if read(path) == content(oid) else 'wrong bytes',
              flush=True)
    elif mode == 'partial':
        oid = p64(int(argv[2]))

        def fetch(path):
            with open(path, 'wb') as f:
                f.write(content(oid)[:SIZE // 2])
            print('ready', flush=True)
            time.sleep(600)
        cache.load(oid, TID, fetch)
    elif mode == 'read':
        found = [cache.lookup(p64(int(number)), TID) for number in argv[2:]]
        cache.close()
        print('ok' if None not in found else f'missed: {found}', flush=True)
    elif mode == 'evict':
        mark_evicting(cache, int(argv[2]))
        print('ready', flush=True)
        time.sleep(600)
    cache.close()


if __name__ == '__main__':
    child(sys.argv[1:])
