"""Bucket against a real S3-API server process (moto's, on 127.0.0.1).

Requests are counted with botocore's own event system on the bucket's
client, so a test can say which requests a method made.
"""

import collections
import os
import shutil
import tempfile
import unittest

from zodbblob.objectstore import blob_key
from zodbblob.testing import S3_MISSING, S3_SERVER

if not S3_MISSING:
    from zodbblob.objectstore import Bucket, ObjectMissing, ObjectStoreError
    from zodbblob.objectstore import bucket as bucket_module

MiB = 1 << 20
OID = bytes.fromhex('00000000000000a1')


def tid(n):
    return n.to_bytes(8, 'big')


class Requests:
    """The S3 operations a client makes, by name, one per call."""

    def __init__(self, client):
        self.counts = collections.Counter()
        client.meta.events.register('before-call.s3', self.called)

    def called(self, model, **kwargs):
        self.counts[model.name] += 1


@unittest.skipIf(S3_MISSING, S3_MISSING)
class BucketTests(unittest.TestCase):

    layer = S3_SERVER

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix='zodbblob-bucket-')
        self.settings = self.layer.make_bucket(prefix='zodb')
        self.bucket = Bucket(self.settings)
        self.requests = Requests(self.bucket.client)

    def tearDown(self):
        self.bucket.client.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def path(self, name, data=None):
        path = os.path.join(self.directory, name)
        if data is not None:
            with open(path, 'wb') as f:
                f.write(data)
        return path

    def read(self, path):
        with open(path, 'rb') as f:
            return f.read()

    def test_check_passes_for_a_bucket_that_is_there(self):
        self.bucket.check()
        self.assertEqual(self.requests.counts, {'HeadBucket': 1})

    def test_upload_then_download_byte_exact(self):
        data = b'a blob\x00\xff' * 1000
        key = blob_key(self.settings.prefix, OID, tid(1))
        self.assertEqual(self.bucket.upload(self.path('in', data), key),
                         len(data))
        self.assertEqual(self.requests.counts['PutObject'], 1)
        self.assertEqual(self.bucket.head(key), len(data))
        target = self.path('out.tmp')
        self.bucket.download(key, target)
        self.assertEqual(self.read(target), data)
        self.assertEqual(sorted(os.listdir(self.directory)), ['in', 'out.tmp'])

    def test_an_empty_file_goes_up_and_down(self):
        key = blob_key(self.settings.prefix, OID, tid(2))
        self.assertEqual(self.bucket.upload(self.path('in', b''), key), 0)
        self.bucket.download(key, self.path('out'))
        self.assertEqual(self.read(self.path('out')), b'')

    def test_a_10_MiB_upload_is_one_put_object(self):
        # Under the multipart threshold: one request, where parts are
        # three at least (create, a part, complete).
        data = os.urandom(MiB) * 10
        key = blob_key(self.settings.prefix, OID, tid(3))
        self.assertEqual(self.bucket.upload(self.path('big', data), key),
                         10 * MiB)
        self.assertEqual(self.requests.counts, {'PutObject': 1})
        self.bucket.download(key, self.path('big.tmp'))
        self.assertEqual(self.read(self.path('big.tmp')), data)

    def test_a_20_MiB_upload_goes_in_parts_and_comes_back_whole(self):
        data = os.urandom(MiB) * 20
        key = blob_key(self.settings.prefix, OID, tid(3))
        # A threshold and parts of 8 MiB, as a 20 MiB blob would meet
        # 64 MiB ones: 3 parts.
        self.bucket = Bucket(self.settings, multipart_threshold=8 * MiB,
                             part_size=8 * MiB)
        self.requests = Requests(self.bucket.client)
        self.assertEqual(self.bucket.upload(self.path('big', data), key),
                         20 * MiB)
        self.assertEqual(self.requests.counts['CreateMultipartUpload'], 1)
        self.assertEqual(self.requests.counts['UploadPart'], 3)
        self.assertEqual(self.requests.counts['PutObject'], 0)
        etag = self.bucket.client.head_object(
            Bucket=self.settings.bucket, Key=key)['ETag']
        self.assertTrue(etag.endswith('-3"'), etag)
        self.bucket.download(key, self.path('big.tmp'))
        self.assertEqual(self.read(self.path('big.tmp')), data)

    def test_download_of_a_missing_key_raises_object_missing(self):
        target = self.path('out.tmp')
        key = blob_key(self.settings.prefix, OID, tid(4))
        with self.assertRaises(ObjectMissing) as raised:
            self.bucket.download(key, target)
        message = str(raised.exception)
        self.assertEqual(
            message,
            f'cannot download to {target} key {key!r} in bucket '
            f'{self.settings.bucket!r} at {self.layer.endpoint_url}: '
            f'no such key')
        self.assertEqual(os.listdir(self.directory), [])

    def test_upload_of_a_missing_file_names_it(self):
        source = self.path('nothing')
        with self.assertRaises(ObjectStoreError) as raised:
            self.bucket.upload(source, 'zodb/k')
        self.assertIn(source, str(raised.exception))
        self.assertIn('No such file', str(raised.exception))
        self.assertEqual(sum(self.requests.counts.values()), 0)

    def test_head_of_a_missing_key_is_none(self):
        self.assertIsNone(self.bucket.head('zodb/nothing'))

    def test_copy_is_made_by_the_server(self):
        data = b'revision one' * 100
        source = blob_key(self.settings.prefix, OID, tid(5))
        target = blob_key(self.settings.prefix, OID, tid(6))
        self.bucket.upload(self.path('in', data), source)
        self.requests.counts.clear()
        self.bucket.copy(source, target)
        self.assertEqual(self.requests.counts, {'CopyObject': 1})
        self.bucket.download(target, self.path('out'))
        self.assertEqual(self.read(self.path('out')), data)
        self.assertEqual(self.bucket.head(source), len(data))

    def test_copy_of_a_missing_key_raises_object_missing(self):
        with self.assertRaises(ObjectMissing) as raised:
            self.bucket.copy('zodb/nothing', 'zodb/target')
        self.assertIn("'zodb/nothing'", str(raised.exception))
        self.assertIsNone(self.bucket.head('zodb/target'))

    def put_keys(self, count):
        """Make `count` small objects, straight through the client."""
        keys = [blob_key(self.settings.prefix, OID, tid(n))
                for n in range(count)]
        for key in keys:
            self.bucket.client.put_object(
                Bucket=self.settings.bucket, Key=key, Body=b'x')
        self.requests.counts.clear()
        return keys

    def test_delete_in_batches_makes_3_requests_for_2_5_batches(self):
        # The API's limit is 1,000 keys a request; a batch of 10 here
        # keeps the test short (2,500 PUTs took 9 s of moto's CPU).
        self.assertEqual(bucket_module.DELETE_BATCH, 1000)
        self.addCleanup(setattr, bucket_module, 'DELETE_BATCH', 1000)
        bucket_module.DELETE_BATCH = 10
        keys = self.put_keys(25)
        self.assertEqual(self.bucket.delete(iter(keys)), 3)
        self.assertEqual(self.requests.counts, {'DeleteObjects': 3})
        self.assertEqual(list(self.bucket.iter_keys()), [])

    def test_delete_of_missing_keys_is_fine(self):
        [kept] = self.put_keys(1)
        self.assertEqual(
            self.bucket.delete(['zodb/nothing', 'zodb/nor/this']), 1)
        self.assertEqual(self.bucket.delete([]), 0)
        self.assertEqual(list(self.bucket.iter_keys()), [(kept, 1)])

    def test_iter_keys_pages_and_yields_every_key_once(self):
        keys = self.put_keys(25)
        self.bucket.client.put_object(
            Bucket=self.settings.bucket, Key='elsewhere/k', Body=b'yy')
        self.requests.counts.clear()
        listed = list(self.bucket.iter_keys(page_size=10))
        self.assertEqual(listed, [(key, 1) for key in sorted(keys)])
        self.assertEqual(self.requests.counts, {'ListObjectsV2': 3})
        self.assertEqual(list(self.bucket.iter_keys('elsewhere/')),
                         [('elsewhere/k', 2)])

    def test_iter_keys_requests_a_page_only_when_it_is_reached(self):
        self.put_keys(25)
        listed = self.bucket.iter_keys(page_size=10)
        next(listed)
        self.assertEqual(self.requests.counts, {'ListObjectsV2': 1})
        listed.close()

    def test_check_of_a_missing_bucket_says_so_in_one_line(self):
        bucket = Bucket(self.layer.settings('no-such-bucket-here'))
        with self.assertRaises(ObjectStoreError) as raised:
            bucket.check()
        self.assertEqual(
            str(raised.exception),
            f"cannot reach bucket 'no-such-bucket-here' at "
            f"{self.layer.endpoint_url}: no such bucket")
        self.assertNotIsInstance(raised.exception, ObjectMissing)
