"""The catalog under faults: a full disk, damaged pages, killed packs, undo.

Whatever happens to ``journal.sqlite`` or to a pack, every committed blob
file keeps its catalog row (so ``getSize`` counts it and a pack can remove
it), a committed transaction is never reported as failed, and nothing is
left that no record references.  Real FileStorages on disk, a real tmpfs
filled to the last byte, real SIGKILLs.
"""

import errno
import io
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest
from contextlib import redirect_stdout

import persistent
import transaction
import ZODB
import ZODB.blob
import ZODB.FileStorage
from ZODB.blob import Blob
from zope.interface.verify import verifyObject

from zodbblob import BlobStorage
from zodbblob.cli import main
from zodbblob.interfaces import IBlobJournal
from zodbblob.storage.catalog import JournalError
from zodbblob.storage.catalog import KILL_POINT_VARIABLE
from zodbblob.storage.catalog import STATE_DIR
from zodbblob.storage.catalog import journal_path
from zodbblob.tools.verify import verify


class Document(persistent.Persistent):
    """A content object holding its file in a blob attribute, as Zope's do."""

    def __init__(self, data):
        self.file = Blob(data)


def blob_records(storage):
    """``(oid, tid)`` of every blob record the base storage holds."""
    records = set()
    for txn in storage.base.iterator():
        for record in txn:
            if ZODB.blob.is_blob_record(record.data):
                records.add((record.oid, record.tid))
    return records


def pack_now(db):
    # Pack to a time after the last commit, whatever the clock's
    # resolution: FileStorage packs to the transaction before it.
    last = ZODB.TimeStamp.TimeStamp(db.lastTransaction()).timeTime()
    db.pack(t=max(time.time(), last) + 1)


def pack_away(db):
    """A blob committed, deleted, and packed away."""
    with db.transaction() as conn:
        conn.root()['blob'] = Blob(b'one')
    with db.transaction() as conn:
        del conn.root()['blob']
    pack_now(db)


class CatalogTestCase(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-catalog-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.blob_dir = os.path.join(self.dir, 'blobs')
        self.data_fs = os.path.join(self.dir, 'Data.fs')

    def open(self):
        storage = BlobStorage(self.blob_dir,
                              ZODB.FileStorage.FileStorage(self.data_fs))
        return storage, ZODB.DB(storage)

    def check_catalog(self, storage):
        """Every committed blob file has its row; getSize counts it."""
        records = blob_records(storage)
        files = {(oid, tid): os.path.getsize(path)
                 for oid, tid, path in storage.fshelper.iter_blobs()}
        self.assertEqual(set(files), records)
        rows = {(oid, tid): size
                for oid, tid, size in storage._shared.journal.committed()}
        self.assertEqual(rows, files)
        self.assertEqual(storage.getSize() - storage.base.getSize(),
                         sum(files.values()))
        return records

    def check_nothing_left_after_deleting_everything(self):
        storage, db = self.open()
        try:
            with db.transaction() as conn:
                conn.root().clear()
            pack_now(db)
            self.assertEqual(blob_records(storage), set())
            self.assertEqual(list(storage.fshelper.iter_blobs()), [])
            self.assertEqual(storage._shared.journal.committed(), [])
            self.assertEqual(storage.getSize(), storage.base.getSize())
            self.assertTrue(verify(storage).clean)
        finally:
            db.close()


class FullStateDirectoryTests(CatalogTestCase):
    """``.zodbblob`` on its own tiny tmpfs, filled while commits go on."""

    def setUp(self):
        if os.geteuid() != 0:
            self.skipTest('mounting a tmpfs needs root')
        super().setUp()
        self.state_dir = os.path.join(self.blob_dir, STATE_DIR)
        os.makedirs(self.state_dir)
        mounted = subprocess.run(
            ['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs',
             self.state_dir], capture_output=True, text=True)
        if mounted.returncode:
            self.skipTest('cannot mount a tmpfs on %s: %s'
                          % (self.state_dir, mounted.stderr.strip()))
        self.addCleanup(subprocess.run, ['umount', '-l', self.state_dir],
                        capture_output=True)

    def fill(self):
        """Take every free byte of the state directory's filesystem."""
        filler = os.path.join(self.state_dir, 'filler')
        chunk = b'\0' * 4096
        with open(filler, 'wb', buffering=0) as f:
            try:
                while True:
                    f.write(chunk)
            except OSError as e:
                self.assertEqual(e.errno, errno.ENOSPC)
        return filler

    def test_commits_while_the_catalog_cannot_be_written_keep_their_rows(self):
        storage, db = self.open()
        try:
            for number in range(3):
                with db.transaction() as conn:
                    conn.root()['before-%d' % number] = Blob(b'x' * 1000)
            filler = self.fill()
            committed = failed = 0
            with self.assertLogs('zodbblob', logging.WARNING) as logs:
                for number in range(60):
                    before = storage.lastTransaction()
                    conn = db.open()
                    for blob in range(8):
                        conn.root()['full-%d-%d' % (number, blob)] = Blob(
                            b'%d' % number * 1000)
                    try:
                        transaction.commit()
                    except Exception:
                        # Refused, then: before the base committed.
                        transaction.abort()
                        self.assertEqual(storage.lastTransaction(), before)
                        failed += 1
                    else:
                        self.assertNotEqual(storage.lastTransaction(),
                                            before)
                        committed += 1
                    conn.close()
            # Both happened: commits whose rows could not be written, and
            # commits refused at vote once the commit log could not grow.
            self.assertIn('stay pending', '\n'.join(logs.output))
            self.assertGreater(committed, 8)
            self.assertGreater(failed, 0)
            os.remove(filler)
            with db.transaction() as conn:
                conn.root()['after'] = Blob(b'space again')
            records = self.check_catalog(storage)
            self.assertEqual(len(records), 3 + 8 * committed + 1)
        finally:
            db.close()
        storage, db = self.open()
        try:
            self.assertEqual(len(self.check_catalog(storage)),
                             3 + 8 * committed + 1)
        finally:
            db.close()
        self.check_nothing_left_after_deleting_everything()

    def test_rows_pending_at_close_are_added_by_the_next_open(self):
        storage, db = self.open()
        with db.transaction() as conn:
            conn.root()['first'] = Blob(b'first')
        filler = self.fill()
        committed = 0
        for number in range(12):
            with db.transaction() as conn:
                for blob in range(8):
                    conn.root()['full-%d-%d' % (number, blob)] = Blob(b'z')
            committed += 1
        # The close cannot checkpoint: the commit log keeps the records.
        with self.assertLogs('zodbblob.storage', logging.WARNING) as logs:
            db.close()
        self.assertIn('without a checkpoint', '\n'.join(logs.output))
        os.remove(filler)
        storage, db = self.open()
        try:
            self.assertEqual(len(self.check_catalog(storage)),
                             1 + 8 * committed)
        finally:
            db.close()
        self.check_nothing_left_after_deleting_everything()


DAMAGE_CHILD = '''
import os, signal, sys, transaction, ZODB, ZODB.FileStorage
from ZODB.blob import Blob
from zodbblob import BlobStorage

def open_db():
    return ZODB.DB(BlobStorage(sys.argv[1] + '/blobs',
                               ZODB.FileStorage.FileStorage(
                                   sys.argv[1] + '/Data.fs')))

db = open_db()
for number in range(20):
    with db.transaction() as conn:
        for blob in range(100):
            conn.root()['%d-%d' % (number, blob)] = Blob(b'%d' % blob)
db.close()
# Transactions in the commit log, their rows not yet checkpointed.
db = open_db()
for number in range(5):
    with db.transaction() as conn:
        conn.root()['late-%d' % number] = Blob(b'late')
os.kill(os.getpid(), signal.SIGKILL)
'''


class DamagedCatalogTests(CatalogTestCase):

    def test_damaged_pages_are_found_at_open_and_the_catalog_rebuilt(self):
        child = subprocess.run([sys.executable, '-c', DAMAGE_CHILD, self.dir],
                               capture_output=True)
        self.assertEqual(child.returncode, -signal.SIGKILL,
                         child.stderr.decode()[-2000:])
        # Pages in the middle of the file overwritten, page 1 (the header
        # and the schema) intact: SQLite opens it without complaint.
        path = journal_path(self.blob_dir)
        pages = os.path.getsize(path) // 4096
        self.assertGreater(pages, 8)
        with open(path, 'r+b') as f:
            for page in range(2, pages - 1):
                f.seek(page * 4096)
                f.write(b'\xa5' * 4096)
        with self.assertLogs('zodbblob', logging.DEBUG) as logs:
            storage, db = self.open()
        warnings = [record for record in logs.records
                    if record.levelno >= logging.WARNING]
        self.assertEqual(len(warnings), 1, logs.output)
        self.assertIn('damaged', warnings[0].getMessage())
        self.assertTrue(os.path.exists(path + '.corrupt'))
        verifyObject(IBlobJournal, storage._shared.journal)
        try:
            self.assertEqual(len(self.check_catalog(storage)), 2005)
            self.assertTrue(verify(storage).clean)
        finally:
            db.close()
        self.check_nothing_left_after_deleting_everything()


class DamagedInUseTests(CatalogTestCase):

    def test_pages_damaged_while_open_lose_no_committed_row(self):
        storage, db = self.open()
        with db.transaction() as conn:
            for blob in range(1000):
                conn.root()['%d' % blob] = Blob(b'%d' % blob)
        db.close()  # the rows are in journal.sqlite itself now
        storage, db = self.open()
        path = journal_path(self.blob_dir)
        pages = os.path.getsize(path) // 4096
        self.assertGreater(pages, 4)
        with open(path, 'r+b') as f:
            for page in range(1, pages):
                f.seek(page * 4096)
                f.write(b'\xa5' * 4096)
        # Another program writes page 1 (the header only): the storage's
        # connection sees the WAL change, drops its page cache, and reads
        # the damaged pages at its next write.
        other = sqlite3.connect(path, isolation_level=None)
        other.execute('PRAGMA user_version = 7')
        other.close()
        with self.assertLogs('zodbblob', logging.WARNING) as logs:
            with db.transaction() as conn:
                for blob in range(64):
                    conn.root()['late-%d' % blob] = Blob(b'late')
            with db.transaction() as conn:
                with conn.root()['late-63'].open() as f:
                    self.assertEqual(f.read(), b'late')
            db.close()
        self.assertIn('malformed', '\n'.join(logs.output))
        storage, db = self.open()
        try:
            self.assertEqual(len(self.check_catalog(storage)), 1064)
        finally:
            db.close()
        self.check_nothing_left_after_deleting_everything()


PACK_CHILD = '''
import sys, time, ZODB, ZODB.FileStorage
from ZODB.blob import Blob
from zodbblob import BlobStorage

def open_db():
    return ZODB.DB(BlobStorage(sys.argv[1] + '/blobs',
                               ZODB.FileStorage.FileStorage(
                                   sys.argv[1] + '/Data.fs')))

db = open_db()
with db.transaction() as conn:
    conn.root()['kept'] = Blob(b'kept 1')
    conn.root()['deleted'] = Blob(b'deleted')
with db.transaction() as conn:
    with conn.root()['kept'].open('w') as f:
        f.write(b'kept 2')
    del conn.root()['deleted']
# Closed and opened again: the commit log is empty when the pack starts,
# as it is after any checkpoint, so replaying it cannot help.
db.close()
db = open_db()
last = ZODB.TimeStamp.TimeStamp(db.lastTransaction()).timeTime()
db.pack(t=max(time.time(), last) + 1)   # killed after the base packed
'''


class PackTestCase(CatalogTestCase):
    """The CLI, and the state a pack of `PACK_CHILD` must leave."""

    def run_cli(self, *args):
        out = io.StringIO()
        with redirect_stdout(out):
            code = main([*args, '--data', self.data_fs,
                         '--blob-dir', self.blob_dir])
        return code, out.getvalue()

    def check_packed(self):
        code, output = self.run_cli('verify')
        self.assertEqual(code, 0, output)
        self.assertIn('1 blob records, 1 blob files, clean', output)
        storage, db = self.open()
        try:
            self.check_catalog(storage)
            with db.transaction() as conn:
                with conn.root()['kept'].open() as f:
                    self.assertEqual(f.read(), b'kept 2')
        finally:
            db.close()


class InterruptedPackTests(PackTestCase):
    """A kill after the base packed, before the blob side marked garbage."""

    def kill_pack(self):
        env = dict(os.environ, **{KILL_POINT_VARIABLE: 'after_base_pack'})
        child = subprocess.run([sys.executable, '-c', PACK_CHILD, self.dir],
                               env=env, capture_output=True)
        self.assertEqual(child.returncode, -signal.SIGKILL,
                         child.stderr.decode()[-2000:])
        # The files of the two packed-away revisions are there, and no
        # record references them.
        code, output = self.run_cli('verify', '--quiet')
        self.assertEqual(code, 1, output)
        self.assertEqual(output.count('orphan:'), 2, output)
        self.assertIn('unfinished: a pack was interrupted after the base '
                      'storage packed; run `zodbblob recover`', output)

    def test_verify_beside_a_live_pack_raises_no_false_alarm(self):
        # What verify sees beside a server whose pack is between the base's
        # pack and the removal of its files: a kill there leaves exactly
        # that state, and another process holds the lock, as a server does.
        self.kill_pack()
        holder = subprocess.Popen(
            [sys.executable, '-c',
             'import sys\n'
             'from zodbblob.storage import hold_blob_directory\n'
             'lock = hold_blob_directory(sys.argv[1])\n'
             'print("held", flush=True)\n'
             'sys.stdin.read()\n', self.blob_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.addCleanup(holder.wait)
        self.addCleanup(holder.stdin.close)
        self.assertEqual(holder.stdout.readline(), 'held\n')
        holder.stdout.close()
        code, output = self.run_cli('verify')
        self.assertEqual(code, 0, output)
        self.assertNotIn('orphan:', output)
        self.assertIn('note: a pack ran beside this verify, so missing and '
                      'orphaned files were not judged; run verify again',
                      output)
        holder.stdin.close()
        self.assertEqual(holder.wait(), 0)
        # Once nothing holds it, the interrupted pack is what verify says.
        code, output = self.run_cli('verify', '--quiet')
        self.assertEqual(code, 1, output)
        self.assertIn('unfinished: a pack was interrupted', output)

    def test_recover_alone_finishes_a_pack_killed_after_the_base_packed(self):
        self.kill_pack()
        code, output = self.run_cli('recover')
        self.assertEqual(code, 0, output)
        self.assertIn('finished a pack interrupted after its base storage '
                      'packed (2 blob files removed)', output)
        code, output = self.run_cli('recover')
        self.assertIn('nothing left to recover', output)
        self.check_packed()

    def test_next_open_finishes_a_pack_killed_after_the_base_packed(self):
        self.kill_pack()
        with self.assertLogs('zodbblob.storage', logging.WARNING) as logs:
            db = self.open()[1]
        db.close()
        self.assertIn('finished a pack', '\n'.join(logs.output))
        self.check_packed()

    def test_a_finished_pack_leaves_no_intent(self):
        storage, db = self.open()
        try:
            pack_away(db)
            self.assertIsNone(storage._shared.journal.pack_started())
        finally:
            db.close()
        code, output = self.run_cli('recover')
        self.assertEqual(code, 0)
        self.assertIn('nothing left to recover', output)


LOST_REMOVALS_CHILD = PACK_CHILD.replace(
    'db.pack(t=max(time.time(), last) + 1)   # killed after the base packed',
    """storage = db.storage
before = {path: open(path, 'rb').read()
          for _, _, path in storage.fshelper.iter_blobs()}
db.pack(t=max(time.time(), last) + 1)
after = {path for _, _, path in storage.fshelper.iter_blobs()}
assert len(set(before) - after) == 2, (before, after)
# What a power cut before the next sync leaves: the removals undone.
import os, signal
for path in set(before) - after:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(before[path])
os.kill(os.getpid(), signal.SIGKILL)
""")


KILLED_AFTER_PACK_CHILD = PACK_CHILD.replace(
    'db.pack(t=max(time.time(), last) + 1)   # killed after the base packed',
    """db.pack(t=max(time.time(), last) + 1)
assert len(db.storage._shared.journal.garbage()) == 2
import os, signal
os.kill(os.getpid(), signal.SIGKILL)
""")


class UnsyncedPackRemovalTests(PackTestCase):
    """Pack removes files without a sync; their marks stay until one."""

    def test_a_kill_after_a_finished_pack_raises_no_alarm(self):
        child = subprocess.run(
            [sys.executable, '-c', KILLED_AFTER_PACK_CHILD, self.dir],
            capture_output=True)
        self.assertEqual(child.returncode, -signal.SIGKILL,
                         child.stderr.decode()[-2000:])
        code, output = self.run_cli('verify')
        self.assertEqual(code, 0, output)
        self.assertNotIn('unfinished', output)
        with self.assertNoLogs('zodbblob.storage', logging.WARNING):
            storage, db = self.open()
        self.assertEqual(storage._shared.journal.garbage(), [])
        db.close()
        self.check_packed()

    def test_removals_lost_before_a_sync_are_done_again_at_open(self):
        child = subprocess.run(
            [sys.executable, '-c', LOST_REMOVALS_CHILD, self.dir],
            capture_output=True)
        self.assertEqual(child.returncode, -signal.SIGKILL,
                         child.stderr.decode()[-2000:])
        with self.assertLogs('zodbblob.storage', logging.WARNING) as logs:
            db = self.open()[1]
        db.close()
        self.assertIn('finished removing the 2 blob files of an '
                      'interrupted pack', '\n'.join(logs.output))
        self.check_packed()

    def test_the_marks_go_at_close(self):
        storage, db = self.open()
        try:
            pack_away(db)
            self.assertEqual(len(storage._shared.journal.garbage()), 1)
        finally:
            db.close()
        with sqlite3.connect(journal_path(self.blob_dir)) as catalog:
            self.assertEqual(
                catalog.execute('SELECT * FROM garbage').fetchall(), [])

    def commit_marked(self, data: bytes) -> tuple[bytes, bytes]:
        """A blob committed, and then marked as garbage by hand."""
        storage, db = self.open()
        with db.transaction() as conn:
            conn.root()['blob'] = Blob(data)
        (oid, tid), = blob_records(storage)
        db.close()
        with sqlite3.connect(journal_path(self.blob_dir)) as catalog:
            catalog.execute('INSERT INTO garbage (oid, tid) VALUES (?, ?)',
                            (oid, tid))
        return oid, tid

    def test_a_marked_revision_the_base_has_gets_its_row_back(self):
        # A base that went back to before its pack, and the removals
        # with it: the file is back and marked, its row gone.
        oid, tid = self.commit_marked(b'back again')
        with sqlite3.connect(journal_path(self.blob_dir)) as catalog:
            catalog.execute('DELETE FROM blob WHERE oid = ? AND tid = ?',
                            (oid, tid))
            # As pack's delete left it: the total without the row.
            catalog.execute("DELETE FROM meta WHERE name = 'total_size'")
        storage, db = self.open()
        try:
            self.check_catalog(storage)
            self.assertEqual(storage._shared.journal.garbage(), [])
        finally:
            db.close()

    def test_marks_that_cannot_be_forgotten_fail_nothing(self):
        import zodbblob.storage.pack
        self.addCleanup(setattr, zodbblob.storage.pack, 'REMOVALS_PER_SYNC',
                        zodbblob.storage.pack.REMOVALS_PER_SYNC)
        zodbblob.storage.pack.REMOVALS_PER_SYNC = 1   # pack checkpoints
        storage, db = self.open()
        journal = storage._shared.journal

        def locked(pairs):
            raise JournalError('Cannot forget garbage in blob catalog %s: '
                               'database is locked' % journal.path)

        try:
            with db.transaction() as conn:
                conn.root()['blob'] = Blob(b'one')
            with db.transaction() as conn:
                del conn.root()['blob']
            journal.forget_garbage = locked
            with self.assertLogs('zodbblob.storage', logging.WARNING) as logs:
                pack_now(db)
            self.assertIn('database is locked; the next open forgets them',
                          '\n'.join(logs.output))
        finally:
            db.close()
        storage, db = self.open()
        try:
            self.assertEqual(storage._shared.journal.garbage(), [])
            self.check_catalog(storage)
        finally:
            db.close()

    def test_a_removal_whose_directory_went_meanwhile_syncs_the_parent(self):
        # Pack removed an oid's last file and its directory while a
        # checkpoint synced the removals listed before.
        import zodbblob.storage.checkpoint as checkpoint
        top = os.path.join(self.dir, 'top')
        gone = os.path.join(top, 'oid')
        os.makedirs(gone)
        synced = []
        fsync_directory = checkpoint.fsync_directory

        def removing_first(directory):
            if not synced:
                os.rmdir(gone)     # between the lookup and the sync
            synced.append(directory)
            fsync_directory(directory)

        self.addCleanup(setattr, checkpoint, 'fsync_directory',
                        fsync_directory)
        checkpoint.fsync_directory = removing_first
        checkpoint.fsync_removals([os.path.join(gone, 'a.blob')])
        self.assertEqual(synced, [gone, top])

    def test_a_marked_revision_the_base_has_is_kept(self):
        self.commit_marked(b'still here')
        storage, db = self.open()
        try:
            with db.transaction() as conn:
                with conn.root()['blob'].open() as f:
                    self.assertEqual(f.read(), b'still here')
            self.assertEqual(storage._shared.journal.garbage(), [])
            self.check_catalog(storage)
        finally:
            db.close()


class UndoTests(CatalogTestCase):
    """Zope's undo of an edit that replaced a Blob by a new one."""

    def test_undo_of_a_replaced_blob_leaves_no_stray_file(self):
        storage, db = self.open()
        try:
            with db.transaction() as conn:
                conn.root()['document'] = Document(b'first upload')
            with db.transaction() as conn:
                conn.root()['document'].file = Blob(b'second upload')
            undo = db.undoLog(0, 1)[0]['id']
            db.undo(undo)
            transaction.commit()
            with db.transaction() as conn:
                with conn.root()['document'].file.open() as f:
                    self.assertEqual(f.read(), b'first upload')
            report = verify(storage)
            self.assertEqual(report.orphans, [])
            self.assertTrue(report.clean, report.lines())
            self.check_catalog(storage)
            # Undoing the undo brings the second upload back, with its file.
            db.undo(db.undoLog(0, 1)[0]['id'])
            transaction.commit()
            with db.transaction() as conn:
                with conn.root()['document'].file.open() as f:
                    self.assertEqual(f.read(), b'second upload')
            self.assertTrue(verify(storage).clean)
            self.check_catalog(storage)
        finally:
            db.close()

    def test_undo_of_a_changed_blob_links_the_earlier_revision(self):
        storage, db = self.open()
        try:
            with db.transaction() as conn:
                conn.root()['document'] = Document(b'draft')
            with db.transaction() as conn:
                with conn.root()['document'].file.open('w') as f:
                    f.write(b'final')
            db.undo(db.undoLog(0, 1)[0]['id'])
            transaction.commit()
            with db.transaction() as conn:
                with conn.root()['document'].file.open() as f:
                    self.assertEqual(f.read(), b'draft')
            self.assertTrue(verify(storage).clean)
            self.check_catalog(storage)
        finally:
            db.close()


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
