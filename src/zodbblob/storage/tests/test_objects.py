"""A storage whose blobs live in a bucket: commit, read, pack, undo,
recovery and refusals, against moto's S3 server (a real process on
127.0.0.1, ``zodbblob.testing.S3_SERVER``) and a real FileStorage."""

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

import transaction
import ZODB
import ZODB.FileStorage
from ZODB.blob import Blob
from ZODB.POSException import POSKeyError, StorageError

from zodbblob import BlobStorage
from zodbblob.objectstore import blob_key
from zodbblob.storage import BlobStorageError, open_filestorage
from zodbblob.storage.binding import MARKER
from zodbblob.storage.killpoints import KILL_POINT_VARIABLE
from zodbblob.testing import S3_MISSING, S3_SERVER, FailingVote

if not S3_MISSING:
    from zodbblob import faults
    from zodbblob.faults import FaultProxy
    from zodbblob.objectstore import Bucket


class ObjectStoreTestCase(unittest.TestCase):

    layer = S3_SERVER

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-objects-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.settings = self.layer.make_bucket(prefix='site')
        self.bucket = Bucket(self.settings)
        self.addCleanup(self.bucket.client.close)

    def open(self, **kw):
        kw.setdefault('object_store', self.settings)
        return open_filestorage(os.path.join(self.dir, 'Data.fs'),
                                os.path.join(self.dir, 'blobs'), **kw)

    def open_db(self, **kw):
        db = ZODB.DB(self.open(**kw))
        self.addCleanup(self.close_if_open, db)
        return db

    @staticmethod
    def close_if_open(db):
        if hasattr(db, '_mvcc_storage'):   # DB.close deletes it
            db.close()

    def keys(self):
        """The bucket's blob keys (not the marker saying whose it is)."""
        return sorted(key for key, size in self.bucket.iter_keys()
                      if not key.endswith(MARKER))

    def catalog_keys(self, storage):
        return sorted(blob_key(self.settings.prefix, oid, tid)
                      for oid, tid, size in
                      storage._shared.journal.committed())

    def cache_dir(self):
        return os.path.join(self.dir, 'blobs', '.zodbblob', 'cache')

    def proxied(self):
        """A FaultProxy before moto, and settings that reach the test's
        bucket through it (two tries a request)."""
        proxy = FaultProxy(tuple(self.layer.address))
        proxy.start()
        self.addCleanup(proxy.stop)
        return proxy, dataclasses.replace(
            self.settings,
            endpoint_url=f'http://127.0.0.1:{proxy.address[1]}',
            attempts=2)

    def counted(self, storage):
        """The storage's bucket's request counts, from zero."""
        requests = storage.object_store.bucket.requests
        requests.clear()
        return requests


@unittest.skipIf(S3_MISSING, S3_MISSING)
class CommitTests(ObjectStoreTestCase):

    def test_committed_blobs_are_objects_read_back_through_the_cache(self):
        db = self.open_db(cache_size=1 << 20)
        storage = db.storage
        with db.transaction() as connection:
            connection.root()['small'] = Blob(b'small bytes')
            connection.root()['large'] = Blob(b'L' * (9 << 20))
        self.assertEqual(storage.commit_protocol, 'serial')
        keys = self.keys()
        self.assertEqual(len(keys), 2)
        self.assertEqual(keys, self.catalog_keys(storage))
        # No blob file in the blob directory: only the cache's copies.
        self.assertEqual(list(storage.fshelper.iter_blobs()), [])
        self.assertEqual(storage.getSize(),
                         storage.base.getSize() + (9 << 20) + 11)
        db.close()
        shutil.rmtree(self.cache_dir())
        db = self.open_db()
        requests = self.counted(db.storage)
        with db.transaction() as connection:
            with connection.root()['large'].open() as f:
                self.assertEqual(f.read(), b'L' * (9 << 20))
            with connection.root()['small'].open() as f:
                self.assertEqual(f.read(), b'small bytes')
        self.assertEqual(requests['PutObject'], 0)
        self.assertGreaterEqual(requests['GetObject'], 2)
        # Read again: from the cache, no request.
        requests.clear()
        with db.transaction() as connection:
            with connection.root()['small'].open() as f:
                self.assertEqual(f.read(), b'small bytes')
        self.assertEqual(sum(requests.values()), 0)

    def test_a_vote_failing_after_the_uploads_deletes_them(self):
        db = self.open_db()
        with db.transaction() as connection:
            connection.root()['kept'] = Blob(b'kept')
        before = self.keys()
        connection = db.open()
        connection.root()['a'] = Blob(b'aborted a')
        connection.root()['b'] = Blob(b'aborted b')
        transaction.get().join(FailingVote())
        with self.assertRaises(ValueError):
            transaction.commit()
        transaction.abort()
        connection.close()
        self.assertEqual(self.keys(), before)
        self.assertEqual(self.catalog_keys(db.storage), before)

    def test_a_blob_being_committed_is_read_by_nobody(self):
        db = self.open_db()
        storage = db.storage
        seen = {}

        class Peek(FailingVote):
            """Votes after the storage, whose uploads are done then."""

            def tpc_vote(self, transaction):
                oid = connection.root()['new']._p_oid
                tid = storage._commit._staged.tid
                seen['key'] = blob_key(test.settings.prefix, oid, tid)
                seen['uploaded'] = test.bucket.head(seen['key'])
                try:
                    storage.loadBlob(oid, tid)
                except POSKeyError:
                    seen['read'] = False
                else:
                    seen['read'] = True
                if aborting:
                    raise ValueError('the other resource refused')

        test = self
        for aborting in (False, True):
            connection = db.open()
            connection.root()['new'] = Blob(b'not yet committed')
            transaction.get().join(Peek())
            if aborting:
                with self.assertRaises(ValueError):
                    transaction.commit()
                transaction.abort()
            else:
                transaction.commit()
            connection.close()
            self.assertEqual(seen['uploaded'], 17)
            self.assertFalse(seen['read'])
            self.assertEqual(self.bucket.head(seen['key']) is not None,
                             not aborting)
        # Nothing of it reached the cache.
        self.assertEqual(db.storage.object_store.cache.stats()['files'], 1)

    def test_an_upload_failing_fails_the_vote_in_one_line(self):
        proxy, settings = self.proxied()
        db = self.open_db(object_store=settings)
        with db.transaction() as connection:
            connection.root()['kept'] = Blob(b'kept')
        before = self.keys()
        proxy.mode = faults.error(503, 'SlowDown')
        proxy.disconnect()
        connection = db.open()
        connection.root()['lost'] = Blob(b'never committed')
        with self.assertRaises(StorageError) as raised:
            transaction.commit()
        transaction.abort()
        connection.close()
        message = str(raised.exception)
        self.assertIn('Could not commit transaction', message)
        self.assertIn(self.settings.bucket, message)
        self.assertNotIn('\n', message)
        # The abort could not delete either: the next checkpoint does,
        # once the store answers again.
        proxy.mode = faults.PASS
        proxy.disconnect()
        db.close()
        self.assertEqual(self.keys(), before)
        db = self.open_db()
        with db.transaction() as connection:
            with connection.root()['kept'].open() as f:
                self.assertEqual(f.read(), b'kept')
            self.assertNotIn('lost', connection.root())

    def test_uploads_an_abort_could_not_delete_are_deleted_later(self):
        proxy, settings = self.proxied()
        db = self.open_db(object_store=settings)
        with db.transaction() as connection:
            connection.root()['kept'] = Blob(b'kept')
        before = self.keys()

        def refuse(**kwargs):
            # The store goes down once the uploads are done.
            proxy.mode = faults.error(503, 'SlowDown')
            proxy.disconnect()
        db.storage.object_store.bucket.client.meta.events.register(
            'before-send.s3.DeleteObjects', refuse)
        connection = db.open()
        connection.root()['aborted'] = Blob(b'uploaded, then aborted')
        transaction.get().join(FailingVote())
        with self.assertLogs('zodbblob.storage', logging.WARNING) as logs:
            with self.assertRaises(ValueError):
                transaction.commit()
            transaction.abort()
            connection.close()
            self.assertEqual(len(self.keys()), 2)
            db.close()   # its checkpoint cannot delete either: no raise
        said = '\n'.join(logs.output)
        self.assertIn('Could not delete the blob objects of aborted', said)
        self.assertIn('without a checkpoint', said)
        proxy.mode = faults.PASS
        proxy.disconnect()
        self.open_db(object_store=settings)   # recovery deletes them
        self.assertEqual(self.keys(), before)

    def test_garbage_a_pack_could_not_delete_goes_at_the_next_pack(self):
        proxy, settings = self.proxied()
        db = self.open_db(object_store=settings)
        for number in range(3):
            with db.transaction() as connection:
                connection.root()['blob'] = Blob(b'revision %d' % number)

        def refuse(**kwargs):
            proxy.mode = faults.error(503, 'SlowDown')
            proxy.disconnect()
        client = db.storage.object_store.bucket.client
        client.meta.events.register('before-send.s3.DeleteObjects', refuse)
        with self.assertRaises(StorageError) as raised:
            db.pack(time.time() + 1)
        self.assertIn('Pack could not delete 2 blob objects',
                      str(raised.exception))
        self.assertNotIn('\n', str(raised.exception))
        self.assertEqual(len(self.keys()), 3)
        client.meta.events.unregister('before-send.s3.DeleteObjects', refuse)
        proxy.mode = faults.PASS
        proxy.disconnect()
        db.pack(time.time() + 1)   # nothing new to pack: the marks go
        self.assertEqual(self.keys(), self.catalog_keys(db.storage))
        self.assertEqual(len(self.keys()), 1)

    def test_pack_deletes_the_garbage_in_one_request_and_lists_nothing(self):
        db = self.open_db()
        for number in range(30):
            with db.transaction() as connection:
                connection.root()['blob'] = Blob(b'revision %d' % number)
        self.assertEqual(len(self.keys()), 30)
        requests = self.counted(db.storage)
        db.pack(time.time() + 1)
        self.assertEqual(requests['DeleteObjects'], 1)
        self.assertEqual(requests['ListObjectsV2'], 0)
        # Only the writer's record: is this directory still the writer?
        self.assertEqual(requests['GetObject'], 1)
        keys = self.keys()
        self.assertEqual(len(keys), 1)
        self.assertEqual(keys, self.catalog_keys(db.storage))
        with db.transaction() as connection:
            with connection.root()['blob'].open() as f:
                self.assertEqual(f.read(), b'revision 29')

    def test_undo_copies_inside_the_store(self):
        db = self.open_db()
        data = os.urandom(3 << 20)
        with db.transaction() as connection:
            connection.root()['blob'] = Blob(data)
        with db.transaction() as connection:
            with connection.root()['blob'].open('w') as f:
                f.write(b'replaced')
        requests = self.counted(db.storage)
        db.undo(db.undoInfo(0, 1)[0]['id'])
        transaction.commit()
        self.assertEqual(requests['CopyObject'], 1)
        self.assertEqual(requests['GetObject'], 0)
        self.assertEqual(requests['PutObject'], 0)
        # The restored revision's local copy is the source's: read
        # without a download.
        with db.transaction() as connection:
            with connection.root()['blob'].open() as f:
                self.assertEqual(f.read(), data)
        self.assertEqual(requests['GetObject'], 0)
        db.close()
        shutil.rmtree(self.cache_dir())
        db = self.open_db()
        with db.transaction() as connection:
            with connection.root()['blob'].open() as f:
                self.assertEqual(f.read(), data)
        db.pack(time.time() + 1)
        with db.transaction() as connection:
            with connection.root()['blob'].open() as f:
                self.assertEqual(f.read(), data)
        self.assertEqual(self.keys(), self.catalog_keys(db.storage))
        self.assertEqual(len(self.keys()), 1)

    def test_a_missing_object_is_a_poskeyerror(self):
        db = self.open_db()
        with db.transaction() as connection:
            connection.root()['blob'] = Blob(b'bytes')
        with db.transaction() as connection:
            oid = connection.root()['blob']._p_oid
        tid = db.storage.lastTransaction()
        self.bucket.delete([blob_key(self.settings.prefix, oid, tid)])
        shutil.rmtree(self.cache_dir())
        db.close()
        storage = self.open()
        self.addCleanup(storage.close)
        with self.assertRaises(POSKeyError):
            storage.loadBlob(oid, tid)

    def test_a_lost_catalog_is_rebuilt_from_the_bucket(self):
        db = self.open_db()
        for name in 'abc':
            with db.transaction() as connection:
                connection.root()[name] = Blob(name.encode() * 100)
        expected = self.keys()
        size = db.storage.getSize()
        db.close()
        os.remove(os.path.join(self.dir, 'blobs', '.zodbblob',
                               'journal.sqlite'))
        with self.assertLogs('zodbblob.storage', logging.WARNING) as logs:
            db = self.open_db()
        self.assertIn('from a listing of', '\n'.join(logs.output))
        self.assertEqual(self.catalog_keys(db.storage), expected)
        self.assertEqual(db.storage.getSize(), size)


@unittest.skipIf(S3_MISSING, S3_MISSING)
class RefusalTests(ObjectStoreTestCase):

    def contents(self):
        return sorted(os.listdir(self.dir))

    def test_a_blob_directory_on_a_bucket_is_not_opened_without_it(self):
        self.open().close()
        with self.assertRaises(BlobStorageError) as raised:
            self.open(object_store=None)
        self.assertIn(f's3://{self.settings.bucket}/site/', str(raised.exception))
        other = self.layer.make_bucket()
        with self.assertRaises(BlobStorageError) as raised:
            self.open(object_store=other)
        self.assertIn('not in s3://' + other.bucket, str(raised.exception))

    def test_a_blob_directory_with_files_of_its_own_is_refused(self):
        db = ZODB.DB(open_filestorage(os.path.join(self.dir, 'Data.fs'),
                                      os.path.join(self.dir, 'blobs')))
        with db.transaction() as connection:
            connection.root()['local'] = Blob(b'local file')
        db.close()
        with self.assertRaises(BlobStorageError) as raised:
            self.open()
        self.assertIn('holds blob files of its own', str(raised.exception))
        self.assertEqual(self.keys(), [])

    def test_an_unreachable_store_is_one_line_and_changes_nothing(self):
        settings = self.layer.settings(
            'nowhere', endpoint_url='http://127.0.0.1:9', attempts=1,
            connect_timeout=1)
        with self.assertRaises(BlobStorageError) as raised:
            self.open(object_store=settings)
        self.assertNotIn('\n', str(raised.exception))
        self.assertIn('127.0.0.1:9', str(raised.exception))
        self.assertEqual(self.contents(), [])

    def test_a_missing_bucket_is_one_line(self):
        settings = self.layer.settings('no-such-bucket-here')
        with self.assertRaises(BlobStorageError) as raised:
            self.open(object_store=settings)
        self.assertIn('no-such-bucket-here', str(raised.exception))
        self.assertEqual(self.contents(), [])

    def test_cache_size_alone_is_refused(self):
        with self.assertRaises(BlobStorageError):
            self.open(object_store=None, cache_size=100)
        self.assertEqual(self.contents(), [])

    def test_a_base_opened_by_the_caller(self):
        storage = BlobStorage(
            os.path.join(self.dir, 'blobs'),
            ZODB.FileStorage.FileStorage(os.path.join(self.dir, 'Data.fs')),
            object_store=self.settings)
        db = ZODB.DB(storage)
        with db.transaction() as connection:
            connection.root()['blob'] = Blob(b'bytes')
        self.assertEqual(self.keys(), self.catalog_keys(storage))
        db.close()


@unittest.skipIf(S3_MISSING, S3_MISSING)
class ToolTests(ObjectStoreTestCase):
    """The commands refuse a blob directory on a bucket named without
    its bucket (``--blob-dir``) in one line, and change nothing."""

    def zodbblob(self, *args):
        return subprocess.run(
            [sys.executable, '-m', 'zodbblob.cli', *args],
            capture_output=True, text=True, timeout=300)

    def test_tools_on_a_blob_directory_on_a_bucket(self):
        db = self.open_db()
        with db.transaction() as connection:
            connection.root()['blob'] = Blob(b'bytes')
        db.close()
        blobs = os.path.join(self.dir, 'blobs')
        storage = ['--data', os.path.join(self.dir, 'Data.fs'),
                   '--blob-dir', blobs]
        before = self.keys()
        for args in (['verify', *storage], ['backup', *storage,
                                            os.path.join(self.dir, 'bk')],
                     ['recover', *storage],
                     ['migrate', '--layout', 'bushy', blobs,
                      os.path.join(self.dir, 'moved')]):
            with self.subTest(command=args[0]):
                done = self.zodbblob(*args)
                self.assertEqual(done.returncode, 2, done.stderr)
                lines = done.stderr.strip().splitlines()
                self.assertEqual(len(lines), 1, done.stderr)
                self.assertIn(f's3://{self.settings.bucket}/site/', lines[0])
                self.assertFalse(os.path.exists(
                    os.path.join(self.dir, 'bk')))
                self.assertFalse(os.path.exists(
                    os.path.join(self.dir, 'moved')))
        self.assertEqual(self.keys(), before)


def run_child(directory, settings, *args, kill_point=None):
    env = dict(os.environ)
    env.pop(KILL_POINT_VARIABLE, None)
    if kill_point:
        env[KILL_POINT_VARIABLE] = kill_point
    return subprocess.run(
        [sys.executable, '-m', 'zodbblob.storage.tests.objects_child',
         directory, json.dumps(dataclasses.asdict(settings)), *args],
        env=env, timeout=300, capture_output=True)


@unittest.skipIf(S3_MISSING, S3_MISSING)
class KillTests(ObjectStoreTestCase):
    """SIGKILL at every named point of the upload protocol: after the
    next open, every acknowledged blob is in the bucket byte-exact, and
    the bucket holds exactly the catalog's keys (no orphan)."""

    dedup = False

    def committed(self):
        path = os.path.join(self.dir, 'committed')
        expected = {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    expected.update(json.loads(line)['changed'])
        return expected

    def check(self, pack=False):
        storage = self.open()
        try:
            self.assertEqual(self.keys(), self.catalog_keys(storage))
            for key, digest in self.committed().items():
                oid, tid = (bytes.fromhex(part) for part in key.split(':'))
                try:
                    path = storage.loadBlob(oid, tid)
                except POSKeyError:
                    if pack:
                        continue   # superseded and packed away
                    raise
                with open(path, 'rb') as f:
                    self.assertEqual(
                        hashlib.sha256(f.read()).hexdigest(), digest, key)
        finally:
            storage.close()

    def kill_at(self, point, *args):
        for directory in ('blobs', 'committed'):
            path = os.path.join(self.dir, directory)
            shutil.rmtree(path, ignore_errors=True)
            if os.path.isfile(path):
                os.remove(path)
        for name in os.listdir(self.dir):
            os.remove(os.path.join(self.dir, name))
        self.settings = self.layer.make_bucket(prefix='site')
        self.bucket = Bucket(self.settings)
        done = run_child(self.dir, self.settings, *args, kill_point=point)
        self.assertEqual(done.returncode, -9,
                         (point, done.stderr.decode()[-2000:]))
        return done

    def test_kill_at_each_upload_point(self):
        for point in ('after_upload_record', 'mid_upload', 'mid_upload:3',
                      'after_uploads', 'after_uploads:3', 'after_base_vote',
                      'after_base_finish', 'after_journal_commit:2'):
            with self.subTest(point=point):
                self.kill_at(point)
                self.check()

    def test_kill_at_each_pack_point(self):
        for point in ('after_base_pack:2', 'after_object_delete',
                      'after_object_delete:2'):
            with self.subTest(point=point):
                self.kill_at(point, '--pack')
                self.check(pack=True)

    def test_kill_in_an_undo(self):
        for point in ('after_uploads:3', 'after_base_vote:4'):
            with self.subTest(point=point):
                self.kill_at(point, '--undo')
                self.check()

    def test_the_parts_of_a_cut_multipart_upload_are_aborted(self):
        # Killed with its record durable, before its upload finished: as
        # if it died in the middle of a large file's parts.
        self.kill_at('after_upload_record')
        from zodbblob.storage.commitlog import CommitLog
        log = CommitLog(os.path.join(self.dir, 'blobs', '.zodbblob',
                                     'commit.log'), read_only=True)
        try:
            record = log.records[-1]   # the killed transaction's
        finally:
            log.close()
        tid = record.tid
        key = blob_key(self.settings.prefix, record.entries[0].oid, tid)
        client = self.bucket.client
        upload = client.create_multipart_upload(
            Bucket=self.settings.bucket, Key=key)
        client.upload_part(Bucket=self.settings.bucket, Key=key,
                           UploadId=upload['UploadId'], PartNumber=1,
                           Body=b'x' * (5 << 20))
        other = blob_key(self.settings.prefix, b'\0' * 7 + b'\1', tid)
        client.create_multipart_upload(Bucket=self.settings.bucket,
                                       Key=other + '.not-ours')
        self.check()
        left = client.list_multipart_uploads(
            Bucket=self.settings.bucket).get('Uploads', [])
        self.assertEqual([upload['Key'] for upload in left],
                         [other + '.not-ours'])

    def test_kill_during_recovery_then_recover_again(self):
        self.kill_at('after_uploads:2')
        env = dict(os.environ, **{KILL_POINT_VARIABLE: 'after_object_delete'})
        done = subprocess.run(
            [sys.executable, '-c',
             'import json, sys;'
             'from zodbblob.objectstore import ObjectStoreSettings;'
             'from zodbblob.storage.tests.objects_child import open_storage;'
             'open_storage(sys.argv[1], ObjectStoreSettings('
             '**json.loads(sys.argv[2])), json.loads(sys.argv[3])).close()',
             self.dir, json.dumps(dataclasses.asdict(self.settings)),
             json.dumps(self.dedup)],
            env=env, capture_output=True, timeout=300)
        self.assertEqual(done.returncode, -9, done.stderr.decode()[-2000:])
        self.check()


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
