"""A ZEO client with <s3> reads committed blobs from the bucket.

Real parts: a ``zodbblob serve`` process (its storage keeps blobs in its
blob directory, as any ZEO server's), moto's S3-API server process, and
clients opened from ZConfig text.  The tests put objects into the bucket
themselves, under the key of a blob committed through the server, with
bytes other than the server's: what a reader reads says where it came
from.  Requests are counted by the client's bucket (``Bucket.requests``).
"""

import dataclasses
import logging
import hashlib
import os
import subprocess
import sys
import shutil
import tempfile
import threading
import time
import unittest

import ZODB.config
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.POSException import StorageError

import zodbblob.zeo
from zodbblob.cli import format_address
from zodbblob.faults import PASS, REFUSE, FaultProxy
from zodbblob.objectstore import ObjectStoreSettings, blob_key
from zodbblob.objectstore.tests.test_errors import REFUSING_S3_SERVER
from zodbblob.testing import (S3_MISSING, S3_SERVER, ZEO_SERVER, _Layer,
                              ServerProcess, free_port, serve_command)

if not S3_MISSING:
    from zodbblob.objectstore import Bucket

# Both servers, for the tests that read what a ZEO server committed.
S3_AND_ZEO_SERVERS = _Layer('S3_AND_ZEO_SERVERS', __name__)
S3_AND_ZEO_SERVERS.__bases__ = (S3_SERVER, ZEO_SERVER)


def counted(bucket):
    """`bucket`'s request counts by operation (a retry counts), from 0."""
    bucket.requests.clear()
    return bucket.requests


def s3_lines(settings, **overrides):
    values = {'bucket': settings.bucket, 'prefix': settings.prefix,
              'endpoint-url': settings.endpoint_url,
              'region': settings.region,
              'access-key-id': settings.access_key_id,
              'secret-access-key': settings.secret_access_key,
              # Bounded, so that a test of a store that is down is short.
              'attempts': '2', 'connect-timeout': '2', 'read-timeout': '10'}
    values.update(overrides)
    return ['<s3>', *(f'  {key} {value}' for key, value in values.items()),
            '</s3>']


class ClientTests:

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix='zodbblob-zeo-bucket-')
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)

    def path(self, *names):
        return os.path.join(self.directory, *names)

    def serve(self, *options):
        """``zodbblob serve --s3-*`` on a fresh bucket (prefix site), its
        credentials in its environment, as they should reach it:
        ``(settings, address, started ServerProcess)``."""
        settings = S3_SERVER.make_bucket(prefix='site')
        address = ('127.0.0.1', free_port())
        os.mkdir(self.path('server'))
        server = ServerProcess(
            serve_command('--address', format_address(address),
                          '--var', self.path('server', 'var'),
                          '--s3-bucket', settings.bucket,
                          '--s3-prefix', 'site',
                          '--s3-endpoint-url', settings.endpoint_url,
                          '--s3-region', settings.region, *options),
            address, cwd=self.path('server'),
            log_path=self.path('server', 'server.log'),
            env={'AWS_ACCESS_KEY_ID': settings.access_key_id,
                 'AWS_SECRET_ACCESS_KEY': settings.secret_access_key})
        server.start()
        return settings, address, server

    def open_db(self, address, *lines):
        body = ''.join(f'    {line}\n' for line in lines)
        db = ZODB.config.databaseFromString(
            f'%import zodbblob\n<zodb>\n  <zodbblobclient>\n'
            f'    server {format_address(address)}\n'
            f'    wait-timeout 30\n{body}'
            f'  </zodbblobclient>\n</zodb>\n')
        self.addCleanup(db.close)
        return db


@unittest.skipIf(S3_MISSING, S3_MISSING)
class BucketReadTests(ClientTests, unittest.TestCase):

    layer = S3_AND_ZEO_SERVERS

    def setUp(self):
        super().setUp()
        self.settings = S3_SERVER.make_bucket(prefix='zodb')
        self.bucket = Bucket(self.settings)
        self.addCleanup(self.bucket.client.close)
        self.writer = self.open_db(ZEO_SERVER.address,
                                   f'blob-dir {self.path("writer")}')

    def commit(self, data, name='blob'):
        """``(oid, serial)`` of a blob of `data` committed through ZEO."""
        with self.writer.transaction() as connection:
            connection.root()[name] = Blob(data)
        return self.ids(self.writer, name)

    def ids(self, db, name):
        """``(oid, serial)`` of the blob at `name`, as a reader loads it."""
        with db.transaction() as connection:
            blob = connection.root()[name]
            blob._p_activate()
            return blob._p_oid, blob._p_serial

    def put(self, oid, serial, data):
        """Put `data` into the bucket as the blob ``(oid, serial)``."""
        with open(self.path('upload'), 'wb') as f:
            f.write(data)
        self.bucket.upload(self.path('upload'),
                           blob_key(self.settings.prefix, oid, serial))

    def open_reader(self, *lines, name='reader', settings=None):
        return self.open_db(ZEO_SERVER.address, f'blob-dir {self.path(name)}',
                            *s3_lines(settings or self.settings), *lines)

    def read(self, db, name='blob'):
        with db.transaction() as connection:
            with connection.root()[name].open() as f:
                return f.read()

    def test_a_blob_missing_from_the_cache_comes_from_the_bucket(self):
        oid, serial = self.commit(b'the server copy')
        self.put(oid, serial, b'the bucket copy')
        reader = self.open_reader()
        storage = reader.storage
        self.assertIsInstance(storage, zodbblob.zeo.ClientStorage)
        requests = counted(storage.object_store)
        self.assertEqual(self.read(reader), b'the bucket copy')
        self.assertEqual(requests['GetObject'], 1)
        # From the cache now: no request more.
        self.assertEqual(self.read(reader), b'the bucket copy')
        self.assertEqual(requests['GetObject'], 1)
        self.assertEqual(storage.blob_cache.stats()['misses'], 1)

    def test_readers_in_threads_download_a_blob_once(self):
        oid, serial = self.commit(b'x' * 1_000_000)
        self.put(oid, serial, b'y' * 1_000_000)
        reader = self.open_reader()
        requests = counted(reader.storage.object_store)
        start = threading.Barrier(4)
        read = []

        def read_in_a_thread():
            start.wait()
            read.append(self.read(reader))

        threads = [threading.Thread(target=read_in_a_thread)
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(read, [b'y' * 1_000_000] * 4)
        self.assertEqual(requests['GetObject'], 1)

    def test_a_key_missing_from_the_bucket_falls_back_to_the_server(self):
        first = self.commit(b'first, from the server', 'first')
        self.commit(b'second, from the server', 'second')
        reader = self.open_reader()
        with self.assertLogs('zodbblob.zeo', logging.WARNING) as logged:
            self.assertEqual(self.read(reader, 'first'),
                             b'first, from the server')
            self.assertEqual(self.read(reader, 'second'),
                             b'second, from the server')
        missing = [record.getMessage() for record in logged.records
                   if 'is not in bucket' in record.getMessage()]
        self.assertEqual(len(missing), 1, logged.output)
        self.assertIn(repr(blob_key(self.settings.prefix, *first)),
                      missing[0])

    def test_a_store_that_is_down_gives_one_line_then_reads_again(self):
        oid, serial = self.commit(b'the server copy')
        self.put(oid, serial, b'the bucket copy')
        proxy = FaultProxy(S3_SERVER.address).start()
        self.addCleanup(proxy.stop)
        reader = self.open_reader(settings=dataclasses.replace(
            self.settings, endpoint_url='http://%s:%d' % proxy.address))
        proxy.mode = REFUSE
        proxy.disconnect()
        with self.assertRaises(StorageError) as caught:
            self.read(reader)
        message = str(caught.exception)
        self.assertNotIn('\n', message)
        self.assertIn(repr(self.settings.bucket), message)
        self.assertIn(repr(blob_key(self.settings.prefix, oid, serial)),
                      message)
        self.assertIn('cannot connect', message)
        self.assertNotIn('botocore', message)
        # The failed download left nothing claimed: back up, it is read.
        proxy.mode = PASS
        self.assertEqual(self.read(reader), b'the bucket copy')

    def test_writes_still_go_through_the_server(self):
        reader = self.open_reader()
        with reader.transaction() as connection:
            connection.root()['written'] = Blob(b'written by reader')
        key = blob_key(self.settings.prefix, *self.ids(reader, 'written'))
        self.assertIsNone(self.bucket.head(key))
        other = self.open_db(ZEO_SERVER.address,
                             f'blob-dir {self.path("other")}')
        self.assertEqual(self.read(other, 'written'), b'written by reader')

    def test_a_client_without_s3_reads_from_the_server_as_before(self):
        oid, serial = self.commit(b'the server copy')
        self.put(oid, serial, b'the bucket copy')
        plain = self.open_db(ZEO_SERVER.address,
                             f'blob-dir {self.path("plain")}')
        self.assertIsNone(plain.storage.object_store)
        self.assertEqual(self.read(plain), b'the server copy')


@unittest.skipIf(S3_MISSING, S3_MISSING)
class BucketCheckedAtOpenTests(ClientTests, unittest.TestCase):
    """A bucket that cannot be read: one line, and no blob-dir made.  No
    ZEO server is needed: the bucket is checked before connecting."""

    layer = S3_SERVER

    def assertRefused(self, settings, *fragments, **overrides):
        with self.assertRaises(StorageError) as caught:
            self.open_db(('127.0.0.1', 1), f'blob-dir {self.path("cache")}',
                         *s3_lines(settings, **overrides))
        message = str(caught.exception)
        self.assertNotIn('\n', message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertEqual(os.listdir(self.directory), [])

    def test_a_missing_bucket_is_refused(self):
        self.assertRefused(self.layer.settings('never-made'),
                           "'never-made'", 'no such bucket')

    def test_an_unreachable_endpoint_is_refused(self):
        endpoint = f'http://127.0.0.1:{free_port()}'
        self.assertRefused(self.layer.settings('any', endpoint_url=endpoint),
                           endpoint, 'cannot connect', attempts='1')


# Nobody listens on port 1: were the bucket ever asked, the test fails.
NOWHERE = ObjectStoreSettings('blobs', endpoint_url='http://127.0.0.1:1',
                              attempts=1)


class ObjectStoreArgumentTests(ClientTests, unittest.TestCase):
    """zodbblob.zeo.ClientStorage's object_store, refused before
    anything is made or connected to."""

    def assertRefused(self, *fragments, **options):
        with self.assertRaises(zodbblob.zeo.ClientStorageError) as caught:
            zodbblob.zeo.ClientStorage(('127.0.0.1', 1), wait_timeout=1,
                                       **options)
        for fragment in fragments:
            self.assertIn(fragment, str(caught.exception))
        self.assertEqual(os.listdir(self.directory), [])

    def test_without_blob_dir_it_is_refused(self):
        self.assertRefused('object_store', 'blob_dir',
                           object_store=NOWHERE)

    def test_with_shared_blob_dir_it_is_refused(self):
        self.assertRefused('shared_blob_dir', blob_dir=self.path('shared'),
                           shared_blob_dir=True,
                           object_store=NOWHERE)

    @unittest.skipIf(S3_MISSING, S3_MISSING)
    def test_what_is_no_settings_nor_bucket_is_refused(self):
        self.assertRefused("'blobs'", 'ObjectStoreSettings',
                           blob_dir=self.path('cache'), object_store='blobs')


@unittest.skipIf(S3_MISSING, S3_MISSING)
class WrongCredentialsAtOpenTests(ClientTests, unittest.TestCase):

    layer = REFUSING_S3_SERVER

    def test_wrong_credentials_are_refused(self):
        with self.assertRaises(StorageError) as caught:
            self.open_db(('127.0.0.1', 1), f'blob-dir {self.path("cache")}',
                         *s3_lines(self.layer.settings('blobs')))
        message = str(caught.exception)
        self.assertNotIn('\n', message)
        self.assertIn('access denied', message)
        self.assertEqual(os.listdir(self.directory), [])


@unittest.skipIf(S3_MISSING, S3_MISSING)
class ServedBucketTests(ClientTests, unittest.TestCase):
    """``zodbblob serve --s3-*`` commits blobs to the bucket, and a
    client with <s3> reads them from there."""

    layer = S3_SERVER

    def test_a_client_reads_from_the_bucket_what_serve_committed(self):
        settings, address, server = self.serve('--s3-cache-size', '10MB')
        # Registered first, so run last: after the clients are closed.
        self.addCleanup(self.assertStopsCleanly, server)
        writer = self.open_db(address, f'blob-dir {self.path("writer")}')
        with writer.transaction() as connection:
            connection.root()['poster'] = Blob(b'POSTER' * 1000)
        with writer.transaction() as connection:
            poster = connection.root()['poster']
            poster._p_activate()
            key = blob_key(settings.prefix, poster._p_oid, poster._p_serial)
        bucket = Bucket(settings)
        self.addCleanup(bucket.client.close)
        self.assertEqual(bucket.head(key), 6000)
        reader = self.open_db(address, f'blob-dir {self.path("reader")}',
                              *s3_lines(settings))
        requests = counted(reader.storage.object_store)
        with reader.transaction() as connection:
            with connection.root()['poster'].open() as f:
                self.assertEqual(f.read(), b'POSTER' * 1000)
        self.assertEqual(requests['GetObject'], 1)
        # Its start said where the blobs are, before and after opening.
        output = server.output()
        self.assertIn(f"blobs in s3://{settings.bucket}/site/ (catalog and "
                      f"cache in ", output)
        self.assertIn(f"blobs in s3://{settings.bucket}/site/ at "
                      f"{settings.endpoint_url} (catalog and a cache of "
                      f"10485760 bytes in ", output)

    def assertStopsCleanly(self, server):
        status = server.stop()
        self.assertEqual(status, 0, server.output())


@unittest.skipIf(S3_MISSING, S3_MISSING)
class SharedCacheTests(ClientTests, unittest.TestCase):
    """8 reader processes share one cache directory and read from the
    bucket while a writer commits through a ZEO server on the bucket:
    every blob byte-exact in every reader, and each downloaded once,
    whichever reader asked first (counted at a proxy before moto)."""

    layer = S3_SERVER
    level = 2
    readers = 8
    blobs = 20

    def test_eight_readers_share_one_cache_while_a_writer_commits(self):
        settings, address, server = self.serve()
        self.addCleanup(server.stop)
        proxy = FaultProxy(tuple(S3_SERVER.address))
        proxy.start()
        self.addCleanup(proxy.stop)
        lines = s3_lines(settings, **{
            'endpoint-url': f'http://127.0.0.1:{proxy.address[1]}'})
        config = self.path('reader.conf')
        with open(config, 'w') as f:
            f.write('%import zodbblob\n<zodb>\n  <zodbblobclient>\n'
                    f'    server {format_address(address)}\n'
                    f'    blob-dir {self.path("shared-cache")}\n'
                    '    wait-timeout 60\n'
                    + ''.join(f'    {line}\n' for line in lines)
                    + '  </zodbblobclient>\n</zodb>\n')
        writer = self.open_db(address, f'blob-dir {self.path("writer")}')
        with writer.transaction() as connection:
            connection.root()['digests'] = PersistentMapping()
        readers = [subprocess.Popen(
            [sys.executable, '-m', 'zodbblob.tests.bucket_reader', config],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(self.readers)]
        for process in readers:
            self.addCleanup(process.kill)
        for number in range(self.blobs):
            data = os.urandom(1000 + number * 5000)
            with writer.transaction() as connection:
                root = connection.root()
                root[f'blob{number}'] = Blob(data)
                root['digests'][f'blob{number}'] = hashlib.sha256(
                    data).hexdigest()
            time.sleep(0.1)   # spread over the readers' reading
        with writer.transaction() as connection:
            connection.root()['done'] = True
        for process in readers:
            out, err = process.communicate(timeout=300)
            self.assertEqual((process.returncode, out.strip()),
                             (0, f'read {self.blobs}'), err[-2000:])
        # Each reader checked the bucket once at open (HeadBucket); each
        # blob was downloaded once (GetObject) for all of them.
        self.assertEqual(proxy.requests, self.readers + self.blobs)
