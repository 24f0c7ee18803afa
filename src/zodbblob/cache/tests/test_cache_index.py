"""The cache's directory and index: the layout marker, adoption of
stock ZEO cache directories, migration of older schemas, damaged
indexes moved aside and rebuilt.
"""

import contextlib
import glob
import logging
import os
import random
import sqlite3
import time

from ZODB.utils import p64

from zodbblob.cache import DERIVED
from zodbblob.cache import INDEX
from zodbblob.cache import SCHEMA_VERSION
from zodbblob.cache import TABLES
from zodbblob.cache import BlobCache
from zodbblob.cache.tests.test_cache import TID
from zodbblob.cache.tests.test_cache import CacheTestCase
from zodbblob.cache.tests.test_cache import content
from zodbblob.cache.tests.test_cache import dead_token
from zodbblob.cache.tests.test_cache import make_stock_cache
from zodbblob.cache.tests.test_cache import not_called
from zodbblob.cache.tests.test_cache import read
from zodbblob.cache.tests.test_cache import tree
from zodbblob.cache.tests.test_cache import writing


def created(name):
    """The statement of the schema at version 3 (`TABLES`, `DERIVED`)
    that creates `name`: the older schemas below take what they share
    with it from there."""
    # A version that changes one of those statements copies its text at
    # version 3 here first: the older schemas must not change with it.
    assert SCHEMA_VERSION == 3, 'copy the statements of version 3 here'
    [statement] = [statement for statement in (*TABLES, *DERIVED)
                   if statement.split()[2] == name]
    return statement


def without(statement, line):
    """`statement` without `line`, which it has."""
    assert line in statement, (line, statement)
    return statement.replace(line, '')


# The index as zodbblob wrote it before the access log, at version 1: its
# cache row had no count of accesses logged, its claims were indexed by
# state, and a trigger counted out each deleted row.
SCHEMA_1 = (
    created('blobs'),
    created('blobs_by_access'),
    """CREATE INDEX blobs_in_progress ON blobs (token)
        WHERE state = 'in-progress'""",
    without(created('cache'), 'logged INTEGER NOT NULL DEFAULT 0,'),
    created('blobs_insert'),
    """CREATE TRIGGER blobs_delete AFTER DELETE ON blobs
        WHEN old.state = 'complete' BEGIN
            UPDATE cache SET files = files - 1, bytes = bytes - old.size;
        END""",
    created('blobs_update'),
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
    created('accesses'),
    created('cache'),
    created('blobs_by_access'),
    created('blobs_by_token'),
    *SCHEMA_1[-3:],
)


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
