"""A store whose blobs can live in a bucket, for the tools' tests: made
in a temporary directory, with a fresh bucket of moto's server (a real
process on 127.0.0.1, ``zodbblob.testing.S3_SERVER``)."""

import hashlib
import os
import shutil
import tempfile
import unittest

import ZODB
from ZODB.blob import Blob

from zodbblob.storage import open_filestorage
from zodbblob.testing import S3_MISSING, S3_SERVER
from zodbblob.tools.verify import verify

if not S3_MISSING:
    from zodbblob.objectstore import Bucket

BUCKET = 'bucket'   # open with the test's bucket


@unittest.skipIf(S3_MISSING, S3_MISSING)
class BucketStoreTestCase(unittest.TestCase):
    """``self.dir`` holds ``Data.fs`` and ``blobs``; ``self.settings``
    reach a fresh bucket (prefix ``site``); `fill` commits blobs and
    remembers their bytes' digests, which `check` reads back."""

    layer = S3_SERVER

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-bucket-store-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.settings = self.layer.make_bucket(prefix='site')
        self.bucket = Bucket(self.settings)
        self.addCleanup(self.bucket.client.close)
        self.blobs = os.path.join(self.dir, 'blobs')
        self.expected = {}

    def open(self, directory=None, object_store=BUCKET, **options):
        directory = directory or self.dir
        if object_store == BUCKET:
            object_store = self.settings
        return open_filestorage(os.path.join(directory, 'Data.fs'),
                                os.path.join(directory, 'blobs'),
                                object_store=object_store, **options)

    def fill(self, contents, names, object_store=BUCKET):
        """Commit each of `contents` as the blob ``names[i % len]``, one
        transaction each; remember the last bytes of each name."""
        db = ZODB.DB(self.open(object_store=object_store))
        try:
            for number, data in enumerate(contents):
                with db.transaction() as connection:
                    connection.root()[names[number % len(names)]] = Blob(
                        data)
            with db.transaction() as connection:
                for name in names:
                    with connection.root()[name].open() as f:
                        self.expected[name] = hashlib.sha256(
                            f.read()).digest()
        finally:
            db.close()

    def check(self, storage, records=None):
        """Every remembered blob reads back its bytes through `storage`
        (closed after); verify --checksum is clean."""
        db = ZODB.DB(storage)
        try:
            with db.transaction() as connection:
                for name, digest in self.expected.items():
                    with connection.root()[name].open() as f:
                        self.assertEqual(
                            hashlib.sha256(f.read()).digest(), digest, name)
            report = verify(db.storage, checksum=True)
            self.assertTrue(report.clean, report.lines())
            if records is not None:
                self.assertEqual(report.records, records)
        finally:
            db.close()
