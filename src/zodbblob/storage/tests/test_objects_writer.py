"""Which blob directory writes a prefix (``storage/writer.py``): a copy of
a site pointed at the same prefix is refused for writing, the site
restarts as itself, ``zodbblob takeover`` makes a moved site the writer;
against moto's S3 server (a real process on 127.0.0.1)."""

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import unittest

import transaction
import ZODB
from ZODB.blob import Blob
from ZODB.POSException import StorageError

from zodbblob.storage import BlobStorageError
from zodbblob.storage.tests.test_objects_binding import BindingTestCase
from zodbblob.storage.writer import WRITER
from zodbblob.testing import S3_MISSING
from zodbblob.tests.test_zeo_bucket import s3_lines


@unittest.skipIf(S3_MISSING, S3_MISSING)
class WriterTests(BindingTestCase):

    def copy_site(self, source='site', name='copy'):
        """`source` copied as ``cp -a`` copies it."""
        subprocess.run(['cp', '-a', self.path(source), self.path(name)],
                       check=True)

    def writer(self):
        return json.loads(self.bucket.get_bytes(self.settings.prefix
                                                + WRITER))

    def test_a_copy_of_the_site_on_its_prefix_is_refused(self):
        self.commit(b'production')
        self.assertEqual(self.writer()['blob_dir'],
                         os.path.realpath(self.path('site', 'blobs')))
        self.copy_site()
        keys = self.keys()
        before = sorted(os.listdir(self.path('copy', 'blobs', '.zodbblob')))
        message = self.assertRefused('written by another copy', 'copy')
        self.assertIn(os.path.realpath(self.path('site', 'blobs')), message)
        self.assertIn('zodbblob takeover', message)
        # Nothing changed: not the bucket, not the copy's state.
        self.assertEqual(self.keys(), keys)
        self.assertEqual(
            sorted(os.listdir(self.path('copy', 'blobs', '.zodbblob'))),
            before)
        # The copy may still read; the site goes on as itself.
        self.assertEqual(self.read('copy', read_only=True), b'production')
        self.commit(b'production, later')
        self.assertEqual(self.read(), b'production, later')

    def test_a_copy_made_while_the_site_runs_is_refused(self):
        self.commit(b'production')
        storage = self.open()
        try:
            self.copy_site()
            self.assertRefused('written by another copy', 'copy')
        finally:
            storage.close()

    def test_a_prefix_without_a_writer_gets_one_at_the_next_open(self):
        # A prefix bound before writers were recorded.
        self.commit(b'production')
        self.bucket.delete([self.settings.prefix + WRITER])
        self.assertEqual(self.read(), b'production')
        self.assertEqual(self.writer()['blob_dir'],
                         os.path.realpath(self.path('site', 'blobs')))

    def test_takeover_makes_a_moved_site_the_writer(self):
        self.commit(b'production')
        os.rename(self.path('site'), self.path('old'))
        self.copy_site('old', 'site')
        self.assertRefused('written by another copy', 'site')
        config = self.path('site.conf')
        with open(config, 'w') as f:
            f.write('\n'.join([
                '%import zodbblob', '<zodb>', '  <zodbblob>',
                f'    blob-dir {self.path("site", "blobs")}',
                *('    ' + line for line in s3_lines(self.settings)),
                '    <filestorage>',
                f'      path {self.path("site", "Data.fs")}',
                '    </filestorage>', '  </zodbblob>', '</zodb>', '']))
        done = subprocess.run(
            [sys.executable, '-m', 'zodbblob.cli', 'takeover',
             '--config', config], capture_output=True, text=True,
            timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn('writes s3://', done.stdout)
        self.assertEqual(self.writer()['blob_dir'],
                         os.path.realpath(self.path('site', 'blobs')))
        self.assertEqual(self.read(), b'production')
        # The old directory is the copy now: refused for writing, and a
        # storage of it that was open before cannot pack any more.
        self.assertRefused('written by another copy', 'old')
        keys = self.keys()
        with self.assertRaises(BlobStorageError) as raised:
            self.pack_after_losing_the_prefix('old')
        self.assertIn('no longer written by this directory',
                      str(raised.exception))
        self.assertEqual(self.keys(), keys)

    def pack_after_losing_the_prefix(self, name):
        """Open `name` for writing as the writer, then lose the prefix
        to the site, then pack."""
        from zodbblob.storage import writer
        with writer.taking_over():
            db = ZODB.DB(self.open(name))
        try:
            # The site takes it back while `name` is open.
            with writer.taking_over():
                self.open().close()
            with db.transaction() as connection:
                del connection.root()['blob']
            db.pack(time.time() + 1)
        finally:
            db.close()

    def test_an_abort_of_a_storage_that_lost_the_prefix_deletes_nothing(self):
        # The old site, still running after a takeover, aborts a commit
        # of a content the new writer has: deleting it would lose the
        # new writer's blob (a reviewer's finding).
        from zodbblob.storage import writer
        from zodbblob.testing import FailingVote
        self.commit(b'production', dedup=True)
        self.copy_site('site', 'moved')
        old = ZODB.DB(self.open(dedup=True))
        try:
            with writer.taking_over():
                moved = ZODB.DB(self.open('moved', dedup=True))
            try:
                with moved.transaction() as connection:
                    connection.root()['new'] = Blob(b'shared bytes')
                connection = old.open()
                connection.root()['new'] = Blob(b'shared bytes')
                transaction.get().join(FailingVote())
                with self.assertRaises(ValueError):
                    transaction.commit()
                transaction.abort()
                connection.close()
                moved.cacheMinimize()
                shutil.rmtree(self.path('moved', 'blobs', '.zodbblob',
                                        'cache'), ignore_errors=True)
            finally:
                moved.close()
        finally:
            old.close()
        db = ZODB.DB(self.open('moved', dedup=True))
        try:
            with db.transaction() as connection:
                with connection.root()['new'].open() as f:
                    self.assertEqual(f.read(), b'shared bytes')
        finally:
            db.close()

    def identity_file(self, name='site', file='writer'):
        return self.path(name, 'blobs', '.zodbblob', file)

    def test_a_clone_of_the_directory_itself_is_refused(self):
        # A snapshot or clone of the filesystem (LVM, ZFS, a VM image)
        # keeps inode numbers: the copy's identity is the site's.  Its
        # generation is the one of the snapshot: the site's next open
        # went past it.
        self.commit(b'production')
        generation = self.identity_file(file='writer-generation')
        with open(generation) as f:
            at_the_snapshot = f.read()
        self.commit(b'production, restarted')
        # The directory as the snapshot has it: the same identity file
        # (its inode too), its generation from then.
        with open(generation, 'w') as f:
            f.write(at_the_snapshot)
        self.assertRefused('by a later generation of this directory')

    def test_a_running_site_whose_clone_opened_deletes_nothing(self):
        # A clone taken while the site ran opens the prefix (one
        # generation on, the same identity): the site, still running,
        # is no longer the writer, and its pack deletes nothing.
        self.commit(b'production')
        db = ZODB.DB(self.open())
        try:
            record = self.writer()
            record['generation'] += 1
            self.bucket.put_bytes(self.settings.prefix + WRITER,
                                  json.dumps(record).encode())
            keys = self.keys()
            with db.transaction() as connection:
                connection.root()['blob'] = Blob(b'next')
            with self.assertRaises(BlobStorageError) as raised:
                db.pack(time.time() + 1)
            self.assertIn('no longer written by this directory',
                          str(raised.exception))
            self.assertTrue(set(keys) <= set(self.keys()))
        finally:
            db.close()

    def test_opens_whose_record_was_not_written_do_not_lock_the_site_out(
            self):
        # An open whose PUT failed (or was killed) after the generation
        # file: twice, then a good one (a reviewer's restart loop
        # during an outage refused the site itself).
        from zodbblob.storage import writer
        self.commit(b'production')
        blob_dir = self.path('site', 'blobs')

        class Refusing:
            settings = self.bucket.settings

            def __init__(self, bucket):
                self.bucket = bucket

            def get_record(self, key, field):
                return self.bucket.get_record(key, field)

            def put_bytes(self, key, data):
                raise OSError('the PUT failed')
        for _ in range(2):
            with self.assertRaises(OSError):
                writer.claim_writer(Refusing(self.bucket), blob_dir, 'x')
        self.assertEqual(self.read(), b'production')

    def test_a_copy_made_of_hard_links_is_refused(self):
        self.commit(b'production')
        subprocess.run(['cp', '-al', self.path('site'), self.path('copy')],
                       check=True)
        os.remove(self.path('copy', 'blobs', '.zodbblob', 'lock'))
        self.assertRefused('has 2 names', 'copy')

    def test_a_rebuilt_catalog_is_no_way_around_the_writer(self):
        self.commit(b'production')
        self.copy_site()
        for name in os.listdir(self.path('copy', 'blobs', '.zodbblob')):
            if name.startswith('journal.sqlite'):
                os.remove(self.path('copy', 'blobs', '.zodbblob', name))
        self.assertRefused('written by another copy', 'copy')

    def test_a_clone_of_a_running_site_is_refused(self):
        # The site runs in another process, and renews its lease; a
        # clone of its filesystem has its identity and generation (as
        # the claim below, on the site's own directory, has).
        from zodbblob.storage import writer
        self.commit(b'production')
        blob_dir = self.path('site', 'blobs')
        child = subprocess.Popen(
            [sys.executable, '-c',
             'import json, sys, time;'
             'from zodbblob.objectstore import ObjectStoreSettings;'
             'from zodbblob.storage import open_filestorage;'
             's = open_filestorage(sys.argv[1], sys.argv[2], object_store='
             'ObjectStoreSettings(**json.loads(sys.argv[3])));'
             'print("open", flush=True); sys.stdin.read(); s.close()',
             self.path('site', 'Data.fs'), blob_dir,
             json.dumps(dataclasses.asdict(self.settings))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            self.assertEqual(child.stdout.readline().strip(), 'open')
            record = self.writer()
            for taking_over in (False, True):
                with self.subTest(takeover=taking_over):
                    with contextlib.ExitStack() as stack:
                        if taking_over:
                            stack.enter_context(writer.taking_over())
                        with self.assertRaises(BlobStorageError) as raised:
                            writer.claim_writer(self.bucket, blob_dir, 'x')
                    self.assertIn('in use by a running storage',
                                  str(raised.exception))
                    self.assertIn(f'pid {child.pid}', str(raised.exception))
                    self.assertEqual(self.writer()['session'],
                                     record['session'])
        finally:
            child.communicate('', timeout=60)
        # Closed cleanly: given up, the next open need not wait.
        self.assertIs(self.writer()['released'], True)
        self.assertEqual(self.read(), b'production')

    def test_a_storage_that_lost_the_prefix_commits_nothing(self):
        self.commit(b'production')
        db = ZODB.DB(self.open())
        try:
            # A clone of this running site opened the prefix (its lease
            # lapsed meanwhile): the same identity, another session.
            record = self.writer()
            record['session'] = 'the clone'
            self.bucket.put_bytes(self.settings.prefix + WRITER,
                                  json.dumps(record).encode())
            db.storage.object_store.renew_lease()
            keys = self.keys()
            with self.assertRaises(StorageError) as raised:
                with db.transaction() as connection:
                    connection.root()['blob'] = Blob(b'orphan?')
            self.assertIn('stop this site', str(raised.exception))
            self.assertNotIn('\n', str(raised.exception))
            self.assertEqual(self.keys(), keys)
        finally:
            db.close()
        self.assertEqual(self.writer()['session'], 'the clone')

    def test_a_writer_that_is_no_record_names_nobody(self):
        self.commit(b'production')
        self.bucket.put_bytes(self.settings.prefix + WRITER, b'not json')
        self.assertRefused('written by another copy')

    def test_the_site_keeps_its_identity_across_restarts_and_chown(self):
        self.commit(b'production')
        for path, dirs, files in os.walk(self.path('site')):
            for name in dirs + files:
                os.chmod(os.path.join(path, name),
                         os.stat(os.path.join(path, name)).st_mode)
                os.utime(os.path.join(path, name))
        self.commit(b'production, restarted')
        self.assertEqual(self.read(), b'production, restarted')


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
