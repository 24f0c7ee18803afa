"""Aborts, conflicts and failed votes leave no file behind.

Each test drives a real ZODB.DB over zodbblob.BlobStorage and FileStorage
the way an application does, then looks at every file below the blob
directory.  Stock ZODB 6.4 leaks ``tmp/BUC*`` on a ConflictError.
"""

import os
import shutil
import tempfile
import threading
import unittest

import transaction
import ZODB
import ZODB.FileStorage
import ZODB.MappingStorage
from ZODB.blob import Blob
from ZODB.POSException import ConflictError

from zodbblob import BlobStorage
from zodbblob.testing import FailingVote


def files_below(path):
    return sorted(os.path.relpath(os.path.join(dirpath, name), path)
                  for dirpath, dirs, files in os.walk(path)
                  for name in files
                  if not dirpath.startswith(os.path.join(path, '.zodbblob')))


class TransactionTests(unittest.TestCase):

    base = 'filestorage'

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-txn-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.blob_dir = os.path.join(self.dir, 'blobs')
        if self.base == 'filestorage':
            base = ZODB.FileStorage.FileStorage(
                os.path.join(self.dir, 'Data.fs'))
        else:
            base = ZODB.MappingStorage.MappingStorage()
        self.storage = BlobStorage(self.blob_dir, base)
        self.db = ZODB.DB(self.storage)
        self.addCleanup(self.db.close)
        self.addCleanup(transaction.abort)
        with self.db.transaction() as conn:
            conn.root()['blob'] = Blob(b'committed')
        self.committed_files = files_below(self.blob_dir)

    def assert_nothing_left(self):
        self.assertEqual(files_below(self.blob_dir), self.committed_files)

    def read(self, key='blob'):
        with self.db.transaction() as conn:
            with conn.root()[key].open() as f:
                return f.read()

    def test_abort_after_open_for_writing_leaves_no_file(self):
        conn = self.db.open()
        with conn.root()['blob'].open('w') as f:
            f.write(b'never committed')
        conn.root()['new'] = Blob(b'new, never committed')
        transaction.abort()
        conn.close()
        self.assert_nothing_left()
        self.assertEqual(self.read(), b'committed')

    def test_conflict_leaves_no_file_and_the_winner_commits(self):
        tm1, tm2 = transaction.TransactionManager(), \
            transaction.TransactionManager()
        conn1, conn2 = self.db.open(tm1), self.db.open(tm2)
        for conn, data in ((conn1, b'first writer'),
                           (conn2, b'second writer')):
            with conn.root()['blob'].open('w') as f:
                f.write(data)
        tm1.commit()
        # The winner's files, without the loser's uncommitted one.
        winner_files = [name for name in files_below(self.blob_dir)
                        if not name.startswith('tmp' + os.sep)]
        with self.assertRaises(ConflictError):
            tm2.commit()
        tm2.abort()
        conn1.close()
        conn2.close()
        self.assertEqual(files_below(self.blob_dir), winner_files)
        self.assertEqual(self.read(), b'first writer')

    def test_failed_vote_leaves_no_file(self):
        conn = self.db.open()
        with conn.root()['blob'].open('w') as f:
            f.write(b'voted but failed')
        transaction.get().join(FailingVote(RuntimeError('vote failed')))
        with self.assertRaises(RuntimeError):
            transaction.commit()
        transaction.abort()
        conn.close()
        self.assert_nothing_left()
        self.assertEqual(self.read(), b'committed')

    def test_concurrent_updates_of_one_blob_from_threads(self):
        barrier = threading.Barrier(4)
        outcome = {}

        def update(number):
            tm = transaction.TransactionManager()
            conn = self.db.open(tm)
            try:
                with conn.root()['blob'].open('w') as f:
                    f.write(b'writer %d' % number)
                barrier.wait()
                tm.commit()
                outcome[number] = 'committed'
            except ConflictError:
                tm.abort()
                outcome[number] = 'conflict'
            finally:
                conn.close()

        threads = [threading.Thread(target=update, args=(n,))
                   for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [n for n, result in outcome.items()
                   if result == 'committed']
        self.assertEqual(len(winners), 1, outcome)
        self.assertEqual(self.read(), b'writer %d' % winners[0])
        self.assertEqual(len(files_below(self.blob_dir)),
                         len(self.committed_files) + 1)


class MappingStorageTransactionTests(TransactionTests):

    base = 'mappingstorage'


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
