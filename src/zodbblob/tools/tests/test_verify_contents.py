"""verify of a storage on a bucket that keeps each content once (dedup),
against moto's S3 server (a real process on 127.0.0.1): pointers at the
blob keys, contents under ``contents/``, the catalog's rows and digests;
and ``zodbblob verify --config`` on a real configuration file."""

import os
import subprocess
import sys
import time
import unittest

import ZODB
from ZODB.blob import Blob

from zodbblob.cli.serve import s3_section
from zodbblob.objectstore import blob_key, content_key
from zodbblob.storage.digest import digest_bytes
from zodbblob.testing import S3_MISSING
from zodbblob.tools import verifybucket
from zodbblob.tools.tests.bucketstores import BucketStoreTestCase
from zodbblob.tools.verify import verify

SAME = b'the same bytes' * 100
OTHER = b'other bytes' * 100


@unittest.skipIf(S3_MISSING, S3_MISSING)
class VerifyContentsTests(BucketStoreTestCase):

    def setUp(self):
        super().setUp()
        db = ZODB.DB(self.open(dedup=True))
        for name, data in (('a', SAME), ('b', SAME), ('c', OTHER)):
            with db.transaction() as connection:
                connection.root()[name] = Blob(data)
        self.oids, self.tids = {}, {}
        with db.transaction() as connection:
            for name in 'abc':
                connection.root()[name]._p_activate()
                self.oids[name] = connection.root()[name]._p_oid
                self.tids[name] = connection.root()[name]._p_serial
        db.close()
        self.url = f's3://{self.settings.bucket}/'

    def key(self, name):
        return blob_key(self.settings.prefix, self.oids[name],
                        self.tids[name])

    def content(self, data):
        return content_key(self.settings.prefix, digest_bytes(data))

    def verify(self, checksum=False, read_only=True):
        storage = self.open(dedup=not read_only, read_only=read_only)
        try:
            return verify(storage, checksum=checksum)
        finally:
            storage.close()

    def put(self, key, data):
        self.bucket.client.put_object(Bucket=self.settings.bucket, Key=key,
                                      Body=data)

    def test_a_clean_bucket_by_content(self):
        for checksum in (False, True):
            report = self.verify(checksum=checksum)
            self.assertTrue(report.clean, report.lines())
            self.assertEqual((report.records, report.files), (3, 3))
            self.assertEqual(report.unique_contents, 2)
            lines = report.lines()
            self.assertIn('3 blob objects point to 2 unique contents',
                          lines[-2])
            self.assertIn('3 blob records, 3 blob files, clean', lines[-1])

    def test_missing_orphaned_and_resized_pointers_and_contents(self):
        self.bucket.delete([self.key('a'), self.content(OTHER)])
        self.put(self.content(SAME), b'short')
        stray = blob_key(self.settings.prefix, b'\0' * 7 + b'\x63',
                         self.tids['c'])
        self.bucket.put_pointer(stray, digest_bytes(SAME))
        nobodys = self.content(b'nobody needs this')
        self.put(nobodys, b'nobody needs this')
        junk = self.settings.prefix + 'contents/zz/not-a-digest'
        self.put(junk, b'junk')
        report = self.verify()
        self.assertFalse(report.clean)
        self.assertEqual(sorted(report.missing), sorted([
            (self.oids['a'], self.tids['a'], self.url + self.key('a')),
            (self.oids['c'], self.tids['c'],
             self.url + self.content(OTHER))]))
        self.assertEqual(sorted(report.orphans),
                         sorted([self.url + stray, self.url + nobodys,
                                 self.url + junk]))
        # Once, though two rows name it.
        self.assertEqual(report.size_mismatches,
                         [(self.url + self.content(SAME), len(SAME), 5)])
        lines = report.lines()
        self.assertIn('orphan: no record references ' + self.url + nobodys,
                      lines)
        self.assertIn('6 problems', lines[-1])

    def test_a_wrong_pointer_and_a_bad_content_are_found_by_checksum(self):
        # A pointer naming another content that is there, and a content
        # whose bytes are not its digest's, of the same size.
        self.bucket.put_pointer(self.key('b'), digest_bytes(OTHER))
        self.put(self.content(OTHER), b'x' * len(OTHER))
        self.assertTrue(self.verify().clean)
        report = self.verify(checksum=True)
        self.assertEqual(report.pointer_mismatches, [
            (self.oids['b'], self.tids['b'], self.url + self.key('b'),
             digest_bytes(OTHER), digest_bytes(SAME))])
        self.assertEqual(report.content_mismatches, [
            (self.url + self.content(OTHER), digest_bytes(b'x' * len(OTHER)))])
        text = '\n'.join(report.lines())
        self.assertIn('pointer mismatch: blob of oid', text)
        self.assertIn(f'names content {digest_bytes(OTHER).hex()}, the '
                      f'catalog recorded {digest_bytes(SAME).hex()}', text)
        self.assertIn("checksum mismatch: content " + self.url
                      + self.content(OTHER), text)
        self.assertEqual(os.listdir(os.path.join(self.blobs, 'tmp')), [])

    def test_a_pack_beside_a_verify_is_not_damage(self):
        db = ZODB.DB(self.open(dedup=True))   # the live storage
        self.addCleanup(db.close)
        with db.transaction() as connection:
            connection.root()['c'] = Blob(b'the next revision')
        reader = self.open(read_only=True)
        self.addCleanup(reader.close)
        self.addCleanup(setattr, verifybucket, 'LIST_PAGE',
                        verifybucket.LIST_PAGE)
        verifybucket.LIST_PAGE = 1

        def progress(done, total):
            if done == 1:
                db.pack(time.time() + 1)
        report = verify(reader, progress=progress)
        self.assertEqual((report.missing, report.orphans), ([], []))
        self.assertTrue(report.packed_meanwhile)

    def test_the_command_on_a_configuration_file(self):
        config = os.path.join(self.dir, 'zodb.conf')
        with open(config, 'w') as f:
            f.write(f'<zodbblob>\n  blob-dir {self.blobs}\n  dedup on\n'
                    f'{s3_section(self.settings)}'
                    f'  <filestorage>\n'
                    f'    path {os.path.join(self.dir, "Data.fs")}\n'
                    f'  </filestorage>\n</zodbblob>\n')
        env = dict(os.environ, AWS_ACCESS_KEY_ID='testing',
                   AWS_SECRET_ACCESS_KEY='testing')

        def run(*args):
            return subprocess.run(
                [sys.executable, '-m', 'zodbblob.cli', 'verify', '--quiet',
                 '--config', config, *args],
                capture_output=True, text=True, timeout=300, env=env)
        done = run('--checksum')
        self.assertEqual(done.returncode, 0, done.stderr + done.stdout)
        self.assertIn('3 blob records, 3 blob files, clean', done.stdout)
        self.bucket.delete([self.content(OTHER)])
        done = run()
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn('missing: blob file of oid', done.stdout)
        self.assertIn(self.content(OTHER), done.stdout)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
