"""Deferred syncs: a file is written to disk after its reader has it,
and what a restart may have lost is dropped.
"""

import contextlib
import os
import sqlite3
import threading
from unittest import mock

from ZODB.utils import p64

import zodbblob.cache
from zodbblob.cache import INDEX
from zodbblob.cache.tests.test_cache import TID
from zodbblob.cache.tests.test_cache import CacheTestCase
from zodbblob.cache.tests.test_cache import content
from zodbblob.cache.tests.test_cache import dead_token
from zodbblob.cache.tests.test_cache import read
from zodbblob.cache.tests.test_cache import writing


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
                             zodbblob.cache.syncs.BOOT)
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
        self.add_unsynced(1, zodbblob.cache.syncs.BOOT)
        synced = []
        with mock.patch.object(zodbblob.cache.syncs, '_sync_file',
                               side_effect=synced.append):
            cache = self.open()
        self.assertEqual(synced, [cache.path(p64(1), TID)])
        self.assertEqual(self.cached(cache), [1])
        self.assertEqual(self.unsynced_rows(), [])
