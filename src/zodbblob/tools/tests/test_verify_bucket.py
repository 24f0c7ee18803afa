"""verify of a storage whose blobs live in a bucket (moto's S3 server,
a real process on 127.0.0.1): the catalog and the base's records
against a listing of the bucket, and with checksum, the objects' bytes."""

import os
import shutil
import tempfile
import time
import unittest

import ZODB
from ZODB.blob import Blob

from zodbblob.objectstore import blob_key
from zodbblob.storage import open_filestorage
from zodbblob.testing import S3_MISSING, S3_SERVER
from zodbblob.tools import verifybucket
from zodbblob.tools.verify import verify

if not S3_MISSING:
    from zodbblob.objectstore import Bucket


@unittest.skipIf(S3_MISSING, S3_MISSING)
class VerifyBucketTests(unittest.TestCase):

    layer = S3_SERVER

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-verify-bucket-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.settings = self.layer.make_bucket(prefix='site')
        self.bucket = Bucket(self.settings)
        self.addCleanup(self.bucket.client.close)
        db = ZODB.DB(self.open())
        self.oids = {}
        for name in ('a', 'b', 'c'):
            with db.transaction() as connection:
                connection.root()[name] = Blob(name.encode() * 1000)
        self.tids = {}
        with db.transaction() as connection:
            for name in 'abc':
                connection.root()[name]._p_activate()
                self.oids[name] = connection.root()[name]._p_oid
                self.tids[name] = connection.root()[name]._p_serial
        db.close()

    def open(self, read_only=False):
        return open_filestorage(os.path.join(self.dir, 'Data.fs'),
                                os.path.join(self.dir, 'blobs'),
                                object_store=self.settings,
                                read_only=read_only)

    def key(self, name):
        return blob_key(self.settings.prefix, self.oids[name],
                        self.tids[name])

    def verify(self, checksum=False, read_only=True):
        storage = self.open(read_only=read_only)
        try:
            return verify(storage, checksum=checksum)
        finally:
            storage.close()

    def put(self, key, data):
        self.bucket.client.put_object(Bucket=self.settings.bucket, Key=key,
                                      Body=data)

    def test_a_clean_bucket(self):
        report = self.verify(checksum=True)
        self.assertTrue(report.clean, report.lines())
        self.assertEqual((report.records, report.files), (3, 3))
        self.assertEqual(report.unrecorded, 0)
        self.assertIn('3 blob records, 3 blob files, clean',
                      report.lines()[-1])

    def test_missing_orphaned_and_resized_objects(self):
        self.bucket.delete([self.key('a')])
        self.put(self.key('b'), b'short')
        stray = blob_key(self.settings.prefix, b'\0' * 7 + b'\x63',
                         self.tids['c'])
        self.put(stray, b'nobody')
        self.put(self.settings.prefix + 'notes.txt', b'not a blob')
        report = self.verify()
        self.assertFalse(report.clean)
        bucket = f's3://{self.settings.bucket}/'
        self.assertEqual(report.missing, [
            (self.oids['a'], self.tids['a'], bucket + self.key('a'))])
        self.assertEqual(sorted(report.orphans), sorted([
            bucket + stray, bucket + self.settings.prefix + 'notes.txt']))
        self.assertEqual(report.size_mismatches,
                         [(bucket + self.key('b'), 1000, 5)])

    def test_a_nested_prefix_is_anothers_and_a_future_tid_an_orphan(self):
        # Another store's prefix below this one: not this store's keys.
        self.put(self.settings.prefix + 'staging/' + self.key('a')[5:],
                 b'staging')
        # A key whose tid is after the last transaction: with no storage
        # running, nothing can be committing it.
        future = blob_key(self.settings.prefix, self.oids['a'],
                          b'\x7f' + b'\xff' * 7)
        self.put(future, b'stray')
        report = self.verify()
        self.assertEqual(report.orphans,
                         [f's3://{self.settings.bucket}/{future}'])
        self.assertEqual(report.files, 4)

    def test_a_same_size_corruption_is_found_by_checksum_only(self):
        self.put(self.key('c'), b'x' * 1000)
        self.assertTrue(self.verify().clean)
        report = self.verify(checksum=True)
        [(oid, tid, where, expected, actual)] = report.checksum_mismatches
        self.assertEqual((oid, tid), (self.oids['c'], self.tids['c']))
        self.assertTrue(where.endswith(self.key('c')))
        self.assertIn('checksum mismatch', '\n'.join(report.lines()))
        # The temporary files of the downloads are gone.
        self.assertEqual(os.listdir(os.path.join(self.dir, 'blobs', 'tmp')),
                         [])

    def test_a_pack_beside_a_verify_is_not_damage(self):
        storage = self.open()   # the live storage, holding the lock
        db = ZODB.DB(storage)
        self.addCleanup(db.close)
        with db.transaction() as connection:
            connection.root()['c'] = Blob(b'the next revision')
        reader = self.open(read_only=True)
        self.addCleanup(reader.close)
        # The pack runs once the listing has begun (a key a page): the
        # records were read before it, the later pages after it.
        self.patch(verifybucket, 'LIST_PAGE', 1)

        def progress(done, total):
            if done == 1:
                db.pack(time.time() + 1)
        report = verify(reader, progress=progress)
        self.assertEqual((report.missing, report.orphans), ([], []))
        self.assertTrue(report.packed_meanwhile)
        self.assertIn('a pack ran beside this verify',
                      '\n'.join(report.lines()))

    def patch(self, module, name, value):
        self.addCleanup(setattr, module, name, getattr(module, name))
        setattr(module, name, value)

def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
