"""Whose a bucket's prefix is (``storage/binding.py``): a prefix belongs
to one database, named by the marker the first open writes; against
moto's S3 server (a real process on 127.0.0.1)."""

import gc
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import warnings

import ZODB
import ZODB.FileStorage
from ZODB.blob import Blob

from zodbblob import BlobStorage
from zodbblob.storage import BlobStorageError, open_filestorage
from zodbblob.storage.binding import MARKER
from zodbblob.testing import S3_MISSING, S3_SERVER

if not S3_MISSING:
    from zodbblob.objectstore import Bucket


class BindingTestCase(unittest.TestCase):

    layer = S3_SERVER

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-binding-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.settings = self.layer.make_bucket(prefix='site')
        self.bucket = Bucket(self.settings)
        self.addCleanup(self.bucket.client.close)

    def path(self, *names):
        return os.path.join(self.dir, *names)

    def open(self, name='site', **kw):
        kw.setdefault('object_store', self.settings)
        return open_filestorage(self.path(name, 'Data.fs'),
                                self.path(name, 'blobs'), **kw)

    def commit(self, data, name='site', **kw):
        os.makedirs(self.path(name), exist_ok=True)
        db = ZODB.DB(self.open(name, **kw))
        try:
            with db.transaction() as connection:
                connection.root()['blob'] = Blob(data)
        finally:
            db.close()

    def read(self, name='site', **kw):
        db = ZODB.DB(self.open(name, **kw))
        try:
            with db.transaction() as connection:
                with connection.root()['blob'].open() as f:
                    return f.read()
        finally:
            db.close()

    def keys(self):
        return sorted(key for key, size in self.bucket.iter_keys())

    def assertRefused(self, said, name='site', **kw):
        with self.assertRaises(BlobStorageError) as raised:
            self.open(name, **kw)
        message = str(raised.exception)
        self.assertIn(said, message)
        self.assertNotIn('\n', message)
        return message



@unittest.skipIf(S3_MISSING, S3_MISSING)
class BindingTests(BindingTestCase):

    def test_a_new_storage_on_a_used_prefix_is_refused_changing_nothing(self):
        self.commit(b'production')
        keys = self.keys()
        os.mkdir(self.path('staging'))
        self.assertRefused('belongs to another database', 'staging')
        self.assertEqual(os.listdir(self.path('staging')), [])
        # A prefix with objects but no marker (another program's): too.
        other = self.layer.make_bucket(prefix='p')
        Bucket(other).put_bytes('p/someone-elses.txt', b'x')
        self.assertRefused('holds objects already', 'staging',
                           object_store=other)
        self.assertEqual(os.listdir(self.path('staging')), [])
        self.assertEqual(self.keys(), keys)
        self.assertEqual(self.read(), b'production')

    def test_a_copied_site_keeps_its_copy_of_the_catalog_and_is_refused(self):
        # A copy made with cp -a has the same catalog, and its id: it is
        # refused where its marker is another's.
        self.commit(b'production')
        shutil.copytree(self.path('site'), self.path('copy'))
        other = self.layer.make_bucket(prefix='site')
        # The copy pointed at a new, empty bucket: refused (its catalog
        # is bound to the first), never adopting it silently.
        self.assertRefused('keeps its blobs in s3://' + self.settings.bucket,
                           'copy', object_store=other)
        self.assertEqual(Bucket(other).head('site/' + MARKER), None)

    def test_a_lost_marker_is_refused_at_every_open(self):
        self.commit(b'bytes')
        self.bucket.delete(['site/' + MARKER])
        for read_only in (False, True):
            with self.subTest(read_only=read_only):
                self.assertRefused('has no marker', read_only=read_only)

    def test_a_marker_that_is_no_marker_is_refused(self):
        self.commit(b'bytes')
        for garbage in (b'\xff\xfe not json', b'[1, 2]',
                        b'{"database": 7}', b''):
            with self.subTest(marker=garbage):
                self.bucket.put_bytes('site/' + MARKER, garbage)
                self.assertRefused('belongs to another database (its '
                                   'marker site/.zodbblob.json names None')
        # A new storage on that prefix is refused as well.
        os.mkdir(self.path('new'))
        self.assertRefused('belongs to another database', 'new')
        self.assertEqual(os.listdir(self.path('new')), [])
        # One too large to be a marker is not read into memory.
        self.bucket.put_bytes('site/' + MARKER, b' ' * (1 << 20))
        self.assertRefused('larger than 65536 bytes')
        self.assertRefused('larger than 65536 bytes', 'new')
        self.assertEqual(os.listdir(self.path('new')), [])

    def test_read_only_opens_check_the_binding_too(self):
        self.commit(b'right bytes')
        other = self.layer.make_bucket(prefix='site')
        self.assertRefused('not in s3://' + other.bucket, read_only=True,
                           object_store=other)
        again = self.layer.settings(self.settings.bucket, prefix='elsewhere')
        self.assertRefused('not in s3://', read_only=True,
                           object_store=again)
        self.assertEqual(self.read(), b'right bytes')

    def test_a_refused_read_only_open_closes_the_file_it_opened(self):
        self.commit(b'bytes')
        self.bucket.delete(['site/' + MARKER])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always', ResourceWarning)
            self.assertRefused('has no marker', read_only=True)
            gc.collect()   # a file left open warns when it is collected
        self.assertEqual([str(w.message) for w in caught
                          if issubclass(w.category, ResourceWarning)], [])

    def test_a_cache_that_cannot_be_made_is_one_line(self):
        self.commit(b'bytes')
        cache = self.path('site', 'blobs', '.zodbblob', 'cache')
        shutil.rmtree(cache)
        with open(cache, 'w') as f:   # where the cache's directory goes
            f.write('not a directory')
        for read_only in (True, False):
            with self.subTest(read_only=read_only):
                self.assertRefused('Cannot open the blob cache ' + cache,
                                   read_only=read_only)

    def test_local_files_without_a_catalog_are_not_put_on_a_bucket(self):
        os.mkdir(self.path('stock'))
        storage = ZODB.FileStorage.FileStorage(
            self.path('stock', 'Data.fs'), blob_dir=self.path('stock',
                                                              'blobs'))
        db = ZODB.DB(storage)
        with db.transaction() as connection:
            connection.root()['blob'] = Blob(b'stock file')
        db.close()
        self.assertRefused('holds blob files of its own', 'stock')
        self.assertEqual(self.keys(), [])
        self.assertEqual(self.read('stock', object_store=None),
                         b'stock file')

    def test_wrong_cache_sizes_and_object_stores_are_refused(self):
        os.mkdir(self.path('new'))
        for value in (0, -1, '10MB', 1.5, True):
            with self.subTest(cache_size=value):
                self.assertRefused('cache_size', 'new', cache_size=value)
        for value in ('s3://bucket/prefix', {'bucket': 'b'}):
            with self.subTest(object_store=value):
                self.assertRefused('object_store', 'new',
                                   object_store=value)
        self.assertEqual(os.listdir(self.path('new')), [])
        base = ZODB.FileStorage.FileStorage(self.path('new', 'Data.fs'))
        self.addCleanup(base.close)   # the caller's to close
        with self.assertRaises(BlobStorageError):
            BlobStorage(self.path('new', 'blobs'), base,
                        object_store=self.settings, cache_size=-5)
        self.assertFalse(os.path.exists(self.path('new', 'blobs')))

    def test_migrate_into_a_used_prefix_is_refused(self):
        self.commit(b'production')
        self.commit(b'local', 'local', object_store=None)
        done = subprocess.run(
            [sys.executable, '-m', 'zodbblob.cli', 'migrate', '--quiet',
             '--s3-endpoint-url', self.layer.endpoint_url,
             '--s3-region', 'us-east-1', self.path('local', 'blobs'),
             f's3://{self.settings.bucket}/site'],
            capture_output=True, text=True, timeout=300,
            env=dict(os.environ, AWS_ACCESS_KEY_ID='testing',
                     AWS_SECRET_ACCESS_KEY='testing'))
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn('belongs to another database', done.stderr)
        self.assertEqual(self.read('local', object_store=None), b'local')
        self.assertEqual(self.read(), b'production')


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
