"""Backup of a storage on a bucket that keeps each content once (dedup),
against moto's S3 server (a real process on 127.0.0.1): each content
downloaded once, by the catalog's digest; a backup beside the running
storage; the restore a local blob directory, which ``zodbblob migrate
--dedup`` moves into a new prefix by content."""

import hashlib
import os
import shutil
import subprocess
import sys
import unittest

import ZODB
from ZODB.blob import Blob

from zodbblob.testing import S3_MISSING
from zodbblob.tools.backup import backup, restore
from zodbblob.tools.tests.bucketstores import BucketStoreTestCase

LARGE = os.urandom(9 << 20)


@unittest.skipIf(S3_MISSING, S3_MISSING)
class DedupBucketBackupTests(BucketStoreTestCase):

    def setUp(self):
        super().setUp()
        self.dest = os.path.join(self.dir, 'backups')
        names = ['blob0', 'blob1', 'blob2', 'blob3', 'blob4']
        # 7 revisions, 5 contents.
        contents = [b'', b'same', b'same', LARGE, b'superseded',
                    b'current', LARGE]
        db = ZODB.DB(self.open(dedup=True))
        for number, data in enumerate(contents):
            with db.transaction() as connection:
                connection.root()[names[number % len(names)]] = Blob(data)
        db.close()
        self.expected_names = names
        shutil.rmtree(os.path.join(self.blobs, '.zodbblob', 'cache'))

    def remember(self, db):
        """The digests `check` compares, read through `db`."""
        with db.transaction() as connection:
            for name in self.expected_names:
                with connection.root()[name].open() as f:
                    self.expected[name] = hashlib.sha256(f.read()).digest()

    def test_each_content_downloaded_once_restore_and_migrate_dedup(self):
        db = ZODB.DB(self.open(dedup=True))
        self.remember(db)
        db.close()
        shutil.rmtree(os.path.join(self.blobs, '.zodbblob', 'cache'))
        storage = self.open(read_only=True)
        requests = storage.object_store.bucket.requests
        requests.clear()   # the open read the prefix's marker
        try:
            [result] = backup(storage, self.dest)
        finally:
            storage.close()
        self.assertEqual(result.blob_files, 7)
        self.assertEqual(result.missing, [])
        # Each content once, at its content key: no pointer read.
        self.assertEqual(requests['GetObject'], 5)
        self.assertEqual(requests['HeadObject'], 0)
        self.assertEqual(os.listdir(os.path.join(self.blobs, 'tmp')), [])
        restored = os.path.join(self.dir, 'restored')
        restore(result.snapshot, restored)
        self.check(self.open(restored, object_store=None), records=7)
        # Into a new prefix by content, through the command line.
        other = self.layer.make_bucket(prefix='restored')
        done = subprocess.run(
            [sys.executable, '-m', 'zodbblob.cli', 'migrate', '--quiet',
             '--s3-endpoint-url', self.layer.endpoint_url, '--s3-region',
             'us-east-1', os.path.join(restored, 'blobs'),
             f's3://{other.bucket}/restored', '--dedup'],
            capture_output=True, text=True, timeout=300,
            env=dict(os.environ, AWS_ACCESS_KEY_ID='testing',
                     AWS_SECRET_ACCESS_KEY='testing'))
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn('by content: 5 contents uploaded', done.stdout)
        self.check(self.open(restored, object_store=other, dedup=True),
                   records=7)

    def test_a_backup_beside_the_running_storage(self):
        db = ZODB.DB(self.open(dedup=True))
        [result] = backup(db.storage, self.dest)
        self.assertEqual((result.blob_files, result.missing), (7, []))
        with db.transaction() as connection:
            connection.root()['blob0'] = Blob(b'same')
        [result] = backup(db.storage, self.dest)
        self.assertEqual((result.blob_files, result.missing), (8, []))
        restored = os.path.join(self.dir, 'restored')
        restore(result.snapshot, restored)
        self.remember(db)
        db.close()
        self.check(self.open(restored, object_store=None), records=8)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
