"""zodbblob.tools.verify: what a damaged blob directory reports."""

import os
import shutil
import tempfile
import unittest

import ZODB
import ZODB.FileStorage
from ZODB.blob import Blob

from zodbblob import BlobStorage
from zodbblob.tools.verify import verify


class VerifyTests(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-verify-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.blob_dir = os.path.join(self.dir, 'blobs')
        db = ZODB.DB(self.open())
        with db.transaction() as conn:
            for i in range(5):
                conn.root()['b%d' % i] = Blob(b'%d' % i * 1000)
        with db.transaction() as conn:
            with conn.root()['b0'].open('w') as f:
                f.write(b'changed')
            blob = conn.root()['b1']
            blob._p_activate()
            self.b1 = blob._p_oid, blob._p_serial
        db.close()
        self.storage = self.open(read_only=True)
        self.addCleanup(self.storage.close)

    def open(self, **kw):
        return BlobStorage(self.blob_dir, ZODB.FileStorage.FileStorage(
            os.path.join(self.dir, 'Data.fs'), **kw))

    def path_of_b1(self):
        return self.storage.fshelper.getBlobFilename(*self.b1)

    def test_clean_store_is_clean(self):
        report = verify(self.storage, checksum=True)
        self.assertTrue(report.clean, report.lines())
        self.assertEqual((report.records, report.files), (6, 6))
        self.assertIn('clean', report.lines()[-1])

    def test_missing_file_is_reported_with_its_path(self):
        os.remove(self.path_of_b1())
        report = verify(self.storage)
        self.assertFalse(report.clean)
        self.assertEqual([path for oid, tid, path in report.missing],
                         [self.path_of_b1()])
        self.assertIn(self.path_of_b1(), report.lines()[0])

    def test_orphan_file_is_reported(self):
        oid, tid = self.b1
        orphan = self.storage.fshelper.getBlobFilename(oid, b'\0' * 7 + b'9')
        with open(orphan, 'wb') as f:
            f.write(b'nobody knows me')
        report = verify(self.storage)
        self.assertEqual(report.orphans, [orphan])

    def test_truncated_file_is_a_size_mismatch(self):
        path = self.path_of_b1()
        os.chmod(path, 0o644)
        with open(path, 'r+b') as f:
            f.truncate(10)
        report = verify(self.storage)
        self.assertEqual(report.size_mismatches, [(path, 1000, 10)])

    def test_dangling_link_is_reported_as_no_regular_file(self):
        path = self.path_of_b1()
        os.remove(path)
        os.symlink(os.path.join(self.dir, 'gone'), path)
        report = verify(self.storage, checksum=True)
        self.assertEqual(report.not_files, [(path, 'a symbolic link')])
        self.assertEqual(report.unreadable, [])

    def test_verify_writes_nothing(self):
        def snapshot():
            return sorted((dirpath, sorted(files)) for dirpath, dirs, files
                          in os.walk(self.dir))
        before = snapshot()
        verify(self.storage, checksum=True)
        self.assertEqual(snapshot(), before)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
