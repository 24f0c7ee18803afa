"""Content digests: the catalog row of every committed blob file has the
BLAKE3 of its bytes, whichever way the file was committed."""

import base64
import logging
import os
import shutil
import signal
import sqlite3
import tempfile
import time
import unittest

import blake3
import transaction
import ZODB
import ZODB.FileStorage
from ZODB.blob import Blob

from zodbblob import BlobStorage
from zodbblob.storage.catalog import journal_path
from zodbblob.storage.commit import INLINE_LIMIT, SYNCFS_THRESHOLD
from zodbblob.storage.tests.test_crash import run_child


def blake3_of(path):
    with open(path, 'rb') as f:
        return blake3.blake3(f.read()).digest()


def catalog_digests(storage):
    """(oid, tid) -> digest of every catalog row."""
    journal = storage._shared.journal
    return {(oid, tid): digest
            for batch in journal.rows(digests=True)
            for oid, tid, size, digest in batch}


class DigestTestCase(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-digest-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.blob_dir = os.path.join(self.dir, 'blobs')

    def open(self, dedup=False, scrub=True, **kw):
        storage = BlobStorage(self.blob_dir, ZODB.FileStorage.FileStorage(
            os.path.join(self.dir, 'Data.fs'), **kw), dedup=dedup,
            scrub=scrub)
        self.addCleanup(storage.close)
        return storage

    def assert_digests_match_files(self, storage, count, wait=True):
        """With `wait`, the scrubber may record them (a few seconds)."""
        digests = catalog_digests(storage)
        deadline = time.monotonic() + 10
        while wait and None in digests.values() and (
                time.monotonic() < deadline):
            time.sleep(0.02)
            digests = catalog_digests(storage)
        self.assertEqual(len(digests), count)
        for (oid, tid), digest in digests.items():
            path = storage.fshelper.getBlobFilename(oid, tid)
            self.assertEqual(digest, blake3_of(path), path)


class DigestFdTests(unittest.TestCase):
    """digest_fd sizes its buffer to the file; the digest never changes."""

    def test_files_around_the_chunk_size_and_from_an_offset(self):
        from zodbblob.storage.digest import CHUNK, digest_fd
        directory = tempfile.mkdtemp(prefix='zodbblob-digest-')
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, 'f')
        for size in (0, 1, 4095, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7):
            data = os.urandom(size)
            with open(path, 'wb') as f:
                f.write(data)
            for offset in {0, size // 2}:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.lseek(fd, offset, os.SEEK_SET)
                    self.assertEqual(digest_fd(fd),
                                     blake3.blake3(data[offset:]).digest(),
                                     (size, offset))
                finally:
                    os.close(fd)

    def test_a_stream_without_a_size_is_read_to_its_end(self):
        from zodbblob.storage.digest import digest_fd
        read_fd, write_fd = os.pipe()
        self.addCleanup(os.close, read_fd)
        os.write(write_fd, b'abc' * 1000)
        os.close(write_fd)
        self.assertEqual(digest_fd(read_fd),
                         blake3.blake3(b'abc' * 1000).digest())


class CommitDigestTests(DigestTestCase):

    def commit(self, storage, blobs):
        db = ZODB.DB(storage)
        with db.transaction() as conn:
            for key, data in blobs.items():
                conn.root()[key] = Blob(data)
        return db

    def test_inline_transaction_records_the_digest_of_each_file(self):
        storage = self.open()
        # Bytes in the commit record: hashed from them.
        db = self.commit(storage, {'a': b'a' * 1000, 'b': b'', 'c': b'c'})
        self.assert_digests_match_files(storage, 3)
        db.close()

    def test_large_file_records_its_digest(self):
        # More than INLINE_LIMIT, dedup off: the scrubber hashes it
        # (test_scrub.py); with dedup on, below, the commit does.
        storage = self.open()
        db = self.commit(storage, {'large': os.urandom(INLINE_LIMIT + 1)})
        self.assert_digests_match_files(storage, 1)
        db.close()
        self.assert_digests_match_files(self.open(), 1)

    def test_large_file_with_dedup_records_its_digest_at_commit(self):
        # Made durable by an fdatasync, hashed in a thread meanwhile;
        # tpc_finish waits for it, so the row has its digest once the
        # commit returns (dedup needs it at publish).
        storage = self.open(dedup=True, scrub=False)
        db = self.commit(storage, {'large': os.urandom(INLINE_LIMIT + 1)})
        self.assert_digests_match_files(storage, 1, wait=False)
        db.close()

    def test_many_large_files_record_their_digests(self):
        # Past SYNCFS_THRESHOLD files and INLINE_LIMIT bytes: one syncfs;
        # with dedup on, the hashing split among the threads at commit.
        count = SYNCFS_THRESHOLD + 3
        size = INLINE_LIMIT // SYNCFS_THRESHOLD
        for dedup in (False, True):
            storage = self.open(dedup=dedup, scrub=not dedup)
            db = self.commit(storage, {'f%d' % i: os.urandom(size)
                                       for i in range(count)})
            self.assert_digests_match_files(storage, count, wait=not dedup)
            db.close()
            self.assert_digests_match_files(self.open(), count)
            shutil.rmtree(self.blob_dir)
            for name in os.listdir(self.dir):
                os.remove(os.path.join(self.dir, name))

    def test_rows_survive_reopening(self):
        db = self.commit(self.open(), {'a': b'bytes'})
        db.close()
        self.assert_digests_match_files(self.open(), 1)


class UndoDigestTests(DigestTestCase):

    def setUp(self):
        super().setUp()
        self.storage = self.open()
        self.db = ZODB.DB(self.storage)
        self.addCleanup(self.db.close)
        with self.db.transaction() as conn:
            conn.root()['a'] = Blob(b'first')
        with self.db.transaction() as conn:
            with conn.root()['a'].open('w') as f:
                f.write(b'second')
            self.oid = conn.root()['a']._p_oid
        self.first = self.storage._shared.journal.revisions(self.oid)[0]

    def undo_last(self):
        undo_id = self.db.undoLog(0, 1)[0]['id']
        self.db.undo(undo_id)
        transaction.commit()
        tid = self.storage._shared.journal.revisions(self.oid)[-1]
        self.assertTrue(base64.decodebytes(undo_id + b'\n') < tid)
        return tid

    def set_digest(self, tid, digest):
        journal = self.storage._shared.journal
        journal.flush()
        journal._db.execute('UPDATE blob SET digest = ? WHERE oid = ? AND '
                            'tid = ?', (digest, self.oid, tid))

    def test_undo_reuses_the_digest_of_the_revision_it_links(self):
        # A digest no file has: only a copy of the source row's gives it.
        self.set_digest(self.first, b'recorded' * 4)
        tid = self.undo_last()
        self.assertEqual(self.storage._shared.journal.digest(self.oid, tid),
                         b'recorded' * 4)

    def test_undo_hashes_a_revision_without_digest(self):
        self.set_digest(self.first, None)
        tid = self.undo_last()
        path = self.storage.fshelper.getBlobFilename(self.oid, tid)
        self.assertEqual(self.storage._shared.journal.digest(self.oid, tid),
                         blake3_of(path))


class RecoveredDigestTests(DigestTestCase):
    """Rows that recovery writes from the commit log have digests."""

    def kill_then_check(self, *args):
        result = run_child(self.dir, '30', '--checkpoint-every', '50', *args,
                           kill_point='after_base_finish:6')
        self.assertEqual(result.returncode, -signal.SIGKILL,
                         result.stderr.decode()[-2000:])
        with self.assertLogs('zodbblob.storage', logging.INFO) as logs:
            storage = self.open()
        self.assertIn('rows of', '\n'.join(logs.output))
        self.assert_digests_match_files(
            storage, len(list(storage.fshelper.iter_blobs())))

    def test_recovered_inline_rows_have_digests(self):
        self.kill_then_check()

    def test_recovered_rows_of_large_files_have_digests(self):
        self.kill_then_check('--not-inline')


class MigrationTests(DigestTestCase):

    def test_catalog_without_digest_column_is_migrated_at_open(self):
        db = ZODB.DB(self.open())
        with db.transaction() as conn:
            conn.root()['old'] = Blob(b'old')
        db.close()
        # The catalog as zodbblob before digests wrote it.
        old = sqlite3.connect(journal_path(self.blob_dir))
        old.execute('DROP INDEX blob_digest')
        old.execute('DROP INDEX blob_undigested')
        old.execute('ALTER TABLE blob DROP COLUMN digest')
        old.close()
        with self.assertLogs('zodbblob.storage.catalog', logging.INFO) as logs:
            storage = self.open(scrub=False)   # the NULL stays NULL
        self.assertIn('added the digest column (its 1 rows',
                      '\n'.join(logs.output))
        self.assertEqual(list(catalog_digests(storage).values()), [None])
        db = ZODB.DB(storage)
        with db.transaction() as conn:
            conn.root()['new'] = Blob(b'new')
        with db.transaction() as conn:
            oid = conn.root()['new']._p_oid
        tid = storage._shared.journal.revisions(oid)[0]
        self.assertEqual(storage._shared.journal.digest(oid, tid),
                         blake3_of(storage.fshelper.getBlobFilename(oid, tid)))
        db.close()

    def test_read_only_open_of_an_old_catalog_reads_no_digests(self):
        db = ZODB.DB(self.open())
        with db.transaction() as conn:
            conn.root()['old'] = Blob(b'old')
        db.close()
        old = sqlite3.connect(journal_path(self.blob_dir))
        old.execute('DROP INDEX blob_digest')
        old.execute('DROP INDEX blob_undigested')
        old.execute('ALTER TABLE blob DROP COLUMN digest')
        old.close()
        storage = self.open(read_only=True)
        self.assertEqual(list(catalog_digests(storage).values()), [None])


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
