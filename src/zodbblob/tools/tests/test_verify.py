"""zodbblob.tools.verify: what a damaged blob directory reports."""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import ZODB
import ZODB.FileStorage
from ZODB.blob import Blob
from ZODB.utils import oid_repr

from zodbblob import BlobStorage
from zodbblob.tools.tests.test_readahead import open_blob_files
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


def damage(path, change):
    """Apply `change` to the open committed (read-only) file at `path`."""
    os.chmod(path, 0o644)
    with open(path, 'r+b') as f:
        change(f)
    os.chmod(path, 0o444)


class ChecksumTests(unittest.TestCase):
    """verify --checksum against the digests recorded at commit."""

    setUp = VerifyTests.setUp
    open = VerifyTests.open
    path_of_b1 = VerifyTests.path_of_b1

    def assert_mismatch_found(self, report, oid, tid):
        path = self.storage.fshelper.getBlobFilename(oid, tid)
        self.assertFalse(report.clean)
        self.assertIn((oid, tid, path),
                      [m[:3] for m in report.checksum_mismatches])
        line = [line for line in report.lines() if path in line
                and line.startswith('checksum mismatch')]
        self.assertEqual(len(line), 1, report.lines())
        self.assertIn(oid_repr(oid), line[0])
        self.assertIn(oid_repr(tid), line[0])

    def test_same_size_corruption_is_found(self):
        def flip(f):
            f.seek(500)
            f.write(b'X')
        damage(self.path_of_b1(), flip)
        self.assertTrue(verify(self.storage).clean)   # sizes agree
        report = verify(self.storage, checksum=True)
        self.assertEqual(report.size_mismatches, [])
        self.assert_mismatch_found(report, *self.b1)
        self.assertEqual(len(report.checksum_mismatches), 1)

    def test_truncation_is_found(self):
        damage(self.path_of_b1(), lambda f: f.truncate(10))
        report = verify(self.storage, checksum=True)
        self.assert_mismatch_found(report, *self.b1)

    def test_two_files_swapped_are_both_found(self):
        # b2 and b3: 1000 bytes each, so no size tells them apart.
        fshelper = self.storage.fshelper
        pairs = [(oid, tid) for oid, tid, path in fshelper.iter_blobs()
                 if os.path.getsize(path) == 1000 and (oid, tid) != self.b1]
        (a, b) = pairs[:2]
        path_a = fshelper.getBlobFilename(*a)
        path_b = fshelper.getBlobFilename(*b)
        os.rename(path_a, path_a + '.swap')
        os.rename(path_b, path_a)
        os.rename(path_a + '.swap', path_b)
        report = verify(self.storage, checksum=True)
        self.assertEqual(report.size_mismatches, [])
        self.assert_mismatch_found(report, *a)
        self.assert_mismatch_found(report, *b)

    def test_a_walk_stopped_by_an_error_leaves_no_file_open(self):
        # The files opened ahead are closed when the error leaves verify,
        # not when whoever caught it lets its traceback go.
        class Stop(Exception):
            pass

        def progress(done, total):
            raise Stop

        try:
            verify(self.storage, checksum=True, progress=progress)
        except Stop as e:
            caught = e   # its traceback keeps verify's frames
        else:
            self.fail('the walk went on')
        self.assertEqual(open_blob_files(), [])
        del caught

    def test_cli_exits_1_naming_the_file(self):
        damage(self.path_of_b1(), lambda f: f.write(b'Y'))
        self.storage.close()
        result = subprocess.run(
            [sys.executable, '-m', 'zodbblob.cli', 'verify', '--checksum',
             '--quiet', '--data', os.path.join(self.dir, 'Data.fs'),
             '--blob-dir', self.blob_dir],
            capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn('checksum mismatch: blob file of oid %s tid %s: %s'
                      % (oid_repr(self.b1[0]), oid_repr(self.b1[1]),
                         self.path_of_b1()), result.stdout)


class AdoptedChecksumTests(unittest.TestCase):
    """A stock blob directory has no digests; verify --checksum records
    them where it may write, and compares them from then on."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-verify-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.blob_dir = os.path.join(self.dir, 'blobs')
        self.data = os.path.join(self.dir, 'Data.fs')
        # ZODB's own FileStorage writes the directory.
        db = ZODB.DB(ZODB.FileStorage.FileStorage(self.data,
                                                  blob_dir=self.blob_dir))
        with db.transaction() as conn:
            for i in range(4):
                conn.root()['b%d' % i] = Blob(b'%d' % i * 100)
        db.close()

    def open(self, **kw):
        # Without the background scrubber, which would record the
        # digests too (storage/tests/test_scrub.py), whenever it gets to.
        storage = BlobStorage(self.blob_dir, ZODB.FileStorage.FileStorage(
            self.data, **kw), scrub=False)
        self.addCleanup(storage.close)
        return storage

    def test_adopted_directory_gets_digests_then_corruption_is_found(self):
        storage = self.open()
        report = verify(storage, checksum=True)
        self.assertTrue(report.clean, report.lines())
        self.assertEqual(report.unrecorded, 4)
        self.assertIn('note: 4 files have no recorded checksum yet; recorded '
                      'now', '\n'.join(report.lines()))
        again = verify(storage, checksum=True)
        self.assertEqual(again.unrecorded, 0)
        self.assertTrue(again.clean, again.lines())
        oid, tid, path = next(storage.fshelper.iter_blobs())
        damage(path, lambda f: f.write(b'!'))
        report = verify(storage, checksum=True)
        self.assertEqual([m[:3] for m in report.checksum_mismatches],
                         [(oid, tid, path)])

    def test_read_only_verify_records_nothing_and_says_so(self):
        self.open().close()   # adopts the directory: rows, no digests
        storage = self.open(read_only=True)
        report = verify(storage, checksum=True)
        self.assertEqual(report.unrecorded, 4)
        self.assertIn('they were not recorded: the storage is open '
                      'read-only', '\n'.join(report.lines()))
        self.assertEqual(verify(storage, checksum=True).unrecorded, 4)

    def test_cli_record_checksums_records_them(self):
        self.open().close()
        argv = [sys.executable, '-m', 'zodbblob.cli', 'verify', '--quiet',
                '--data', self.data, '--blob-dir', self.blob_dir]
        subprocess.run(argv + ['--record-checksums'], check=True,
                       capture_output=True, timeout=120)
        oid, tid, path = next(iter(self.open(read_only=True)
                                   .fshelper.iter_blobs()))
        damage(path, lambda f: f.write(b'!'))
        result = subprocess.run(argv + ['--checksum'], capture_output=True,
                                text=True, timeout=120)
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertIn('checksum mismatch: blob file of oid %s'
                      % oid_repr(oid), result.stdout)

    def test_a_file_of_wrong_size_gets_no_digest(self):
        storage = self.open()
        oid, tid, path = next(storage.fshelper.iter_blobs())
        damage(path, lambda f: f.truncate(3))
        report = verify(storage, checksum=True)
        self.assertEqual(len(report.size_mismatches), 1)
        self.assertIsNone(storage._shared.journal.digest(oid, tid))


class ContentCountTests(unittest.TestCase):
    """verify counts unique contents, and the bytes links save."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-verify-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.blob_dir = os.path.join(self.dir, 'blobs')

    def commit(self, dedup, **blobs):
        db = ZODB.DB(BlobStorage(self.blob_dir, ZODB.FileStorage.FileStorage(
            os.path.join(self.dir, 'Data.fs')), dedup=dedup))
        with db.transaction() as conn:
            for key, data in blobs.items():
                conn.root()[key] = Blob(data)
        db.close()

    def verify(self, checksum):
        storage = BlobStorage(self.blob_dir, ZODB.FileStorage.FileStorage(
            os.path.join(self.dir, 'Data.fs'), read_only=True))
        try:
            return verify(storage, checksum=checksum)
        finally:
            storage.close()

    def test_links_are_counted_with_the_bytes_they_save(self):
        self.commit(False, a=b'a' * 100, b=b'a' * 100)   # copies
        self.commit(True, c=b'a' * 100, d=b'a' * 100, e=b'e' * 10)
        report = self.verify(checksum=False)
        self.assertTrue(report.clean, report.lines())
        contents = report.contents
        self.assertEqual((contents.files, contents.links,
                          contents.link_bytes), (5, 2, 200))
        self.assertIsNone(contents.copies)
        self.assertEqual(report.lines()[-2], (
            'contents: 5 blob files, at most 3 unique contents (an inode '
            'each; --checksum counts them); links save 200 bytes'))

    def test_with_checksum_copies_that_are_not_links_are_counted(self):
        self.commit(False, a=b'a' * 100, b=b'a' * 100)
        self.commit(True, c=b'a' * 100, d=b'a' * 100, e=b'e' * 10)
        report = self.verify(checksum=True)
        contents = report.contents
        self.assertEqual((contents.copies, contents.copy_bytes,
                          contents.links), (3, 300, 2))
        self.assertEqual(report.lines()[-2], (
            'contents: 5 blob files, 2 unique contents (by BLAKE3-256); '
            'links save 200 bytes, 100 more bytes are copies of a content '
            'another file holds'))

    def test_a_store_of_distinct_contents_gets_no_line(self):
        self.commit(True, a=b'a', b=b'b')
        for checksum in (False, True):
            report = self.verify(checksum)
            self.assertEqual(report.contents.files, 2)
            self.assertEqual(len(report.lines()), 1)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
