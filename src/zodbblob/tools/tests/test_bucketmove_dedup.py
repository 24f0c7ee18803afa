"""``zodbblob migrate SRC s3://BUCKET/PREFIX --dedup`` and back, through
the command line, against moto's S3 server (a real process on
127.0.0.1): each content uploaded once, a pointer per row, the prefix
bound by content; resumable; and back into files."""

import json
import os
import sqlite3
import unittest

from zodbblob.storage import BlobStorageError
from zodbblob.storage.binding import KEYS_NAME, MARKER
from zodbblob.storage.catalog import Journal, journal_path
from zodbblob.testing import S3_MISSING
from zodbblob.tools.tests.test_bucketmove import MoveTestCase

LARGE = os.urandom(9 << 20)   # a multipart upload
SMALL = os.urandom(100)
EMPTY = b''


@unittest.skipIf(S3_MISSING, S3_MISSING)
class DedupMoveTests(MoveTestCase):

    records = 7

    def contents(self):
        return [LARGE, SMALL, LARGE, EMPTY, SMALL, LARGE, EMPTY]

    def contents_and_pointers(self):
        keys = self.keys()
        contents = [key for key in keys if key.startswith('site/contents/')]
        return contents, sorted(set(keys) - set(contents))

    def forget_digests(self):
        """Make the catalog one from before digests were kept."""
        db = sqlite3.connect(journal_path(self.blobs))
        with db:
            db.execute('UPDATE blob SET digest = NULL')
        db.close()

    def meta(self, name):
        journal = Journal(self.blobs, read_only=True)
        try:
            return journal.get_meta(name)
        finally:
            journal.close()

    def test_each_content_once_and_back(self):
        files = self.local_files()
        self.forget_digests()
        done = self.migrate(self.blobs, self.url, '--dedup')
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(f'7 blobs moved into {self.url}/ by content: 3 '
                      f'contents uploaded ({len(LARGE) + len(SMALL)} bytes), '
                      f'7 pointers, 0 there already', done.stdout)
        contents, pointers = self.contents_and_pointers()
        self.assertEqual((len(contents), len(pointers)), (3, 7))
        self.assertEqual(self.local_files(), [])
        self.assertEqual(self.meta(KEYS_NAME), 'content')
        marker = json.loads(self.bucket.get_bytes('site/' + MARKER))
        self.assertEqual(marker['keys'], 'content')
        # Read back with dedup on (and verify --checksum clean); refused
        # without.
        self.check(dedup=True)
        with self.assertRaises(BlobStorageError) as raised:
            self.open()
        self.assertIn('by content', str(raised.exception))
        # Back into files: each row's file, the binding's keys dropped.
        done = self.migrate(self.url, self.blobs)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn('7 downloaded', done.stdout)
        self.assertEqual(self.local_files(), files)
        self.assertIsNone(self.meta(KEYS_NAME))
        self.check(object_store=None)

    def test_a_killed_move_is_finished_by_running_it_again(self):
        for point in ('mid_bucket_move:2',):
            with self.subTest(point=point):
                done = self.migrate(self.blobs, self.url, '--dedup',
                                    kill_point=point)
                self.assertEqual(done.returncode, -9, done.stderr)
                # Not finished the other way: one line, nothing changed.
                keys = self.settled_keys()
                done = self.migrate(self.blobs, self.url)
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertEqual(len(done.stderr.strip().splitlines()), 1)
                self.assertIn('--dedup', done.stderr)
                self.assertEqual(self.keys(), keys)
                done = self.migrate(self.blobs, self.url, '--dedup')
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assertEqual(self.local_files(), [])
                self.check(dedup=True)
                done = self.migrate(self.url, self.blobs, kill_point=point)
                self.assertEqual(done.returncode, -9, done.stderr)
                done = self.migrate(self.url, self.blobs)
                self.assertEqual(done.returncode, 0, done.stderr)
                self.check(object_store=None)
        # Resumed, not started over: every pointer and content there.
        done = self.migrate(self.blobs, self.url, '--dedup')
        self.assertIn('0 contents uploaded (0 bytes), 0 pointers, 7 there '
                      'already', done.stdout)

    def test_dedup_is_for_a_move_into_a_bucket(self):
        files = self.local_files()
        for args in ((self.blobs, os.path.join(self.dir, 'other'),
                      '--layout', 'bushy', '--dedup'),
                     (self.url, self.blobs, '--dedup')):
            with self.subTest(args=args):
                done = self.migrate(*args)
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertIn('--dedup is for a move into a bucket',
                              done.stderr)
        self.assertEqual(self.local_files(), files)
        self.assertEqual(self.keys(), [])


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
