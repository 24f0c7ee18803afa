"""Backup of a storage whose blobs live in a bucket (moto's S3 server, a
real process on 127.0.0.1): each object downloaded once into the pool
(not into the local cache), the restore a local blob directory, which
``zodbblob migrate`` moves into a bucket again."""

import os
import shutil
import time
import unittest

import ZODB

from zodbblob.testing import S3_MISSING
from zodbblob.tools.backup import backup, restore
from zodbblob.tools.bucketmove import to_bucket
from zodbblob.tools.tests.bucketstores import BucketStoreTestCase


@unittest.skipIf(S3_MISSING, S3_MISSING)
class BucketBackupTests(BucketStoreTestCase):

    def setUp(self):
        super().setUp()
        self.dest = os.path.join(self.dir, 'backups')
        self.fill([b'', b'same', b'same', os.urandom(9 << 20), b'superseded',
                   b'current'], ['blob0', 'blob1', 'blob2', 'blob3', 'blob4'])
        shutil.rmtree(self.cache())

    def cache(self):
        return os.path.join(self.blobs, '.zodbblob', 'cache')

    def test_backup_restore_and_back_into_a_bucket(self):
        storage = self.open(read_only=True)
        requests = storage.object_store.bucket.requests
        requests.clear()   # the open read the prefix's marker
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
        self.check(self.open(restored, object_store=None))
        # Into a new bucket, as the site's blob directory again.
        other = self.layer.make_bucket(prefix='restored')
        to_bucket(os.path.join(restored, 'blobs'), other)
        self.check(self.open(restored, object_store=other))

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
