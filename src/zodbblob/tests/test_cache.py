"""The ZEO client blob cache, on real files in temporary directories.

Hits and misses, one download per blob across threads and processes,
eviction by last access, adoption of stock ZEO cache directories, and the
``zodbblob cache`` command.  The process tests run this module as a child
(``python -m zodbblob.tests.test_cache MODE ...``).
"""

import contextlib
import glob
import io
import logging
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

from ZEO.ClientStorage import BlobCacheLayout
import ZODB
import ZODB.FileStorage
from ZODB.blob import Blob
from ZODB.utils import p64
from zope.interface.verify import verifyObject

import zodbblob.cache
from zodbblob import BlobStorage
from zodbblob import cli
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


# The index as zodbblob wrote it before the access log, at version 1.
SCHEMA_1 = (
    """CREATE TABLE blobs (
        oid BLOB NOT NULL,
        tid BLOB NOT NULL,
        size INTEGER NOT NULL,
        accessed REAL NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('complete', 'in-progress')),
        token TEXT,
        started REAL,
        PRIMARY KEY (oid, tid)) WITHOUT ROWID""",
    """CREATE INDEX blobs_by_access ON blobs (accessed, oid, tid)
        WHERE state = 'complete'""",
    """CREATE INDEX blobs_in_progress ON blobs (token)
        WHERE state = 'in-progress'""",
    """CREATE TABLE cache (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL,
        files INTEGER NOT NULL DEFAULT 0,
        bytes INTEGER NOT NULL DEFAULT 0,
        hits INTEGER NOT NULL DEFAULT 0,
        misses INTEGER NOT NULL DEFAULT 0,
        pruner TEXT,
        pruned_at REAL)""",
    """CREATE TRIGGER blobs_insert AFTER INSERT ON blobs
        WHEN new.state = 'complete' BEGIN
            UPDATE cache SET files = files + 1, bytes = bytes + new.size;
        END""",
    """CREATE TRIGGER blobs_delete AFTER DELETE ON blobs
        WHEN old.state = 'complete' BEGIN
            UPDATE cache SET files = files - 1, bytes = bytes - old.size;
        END""",
    """CREATE TRIGGER blobs_update AFTER UPDATE OF state, size ON blobs
        BEGIN
            UPDATE cache SET
                files = files + (new.state = 'complete')
                              - (old.state = 'complete'),
                bytes = bytes
                    + CASE WHEN new.state = 'complete' THEN new.size ELSE 0 END
                    - CASE WHEN old.state = 'complete' THEN old.size ELSE 0 END;
        END""",
)


# The index as zodbblob wrote it before the evicting table, at version 2:
# a pruner marked its rows 'evicting' in place.
SCHEMA_2 = (
    """CREATE TABLE blobs (
        oid BLOB NOT NULL,
        tid BLOB NOT NULL,
        size INTEGER NOT NULL,
        accessed REAL NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('complete', 'in-progress', 'evicting')),
        token TEXT,
        started REAL,
        PRIMARY KEY (oid, tid)) WITHOUT ROWID""",
    'CREATE TABLE accesses (batch BLOB NOT NULL)',
    """CREATE TABLE cache (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL,
        files INTEGER NOT NULL DEFAULT 0,
        bytes INTEGER NOT NULL DEFAULT 0,
        hits INTEGER NOT NULL DEFAULT 0,
        misses INTEGER NOT NULL DEFAULT 0,
        logged INTEGER NOT NULL DEFAULT 0,
        pruner TEXT,
        pruned_at REAL)""",
    """CREATE INDEX blobs_by_access ON blobs (accessed, oid, tid)
        WHERE state = 'complete'""",
    """CREATE INDEX blobs_by_token ON blobs (token)
        WHERE token IS NOT NULL""",
    *SCHEMA_1[-3:],
)



def dead_token():
    """A token of this pid in an earlier incarnation: its owner ended."""
    host = re.sub(r'[^A-Za-z0-9.]', '_', socket.gethostname())
    return f'{host}-{os.getpid()}-ended-1-0'


@contextlib.contextmanager
def old_index(directory, schema, version):
    """An index of an older `schema` in `directory` (a zodbblob cache
    directory, its open lock there), its cache row at `version` with 7
    hits and 3 misses; the connection, committed at the end."""
    open(os.path.join(directory, '.zodbblob-cache.lock'), 'w').close()
    with contextlib.closing(sqlite3.connect(
            os.path.join(directory, INDEX))) as db:
        for statement in schema:
            db.execute(statement)
        db.execute('INSERT INTO cache (id, version, hits, misses) '
                   'VALUES (1, ?, 7, 3)', (version,))
        yield db
        db.commit()


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


def damage_pages(index):
    """Overwrite every page of `index` with garbage but the first (the
    header and the schema) and the ``cache`` table's, after moving its
    write-ahead log into it: the index opens, its rows are unreadable."""
    with contextlib.closing(sqlite3.connect(index)) as db:
        db.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()
        page_size, = db.execute('PRAGMA page_size').fetchone()
        kept = {1, db.execute("SELECT rootpage FROM sqlite_master "
                              "WHERE name = 'cache'").fetchone()[0]}
    pages = os.path.getsize(index) // page_size
    assert pages > 4, f'{index}: only {pages} pages'
    with open(index, 'r+b') as f:
        for page in range(2, pages + 1):
            if page not in kept:
                f.seek((page - 1) * page_size)
                f.write(b'\xa5' * page_size)


def touch_index(index):
    """Commit a change to the ``cache`` row, as another process would:
    the connections open on `index` read its pages again."""
    with contextlib.closing(sqlite3.connect(index)) as db:
        db.execute('UPDATE cache SET hits = hits + 0')
        db.commit()


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
        with mock.patch('os.stat', wraps=os.stat) as stat_calls:
            self.assertEqual(cache.lookup(oid, TID), cache.path(oid, TID))
        self.assertEqual(stat_calls.call_count, 1)

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
        with mock.patch.object(zodbblob.cache.accesslog, 'ACCESS_LOG_LIMIT', 3):
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


class LayoutTests(CacheTestCase):

    def test_new_directory_gets_the_zeocache_marker(self):
        self.open()
        with open(os.path.join(self.dir, '.layout')) as f:
            self.assertEqual(f.read(), 'zeocache')

    def test_marker_of_another_layout_is_refused_and_nothing_changes(self):
        os.makedirs(os.path.join(self.dir, '0x00'))
        with open(os.path.join(self.dir, '.layout'), 'w') as f:
            f.write('bushy')
        with open(os.path.join(self.dir, '0x00', '0x01.blob'), 'w') as f:
            f.write('data')
        before = tree(self.dir)
        with self.assertRaises(ValueError) as raised:
            BlobCache(self.dir)
        message = str(raised.exception)
        for expected in (self.dir, '`zeocache`', '`bushy`'):
            self.assertIn(expected, message)
        self.assertEqual(tree(self.dir), before)

    def test_used_directory_without_marker_is_refused(self):
        os.makedirs(os.path.join(self.dir, 'data'))
        before = tree(self.dir)
        with self.assertRaises(ValueError) as raised:
            BlobCache(self.dir)
        self.assertIn(self.dir, str(raised.exception))
        self.assertEqual(tree(self.dir), before)


class AdoptionTests(CacheTestCase):

    def test_stock_cache_directory_is_adopted_without_fetching(self):
        blobs = {number: content(p64(number), 1000 + number)
                 for number in (1, 2, 998, 5000)}
        paths = make_stock_cache(self.dir, blobs)
        with self.assertLogs('zodbblob.cache', 'WARNING') as logs:
            cache = self.open()
        self.assertIn('adopted a stock ZEO cache directory', logs.output[0])
        stats = cache.stats()
        self.assertEqual((stats['files'], stats['bytes']),
                         (4, sum(map(len, blobs.values()))))
        for number, data in blobs.items():
            self.assertEqual(cache.load(p64(number), TID, not_called),
                             paths[number])
            self.assertEqual(read(paths[number]), data)

    def test_stock_leftovers_are_removed_and_never_counted(self):
        paths = make_stock_cache(self.dir, {1: b'one', 2: b'two'})
        bucket = os.path.dirname(paths[1])
        old = time.time() - 400
        leftovers = [os.path.join(bucket, name) for name in (
            '0.03ed4f1a2b3c4d5e.blob.dl', '0x03ed4f1a2b3c4d5eab12cd.tmp-',
            '0x03ed4f1a2b3c4d5eab12cd.tmp')]
        running = os.path.join(os.path.dirname(paths[2]),
                               '0.03ed4f1a2b3c4d5f.blob.dl')
        for path in leftovers + [running]:
            with open(path, 'wb') as f:
                f.write(b'partial')
        for path in leftovers:
            os.utime(path, (old, old))
        with self.assertLogs('zodbblob.cache', 'WARNING') as logs:
            cache = self.open()
        self.assertIn('3 leftover temporary files removed', logs.output[0])
        for path in leftovers:
            self.assertFalse(os.path.exists(path), path)
        # Young enough to be a stock client's download in progress.
        self.assertTrue(os.path.exists(running))
        self.assertTrue(os.path.exists(os.path.join(bucket, '.lock')))
        stats = cache.stats()
        self.assertEqual((stats['files'], stats['bytes']), (2, 6))

    def test_missing_index_of_a_zodbblob_cache_is_rebuilt(self):
        cache = self.open()
        for number in (1, 2):
            self.admit(cache, number, content(p64(number)))
        cache.close()
        os.remove(os.path.join(self.dir, INDEX))
        with self.assertLogs('zodbblob.cache', 'WARNING') as logs:
            cache = self.open()
        self.assertIn('the index is missing; rebuilt: 2 files',
                      logs.output[0])
        self.assertEqual(cache.stats()['files'], 2)

    def test_index_of_schema_version_1_is_migrated_keeping_its_order(self):
        blobs = {number: b'x' * 100 for number in range(1, 6)}
        make_stock_cache(self.dir, blobs)
        now = time.time()
        accessed = {3: now - 500, 5: now - 400, 1: now - 300, 4: now - 200,
                    2: now - 100}
        with old_index(self.dir, SCHEMA_1, 1) as db:
            db.executemany(
                'INSERT INTO blobs (oid, tid, size, accessed, state) '
                'VALUES (?, ?, 100, ?, ?)',
                [(p64(number), TID, when, 'complete')
                 for number, when in accessed.items()])
            db.execute('INSERT INTO blobs (oid, tid, size, accessed, state, '
                       "token, started) VALUES (?, ?, 0, ?, 'in-progress', "
                       "'elsewhere-1-0-1-0', ?)", (p64(9), TID, now, now))
        with self.assertLogs('zodbblob.cache', 'INFO') as logs:
            cache = self.open(grace=0, check_percent=0)
        self.assertEqual(len(logs.output), 1)
        self.assertIn('from schema version 1 to 3', logs.output[0])
        stats = cache.stats()
        self.assertEqual(
            [stats[name] for name in ('files', 'bytes', 'hits', 'misses')],
            [5, 500, 7, 3])
        self.assertEqual(stats['oldest_access'], accessed[3])
        self.assertEqual(cache.prune(300), (2, 200))
        self.assertEqual(self.cached(cache), [1, 2, 4])
        self.assertEqual(glob.glob(os.path.join(self.dir, INDEX + '.*')), [])

    def test_index_of_schema_version_2_is_migrated_with_its_evictions(self):
        blobs = {number: b'x' * 100 for number in range(1, 5)}
        paths = make_stock_cache(self.dir, blobs)
        now = time.time()
        with old_index(self.dir, SCHEMA_2, 2) as db:
            db.executemany(
                'INSERT INTO blobs (oid, tid, size, accessed, state) '
                "VALUES (?, ?, 100, ?, 'complete')",
                [(p64(number), TID, now - 100 * number)
                 for number in (2, 3, 4)])
            db.execute('INSERT INTO blobs (oid, tid, size, accessed, state, '
                       "token, started) VALUES (?, ?, 100, ?, 'evicting', "
                       '?, ?)', (p64(1), TID, now - 500, dead_token(), now))
        with self.assertLogs('zodbblob.cache', 'INFO') as logs:
            cache = self.open(grace=0, check_percent=0)
        self.assertEqual(len(logs.output), 2)
        self.assertIn('from schema version 2 to 3', logs.output[0])
        self.assertIn('finished 1 of their evictions', logs.output[1])
        self.assertFalse(os.path.exists(paths[1]))
        self.assertEqual(self.evicting_rows(), [])
        stats = cache.stats()
        self.assertEqual(
            [stats[name] for name in ('files', 'bytes', 'hits', 'misses')],
            [3, 300, 7, 3])
        self.assertEqual(cache.prune(200), (1, 100))
        self.assertEqual(self.cached(cache), [2, 3])

    def test_index_of_an_unknown_schema_version_is_moved_aside_and_rebuilt(
            self):
        cache = self.open()
        for number in (1, 2):
            self.admit(cache, number, content(p64(number)))
        cache.close()
        index = os.path.join(self.dir, INDEX)
        with contextlib.closing(sqlite3.connect(index)) as db:
            db.execute('UPDATE cache SET version = 99')
            db.commit()
        with self.assertLogs('zodbblob.cache', 'WARNING') as logs:
            cache = self.open()
        self.assertIn('is of schema version 99, not 3', logs.output[0])
        [aside] = glob.glob(index + '.version-99-*')
        self.assertIn(aside, logs.output[0])
        self.assertEqual(cache.stats()['files'], 2)

    def test_corrupt_index_is_moved_aside_and_rebuilt(self):
        cache = self.open()
        for number in (1, 2, 3):
            cache.load(p64(number), TID, writing(content(p64(number))))
        cache.close()
        index = os.path.join(self.dir, INDEX)
        garbage = b'this is not an index\0' * 500
        with open(index, 'wb') as f:
            f.write(garbage)
        with self.assertLogs('zodbblob.cache', 'WARNING') as logs:
            cache = self.open()
        self.assertIn('unreadable', logs.output[0])
        [aside] = glob.glob(index + '.corrupt-*')
        self.assertIn(aside, logs.output[0])
        self.assertEqual(read(aside), garbage)
        self.assertEqual(cache.stats()['files'], 3)
        for number in (1, 2, 3):
            self.assertEqual(read(cache.load(p64(number), TID, not_called)),
                             content(p64(number)))

    def fill(self, files=300):
        """A closed cache of `files` small files, enough for an index of
        a dozen pages; the index's path."""
        cache = BlobCache(self.dir)
        for number in range(files):
            self.admit(cache, number, b'x' * 10)
        cache.close()
        return os.path.join(self.dir, INDEX)

    def test_index_with_damaged_pages_is_moved_aside_and_rebuilt_at_open(
            self):
        index = self.fill()
        damage_pages(index)
        with self.assertLogs('zodbblob.cache', 'WARNING') as logs:
            cache = self.open()
        [warning] = logs.output
        self.assertIn('the index was unreadable', warning)
        [aside] = glob.glob(index + '.corrupt-*')
        self.assertIn(aside, warning)
        self.assertIn('300 files', warning)
        self.assertEqual(cache.stats()['files'], 300)
        self.assertEqual(read(cache.load(p64(7), TID, not_called)), b'x' * 10)

    def test_index_with_random_damage_in_any_page_opens_and_serves_reads(
            self):
        # The reviewer's damage (random bytes into the pages after the
        # first, the header intact) at many places, from a fixed seed: a
        # `cache` row that reads back with a NULL version once made every
        # open run CREATE TABLE over the tables there ("table blobs
        # already exists"), forever.
        files = 100
        # Blob files that differ from one another: a read of the wrong
        # one shows.
        blobs = {number: b'%d' % number * 3 for number in range(files)}
        cache = BlobCache(self.dir)
        for number, data in blobs.items():
            self.admit(cache, number, data)
        cache.close()
        index = os.path.join(self.dir, INDEX)
        with contextlib.closing(sqlite3.connect(index)) as db:
            db.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()
            page_size, = db.execute('PRAGMA page_size').fetchone()
        pristine = read(index)
        pages = len(pristine) // page_size
        # From byte 8 on, as the reviewer wrote (the page type and the cell
        # count kept, the cell pointers not), and anywhere else.
        rng = random.Random(12)
        damages = [[(page, offset, rng.randbytes(size))]
                   for page in range(2, pages + 1)
                   for offset, size in ((8, 2000), (8, 16),
                                        (rng.randrange(page_size), 2000))]
        damages += [[(page, 8, rng.randbytes(2000))
                     for page in range(2, pages + 1)] for _ in range(40)]
        rebuilt = 0
        for damage in damages:
            for name in glob.glob(index + '*'):
                os.remove(name)
            with open(index, 'wb') as f:
                f.write(pristine)
                for page, offset, garbage in damage:
                    f.seek((page - 1) * page_size + offset)
                    f.write(garbage[:page_size - offset])
            with self.subTest(damage=[(page, offset, len(garbage))
                                      for page, offset, garbage in damage]):
                warnings = []
                handler = logging.Handler(logging.WARNING)
                handler.emit = warnings.append
                logger = logging.getLogger('zodbblob.cache')
                logger.addHandler(handler)
                try:
                    cache = BlobCache(self.dir)
                finally:
                    logger.removeHandler(handler)
                moved = glob.glob(index + '.corrupt-*[0-9]')
                # Moved aside and rebuilt with one WARNING, or (the damage
                # in bytes no read needs) kept, without one.
                self.assertEqual(len(warnings), len(moved))
                rebuilt += len(moved)
                try:
                    for number in range(files):
                        self.assertEqual(
                            read(cache.load(p64(number), TID,
                                            writing(blobs[number]))),
                            blobs[number])
                    stats = cache.stats()
                    self.assertEqual(
                        (stats['files'], stats['bytes']),
                        (files, sum(map(len, blobs.values()))))
                finally:
                    cache.close()
        # Most damage is found at open (the rest touches no row).
        self.assertGreater(rebuilt, len(damages) // 2)

    def test_index_damaged_in_use_is_rebuilt_once_by_the_first_reader(self):
        index = self.fill()
        # Two processes use the cache when its pages are damaged.
        first, second = self.open(), self.open()
        for cache in (first, second):
            cache._preloading.join()
        damage_pages(index)
        touch_index(index)
        with self.assertLogs('zodbblob.cache', 'WARNING') as logs:
            self.assertIsNone(first.lookup(p64(1000), TID))
            self.assertIsNone(second.lookup(p64(1001), TID))
            for cache in (first, second):
                self.assertEqual(
                    read(cache.load(p64(1002), TID, writing(b'new'))),
                    b'new')
                self.assertEqual(read(cache.load(p64(7), TID, not_called)),
                                 b'x' * 10)
        [warning] = logs.output
        self.assertIn('database disk image is malformed', warning)
        # Moved aside once (with its write-ahead log).
        self.assertEqual(len(glob.glob(index + '.corrupt-*[0-9]')), 1)
        for cache in (first, second):
            self.assertEqual(cache.stats()['files'], 301)


class SyncTests(CacheTestCase):
    """A file is written to disk after its reader has it, by a thread;
    until then its row in ``unsynced`` says so, and a cache opened after
    the machine restarted drops what was not synced."""

    def unsynced_rows(self):
        with contextlib.closing(sqlite3.connect(
                os.path.join(self.dir, INDEX))) as db:
            return db.execute('SELECT oid, tid, token, boot FROM unsynced '
                              'ORDER BY oid').fetchall()

    def add_unsynced(self, number, boot):
        with contextlib.closing(sqlite3.connect(
                os.path.join(self.dir, INDEX))) as db:
            db.execute('INSERT INTO unsynced (oid, tid, token, boot) '
                       'VALUES (?, ?, ?, ?)',
                       (p64(number), TID, dead_token(), boot))
            db.commit()

    def test_a_download_is_synced_by_a_thread_after_its_reader_has_it(self):
        cache = self.open()
        oid = p64(5)
        synced, release = [], threading.Event()
        sync_file = zodbblob.cache.syncs._sync_file

        def recording(path):
            release.wait(10)
            synced.append((path, threading.current_thread().name))
            return sync_file(path)

        with mock.patch.object(zodbblob.cache.syncs, '_sync_file', recording):
            path = cache.load(oid, TID, writing(content(oid)))
            self.assertEqual(read(path), content(oid))
            # The reader has its file; the sync has not happened yet.
            self.assertEqual(synced, [])
            self.assertEqual([row[:2] for row in self.unsynced_rows()],
                             [(oid, TID)])
            self.assertEqual(self.unsynced_rows()[0][3],
                             zodbblob.cache.syncs._BOOT)
            release.set()
            cache.close()
        self.assertEqual(len(synced), 1)
        self.assertEqual(synced[0][0], path)
        self.assertTrue(synced[0][1].startswith('zodbblob-cache-sync'))
        self.assertEqual(self.unsynced_rows(), [])

    def test_file_not_synced_before_a_restart_is_removed_at_open(self):
        cache = self.open()
        for number in (1, 2):
            self.admit(cache, number, b'x' * 100)
        cache.close()
        self.add_unsynced(1, 'a boot before this one')
        with self.assertLogs('zodbblob.cache', 'WARNING') as logs:
            cache = self.open()
        self.assertIn('removed 1 files written before the machine '
                      'restarted', logs.output[-1])
        self.assertEqual(self.cached(cache), [2])
        self.assertEqual([row[0] for row in self.index_rows()], [p64(2)])
        self.assertEqual(self.unsynced_rows(), [])
        stats = cache.stats()
        self.assertEqual((stats['files'], stats['bytes']), (1, 100))

    def test_file_not_synced_by_a_process_that_ended_is_synced_at_open(self):
        cache = self.open()
        self.admit(cache, 1, b'x' * 100)
        cache.close()
        self.add_unsynced(1, zodbblob.cache.syncs._BOOT)
        synced = []
        with mock.patch.object(zodbblob.cache.syncs, '_sync_file',
                               side_effect=synced.append):
            cache = self.open()
        self.assertEqual(synced, [cache.path(p64(1), TID)])
        self.assertEqual(self.cached(cache), [1])
        self.assertEqual(self.unsynced_rows(), [])


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
        fetches, contents = [], []
        start = threading.Barrier(8)

        def reader():
            start.wait()
            path = cache.load(oid, TID,
                              writing(content(oid), fetches, delay=0.2))
            contents.append(read(path))

        threads = [threading.Thread(target=reader) for i in range(8)]
        for thread in threads:
            thread.start()
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
            [sys.executable, '-m', 'zodbblob.tests.test_cache']
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
        contents = []

        def reader():
            start.wait()
            path = cache.load(oid, TID,
                              writing(content(oid), fetches, delay=0.3))
            contents.append(read(path))

        threads = [threading.Thread(target=reader) for i in range(4)]
        for thread in threads:
            thread.start()
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
        self.wait_for_bytes(1000)
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
            cache._index.db.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()
        cache.prune(1000)
        cache._index.checkpointing.join(10)
        with cache._index.db_lock:
            self.assertEqual(
                cache._index.db.execute('PRAGMA wal_autocheckpoint').fetchone(),
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
                cache._evictor._drop_evicted([(victims, removal)], token), (1, 3))
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
            self.assertEqual(cli.parse_size(text), size)
        for text in ('', '-1', '1e3', 'GB', '1.5x', 'inf'):
            with self.assertRaises(Exception):
                cli.parse_size(text)

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
