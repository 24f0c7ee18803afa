"""Pack finds its garbage from what changed: the superseded index.

The catalog knows, per row, the tid that superseded it; pack reads the
rows superseded before its pack time (confirmed with ``loadSerial``),
and reads the other rows only when the base's GC removed objects (or the
base cannot say).  Pack and verify read the catalog in bounded batches.
"""

import concurrent.futures
import contextlib
import logging
import os
import signal
import sqlite3
import sys
import time
import unittest

import transaction
import ZODB
import ZODB.FileStorage
import ZODB.MappingStorage
from ZODB.blob import Blob
from ZODB.utils import p64

from zodbblob import BlobStorage
from zodbblob.storage.catalog import Journal, journal_path
from zodbblob.storage.tests.test_crash import CrashTestCase, run_child
from zodbblob.storage.tests.test_storage import (
    StorageTestCase,
    blob_files,
    close_once,
)
from zodbblob.tools.verify import verify


class CountingFileStorage(ZODB.FileStorage.FileStorage):
    """A FileStorage that counts loadSerial calls, and can run something
    right after its own pack (as if committed while it packed)."""

    load_serials = 0
    after_pack = None

    def loadSerial(self, oid, serial):
        self.load_serials += 1
        return super().loadSerial(oid, serial)

    def pack(self, t, referencesf, gc=None):
        result = super().pack(t, referencesf, gc)
        if self.after_pack is not None:
            self.after_pack()
        return result


def read_batches(journal):
    """Record the size of every batch `journal` reads (returned list)."""
    sizes = []
    read = journal._read_batch

    def counted(sql, parameters):
        batch = read(sql, parameters)
        sizes.append(len(batch))
        return batch
    journal._read_batch = counted
    return sizes


# The os.remove and os.rmdir calls of this process, seen through the
# interpreter's audit events (the real calls, observed, not replaced): an
# audit hook cannot be removed, so one records for whoever is watching.
_watching: list[list] = []


def _record_removal(event, args):
    if _watching and event in ('os.remove', 'os.rmdir'):
        for calls in _watching:
            calls.append((event, os.fsdecode(args[0])))


sys.addaudithook(_record_removal)


@contextlib.contextmanager
def removals_under(directory):
    """The ``(event, path)`` of the removals below `directory` (its
    ``tmp`` and the catalog's directory aside) made meanwhile."""
    calls = []
    _watching.append(calls)
    found = []
    try:
        yield found
    finally:
        _watching.remove(calls)
    for event, path in calls:
        relative = os.path.relpath(path, directory)
        if not relative.startswith(('..', 'tmp', '.zodbblob')):
            found.append((event, path))


def catalog_rows(journal):
    return journal._db.execute(
        'SELECT oid, tid, superseded FROM blob ORDER BY oid, tid').fetchall()


class GarbageTestCase(StorageTestCase):

    def open(self, base=None, **kw):
        if base is None:
            base = CountingFileStorage('Data.fs', **kw)
        storage = BlobStorage(self.blob_dir, base)
        self.addCleanup(storage.close)
        return storage

    def open_db(self, base=None, **kw):
        db = ZODB.DB(self.open(base, **kw))
        self.addCleanup(close_once, db)
        return db

    def assert_superseded_by_the_next_row(self, journal):
        rows = catalog_rows(journal)
        self.assertTrue(rows)
        for (oid, tid, superseded), following in zip(
                rows, rows[1:] + [(None, None, None)]):
            expected = following[1] if following[0] == oid else None
            self.assertEqual(superseded, expected,
                             f'row {oid.hex()} {tid.hex()}')

    def in_a_thread(self, function):
        # Another thread, as a commit beside the pack would come.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(function).result(timeout=120)


class SupersededTests(GarbageTestCase):

    def undo_last(self, db):
        db.undo(db.undoLog(0, 1)[0]['id'])
        transaction.commit()

    def test_a_new_revision_supersedes_the_one_before(self):
        db = self.open_db()
        journal = db.storage._shared.journal
        oid, first = self.commit_blob(db, 'a', b'1')
        _, second = self.commit_blob(db, 'a', b'2')
        _, third = self.commit_blob(db, 'a', b'3')
        journal.flush()
        self.assertEqual(journal.superseded_at(oid, first), second)
        self.assertEqual(journal.superseded_at(oid, second), third)
        self.assertIsNone(journal.superseded_at(oid, third))
        self.assert_superseded_by_the_next_row(journal)

    def test_rows_added_out_of_tid_order_supersede_in_tid_order(self):
        # Recovery's rows, or a batch written after a failed one, may
        # come after rows of later transactions.
        journal = Journal(self.blob_dir)
        self.addCleanup(journal.close)
        oid = p64(1)
        journal.add([(oid, p64(30), 1)])
        journal.add([(oid, p64(10), 1), (oid, p64(20), 1)])
        journal.flush()
        self.assertEqual(catalog_rows(journal), [
            (oid, p64(10), p64(20)), (oid, p64(20), p64(30)),
            (oid, p64(30), None)])

    def test_undo_back_to_an_earlier_blob_supersedes_the_undone_one(self):
        db = self.open_db()
        journal = db.storage._shared.journal
        oid, _ = self.commit_blob(db, 'a', b'first')
        _, second = self.commit_blob(db, 'a', b'second')
        self.undo_last(db)
        _, undo = self.serial(db, 'a')
        journal.flush()
        self.assertEqual(journal.superseded_at(oid, second), undo)
        self.assertIsNone(journal.superseded_at(oid, undo))
        self.assert_superseded_by_the_next_row(journal)

    def test_undo_of_a_blob_creation_supersedes_the_blob_with_no_file(self):
        db = self.open_db()
        journal = db.storage._shared.journal
        oid, created = self.commit_blob(db, 'a', b'created')
        self.undo_last(db)
        undo = db.lastTransaction()
        journal.flush()
        self.assertEqual(journal.superseded_at(oid, created), undo)
        self.assertEqual(journal.revisions(oid), [created])

    def test_pack_without_gc_removes_a_blob_whose_creation_was_undone(self):
        db = self.open_db(pack_gc=False)
        storage = db.storage
        self.commit_blob(db, 'kept', b'kept')
        oid, created = self.commit_blob(db, 'a', b'created')
        path = storage.fshelper.getBlobFilename(oid, created)
        self.undo_last(db)
        time.sleep(0.01)
        db.pack()
        self.assertFalse(os.path.exists(path))
        self.assertEqual(storage._shared.journal.revisions(oid), [])
        self.assertTrue(verify(storage).clean, verify(storage).lines())

    def test_a_rebuilt_catalog_knows_what_was_superseded(self):
        db = self.open_db()
        for i in range(3):
            for revision in range(3):
                self.commit_blob(db, f'b{i}', str(revision).encode())
        db.close()
        for suffix in ('', '-wal', '-shm'):
            if os.path.exists(journal_path(self.blob_dir) + suffix):
                os.remove(journal_path(self.blob_dir) + suffix)
        with self.assertLogs('zodbblob.storage', logging.WARNING):
            storage = self.open()
        self.assertEqual(len(catalog_rows(storage._shared.journal)), 9)
        self.assert_superseded_by_the_next_row(storage._shared.journal)

    def test_an_old_catalog_is_migrated_once_at_open(self):
        db = self.open_db()
        for i in range(3):
            for revision in range(2):
                self.commit_blob(db, f'b{i}', str(revision).encode())
        db.close()
        # The catalog as zodbblob before the superseded column wrote it.
        old = sqlite3.connect(journal_path(self.blob_dir))
        old.executescript('DROP INDEX blob_superseded; '
                          'ALTER TABLE blob DROP COLUMN superseded;')
        old.close()
        with self.assertLogs('zodbblob.storage', logging.INFO) as logs:
            storage = self.open()
        self.assertIn('added the superseded column (3 revisions',
                      '\n'.join(logs.output))
        self.assertIn(journal_path(self.blob_dir), '\n'.join(logs.output))
        self.assert_superseded_by_the_next_row(storage._shared.journal)
        storage.close()
        with self.assertNoLogs('zodbblob.storage.catalog', logging.INFO):
            self.open()


class RecoveredRowsTests(CrashTestCase):

    def test_rows_recovery_writes_supersede_as_commits_do(self):
        # Killed after the base committed and before the catalog row was
        # written: the next open writes the rows from the commit log.
        result = run_child(self.dir, '60', '--log-mib', '64',
                           kill_point='after_base_finish:40')
        self.assertEqual(result.returncode, -signal.SIGKILL)
        storage = BlobStorage(os.path.join(self.dir, 'blobs'),
                              ZODB.FileStorage.FileStorage(
                                  os.path.join(self.dir, 'Data.fs')))
        try:
            rows = catalog_rows(storage._shared.journal)
            self.assertGreater(len(rows), 40)
            for (oid, tid, superseded), following in zip(
                    rows, rows[1:] + [(None, None, None)]):
                expected = following[1] if following[0] == oid else None
                self.assertEqual(superseded, expected)
        finally:
            storage.close()

    def test_pack_killed_between_batches_is_finished_by_the_next_open(self):
        result = run_child(self.dir, '40', '--pack', '--read-batch', '1',
                           kill_point='mid_pack_removal:3')
        self.assertEqual(result.returncode, -signal.SIGKILL)
        self.check_guarantee(pack=True)


class PackTests(GarbageTestCase):

    def test_pack_reads_only_the_superseded_rows_when_nothing_was_collected(
            self):
        db = self.open_db()
        storage = db.storage
        for i in range(30):
            self.commit_blob(db, f'b{i}', b'v1')
        live = {i: self.commit_blob(db, f'b{i}', b'v2')
                for i in range(0, 30, 10)}
        live.update({i: self.serial(db, f'b{i}')
                     for i in range(30) if i not in live})
        batches = read_batches(storage._shared.journal)
        storage.base.load_serials = 0
        time.sleep(0.01)
        db.pack()
        self.assertEqual(sum(batches), 3)
        self.assertEqual(storage.base.load_serials, 3)
        self.assertEqual(blob_files(self.blob_dir), {
            os.path.relpath(storage.loadBlob(oid, tid), self.blob_dir)
            for oid, tid in live.values()})

    def test_pack_unlinks_its_garbage_and_removes_only_emptied_directories(
            self):
        # Per removed file its unlink, nothing else; a directory only
        # where the oid has no file left (an rmdir per file, failing
        # where the newer revision lives, cost as much as the unlink).
        db = self.open_db()
        storage = db.storage
        for i in range(10):
            self.commit_blob(db, f'b{i}', b'v1')
        superseded = [self.serial(db, f'b{i}') for i in range(0, 10, 2)]
        for i in range(0, 10, 2):
            self.commit_blob(db, f'b{i}', b'v2')
        collected = self.serial(db, 'b9')
        with db.transaction() as conn:
            del conn.root()['b9']
        time.sleep(0.01)
        with removals_under(self.blob_dir) as calls:
            db.pack()
        fshelper = storage.fshelper
        self.assertEqual(sorted(calls), sorted(
            [('os.remove', fshelper.getBlobFilename(oid, tid))
             for oid, tid in superseded + [collected]]
            + [('os.rmdir', fshelper.getPathForOID(collected[0]))]))
        self.assertFalse(os.path.exists(
            fshelper.getPathForOID(collected[0])))
        self.assertTrue(verify(storage).clean, verify(storage).lines())

    def test_pack_removes_the_blobs_of_objects_the_base_collected(self):
        db = self.open_db()
        storage = db.storage
        for i in range(10):
            self.commit_blob(db, f'b{i}', b'v1')
        gone = self.serial(db, 'b3')
        with db.transaction() as conn:
            del conn.root()['b3']
        time.sleep(0.01)
        db.pack()
        self.assertFalse(os.path.exists(
            storage.fshelper.getBlobFilename(*gone)))
        self.assertEqual(len(blob_files(self.blob_dir)), 9)
        self.assertEqual(storage._shared.journal.revisions(gone[0]), [])

    def test_pack_without_gc_keeps_unreachable_blobs_and_reads_no_row(self):
        db = self.open_db(pack_gc=False)
        storage = db.storage
        for i in range(10):
            self.commit_blob(db, f'b{i}', b'v1')
        with db.transaction() as conn:
            del conn.root()['b3']
        batches = read_batches(storage._shared.journal)
        time.sleep(0.01)
        db.pack()
        self.assertEqual(sum(batches), 0)
        self.assertEqual(len(blob_files(self.blob_dir)), 10)

    def test_an_object_created_while_the_base_packs_hides_no_collected_one(
            self):
        # The base's object count after the pack is the count before,
        # minus what GC removed, plus what was created meanwhile: one of
        # each must not look like nothing was removed.
        db = self.open_db()
        storage = db.storage
        for i in range(5):
            self.commit_blob(db, f'b{i}', b'v1')
        gone = self.serial(db, 'b3')
        with db.transaction() as conn:
            del conn.root()['b3']

        def create():
            with db.transaction() as conn:
                conn.root()['new'] = Blob(b'new')
        storage.base.after_pack = lambda: self.in_a_thread(create)
        time.sleep(0.01)
        db.pack()
        self.assertFalse(os.path.exists(
            storage.fshelper.getBlobFilename(*gone)))
        new = self.serial(db, 'new')
        self.assertTrue(os.path.exists(storage.loadBlob(*new)))
        self.assertTrue(verify(storage).clean, verify(storage).lines())

    def test_a_revision_committed_while_the_base_packs_keeps_its_parent(
            self):
        db = self.open_db()
        storage = db.storage
        oid, current = self.commit_blob(db, 'a', b'v1')

        def change():
            with db.transaction() as conn, conn.root()['a'].open('w') as f:
                f.write(b'v2')
        storage.base.after_pack = lambda: self.in_a_thread(change)
        time.sleep(0.01)
        db.pack()
        _, newer = self.serial(db, 'a')
        self.assertNotEqual(newer, current)
        # Current at the pack time: the base keeps it, and so does pack.
        with open(storage.loadBlob(oid, current), 'rb') as f:
            self.assertEqual(f.read(), b'v1')
        with open(storage.loadBlob(oid, newer), 'rb') as f:
            self.assertEqual(f.read(), b'v2')
        self.assertTrue(verify(storage).clean, verify(storage).lines())

    def test_a_base_that_cannot_count_has_every_row_checked(self):
        db = self.open_db(ZODB.MappingStorage.MappingStorage())
        storage = db.storage
        for i in range(5):
            self.commit_blob(db, f'b{i}', b'v1')
        gone = self.serial(db, 'b3')
        with db.transaction() as conn:
            del conn.root()['b3']
        batches = read_batches(storage._shared.journal)
        time.sleep(0.01)
        db.pack()
        self.assertFalse(os.path.exists(
            storage.fshelper.getBlobFilename(*gone)))
        self.assertEqual(len(blob_files(self.blob_dir)), 4)
        self.assertGreaterEqual(sum(batches), 5)

    def test_pack_reads_the_catalog_in_bounded_batches(self):
        db = self.open_db()
        storage = db.storage
        for i in range(12):
            self.commit_blob(db, f'b{i}', b'v1')
        for i in range(0, 12, 2):
            self.commit_blob(db, f'b{i}', b'v2')
        with db.transaction() as conn:
            del conn.root()['b1'], conn.root()['b3']
        live = {self.serial(db, f'b{i}')
                for i in range(12) if i not in (1, 3)}
        storage._shared.journal.read_batch = 2
        batches = read_batches(storage._shared.journal)
        time.sleep(0.01)
        db.pack()
        # 6 superseded rows, then the 12 rows left (2 collected): in
        # batches of at most 2.
        self.assertEqual(max(batches), 2)
        self.assertGreaterEqual(len(batches), 9)
        self.assertEqual(blob_files(self.blob_dir), {
            os.path.relpath(storage.loadBlob(oid, tid), self.blob_dir)
            for oid, tid in live})
        self.assertEqual(len(storage._shared.journal), 10)


class RemoveTests(GarbageTestCase):

    def test_remove_says_which_oids_it_left_without_files(self):
        journal = Journal(self.blob_dir)
        self.addCleanup(journal.close)
        one, two, three = p64(1), p64(2), p64(3)
        journal.add([(one, p64(10), 5), (one, p64(20), 7),
                     (two, p64(10), 11), (three, p64(30), 13)])
        emptied = journal.remove([(one, p64(10)), (two, p64(10)),
                                  (two, p64(10)), (three, p64(99))])
        self.assertEqual(sorted(emptied), [two])
        self.assertEqual(journal.total_size(), 20)
        self.assertEqual(catalog_rows(journal), [
            (one, p64(20), None), (three, p64(30), None)])
        # Nothing is left over for the next call.
        self.assertEqual(journal.remove([(three, p64(30))]), [three])
        self.assertEqual(journal.total_size(), 7)


class VerifyBatchTests(GarbageTestCase):

    def commit_blobs(self, db, count):
        with db.transaction() as conn:
            for i in range(count):
                conn.root()[f'b{i}'] = Blob(str(i).encode() * 100)
        return [self.serial(db, f'b{i}') for i in range(count)]

    def damage(self, storage, oid, tid):
        path = storage.fshelper.getBlobFilename(oid, tid)
        os.chmod(path, 0o644)
        with open(path, 'ab') as f:
            f.write(b'more')
        return path

    def test_verify_reads_the_catalog_in_bounded_batches(self):
        db = self.open_db()
        storage = db.storage
        blobs = self.commit_blobs(db, 20)
        path = self.damage(storage, *blobs[13])
        storage._shared.journal.read_batch = 3
        batches = read_batches(storage._shared.journal)
        report = verify(storage)
        self.assertEqual([mismatch[0] for mismatch in report.size_mismatches],
                         [path])
        self.assertEqual(max(batches), 3)
        self.assertEqual(sum(batches), 20)

    def test_verify_finds_sizes_of_a_walk_out_of_oid_order(self):
        # The lawn layout's names do not sort as oids past 255 (0x0100
        # comes before 0x02).
        storage = BlobStorage(self.blob_dir, ZODB.FileStorage.FileStorage(
            'Data.fs'), layout='lawn')
        db = ZODB.DB(storage)
        self.addCleanup(close_once, db)
        blobs = self.commit_blobs(db, 300)
        storage._shared.journal.read_batch = 7
        damaged = sorted(self.damage(storage, *blobs[i])
                         for i in (1, 2, 100, 280))
        report = verify(storage)
        self.assertEqual(sorted(mismatch[0]
                                for mismatch in report.size_mismatches),
                         damaged)
        self.assertEqual(report.files, 300)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
