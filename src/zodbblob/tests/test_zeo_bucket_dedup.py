"""Dedup on a bucket, end to end from configuration files: a
``zodbblob serve --dedup --s3-*`` server keeps each content once, and a
ZEO client whose ``<zodbblobclient>`` has an ``<s3>`` section reads the
bucket itself (pointers followed; counted at a proxy in front of moto's
S3 server, a real process on 127.0.0.1); a ``<zodbblob>`` section with
``dedup on`` and ``<s3>`` opened by ``zodbblob.config``."""

import os
import unittest

import ZODB
import ZODB.config
from ZODB.blob import Blob

from zodbblob.cli.serve import s3_section
from zodbblob.config import storage_from_file
from zodbblob.faults import FaultProxy
from zodbblob.objectstore import blob_key, content_key
from zodbblob.storage import BlobStorageError
from zodbblob.storage.digest import digest_bytes
from zodbblob.testing import S3_MISSING, S3_SERVER
from zodbblob.tests.test_zeo_bucket import ClientTests, s3_lines

if not S3_MISSING:
    from zodbblob.objectstore import Bucket

POSTER = b'POSTER' * 1000


@unittest.skipIf(S3_MISSING, S3_MISSING)
class ServedDedupTests(ClientTests, unittest.TestCase):

    layer = S3_SERVER

    def keys(self, settings):
        bucket = Bucket(settings)
        self.addCleanup(bucket.client.close)
        return [key for key, size in bucket.iter_keys()
                if not key.endswith('.json')]

    def config_file(self, name, text):
        path = self.path(name)
        with open(path, 'w') as f:
            f.write(text)
        return path

    def test_a_client_reads_each_content_from_the_bucket(self):
        settings, address, server = self.serve('--dedup')
        self.addCleanup(lambda: self.assertEqual(server.stop(), 0,
                                                 server.output()))
        self.assertIn('each content once (dedup on)', server.output())
        writer = self.open_db(address, f'blob-dir {self.path("writer")}')
        with writer.transaction() as connection:
            connection.root()['a'] = Blob(POSTER)
            connection.root()['b'] = Blob(POSTER)
        pointers = []
        with writer.transaction() as connection:
            for name in 'ab':
                blob = connection.root()[name]
                blob._p_activate()
                pointers.append(blob_key(settings.prefix, blob._p_oid,
                                         blob._p_serial))
        # One content, a pointer at each revision's key.
        self.assertEqual(sorted(self.keys(settings)), sorted(
            [content_key(settings.prefix, digest_bytes(POSTER)),
             *pointers]))
        # The reader's configuration file reaches the bucket through a
        # proxy that counts its requests.
        proxy = FaultProxy(tuple(S3_SERVER.address)).start()
        self.addCleanup(proxy.stop)
        lines = '\n'.join(f'    {line}' for line in s3_lines(
            settings, **{'endpoint-url': 'http://%s:%d' % proxy.address}))
        config = self.config_file('reader.conf', (
            f'%import zodbblob\n<zodb>\n  <zodbblobclient>\n'
            f'    server {address[0]}:{address[1]}\n'
            f'    wait-timeout 30\n'
            f'    blob-dir {self.path("reader")}\n{lines}\n'
            f'  </zodbblobclient>\n</zodb>\n'))
        reader = ZODB.config.databaseFromURL(config)
        self.addCleanup(reader.close)
        requests = reader.storage.object_store.requests
        requests.clear()
        before = proxy.requests
        with reader.transaction() as connection:
            for name in 'ab':
                with connection.root()[name].open() as f:
                    self.assertEqual(f.read(), POSTER)
        # Each blob: its pointer, then the content it names; all through
        # the proxy, none through the server's sendBlob.
        self.assertEqual(requests['GetObject'], 4)
        self.assertEqual(proxy.requests - before, 4)


@unittest.skipIf(S3_MISSING, S3_MISSING)
class ConfigDedupTests(unittest.TestCase):

    layer = S3_SERVER

    def setUp(self):
        import shutil
        import tempfile
        self.dir = tempfile.mkdtemp(prefix='zodbblob-config-dedup-')
        self.addCleanup(shutil.rmtree, self.dir, True)

    def config(self, settings, dedup):
        path = os.path.join(self.dir, f'zodb-{dedup}.conf')
        with open(path, 'w') as f:
            f.write(f'%import zodbblob\n<zodb>\n<zodbblob>\n'
                    f'  blob-dir {os.path.join(self.dir, "blobs")}\n'
                    f'{"  dedup on" if dedup else ""}\n'
                    f'{s3_section(settings)}'
                    f'  <filestorage>\n'
                    f'    path {os.path.join(self.dir, "Data.fs")}\n'
                    f'  </filestorage>\n</zodbblob>\n</zodb>\n')
        return path

    def test_dedup_on_with_s3_in_a_zodbblob_section(self):
        settings = S3_SERVER.make_bucket(prefix='site')
        storage = storage_from_file(self.config(settings, True))
        self.assertTrue(storage.dedup)
        db = ZODB.DB(storage)
        with db.transaction() as connection:
            connection.root()['a'] = Blob(POSTER)
        with db.transaction() as connection:
            connection.root()['b'] = Blob(POSTER)
        db.close()
        bucket = Bucket(settings)
        self.addCleanup(bucket.client.close)
        keys = [key for key, size in bucket.iter_keys()
                if not key.endswith('.json')]
        self.assertEqual(len(keys), 3)   # two pointers, one content
        self.assertIn(content_key(settings.prefix, digest_bytes(POSTER)),
                      keys)
        # The same file without dedup: refused in one line.
        with self.assertRaises(BlobStorageError) as raised:
            storage_from_file(self.config(settings, False))
        self.assertIn('by content', str(raised.exception))
        self.assertNotIn('\n', str(raised.exception))


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
