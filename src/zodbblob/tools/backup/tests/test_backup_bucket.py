"""Backup of a storage whose blobs live in a bucket (moto's S3 server, a
real process on 127.0.0.1): each object downloaded once into the pool
(not into the local cache), the restore a local blob directory, which
``zodbblob migrate`` moves into a bucket again."""

import hashlib
import os
import shutil
import tempfile
import time
import unittest

import ZODB
from ZODB.blob import Blob

from zodbblob.storage import open_filestorage
from zodbblob.testing import S3_MISSING, S3_SERVER
from zodbblob.tools.backup import backup, restore
from zodbblob.tools.bucketmove import to_bucket
from zodbblob.tools.verify import verify

if not S3_MISSING:
    from zodbblob.objectstore import Bucket


@unittest.skipIf(S3_MISSING, S3_MISSING)
class BucketBackupTests(unittest.TestCase):

    layer = S3_SERVER

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-backup-bucket-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.settings = self.layer.make_bucket(prefix='site')
        self.bucket = Bucket(self.settings)
        self.addCleanup(self.bucket.client.close)
        self.dest = os.path.join(self.dir, 'backups')
        db = ZODB.DB(self.open())
        self.expected = {}
        for number, data in enumerate([b'', b'same', b'same',
                                       os.urandom(9 << 20),
                                       b'superseded', b'current']):
            with db.transaction() as connection:
                connection.root()[f'blob{min(number, 4)}'] = Blob(data)
        with db.transaction() as connection:
            for name in ('blob0', 'blob1', 'blob2', 'blob3', 'blob4'):
                with connection.root()[name].open() as f:
                    self.expected[name] = hashlib.sha256(f.read()).digest()
        db.close()
        shutil.rmtree(self.cache())

    def open(self, directory=None, settings='bucket', **kw):
        directory = directory or self.dir
        return open_filestorage(
            os.path.join(directory, 'Data.fs'),
            os.path.join(directory, 'blobs'),
            object_store=self.settings if settings == 'bucket' else settings,
            **kw)

    def cache(self):
        return os.path.join(self.dir, 'blobs', '.zodbblob', 'cache')

    def check(self, storage):
        db = ZODB.DB(storage)
        try:
            with db.transaction() as connection:
                for name, digest in self.expected.items():
                    with connection.root()[name].open() as f:
                        self.assertEqual(
                            hashlib.sha256(f.read()).digest(), digest, name)
            report = verify(db.storage, checksum=True)
            self.assertTrue(report.clean, report.lines())
        finally:
            db.close()

    def test_backup_restore_and_back_into_a_bucket(self):
        storage = self.open(read_only=True)
        requests = storage.object_store.bucket.requests
        try:
            [result] = backup(storage, self.dest)
        finally:
            storage.close()
        self.assertEqual(result.blob_files, 6)
        self.assertEqual(result.missing, [])
        # Each object downloaded once; nothing kept in the local cache,
        # nothing left in tmp.
        self.assertEqual(requests['GetObject'], 6)
        cached = [name for parent, dirs, names in os.walk(self.cache())
                  for name in names if name.endswith('.blob')]
        self.assertEqual(cached, [])
        self.assertEqual(os.listdir(os.path.join(self.dir, 'blobs', 'tmp')),
                         [])
        restored = os.path.join(self.dir, 'restored')
        restore(result.snapshot, restored)
        self.check(self.open(restored, settings=None))
        # Into a new bucket, as the site's blob directory again.
        other = self.layer.make_bucket(prefix='restored')
        to_bucket(os.path.join(restored, 'blobs'), other)
        self.check(self.open(restored, settings=other))

    def test_a_missing_object_is_reported_and_the_rest_backed_up(self):
        db = ZODB.DB(self.open(read_only=True))
        try:
            with db.transaction() as connection:
                blob = connection.root()['blob3']
                blob._p_activate()
                oid, tid = blob._p_oid, blob._p_serial
            key = db.storage.object_store.key(oid, tid)
        finally:
            db.close()
        self.bucket.delete([key])
        storage = self.open(read_only=True)
        try:
            [result] = backup(storage, self.dest)
        finally:
            storage.close()
        self.assertEqual(len(result.missing), 1)
        self.assertEqual(result.blob_files, 6)
        self.assertEqual(os.listdir(os.path.join(self.dir, 'blobs', 'tmp')),
                         [])

    def test_a_packed_store(self):
        storage = self.open()
        db = ZODB.DB(storage)
        db.pack(time.time() + 1)
        db.close()
        storage = self.open(read_only=True)
        try:
            [result] = backup(storage, self.dest)
        finally:
            storage.close()
        self.assertEqual(result.blob_files, 5)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
