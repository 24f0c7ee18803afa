"""Commit with one sync: the torn last transaction, and who sees a tid when.

A storage that opens its FileStorage itself (the ``<zodbblob>`` section,
``zodbblob.open_filestorage``) finishes the base while its commit
record's fdatasync (S1) may still run.  A power cut can then keep the
base's commit (S2) and lose the record: the next open must remove that
last transaction, which nobody was told about, and touch nothing else.
And until ``tpc_finish`` returns, nobody may learn the new tid: not
another connection, not another ZEO client.
"""

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import unittest

import transaction
import ZEO.ClientStorage
import ZEO.StorageServer
import ZODB
import ZODB.blob
import ZODB.config
import ZODB.FileStorage
from ZODB.blob import Blob
from ZODB.POSException import POSKeyError
from ZODB.utils import oid_repr

import zodbblob
import zodbblob.storage
from zodbblob.layout import FilesystemHelper
from zodbblob.storage import commitlog
from zodbblob.storage.commitlog import CommitLog, commit_log_path
from zodbblob.storage.filestorage import last_transaction
from zodbblob.storage.tests import test_crash
from zodbblob.storage.tests.test_crash import (
    COMMIT_POINTS,
    CrashTestCase,
    run_child,
)
from zodbblob.testing import FailingVote
from zodbblob.tests.crash_child import open_configured
from zodbblob.tools.verify import verify

# after_journal_begin is the serial protocol's: its vote waits for the
# record's sync.
ONE_SYNC_POINTS = tuple(
    point for point in COMMIT_POINTS if point != 'after_journal_begin') + (
    'after_base_finish_before_log_sync', 'after_log_sync')
NO_CHECKPOINT = ('--log-mib', '256')


def lose_last_record(blob_dir: str) -> bytes:
    """Take away the commit log's last record, as a power cut before its
    fdatasync returned would (the log is zero-filled): return its tid."""
    path = commit_log_path(blob_dir)
    log = CommitLog(path, read_only=True)
    try:
        records = log.records
    finally:
        log.close()
    position = commitlog.FIRST_RECORD
    for record in records[:-1]:
        position += commitlog._aligned(
            commitlog.record_length(record.entries))
    last = records[-1]
    length = commitlog._aligned(commitlog.record_length(last.entries))
    with open(path, 'r+b') as f:
        f.seek(position)
        f.write(b'\0' * length)
    return last.tid


def lose_unsynced_names(blob_dir: str) -> None:
    """Take away the final names of the logged transactions' files: a
    checkpoint, not their commit, makes those durable."""
    log = CommitLog(commit_log_path(blob_dir), read_only=True)
    fshelper = FilesystemHelper(blob_dir)
    try:
        for record in log.records:
            for entry in record.entries:
                final = fshelper.getBlobFilename(entry.oid, record.tid)
                if os.path.exists(final):
                    os.remove(final)
    finally:
        log.close()


class OneSyncCrashTests(CrashTestCase):
    """SIGKILL, then what a power cut could take, then an open through
    the configuration: every acknowledged transaction intact, the torn one
    gone, no orphan, verify clean."""

    def open_storage(self):
        return open_configured(self.dir)

    @property
    def data_fs(self):
        return os.path.join(self.dir, 'Data.fs')

    @property
    def blob_dir(self):
        return os.path.join(self.dir, 'blobs')

    def kill(self, point, *args):
        result = run_child(self.dir, '30', '--config', *args,
                           kill_point=point)
        self.assertEqual(result.returncode, -signal.SIGKILL,
                         f'child was not killed at {point}: '
                         f'{result.stderr.decode()[-2000:]}')

    def assert_verify_clean(self):
        storage = self.open_storage()
        try:
            self.assertEqual(storage.commit_protocol, 'one sync')
            report = verify(storage)
            self.assertTrue(report.clean, report)
        finally:
            storage.close()

    def test_kill_at_each_commit_point_with_one_sync(self, *args,
                                                     points=()):
        for point in ONE_SYNC_POINTS + points:
            with self.subTest(point=point):
                shutil.rmtree(self.dir)
                os.mkdir(self.dir)
                self.kill(f'{point}:6', '--checkpoint-every', '4', *args)
                last_tid, _ = self.check_guarantee()
                self.assertIsNotNone(last_tid)

    def test_kill_at_each_commit_point_with_one_sync_and_dedup(self):
        self.test_kill_at_each_commit_point_with_one_sync(
            '--dedup', points=('mid_dedup_link',))

    def roll_back_torn_transaction(self, *args):
        self.kill('after_base_finish_before_log_sync:6', *NO_CHECKPOINT,
                  *args)
        torn = last_transaction(self.data_fs)
        self.assertEqual(torn.status, b' ')
        self.assertTrue(torn.blob_oids)
        self.assertEqual(lose_last_record(self.blob_dir), torn.tid)
        lose_unsynced_names(self.blob_dir)
        acknowledged, _ = self.committed_log()
        self.assertLess(acknowledged, torn.tid)
        size = os.path.getsize(self.data_fs)

        with self.assertLogs('zodbblob.storage', logging.WARNING) as logs:
            self.check_guarantee()
        said = '\n'.join(logs.output)
        self.assertIn(f'Rolled back transaction {oid_repr(torn.tid)} at '
                      f'the end of {self.data_fs}', said)
        # Only the torn transaction went, and its bytes were kept aside.
        self.assertEqual(last_transaction(self.data_fs).tid, acknowledged)
        self.assertEqual(os.path.getsize(self.data_fs), torn.start)
        self.assertEqual(os.path.getsize(self.data_fs + '.tr0'),
                         size - torn.start)
        self.assert_verify_clean()

    def test_a_torn_last_transaction_is_rolled_back(self):
        # Blob bytes in the record: the files sat in staging, unpublished.
        self.roll_back_torn_transaction()

    def test_a_torn_last_transaction_of_synced_files_is_rolled_back(self):
        # Files made durable under their staged names, never published.
        self.roll_back_torn_transaction('--not-inline')

    def test_recover_rolls_back_a_torn_transaction_and_says_so(self):
        self.kill('after_base_finish_before_log_sync:6', *NO_CHECKPOINT)
        torn = last_transaction(self.data_fs)
        lose_last_record(self.blob_dir)
        result = subprocess.run(
            [sys.executable, '-m', 'zodbblob.cli', 'recover', '--data',
             self.data_fs, '--blob-dir', self.blob_dir],
            capture_output=True, text=True, timeout=300, check=False)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f'Rolled back transaction {oid_repr(torn.tid)} at the '
                      f'end of {self.data_fs}', result.stdout)
        self.assertEqual(os.path.getsize(self.data_fs), torn.start)
        self.check_guarantee()

    def test_a_durable_record_is_rolled_forward_not_back(self):
        # The same kill without the power cut: the record survived, so the
        # transaction is kept, and its files get their names.
        self.kill('after_base_finish_before_log_sync:6', *NO_CHECKPOINT)
        last = last_transaction(self.data_fs)
        lose_unsynced_names(self.blob_dir)
        self.check_guarantee()
        self.assertEqual(last_transaction(self.data_fs), last)
        self.assertFalse(os.path.exists(self.data_fs + '.tr0'))
        self.assert_verify_clean()

    def test_a_clean_close_leaves_data_fs_alone(self):
        result = run_child(self.dir, '5', '--config')
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        last = last_transaction(self.data_fs)
        # Even with a file gone (no crash can do that after a clean
        # close), the last transaction is not taken for a torn one.
        os.remove(FilesystemHelper(self.blob_dir).getBlobFilename(
            last.blob_oids[0], last.tid))
        storage = self.open_storage()
        storage.close()
        self.assertEqual(last_transaction(self.data_fs), last)
        self.assertFalse(os.path.exists(self.data_fs + '.tr0'))

    def test_a_transaction_stock_zodb_committed_later_is_kept(self):
        self.kill('after_journal_commit:6', *NO_CHECKPOINT)
        # Stock ZODB commits into the directory zodbblob left unclosed: it
        # renames its files into place at storeBlob.
        db = ZODB.DB(ZODB.blob.BlobStorage(
            self.blob_dir, ZODB.FileStorage.FileStorage(self.data_fs)))
        with db.transaction() as conn:
            conn.root()['stock'] = Blob(b'committed by stock ZODB')
        db.close()
        last = last_transaction(self.data_fs)
        self.assertTrue(last.blob_oids)
        db = ZODB.DB(self.open_storage())
        try:
            with db.transaction() as conn, conn.root()['stock'].open() as f:
                self.assertEqual(f.read(), b'committed by stock ZODB')
        finally:
            db.close()
        self.assertEqual(last_transaction(self.data_fs), last)
        self.assertFalse(os.path.exists(self.data_fs + '.tr0'))

    def test_a_torn_transaction_that_is_not_last_is_left_alone(self):
        self.kill('after_base_finish_before_log_sync:6', *NO_CHECKPOINT)
        lose_last_record(self.blob_dir)
        # Another transaction (no blobs) after it: a rollback would take
        # that one too.
        db = ZODB.DB(ZODB.FileStorage.FileStorage(self.data_fs))
        with db.transaction() as conn:
            conn.root()['later'] = 1
        db.close()
        last = last_transaction(self.data_fs)
        storage = self.open_storage()
        storage.close()
        self.assertEqual(last_transaction(self.data_fs), last)
        self.assertFalse(os.path.exists(self.data_fs + '.tr0'))

    def test_a_storage_given_its_base_refuses_a_torn_transaction(self):
        self.kill('after_base_finish_before_log_sync:6', *NO_CHECKPOINT)
        torn = last_transaction(self.data_fs)
        lose_last_record(self.blob_dir)
        size = os.path.getsize(self.data_fs)
        base = ZODB.FileStorage.FileStorage(self.data_fs)
        try:
            with self.assertRaises(zodbblob.BlobStorageError) as caught:
                zodbblob.BlobStorage(self.blob_dir, base)
        finally:
            base.close()
        self.assertIn(f'{self.data_fs} ends with transaction '
                      f'{oid_repr(torn.tid)}', str(caught.exception))
        self.assertEqual(os.path.getsize(self.data_fs), size)
        # The configured open rolls it back.
        self.check_guarantee()


# By its module: a class imported by name would run here a second time.
class OneSyncRandomKillTests(test_crash.RandomKillTests):
    """SIGKILL at random moments, 30 times, committing with one sync
    (the power-cut tests cut it hundreds of times more; 30 for the
    suite's 15 minutes on two busy cores)."""

    child_args = ('--config',)
    kills = 30

    def open_storage(self):
        return open_configured(self.dir)


class OneSyncVisibilityTests(unittest.TestCase):
    """Nobody learns a tid before its blob files are published.

    The commit record's sync is held back (a job queued ahead of it on
    the storage's own sync thread), so a transaction stays between the
    base's finish and its publish for as long as the test wants.
    """

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-onesync-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.storage = zodbblob.open_filestorage(
            os.path.join(self.dir, 'Data.fs'),
            blob_dir=os.path.join(self.dir, 'blobs'))
        self.db = ZODB.DB(self.storage)
        self.addCleanup(self.db.close)
        with self.db.transaction() as conn:
            conn.root()['blob'] = Blob(b'first')

    def hold_record_sync(self):
        release = threading.Event()
        self.storage._shared.syncer().submit(release.wait, 120)
        self.addCleanup(release.set)
        return release

    def commit_in_thread(self, data):
        done = threading.Event()

        def commit():
            manager = transaction.TransactionManager()
            conn = self.db.open(manager)
            with conn.root()['blob'].open('w') as f:
                f.write(data)
            manager.commit()
            conn.close()
            done.set()

        thread = threading.Thread(target=commit, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 120)
        return thread, done

    def wait_for_base_finish(self, before):
        # The base's own last tid moves at its finish; ours does not yet.
        for _ in range(12000):
            if self.storage.base.lastTransaction() != before:
                return self.storage.base.lastTransaction()
            threading.Event().wait(0.01)
        self.fail('the base never finished')

    def test_no_connection_sees_the_tid_before_its_file(self):
        before = self.storage.lastTransaction()
        release = self.hold_record_sync()
        thread, done = self.commit_in_thread(b'second')
        tid = self.wait_for_base_finish(before)
        self.assertFalse(done.is_set())
        self.assertEqual(self.storage.lastTransaction(), before)
        manager = transaction.TransactionManager()
        conn = self.db.open(manager)
        with conn.root()['blob'].open() as f:
            self.assertEqual(f.read(), b'first')
        manager.abort()
        oid = conn.root()['blob']._p_oid
        conn.close()
        # Whoever learned the tid anyway (a load of the current record)
        # waits for its file instead of being told it does not exist.
        found = []
        reader = threading.Thread(
            target=lambda: found.append(self.storage.loadBlob(oid, tid)),
            daemon=True)
        reader.start()
        reader.join(0.2)
        self.assertEqual(found, [])
        release.set()
        thread.join(120)
        reader.join(120)
        self.assertTrue(done.is_set())
        with open(found[0], 'rb') as f:
            self.assertEqual(f.read(), b'second')
        self.assertEqual(self.storage.lastTransaction(), tid)
        with self.db.transaction() as conn, conn.root()['blob'].open() as f:
            self.assertEqual(f.read(), b'second')

    def test_an_abort_releases_the_next_transaction(self):
        manager = transaction.TransactionManager()
        conn = self.db.open(manager)
        conn.root()['other'] = Blob(b'aborted')
        manager.get().join(FailingVote(RuntimeError('vote refused')))
        with self.assertRaises(RuntimeError):
            manager.commit()
        manager.abort()
        conn.close()
        with self.db.transaction() as conn:
            conn.root()['next'] = Blob(b'committed after')
        with self.db.transaction() as conn, conn.root()['next'].open() as f:
            self.assertEqual(f.read(), b'committed after')
            self.assertNotIn('other', conn.root())
            with self.assertRaises(POSKeyError):
                self.storage.loadBlob(b'\0' * 7 + b'\x09', b'\0' * 8)


class OneSyncZEOTests(unittest.TestCase):
    """The same over a real ZEO server, to a client that reads the
    server's blob directory itself (``shared_blob_dir``): it learns a tid
    from its invalidation, which must not come before the file."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-onesync-zeo-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.blob_dir = os.path.join(self.dir, 'blobs')
        self.storage = zodbblob.open_filestorage(
            os.path.join(self.dir, 'Data.fs'), blob_dir=self.blob_dir)
        self.server = ZEO.StorageServer.StorageServer(
            ('127.0.0.1', 0), {'1': self.storage})
        self.server.start_thread()
        self.addCleanup(self.server.close)

    def client(self) -> ZODB.DB:
        db = ZODB.DB(ZEO.ClientStorage.ClientStorage(
            self.server.addr, blob_dir=self.blob_dir, shared_blob_dir=True,
            wait_timeout=120))
        self.addCleanup(db.close)
        return db

    def read(self, db):
        with db.transaction() as conn, conn.root()['blob'].open() as f:
            return f.read()

    def test_a_shared_blob_dir_client_never_sees_a_tid_before_its_file(self):
        writer, reader = self.client(), self.client()
        with writer.transaction() as conn:
            conn.root()['blob'] = Blob(b'first')
        before = writer.storage.lastTransaction()
        wait_until(lambda: reader.storage.lastTransaction() == before)
        self.assertEqual(self.read(reader), b'first')
        release = threading.Event()
        self.storage._shared.syncer().submit(release.wait, 120)
        self.addCleanup(release.set)

        def commit():
            with writer.transaction() as conn, \
                    conn.root()['blob'].open('w') as f:
                f.write(b'second')

        thread = threading.Thread(target=commit, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 120)
        wait_until(lambda: self.storage.base.lastTransaction() != before)
        tid = self.storage.base.lastTransaction()
        for _ in range(5):
            # However long the record's sync takes, the reader is told
            # nothing, and reads what it read.
            self.assertEqual(reader.storage.lastTransaction(), before)
            self.assertEqual(self.read(reader), b'first')
            threading.Event().wait(0.1)
        release.set()
        thread.join(120)
        wait_until(lambda: reader.storage.lastTransaction() == tid)
        self.assertEqual(self.read(reader), b'second')


def wait_until(condition, timeout=120):
    for _ in range(int(timeout * 100)):
        if condition():
            return
        threading.Event().wait(0.01)
    raise AssertionError(f'waited {timeout} s in vain')


class OpenFileStorageInputTests(unittest.TestCase):
    """A wrong path is refused in one line naming it, changing nothing."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-onesync-input-')
        self.addCleanup(shutil.rmtree, self.dir, True)

    def assertRefused(self, path, said, **options):
        blob_dir = os.path.join(self.dir, 'blobs')
        with self.assertRaises(ValueError) as caught:
            zodbblob.open_filestorage(path, blob_dir=blob_dir, **options)
        message = str(caught.exception)
        self.assertIn(said, message)
        self.assertNotIn('\n', message)
        self.assertFalse(os.path.exists(blob_dir))

    def test_a_missing_directory_a_directory_and_blob_dir_are_refused(self):
        missing = os.path.join(self.dir, 'nowhere', 'Data.fs')
        self.assertRefused(missing, f'FileStorage {missing}: its directory '
                                    f'{os.path.dirname(missing)} does not '
                                    f'exist')
        self.assertRefused(self.dir, f'FileStorage {self.dir} is not a '
                                     f'regular file')
        path = os.path.join(self.dir, 'Data.fs')
        with self.assertRaises(ValueError) as caught:
            zodbblob.storage.FileStorageOpener(path, blob_dir='elsewhere')
        self.assertIn(f'FileStorage {path}: blob_dir elsewhere',
                      str(caught.exception))
        self.assertEqual(os.listdir(self.dir), [])


class HostileDataFsTailTests(unittest.TestCase):
    """The tail reader meets whatever a crash or a hand left at the end of
    ``Data.fs``: anything that does not read back as one whole
    transaction is None (FileStorage's own open deals with it), never an
    exception, never a wrong transaction."""

    def setUp(self):
        self.top = tempfile.mkdtemp(prefix='zodbblob-tail-')
        self.addCleanup(shutil.rmtree, self.top, ignore_errors=True)
        self.data_fs = os.path.join(self.top, 'Data.fs')
        storage = ZODB.FileStorage.FileStorage(
            self.data_fs, blob_dir=os.path.join(self.top, 'blobs'))
        db = ZODB.DB(storage)
        with db.transaction() as conn:
            conn.root()['blob'] = Blob(b'tail')
        self.tid = db.lastTransaction()
        db.close()
        with open(self.data_fs, 'rb') as f:
            self.good = f.read()

    def tail_of(self, data: bytes):
        with open(self.data_fs, 'wb') as f:
            f.write(data)
        return last_transaction(self.data_fs)

    def test_the_whole_file_reads_its_last_transaction(self):
        last = self.tail_of(self.good)
        self.assertEqual(last.tid, self.tid)
        self.assertEqual(len(last.blob_oids), 1)

    def test_hostile_tails_read_as_none(self):
        good = self.good
        hostile = {
            'empty': b'',
            'magic only': good[:4],
            'not a Data.fs': b'\x7fELF' + good[4:],
            'garbage appended': good + os.urandom(37),
            'a length past the start': good[:-8] + (2 ** 63).to_bytes(8, 'big'),
            'a length of zero': good[:-8] + bytes(8),
            'cut inside the last record': good[:-20] + good[-8:],
            'zeros': bytes(len(good)),
        }
        for name, data in hostile.items():
            with self.subTest(name):
                self.assertIsNone(self.tail_of(data))

    def test_a_back_pointer_loop_ends(self):
        # A data record whose back pointer leads to itself.
        from zodbblob.storage.filestorage import _Reader
        record = bytearray(b'FS21' + bytes(42 + 8))
        record[4 + 34:4 + 42] = bytes(8)            # size 0: a back pointer
        record[4 + 42:4 + 50] = (4).to_bytes(8, 'big')  # to itself
        with open(self.data_fs, 'wb') as f:
            f.write(record)
        with open(self.data_fs, 'rb') as f:
            self.assertIsNone(_Reader(f.fileno()).data_at(4))


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
