"""The store killed for real: a moto server process of the test's own,
SIGKILLed in the middle of a 20 MiB upload and of a 20 MiB download.

The kill is made from botocore's own events on the bucket's client, so
it falls inside the transfer whatever the machine's speed: after the
multipart upload is created, as a part is sent; after a GetObject's
answer came, before its body is read (the kernel's socket buffers hold
well under 20 MiB, so the body is cut).  moto keeps its buckets in
memory, gone with it: what can be asserted is the one line, no hang,
and no file left behind.
"""

import os
import re
import shutil
import signal
import sys
import tempfile
import unittest

from zodbblob.testing import S3_MISSING, S3_SERVER, free_port, start_server

if not S3_MISSING:
    from zodbblob.objectstore import Bucket, ObjectStoreError

MiB = 1 << 20


@unittest.skipIf(S3_MISSING, S3_MISSING)
class KilledStoreTests(unittest.TestCase):

    # For S3_MISSING and the layer's settings; the server killed is
    # started by each test.
    layer = S3_SERVER

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix='zodbblob-killed-')
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        address = ('127.0.0.1', free_port())
        self.server = start_server(
            [sys.executable, '-m', 'moto.server', '-H', address[0],
             '-p', str(address[1])],
            address, self.directory, 'moto.log', 60)
        self.addCleanup(self.server.stop)
        self.endpoint = 'http://%s:%d' % address
        settings = self.layer.settings(
            'killed', endpoint_url=self.endpoint, attempts=2,
            connect_timeout=2, read_timeout=5)
        # Parts of 8 MiB: a 20 MiB upload in 3.
        self.bucket = Bucket(settings, multipart_threshold=8 * MiB,
                             part_size=8 * MiB)
        self.addCleanup(self.bucket.client.close)
        self.bucket.client.create_bucket(Bucket='killed')
        self.killed = False

    def kill_at(self, event, count=1):
        """SIGKILL the server at the `count`-th `event` of the client."""
        seen = []

        def kill(**kwargs):
            seen.append(1)
            if len(seen) == count:
                process = self.server.process
                process.send_signal(signal.SIGKILL)
                process.wait()
                self.killed = True
        self.bucket.client.meta.events.register(event, kill)

    def path(self, name, size=None):
        path = os.path.join(self.directory, name)
        if size is not None:
            with open(path, 'wb') as f:
                for _ in range(size // MiB):
                    f.write(os.urandom(MiB))
        return path

    def test_a_store_killed_mid_upload_ends_in_one_line(self):
        source = self.path('big', 20 * MiB)
        self.kill_at('before-send.s3.UploadPart', count=2)
        with self.assertRaises(ObjectStoreError) as raised:
            self.bucket.upload(source, 'zodb/k')
        self.assertTrue(self.killed)
        message = str(raised.exception)
        self.assertNotIn('\n', message)
        self.assertTrue(message.startswith(
            f"cannot upload {source} to key 'zodb/k' in bucket 'killed' "
            f"at {self.endpoint}: "), message)
        self.assertEqual(self.bucket.requests['CreateMultipartUpload'], 1)
        self.assertEqual(self.bucket.requests['CompleteMultipartUpload'], 0)

    def test_a_store_killed_mid_download_ends_in_one_line_and_no_file(self):
        self.bucket.upload(self.path('big', 20 * MiB), 'zodb/k')
        self.kill_at('after-call.s3.GetObject')
        target = self.path('out.tmp')
        with self.assertRaises(ObjectStoreError) as raised:
            self.bucket.download('zodb/k', target)
        self.assertTrue(self.killed)
        message = str(raised.exception)
        self.assertNotIn('\n', message)
        # The body was cut; the resume found nobody listening.
        cut = re.fullmatch(
            f"cannot download to {re.escape(target)} key 'zodb/k' in "
            f"bucket 'killed' at {re.escape(self.endpoint)}: cannot "
            f"connect to {re.escape(self.endpoint)} after 2 tries, on try "
            r"2 after a cut at (\d+) of 20971520 bytes", message)
        self.assertIsNotNone(cut, message)
        self.assertLess(int(cut[1]), 20 * MiB)
        self.assertFalse(os.path.exists(target))
        self.assertEqual(sorted(os.listdir(self.directory)), ['big', 'moto.log'])
