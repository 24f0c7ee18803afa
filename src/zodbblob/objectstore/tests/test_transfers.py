"""Uploads and downloads through a store that fails: a `FaultProxy`
between the bucket and a real S3-API server (moto's, on 127.0.0.1).

Each failure either passes after the bounded tries or ends in one
`ObjectStoreError` line; a download's file is then gone, a multipart
upload aborted.  Requests are counted by `Bucket.requests`, every try.
"""

import os
import re
import shutil
import tempfile
import threading
import unittest

from zodbblob import faults
from zodbblob.testing import S3_MISSING, S3_SERVER

if not S3_MISSING:
    from zodbblob.objectstore import Bucket, ObjectStoreError

MiB = 1 << 20


class FaultOnce:
    """Puts `proxy` in `mode` at the first send of `operation`, and back
    in PASS when the thread of that send sends again (its retry): that
    request fails once (or a few times, as a pooled connection may
    outlive the switch), then passes.  Other threads' sends meanwhile
    may fail too."""

    def __init__(self, bucket, proxy, operation, mode):
        self.proxy = proxy
        self.mode = mode
        self.first = None
        self.done = False
        self.lock = threading.Lock()
        bucket.client.meta.events.register(
            f'before-send.s3.{operation}', self.sending)

    def sending(self, **kwargs):
        with self.lock:
            if self.done:
                return
            if self.first is None:
                self.first = threading.get_ident()
                self.proxy.mode = self.mode
            elif self.first == threading.get_ident():
                self.done = True
                self.proxy.mode = faults.PASS
            else:
                return
            self.proxy.disconnect()


@unittest.skipIf(S3_MISSING, S3_MISSING)
class TransferTests(unittest.TestCase):

    layer = S3_SERVER

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix='zodbblob-transfers-')
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        self.proxy = faults.FaultProxy(self.layer.address).start()
        self.addCleanup(self.proxy.stop)
        self.proxy_url = 'http://%s:%d' % self.proxy.address
        # The bucket is made and checked straight at the server.
        self.settings = self.layer.make_bucket(prefix='zodb')
        self.direct = Bucket(self.settings)
        self.addCleanup(self.direct.client.close)

    def bucket(self, attempts=3, read_timeout=5):
        """A Bucket that goes through the proxy; files of 8 MiB or
        more go up in 8 MiB parts (a 20 MiB file in 3)."""
        bucket = Bucket(self.layer.settings(
            self.settings.bucket, prefix='zodb', endpoint_url=self.proxy_url,
            attempts=attempts, read_timeout=read_timeout, connect_timeout=5),
            multipart_threshold=8 * MiB, part_size=8 * MiB)
        self.addCleanup(bucket.client.close)
        return bucket

    def path(self, name, data=None):
        path = os.path.join(self.directory, name)
        if data is not None:
            with open(path, 'wb') as f:
                f.write(data)
        return path

    def read(self, path):
        with open(path, 'rb') as f:
            return f.read()

    def stored(self, key, size):
        """Random bytes of `size` put at `key`, straight at the server."""
        data = os.urandom(size)
        self.direct.upload(self.path('source', data), key)
        return data

    def assert_one_line(self, error, *parts):
        message = str(error)
        self.assertNotIn('\n', message)
        for part in parts:
            self.assertIn(part, message)
        return message

    def uploads_left(self):
        return self.direct.client.list_multipart_uploads(
            Bucket=self.settings.bucket).get('Uploads', [])

    # Downloads

    def test_a_cut_download_resumes_and_reads_each_byte_once(self):
        data = self.stored('zodb/k', 6 * MiB)
        bucket = self.bucket(attempts=8)
        self.proxy.mode = faults.cut_response_after(2 * MiB)
        target = self.path('out.tmp')
        self.assertEqual(bucket.download('zodb/k', target), len(data))
        self.assertEqual(self.read(target), data)
        # Four GetObjects of under 2 MiB each, every byte read once: the
        # tries after the first asked for the rest only.
        self.assertEqual(bucket.requests, {'GetObject': 4})
        self.assertEqual(bucket.transferred['down'], len(data))

    def test_a_download_cut_on_every_try_fails_and_leaves_no_file(self):
        # The proxy closes cleanly (a FIN, no reset) after 1 MiB: each
        # body is short of its Content-Length, which is a cut, never a
        # short blob.
        self.stored('zodb/k', 6 * MiB)
        bucket = self.bucket(attempts=3)
        self.proxy.mode = faults.cut_response_after(MiB)
        target = self.path('out.tmp')
        with self.assertRaises(ObjectStoreError) as raised:
            bucket.download('zodb/k', target)
        message = self.assert_one_line(
            raised.exception, f'cannot download to {target}',
            "key 'zodb/k'", self.proxy_url)
        written = int(re.search(
            r': cut after (\d+) of 6291456 bytes, 3 tries$', message)[1])
        self.assertLess(written, 3 * MiB)
        self.assertFalse(os.path.exists(target))
        self.assertEqual(bucket.requests, {'GetObject': 3})

    def test_an_object_replaced_between_tries_is_read_anew(self):
        self.stored('zodb/k', 6 * MiB)
        replacement = os.urandom(MiB // 2)
        bucket = self.bucket(attempts=4)
        self.proxy.mode = faults.cut_response_after(2 * MiB)
        sends = []

        def replace(**kwargs):
            sends.append(1)
            if len(sends) == 2:  # before the try that would resume
                self.direct.upload(self.path('new', replacement), 'zodb/k')
        bucket.client.meta.events.register(
            'before-send.s3.GetObject', replace)
        target = self.path('out.tmp')
        self.assertEqual(bucket.download('zodb/k', target), len(replacement))
        self.assertEqual(self.read(target), replacement)
        # The first cut, the resume refused (If-Match), the new object.
        self.assertEqual(bucket.requests, {'GetObject': 3})

    def test_a_stalled_download_times_out_naming_the_endpoint(self):
        self.stored('zodb/k', 1000)
        bucket = self.bucket(attempts=2, read_timeout=0.5)
        self.proxy.mode = faults.STALL
        target = self.path('out.tmp')
        with self.assertRaises(ObjectStoreError) as raised:
            bucket.download('zodb/k', target)
        self.assert_one_line(
            raised.exception,
            f'at {self.proxy_url}: timed out after 2 tries of 0.5 s each')
        self.assertFalse(os.path.exists(target))

    # Uploads

    def test_a_put_that_fails_on_every_try_ends_in_one_line(self):
        source = self.path('in', os.urandom(MiB))
        causes = [
            (faults.cut_request_after(64 << 10),
             'connection closed before an answer, after 3 tries'),
            (faults.RESET, 'after 3 tries'),
            (faults.error(500, 'InternalError'),
             'InternalError We encountered an internal error.'),
            (faults.error(503, 'SlowDown'),
             'SlowDown Please reduce your request rate.'),
        ]
        for mode, cause in causes:
            with self.subTest(mode=mode):
                bucket = self.bucket(attempts=3)
                self.proxy.mode = mode
                with self.assertRaises(ObjectStoreError) as raised:
                    bucket.upload(source, 'zodb/k')
                message = self.assert_one_line(
                    raised.exception, f'cannot upload {source} to',
                    self.proxy_url)
                self.assertTrue(message.endswith(cause), message)
                self.assertEqual(bucket.requests, {'PutObject': 3})
                self.proxy.mode = faults.PASS
                self.assertIsNone(self.direct.head('zodb/k'))

    def test_a_put_that_fails_once_passes_on_a_retry(self):
        data = os.urandom(MiB)
        for mode in (faults.cut_request_after(64 << 10), faults.RESET,
                     faults.error(503, 'SlowDown')):
            with self.subTest(mode=mode):
                bucket = self.bucket(attempts=4)
                FaultOnce(bucket, self.proxy, 'PutObject', mode)
                bucket.upload(self.path('in', data), 'zodb/k')
                self.assertGreaterEqual(bucket.requests['PutObject'], 2)
                target = self.path('out.tmp')
                self.direct.download('zodb/k', target)
                self.assertEqual(self.read(target), data)
                os.unlink(target)

    def test_a_stalled_upload_times_out_naming_the_endpoint(self):
        bucket = self.bucket(attempts=2, read_timeout=0.5)
        self.proxy.mode = faults.STALL
        source = self.path('in', b'x' * 1000)
        with self.assertRaises(ObjectStoreError) as raised:
            bucket.upload(source, 'zodb/k')
        self.assert_one_line(
            raised.exception,
            f'at {self.proxy_url}: timed out after 2 tries of 0.5 s each')

    def test_a_multipart_upload_whose_parts_fail_is_aborted(self):
        # Each connection is closed after 1 MiB from the client: every
        # 8 MiB part is cut on every try; the small requests (create,
        # abort) pass.
        source = self.path('big', os.urandom(20 * MiB))
        bucket = self.bucket(attempts=2)
        self.proxy.mode = faults.cut_request_after(MiB)
        with self.assertRaises(ObjectStoreError) as raised:
            bucket.upload(source, 'zodb/k')
        self.assert_one_line(
            raised.exception, f'cannot upload {source} to', self.proxy_url,
            'connection closed before an answer, after 2 tries')
        self.assertEqual(bucket.requests['CreateMultipartUpload'], 1)
        self.assertEqual(bucket.requests['AbortMultipartUpload'], 1)
        self.assertEqual(bucket.requests['CompleteMultipartUpload'], 0)
        self.assertEqual(self.uploads_left(), [])
        self.assertIsNone(self.direct.head('zodb/k'))

    def test_a_multipart_upload_whose_part_fails_once_completes(self):
        data = os.urandom(20 * MiB)
        # Other parts may fail while the first waits for its retry:
        # attempts enough that none runs out first.
        bucket = self.bucket(attempts=8)
        FaultOnce(bucket, self.proxy, 'UploadPart',
                  faults.cut_request_after(MiB))
        bucket.upload(self.path('big', data), 'zodb/k')
        self.assertGreater(bucket.requests['UploadPart'], 3)
        self.assertEqual(bucket.requests['CompleteMultipartUpload'], 1)
        self.assertEqual(self.uploads_left(), [])
        target = self.path('out.tmp')
        self.direct.download('zodb/k', target)
        self.assertEqual(self.read(target), data)

    # Counts

    def test_requests_count_every_try_and_bytes_each_way(self):
        bucket = self.bucket(attempts=3)
        source = self.path('in', os.urandom(1000))
        self.proxy.mode = faults.error(503, 'SlowDown')
        with self.assertRaises(ObjectStoreError):
            bucket.upload(source, 'zodb/a')
        # botocore calls once and tries three times: before-call would
        # count 1.
        self.assertEqual(bucket.requests, {'PutObject': 3})
        self.assertEqual(bucket.transferred['up'], 3000)
        self.proxy.mode = faults.PASS
        self.proxy.disconnect()
        bucket.upload(source, 'zodb/a')
        bucket.download('zodb/a', self.path('out.tmp'))
        self.assertEqual(bucket.transferred, {'up': 4000, 'down': 1000})

    def test_requests_are_counted_from_many_threads(self):
        bucket = self.bucket()
        source = self.path('in', b'x')

        def upload(n):
            for i in range(10):
                bucket.upload(source, f'zodb/{n}/{i}')
        threads = [threading.Thread(target=upload, args=(n,))
                   for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(bucket.requests, {'PutObject': 80})

    def test_a_delete_of_200_keys_is_one_request_and_a_copy_no_get(self):
        bucket = self.bucket()
        keys = [f'zodb/{n:04d}' for n in range(200)]
        source = self.path('in', b'revision')
        for key in keys:
            self.direct.upload(source, key)
        bucket.copy(keys[0], 'zodb/copy')
        self.assertEqual(bucket.requests, {'CopyObject': 1})
        bucket.delete(keys)
        self.assertEqual(bucket.requests,
                         {'CopyObject': 1, 'DeleteObjects': 1})
        self.assertEqual(list(self.direct.iter_keys()), [('zodb/copy', 8)])
