"""``zodbblob migrate SRC s3://BUCKET/PREFIX`` and back, through the
command line, against moto's S3 server (a real process on 127.0.0.1):
the blob files move into the bucket and back, resumably."""

import os
import subprocess
import sys
import unittest
import time

from zodbblob.storage import BlobStorageError
from zodbblob.storage.binding import MARKER
from zodbblob.storage.killpoints import KILL_POINT_VARIABLE
from zodbblob.testing import S3_MISSING
from zodbblob.tools.tests.bucketstores import BUCKET, BucketStoreTestCase


@unittest.skipIf(S3_MISSING, S3_MISSING)
class MoveTestCase(BucketStoreTestCase):
    """A blob directory of `contents` (committed one a transaction, on
    four names) to move, and `migrate` through the command line."""

    records = 5

    def contents(self):
        return [os.urandom(size) for size in (0, 100, 5000, 9 << 20, 7)]

    def setUp(self):
        super().setUp()
        self.url = f's3://{self.settings.bucket}/site'
        self.fill(self.contents(), ['blob0', 'blob1', 'blob2', 'blob3'],
                  object_store=None)

    def migrate(self, *args, kill_point=None):
        env = dict(os.environ, AWS_ACCESS_KEY_ID='testing',
                   AWS_SECRET_ACCESS_KEY='testing')
        env.pop(KILL_POINT_VARIABLE, None)
        if kill_point:
            env[KILL_POINT_VARIABLE] = kill_point
        return subprocess.run(
            [sys.executable, '-m', 'zodbblob.cli', 'migrate', '--quiet',
             '--s3-endpoint-url', self.layer.endpoint_url,
             '--s3-region', 'us-east-1', *args],
            capture_output=True, text=True, timeout=300, env=env)

    def local_files(self):
        """The committed blob files in the layout (not the cache's, not
        staging's)."""
        found = []
        for parent, dirs, names in os.walk(self.blobs):
            dirs[:] = [name for name in dirs
                       if name not in ('.zodbblob', 'tmp')]
            found.extend(os.path.relpath(os.path.join(parent, name),
                                         self.blobs)
                         for name in names if name.endswith('.blob'))
        return sorted(found)

    def check(self, object_store=BUCKET, **options):
        super().check(self.open(object_store=object_store, **options),
                      records=self.records)

    def keys(self):
        """The bucket's blob keys (not the marker saying whose it is)."""
        return sorted(key for key, size in self.bucket.iter_keys()
                      if not key.endswith(MARKER))

    def settled_keys(self):
        """`keys` once the server has ended the requests a killed move
        had sent (a PutObject in flight at the SIGKILL is stored a moment
        later): two listings alike, half a second apart."""
        keys = self.keys()
        for _ in range(40):
            time.sleep(0.5)
            again = self.keys()
            if again == keys:
                break
            keys = again
        return keys


class BucketMoveTests(MoveTestCase):

    def test_into_the_bucket_and_back(self):
        files = self.local_files()
        self.assertEqual(len(files), 5)
        done = self.migrate(self.blobs, self.url)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(f'5 blobs moved into {self.url}/: 5 uploaded',
                      done.stdout)
        self.assertEqual(self.local_files(), [])
        self.assertEqual(len(self.keys()), 5)
        self.check()
        with self.assertRaises(BlobStorageError):
            self.open(object_store=None)
        # What a move back killed in the middle of a download leaves.
        left = os.path.join(self.blobs, 'tmp', 'moving-99999.blob')
        with open(left, 'wb') as f:
            f.write(b'part of a download')
        done = self.migrate(self.url, self.blobs)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn('5 downloaded', done.stdout)
        self.assertFalse(os.path.exists(left))
        self.assertEqual(self.local_files(), files)
        self.assertFalse(os.path.exists(os.path.join(
            self.blobs, '.zodbblob', 'cache')))
        self.check(object_store=None)

    def test_a_killed_move_is_finished_by_running_it_again(self):
        for point in ('mid_bucket_move:2', 'after_bucket_bind'):
            with self.subTest(point=point):
                done = self.migrate(self.blobs, self.url, kill_point=point)
                self.assertEqual(done.returncode, -9, done.stderr)
                done = self.migrate(self.blobs, self.url)
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assertEqual(self.local_files(), [])
                self.check()
                done = self.migrate(self.url, self.blobs, kill_point=point)
                self.assertEqual(done.returncode, -9, done.stderr)
                done = self.migrate(self.url, self.blobs)
                self.assertEqual(done.returncode, 0, done.stderr)
                self.check(object_store=None)
        # Resumed, not started over: a key there with its size is kept.
        done = self.migrate(self.blobs, self.url)
        self.assertIn('5 there already', done.stdout)

    def test_the_parts_of_an_upload_a_kill_cut_are_aborted(self):
        client = self.bucket.client
        client.create_multipart_upload(
            Bucket=self.settings.bucket,
            Key='site/0000000000000001/0000000000000001.blob')
        done = self.migrate(self.blobs, self.url)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(client.list_multipart_uploads(
            Bucket=self.settings.bucket).get('Uploads', []), [])

    def test_refusals_change_nothing(self):
        files = self.local_files()
        other = f's3://{self.layer.make_bucket().bucket}/x'
        cases = [
            ((self.blobs, self.url, '--layout', 'bushy'), '--layout'),
            ((self.url, other), 'one of SRC and DST'),
            ((self.url, self.blobs), 'in its own files'),
            ((os.path.join(self.dir, 'nowhere'), self.url),
             'not a blob directory'),
            ((self.blobs, 's3://no-such-bucket-here/x'),
             'no-such-bucket-here'),
            ((self.blobs, f's3://{self.settings.bucket}/a/../b'), '..'),
        ]
        for args, said in cases:
            with self.subTest(args=args):
                done = self.migrate(*args)
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertIn(said, done.stderr)
                self.assertEqual(len(done.stderr.strip().splitlines()), 1,
                                 done.stderr)
        self.assertEqual(self.local_files(), files)
        self.assertEqual(self.keys(), [])
        # A storage that did not close: refused too.
        storage = self.open(object_store=None)
        try:
            done = self.migrate(self.blobs, self.url)
            self.assertEqual(done.returncode, 2)
        finally:
            storage.close()
        self.assertEqual(self.keys(), [])


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
