"""What zodbblob.BlobStorage does beyond (or better than) ZODB.blob."""

import logging
import os
import shutil
import tempfile
import threading
import time
import unittest
from unittest import mock

import transaction
import ZODB
import ZODB.blob
import ZODB.FileStorage
import ZODB.interfaces
import ZODB.MappingStorage
from ZODB.blob import Blob
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import POSKeyError
from ZODB.tests.MVCCMappingStorage import MVCCMappingStorage
from ZODB.tests.StorageTestBase import zodb_pickle
from zope.interface.verify import verifyObject

from zodbblob import BlobStorage
from zodbblob import BlobStorageError
from zodbblob.storage.commitlog import CommitLog
from zodbblob.storage.commitlog import commit_log_path
from zodbblob.storage.commitlog import unfinished_records
from zodbblob.storage.catalog import journal_path


def blob_files(blob_dir):
    """Relative paths of every committed blob file, for comparisons."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(blob_dir):
        for name in filenames:
            if name.endswith('.blob') and '/tmp' not in dirpath[
                    len(blob_dir):]:
                found.add(os.path.relpath(os.path.join(dirpath, name),
                                          blob_dir))
    return found


def tree(path):
    """Every file and directory below `path` with its size."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            result[os.path.relpath(full, path)] = (
                None if os.path.isdir(full) else os.path.getsize(full))
    return result


def restore_with_kind_swapped(pristine, blob_dir, path):
    """`blob_dir` afresh as a copy of `pristine`, and `path` in it of the
    other kind: a directory made a file, a file made a directory."""
    shutil.rmtree(blob_dir)
    shutil.copytree(pristine, blob_dir)
    if os.path.isdir(path):
        shutil.rmtree(path)
        with open(path, 'w') as f:
            f.write('not a directory')
    else:
        os.remove(path)
        os.mkdir(path)


def close_once(db):
    # Tests close some databases themselves; ZODB.DB.close is not
    # idempotent.
    if hasattr(db, '_mvcc_storage'):
        db.close()


class StorageTestCase(unittest.TestCase):

    def setUp(self):
        self.here = os.getcwd()
        self.dir = tempfile.mkdtemp(prefix='zodbblob-test-')
        os.chdir(self.dir)
        self.blob_dir = os.path.join(self.dir, 'blobs')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.addCleanup(os.chdir, self.here)
        self.addCleanup(transaction.abort)

    def open(self, **kw):
        storage = BlobStorage(self.blob_dir,
                              ZODB.FileStorage.FileStorage('Data.fs', **kw))
        self.addCleanup(storage.close)
        return storage

    def open_db(self, **kw):
        db = ZODB.DB(self.open(**kw))
        self.addCleanup(close_once, db)
        return db

    def commit_blob(self, db, key, data):
        with db.transaction() as conn:
            root = conn.root()
            if key in root:
                with root[key].open('w') as f:
                    f.write(data)
            else:
                root[key] = Blob(data)
        return self.serial(db, key)

    def serial(self, db, key):
        with db.transaction() as conn:
            obj = conn.root()[key]
            obj._p_activate()
            return obj._p_oid, obj._p_serial


class WrapperTests(StorageTestCase):

    def test_declares_blob_storage_wrapper_and_base_interfaces(self):
        storage = self.open()
        verifyObject(ZODB.interfaces.IBlobStorage, storage)
        verifyObject(ZODB.interfaces.IStorageWrapper, storage)
        self.assertTrue(ZODB.interfaces.IBlobStorageRestoreable.providedBy(
            storage))
        self.assertTrue(ZODB.interfaces.IStorageUndoable.providedBy(storage))

    def test_not_restoreable_when_base_is_not(self):
        storage = BlobStorage(self.blob_dir,
                              ZODB.MappingStorage.MappingStorage())
        self.addCleanup(storage.close)
        self.assertFalse(
            ZODB.interfaces.IBlobStorageRestoreable.providedBy(storage))

    def test_wrapping_a_blob_storage_is_refused_and_changes_nothing(self):
        base = ZODB.FileStorage.FileStorage('Data.fs',
                                            blob_dir='stock-blobs')
        self.addCleanup(base.close)
        before = tree(self.dir)
        with self.assertRaises(BlobStorageError) as caught:
            BlobStorage(self.blob_dir, base)
        self.assertIn('supports blobs already', str(caught.exception))
        self.assertIn('Data.fs', str(caught.exception))
        self.assertEqual(tree(self.dir), before)

    def test_second_storage_on_same_blob_dir_is_refused(self):
        self.open()
        other = ZODB.MappingStorage.MappingStorage()
        with self.assertRaises(BlobStorageError) as caught:
            BlobStorage(self.blob_dir, other)
        self.assertIn(self.blob_dir, str(caught.exception))
        self.assertIn('in use', str(caught.exception))

    def test_directory_a_tool_holds_is_refused_and_gets_nothing(self):
        # A tool (migrate) holds a directory it is still building: a
        # storage opened there must not write a marker or tmp/ into it.
        from zodbblob.storage import BlobDirectoryInUse
        from zodbblob.storage import hold_blob_directory
        os.makedirs(os.path.join(self.blob_dir, '.zodbblob'))
        with open(os.path.join(self.blob_dir, 'unfinished'), 'w'):
            pass
        lock = hold_blob_directory(self.blob_dir)
        self.addCleanup(lock.close)
        before = tree(self.blob_dir)
        with self.assertRaises(BlobDirectoryInUse):
            BlobStorage(self.blob_dir, ZODB.MappingStorage.MappingStorage())
        self.assertEqual(tree(self.blob_dir), before)

    def test_layout_mismatch_is_refused_and_changes_nothing(self):
        self.open(create=True).close()
        before = tree(self.dir)
        with self.assertRaises(ValueError) as caught:
            BlobStorage(self.blob_dir,
                        ZODB.MappingStorage.MappingStorage(), 'lawn')
        self.assertIn('marker found for layout `bushy`',
                      str(caught.exception))
        self.assertEqual(tree(self.dir), before)

    def test_state_files_of_the_wrong_kind_are_refused_naming_them(self):
        # A file where a directory belongs, a directory where a file does:
        # refused with the path, before anything is created or moved
        # aside, read-only or not.
        db = self.open_db()
        self.commit_blob(db, 'blob', b'data')
        db.close()
        os.remove('Data.fs.lock')
        state = os.path.join(self.blob_dir, '.zodbblob')
        cases = {
            state: 'a regular file, not a directory',
            journal_path(self.blob_dir): 'a directory, not a regular file',
            commit_log_path(self.blob_dir): 'a directory, not a regular file',
            os.path.join(self.blob_dir, '.layout'):
                'a directory, not a regular file',
            os.path.join(state, 'lock'): 'a directory, not a regular file',
        }
        pristine = os.path.join(self.dir, 'pristine')
        shutil.copytree(self.blob_dir, pristine)
        for path, problem in cases.items():
            restore_with_kind_swapped(pristine, self.blob_dir, path)
            for read_only in (False, True):
                with self.subTest(path=path, read_only=read_only):
                    base = ZODB.FileStorage.FileStorage('Data.fs',
                                                        read_only=read_only)
                    before = tree(self.blob_dir)
                    try:
                        with self.assertRaises(ValueError) as caught:
                            BlobStorage(self.blob_dir, base)
                    finally:
                        base.close()
                    self.assertEqual(str(caught.exception),
                                     f'{path} is {problem}')
                    self.assertEqual(tree(self.blob_dir), before)

    def test_mvcc_base_stays_wrapped(self):
        storage = BlobStorage(self.blob_dir, MVCCMappingStorage())
        db = ZODB.DB(storage)
        self.addCleanup(close_once, db)
        instance = storage.new_instance()
        self.assertIsInstance(instance, BlobStorage)
        self.assertIs(instance.fshelper, storage.fshelper)
        instance.release()
        oid, serial = self.commit_blob(db, 'b', b'mvcc bytes')
        with db.transaction() as conn:
            # An MVCC base: each connection has its own wrapped instance.
            self.assertIsInstance(conn._storage, BlobStorage)
            self.assertIsNot(conn._storage, storage)
            with conn.root()['b'].open() as f:
                self.assertEqual(f.read(), b'mvcc bytes')

    def test_read_only_base_writes_nothing(self):
        db = self.open_db()
        self.commit_blob(db, 'b', b'data')
        db.close()
        before = tree(self.dir)
        storage = self.open(read_only=True)
        db = ZODB.DB(storage)
        self.addCleanup(close_once, db)
        with db.transaction() as conn:
            with conn.root()['b'].open() as f:
                self.assertEqual(f.read(), b'data')
        self.assertGreater(storage.getSize(), 4)
        db.close()
        after = tree(self.dir)
        after.pop('Data.fs.lock', None)
        before.pop('Data.fs.lock', None)
        self.assertEqual(after, before)


class CommitTests(StorageTestCase):

    def test_abort_after_vote_leaves_no_file(self):
        storage = self.open()
        db = ZODB.DB(storage)
        self.addCleanup(close_once, db)
        oid, serial = self.commit_blob(db, 'b', b'first')
        files_before = blob_files(self.blob_dir)
        t = TransactionMetaData()
        storage.tpc_begin(t)
        with open(os.path.join(storage.temporaryDirectory(), 'new'),
                  'wb') as f:
            f.write(b'never committed')
        storage.storeBlob(oid, serial, zodb_pickle(Blob()), f.name, '', t)
        storage.tpc_vote(t)
        self.assertEqual(len(blob_files(self.blob_dir)),
                         len(files_before) + 1)
        storage.tpc_abort(t)
        self.assertEqual(blob_files(self.blob_dir), files_before)
        self.assertEqual(os.listdir(storage.temporaryDirectory()), [])
        with db.transaction() as conn:
            with conn.root()['b'].open() as f:
                self.assertEqual(f.read(), b'first')

    def test_conflict_on_store_leaves_no_file(self):
        storage = self.open()
        db = ZODB.DB(storage)
        self.addCleanup(close_once, db)
        oid, serial = self.commit_blob(db, 'b', b'first')
        self.commit_blob(db, 'b', b'second')
        t = TransactionMetaData()
        storage.tpc_begin(t)
        with open(os.path.join(storage.temporaryDirectory(), 'stale'),
                  'wb') as f:
            f.write(b'stale write')
        with self.assertRaises(ZODB.POSException.ConflictError):
            storage.storeBlob(oid, serial, zodb_pickle(Blob()), f.name, '',
                              t)
            storage.tpc_vote(t)
        storage.tpc_abort(t)
        self.assertEqual(os.listdir(storage.temporaryDirectory()), [])
        self.assertEqual(len(blob_files(self.blob_dir)), 2)

    def test_commit_is_logged_with_its_bytes_until_a_checkpoint(self):
        storage = self.open()
        db = ZODB.DB(storage)
        self.addCleanup(close_once, db)
        oid, serial = self.commit_blob(db, 'b', b'x' * 1000)
        self.assertEqual(storage._shared.journal.revisions(oid), [serial])
        log_path = commit_log_path(self.blob_dir)
        log = CommitLog(log_path, read_only=True)
        records = log.records
        log.close()
        self.assertEqual([(r.tid, [(e.oid, e.size, e.data, e.staged)
                                   for e in r.entries]) for r in records],
                         [(serial, [(oid, 1000, b'x' * 1000, None)])])
        db.close()
        self.assertEqual(unfinished_records(log_path), 0)

    def test_commit_log_sync_overlaps_the_base_vote(self):
        # The record's sync waits until the base votes, and the base's vote
        # until the record is synced: only together can they finish.
        voting, synced = threading.Event(), threading.Event()
        sync = CommitLog.sync

        def sync_when_voting(log):
            if not voting.wait(10):
                raise AssertionError('the base did not vote meanwhile')
            sync(log)
            synced.set()

        class Base(ZODB.FileStorage.FileStorage):
            checking = False

            def tpc_vote(self, transaction):
                if self.checking:
                    voting.set()
                    if not synced.wait(10):
                        raise AssertionError('the record was not synced')
                return super().tpc_vote(transaction)

        base = Base('Data.fs')
        storage = BlobStorage(self.blob_dir, base)
        self.addCleanup(storage.close)
        db = ZODB.DB(storage)
        self.addCleanup(close_once, db)
        with db.transaction() as conn:
            conn.root()['b'] = Blob(b'blob')
        base.checking = True
        with mock.patch.object(CommitLog, 'sync', sync_when_voting):
            oid, serial = self.commit_blob(db, 'b', b'changed')
        self.assertTrue(synced.is_set())
        with open(storage.loadBlob(oid, serial), 'rb') as f:
            self.assertEqual(f.read(), b'changed')

    def test_copy_across_filesystems_is_logged_at_warning(self):
        shm = '/dev/shm'
        if not os.path.isdir(shm) or (
                os.stat(shm).st_dev == os.stat(self.dir).st_dev):
            self.skipTest('no second filesystem to copy from')
        storage = self.open()
        db = ZODB.DB(storage)
        self.addCleanup(close_once, db)
        oid, serial = self.commit_blob(db, 'b', b'first')
        fd, outside = tempfile.mkstemp(dir=shm)
        os.write(fd, b'from another filesystem')
        os.close(fd)
        t = TransactionMetaData()
        storage.tpc_begin(t)
        with self.assertLogs('zodbblob.storage', logging.WARNING) as logs:
            storage.storeBlob(oid, serial, zodb_pickle(Blob()), outside,
                              '', t)
        storage.tpc_vote(t)
        tid = storage.tpc_finish(t)
        self.assertIn(outside, logs.output[0])
        self.assertIn('Copied blob file', logs.output[0])
        self.assertFalse(os.path.exists(outside))
        with open(storage.loadBlob(oid, tid), 'rb') as f:
            self.assertEqual(f.read(), b'from another filesystem')


class SizeTests(StorageTestCase):

    def test_get_size_counts_blob_bytes(self):
        storage = self.open()
        db = ZODB.DB(storage)
        self.addCleanup(close_once, db)
        empty = storage.getSize()
        self.commit_blob(db, 'a', b'a' * 100000)
        self.commit_blob(db, 'b', b'b' * 50000)
        base = storage.base.getSize()
        self.assertEqual(storage.getSize(), base + 150000)
        self.assertGreater(storage.getSize(), empty + 150000)

    def test_get_size_does_not_look_at_the_files(self):
        # A file removed behind the storage's back does not change the
        # size: getSize reads the catalog, it does not scan.
        storage = self.open()
        db = ZODB.DB(storage)
        self.addCleanup(close_once, db)
        oid, serial = self.commit_blob(db, 'a', b'a' * 4096)
        size = storage.getSize()
        os.remove(storage.loadBlob(oid, serial))
        self.assertEqual(storage.getSize(), size)

    def test_size_survives_reopen(self):
        db = self.open_db()
        self.commit_blob(db, 'a', b'a' * 7777)
        size = db.storage.getSize()
        db.close()
        storage = self.open()
        self.assertEqual(storage.getSize(), size)

    def test_missing_catalog_is_rebuilt_from_a_scan(self):
        db = self.open_db()
        self.commit_blob(db, 'a', b'a' * 3000)
        self.commit_blob(db, 'a', b'b' * 2000)
        db.close()
        for suffix in ('', '-wal', '-shm'):
            if os.path.exists(journal_path(self.blob_dir) + suffix):
                os.remove(journal_path(self.blob_dir) + suffix)
        with self.assertLogs('zodbblob.storage', logging.WARNING) as logs:
            storage = self.open()
        self.assertIn('Rebuilt the blob catalog', logs.output[0])
        self.assertEqual(storage.getSize(),
                         storage.base.getSize() + 5000)

    def test_corrupt_catalog_is_moved_aside_and_rebuilt(self):
        db = self.open_db()
        self.commit_blob(db, 'a', b'a' * 3000)
        db.close()
        path = journal_path(self.blob_dir)
        for suffix in ('-wal', '-shm'):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
        with open(path, 'wb') as f:
            f.write(b'this is not a database' * 100)
        with self.assertLogs('zodbblob.storage', logging.WARNING) as logs:
            storage = self.open()
        self.assertIn(path, logs.output[0])
        self.assertTrue(os.path.exists(path + '.corrupt'))
        self.assertEqual(storage.getSize(), storage.base.getSize() + 3000)

    def test_blobs_written_by_stock_zodb_meanwhile_are_counted(self):
        db = self.open_db()
        self.commit_blob(db, 'a', b'a' * 1000)
        db.close()
        stock = ZODB.DB(ZODB.blob.BlobStorage(
            self.blob_dir, ZODB.FileStorage.FileStorage('Data.fs')))
        self.commit_blob(stock, 'b', b'b' * 2000)
        stock.close()
        with self.assertLogs('zodbblob.storage', logging.WARNING):
            storage = self.open()
        self.assertEqual(storage.getSize(), storage.base.getSize() + 3000)


class UndoTests(StorageTestCase):

    def undo_last(self, db):
        db.undo(db.undoLog(0, 1)[0]['id'])
        transaction.commit()

    def test_undo_links_the_earlier_revision(self):
        db = self.open_db()
        storage = db.storage
        oid, first = self.commit_blob(db, 'b', b'first' * 1000)
        self.commit_blob(db, 'b', b'second')
        self.undo_last(db)
        oid, undone = self.serial(db, 'b')
        earlier = os.stat(storage.loadBlob(oid, first))
        restored = os.stat(storage.loadBlob(oid, undone))
        self.assertEqual(restored.st_ino, earlier.st_ino)
        with db.transaction() as conn:
            with conn.root()['b'].open() as f:
                self.assertEqual(f.read(), b'first' * 1000)

    def test_undo_does_not_walk_the_blob_directory(self):
        db = self.open_db()
        for i in range(20):
            self.commit_blob(db, 'b%d' % i, b'%d' % i)
        self.commit_blob(db, 'b0', b'changed')
        with mock.patch('os.walk', side_effect=AssertionError('walked')), \
                mock.patch('os.listdir',
                           side_effect=AssertionError('listed')):
            self.undo_last(db)
        with db.transaction() as conn:
            with conn.root()['b0'].open() as f:
                self.assertEqual(f.read(), b'0')

    def test_undo_of_blob_creation_then_redo(self):
        db = self.open_db()
        with db.transaction() as conn:
            conn.root()['b'] = Blob(b'created')
        self.undo_last(db)
        with db.transaction() as conn:
            self.assertNotIn('b', conn.root())
        self.undo_last(db)
        with db.transaction() as conn:
            with conn.root()['b'].open() as f:
                self.assertEqual(f.read(), b'created')


class PackTests(StorageTestCase):

    def test_pack_removes_exactly_the_revisions_the_base_dropped(self):
        db = self.open_db()
        storage = db.storage
        kept = {}
        for i in range(10):
            kept[i] = self.commit_blob(db, 'b%d' % i, b'v1-%d' % i)
        for i in range(5):
            kept[i] = self.commit_blob(db, 'b%d' % i, b'v2-%d' % i)
        with db.transaction() as conn:
            gone = conn.root()['b9']._p_oid
            del conn.root()['b9']
        time.sleep(0.01)
        db.pack()
        expected = {os.path.relpath(storage.loadBlob(oid, tid),
                                    self.blob_dir)
                    for i, (oid, tid) in kept.items() if i != 9}
        self.assertEqual(blob_files(self.blob_dir), expected)
        self.assertEqual(storage._shared.journal.revisions(gone), [])
        self.assertFalse(os.path.exists(storage.fshelper.getPathForOID(gone)))
        self.assertEqual(storage.getSize(),
                         storage.base.getSize()
                         + sum(len(b'v1-5') for i in range(9)))

    def test_pack_does_not_walk_the_blob_directory(self):
        db = self.open_db()
        for i in range(20):
            self.commit_blob(db, 'b%d' % i, b'v1')
            self.commit_blob(db, 'b%d' % i, b'v2')
        time.sleep(0.01)
        with mock.patch('os.walk', side_effect=AssertionError('walked')), \
                mock.patch('os.listdir',
                           side_effect=AssertionError('listed')), \
                mock.patch('os.scandir',
                           side_effect=AssertionError('scanned')):
            db.pack()
        self.assertEqual(len(blob_files(self.blob_dir)), 20)

    def test_concurrent_pack_is_refused(self):
        storage = self.open()
        storage._shared.pack_lock.acquire()
        self.addCleanup(storage._shared.pack_lock.release)
        with self.assertRaises(BlobStorageError) as caught:
            storage.pack(time.time(), ZODB.serialize.referencesf)
        self.assertIn('Already packing', str(caught.exception))
        self.assertIn(self.blob_dir, str(caught.exception))

    def test_missing_blob_raises_pos_key_error_naming_the_path(self):
        storage = self.open()
        with self.assertRaises(POSKeyError) as caught:
            storage.loadBlob(b'\0' * 7 + b'\1', b'\0' * 7 + b'\2')
        self.assertIn(self.blob_dir, str(caught.exception))


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
