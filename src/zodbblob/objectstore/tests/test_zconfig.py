"""The <s3> ZConfig section, in <zodbblob> and <zodbblobclient>, read
from real configuration text by ZODB's schema."""

import io
import os
import shutil
import tempfile
import unittest

import ZConfig
import ZODB
import ZODB.config
import transaction
from ZODB.blob import Blob

from zodbblob.objectstore import ObjectStoreSettings
from zodbblob.testing import S3_MISSING, S3_SERVER



class TemporaryDirectory:

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix='zodbblob-s3-config-')
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)

    def path(self, *names):
        return os.path.join(self.directory, *names)

    def storage_text(self, s3='', keys=''):
        return (f'%import zodbblob\n'
                f'<zodbblob>\n'
                f'  blob-dir {self.path("blobs")}\n'
                f'  {keys}\n'
                f'  <filestorage>\n'
                f'    path {self.path("Data.fs")}\n'
                f'  </filestorage>\n'
                f'{s3}'
                f'</zodbblob>\n')

    def load(self, text):
        root, _ = ZConfig.loadConfigFile(
            ZODB.config.getStorageSchema(), io.StringIO(text))
        return root.storage

    def assertRefused(self, text, *fragments):
        with self.assertRaises(ZConfig.ConfigurationError) as caught:
            self.load(text)
        message = str(caught.exception)
        self.assertNotIn('\n', message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertEqual(os.listdir(self.directory), [])
        return message


def s3_text(*lines):
    body = ''.join(f'    {line}\n' for line in lines)
    return f'  <s3>\n{body}  </s3>\n'


class StorageSectionTests(TemporaryDirectory, unittest.TestCase):
    """<s3> in <zodbblob>: the settings the storage is given."""

    def test_every_key_reaches_the_settings(self):
        factory = self.load(self.storage_text(
            s3_text('bucket zodb-blobs', 'prefix site',
                    'endpoint-url http://minio.example:9000',
                    'region eu-west-1', 'access-key-id AKIA',
                    'secret-access-key s3cr3t', 'addressing-style virtual',
                    'connect-timeout 2.5', 'read-timeout 2m',
                    'attempts 7'),
            keys='cache-size 2GB'))
        self.assertEqual(factory.config.object_store, ObjectStoreSettings(
            'zodb-blobs', prefix='site/',
            endpoint_url='http://minio.example:9000', region='eu-west-1',
            access_key_id='AKIA', secret_access_key='s3cr3t',
            addressing_style='virtual', connect_timeout=2.5,
            read_timeout=120.0, attempts=7))
        self.assertEqual(factory.config.cache_size, 2 << 30)
        self.assertEqual(factory._options(), {
            'scrub': True, 'object_store': factory.config.object_store,
            'cache_size': 2 << 30})

    def test_a_bucket_alone_takes_the_settings_defaults(self):
        factory = self.load(self.storage_text(s3_text('bucket zodb-blobs')))
        self.assertEqual(factory.config.object_store,
                         ObjectStoreSettings('zodb-blobs'))
        self.assertIsNone(factory.config.cache_size)

    def test_each_wrong_value_is_refused_naming_its_key(self):
        for line, fragments in [
                ('prefix /zodb', ['prefix', "'/zodb'"]),
                ('prefix zodb/../other', ['prefix', "'zodb/../other'"]),
                ('addressing-style hosted', ['addressing-style', "'hosted'",
                                             'path']),
                ('connect-timeout 0', ['connect-timeout', "'0'"]),
                ('connect-timeout soon', ['connect-timeout', "'soon'"]),
                ('read-timeout -1', ['read-timeout', "'-1'"]),
                ('read-timeout inf', ['read-timeout', "'inf'"]),
                ('attempts 0', ['attempts', "'0'"]),
                ('attempts many', ['attempts', "'many'"]),
                ('access-key-id AKIA', ['access-key-id', 'secret-access-key']),
                ('secret-access-key s3cr3t', ['secret-access-key',
                                              'access-key-id'])]:
            with self.subTest(line=line):
                message = self.assertRefused(self.storage_text(
                    s3_text('bucket zodb-blobs', line)), *fragments)
                self.assertNotIn('s3cr3t', message)

    def test_a_section_without_a_bucket_is_refused(self):
        self.assertRefused(self.storage_text(s3_text('prefix zodb')),
                           'bucket')

    def test_two_s3_sections_are_refused(self):
        self.assertRefused(self.storage_text(
            s3_text('bucket one') + s3_text('bucket two')), 's3')

    def test_cache_size_without_s3_is_refused(self):
        self.assertRefused(self.storage_text(keys='cache-size 1GB'),
                           'cache-size', 'needs an <s3> section',
                           self.path('blobs'))

    def test_negative_cache_size_is_refused(self):
        self.assertRefused(self.storage_text(
            s3_text('bucket zodb-blobs'), keys='cache-size -1'),
            'cache-size -1')

    def test_a_config_without_s3_opens_as_before(self):
        # The storage is given no object store keyword at all: on a
        # storage without them, passing even None would fail here.
        factory = self.load(self.storage_text())
        self.assertIsNone(factory.config.object_store)
        self.assertEqual(factory._options(), {'scrub': True})
        db = ZODB.DB(factory.open())
        try:
            with db.transaction() as connection:
                connection.root()['blob'] = Blob(b'as before')
            with db.transaction() as connection:
                with connection.root()['blob'].open() as f:
                    self.assertEqual(f.read(), b'as before')
        finally:
            transaction.abort()
            db.close()


class ClientSectionTests(TemporaryDirectory, unittest.TestCase):
    """<s3> in <zodbblobclient>, refused where a client cannot use it."""

    def client_text(self, *lines):
        body = ''.join(f'  {line}\n' for line in lines)
        return (f'%import zodbblob\n<zodbblobclient>\n'
                f'  server 127.0.0.1:1\n{body}'
                f'{s3_text("bucket zodb-blobs", "prefix site")}'
                f'</zodbblobclient>\n')

    def test_the_client_section_takes_the_settings(self):
        factory = self.load(self.client_text(
            f'blob-dir {self.path("cache")}'))
        self.assertEqual(factory.config.object_store,
                         ObjectStoreSettings('zodb-blobs', prefix='site/'))

    def test_without_blob_dir_it_is_refused(self):
        self.assertRefused(self.client_text(), '<s3>', "'zodb-blobs'",
                           'blob-dir')

    def test_with_shared_blob_dir_it_is_refused(self):
        self.assertRefused(self.client_text(
            f'blob-dir {self.path("shared")}', 'shared-blob-dir on'),
            '<s3>', 'shared-blob-dir')


@unittest.skipIf(S3_MISSING, S3_MISSING)
class OpenedStorageTests(TemporaryDirectory, unittest.TestCase):
    """A <zodbblob> with <s3> opens a storage that commits to the bucket."""

    layer = S3_SERVER

    def test_a_committed_blob_is_in_the_bucket(self):
        from zodbblob.objectstore import Bucket, blob_key
        settings = self.layer.make_bucket(prefix='zodb')
        s3 = s3_text(*[f'{key} {getattr(settings, field)}' for key, field in
                       [('bucket', 'bucket'), ('prefix', 'prefix'),
                        ('endpoint-url', 'endpoint_url'),
                        ('region', 'region'),
                        ('access-key-id', 'access_key_id'),
                        ('secret-access-key', 'secret_access_key')]])
        db = ZODB.DB(self.load(self.storage_text(
            s3, keys='cache-size 10MB')).open())
        try:
            with db.transaction() as connection:
                connection.root()['blob'] = Blob(b'in the bucket')
            with db.transaction() as connection:
                blob = connection.root()['blob']
                blob._p_activate()
                oid, serial = blob._p_oid, blob._p_serial
        finally:
            db.close()
        bucket = Bucket(settings)
        self.addCleanup(bucket.client.close)
        self.assertEqual(bucket.head(blob_key(settings.prefix, oid, serial)),
                         len(b'in the bucket'))
