"""One sync: a committed transaction whose files could not be published.

With one sync the base has committed before the files get their final
names; a link refused then (a full disk, EIO) leaves the commit
acknowledged, its record durable, and its files only under their staged
names.  No checkpoint (after a later commit, at close) may drop that
record or those names: the next open publishes the files from them.
"""

import errno
import os
import shutil
import tempfile
import unittest
from unittest import mock

import transaction
import ZODB
from ZODB.blob import Blob
from ZODB.POSException import StorageTransactionError

import zodbblob
from zodbblob.storage import commit


class RefusedLink:
    """A data manager voting after the storage: the new blob's directory
    becomes a regular file, so the storage's publish fails in its
    ``tpc_finish`` (as a full disk refuses the link)."""

    def __init__(self, directory):
        self.directory = directory

    def sortKey(self):
        return '~ after the storage'

    def tpc_vote(self, txn):
        os.rename(self.directory, self.directory + '.away')
        open(self.directory, 'w').close()

    def tpc_begin(self, txn):
        pass

    commit = tpc_finish = tpc_abort = abort = tpc_begin

    def room_again(self):
        os.remove(self.directory)
        os.rename(self.directory + '.away', self.directory)


class OneSyncTestCase(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-unpublished-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        inline_limit, commit.INLINE_LIMIT = commit.INLINE_LIMIT, 0
        self.addCleanup(setattr, commit, 'INLINE_LIMIT', inline_limit)

    def open(self):
        return ZODB.DB(zodbblob.open_filestorage(
            os.path.join(self.dir, 'Data.fs'),
            blob_dir=os.path.join(self.dir, 'blobs')))


class UnpublishedTests(OneSyncTestCase):

    def test_files_not_published_are_published_by_the_next_open(self):
        db = self.open()
        manager = transaction.TransactionManager()
        conn = db.open(manager)
        blob = Blob(b'acknowledged' * 1000)
        conn.root()['blob'] = blob
        conn.add(blob)
        refused = RefusedLink(db.storage.fshelper.getPathForOID(blob._p_oid))
        manager.get().join(refused)
        with self.assertLogs('zodbblob', 'ERROR'):
            manager.commit()   # acknowledged: the base has committed
        refused.room_again()
        # A later commit is refused (it would fill the log behind the
        # record that holds the files); the close does not checkpoint.
        conn.root()['more'] = Blob(b'more' * 1000)
        with self.assertRaises(StorageTransactionError) as refused_commit:
            manager.commit()
        manager.abort()
        message = str(refused_commit.exception)
        self.assertEqual(message.count('\n'), 0)
        self.assertIn('could not be given their names', message)
        self.assertIn('reopen the storage', message)
        db.close()
        db = self.open()
        try:
            with db.transaction() as conn, conn.root()['blob'].open() as f:
                self.assertEqual(f.read(), b'acknowledged' * 1000)
            # Reopened, the storage commits again.
            with db.transaction() as conn:
                conn.root()['more'] = Blob(b'more' * 1000)
        finally:
            db.close()



class FailedCloseCheckpointTests(OneSyncTestCase):
    """A close whose checkpoint fails (a full disk) keeps the staged names
    its commit log's records name: the next open replays the log from
    them, as it would after a crash."""

    def test_the_staging_directory_stays_for_the_next_open(self):
        db = self.open()
        with db.transaction() as conn:
            conn.root()['blob'] = Blob(b'committed' * 1000)
        staging = db.storage._shared.staging_dir
        staged = os.listdir(staging)
        self.assertTrue(staged)
        with mock.patch('zodbblob.storage.wrapper.checkpoint',
                        side_effect=OSError(errno.ENOSPC, 'No space left')), \
                self.assertLogs('zodbblob', 'WARNING') as logs:
            db.close()
        self.assertIn('without a checkpoint', '\n'.join(logs.output))
        self.assertEqual(os.listdir(staging), staged)
        db = self.open()
        try:
            with db.transaction() as conn, conn.root()['blob'].open() as f:
                self.assertEqual(f.read(), b'committed' * 1000)
        finally:
            db.close()
        self.assertFalse(os.path.exists(staging))


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
