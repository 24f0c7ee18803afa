"""Crash safety: SIGKILL at every step of commit, pack and recovery.

A child process (``crash_child``) commits blob transactions and is killed,
either by itself at a named kill point or by the parent at a random
moment.  The parent then reopens the storage and checks the guarantee:

- every blob of every transaction the child saw committed reads back with
  its exact bytes;
- no file of an uncommitted transaction is left in the blob directory:
  the blob files on disk are exactly the blob records the base holds;
- ``tmp/`` is empty and the commit log holds no record.
"""

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest

import ZODB
import ZODB.blob
import ZODB.FileStorage
import zc.lockfile
from ZODB.utils import oid_repr

from zodbblob import BlobStorage
from zodbblob.storage.commitlog import CommitLog
from zodbblob.storage.commitlog import commit_log_path
from zodbblob.storage.commitlog import unfinished_records
from zodbblob.storage.catalog import KILL_POINT_VARIABLE
from zodbblob.storage.catalog import journal_path
from zodbblob.storage.lock import BlobDirectoryInUse
from zodbblob.layout import FilesystemHelper
from zodbblob.tools.verify import verify


COMMIT_POINTS = (
    'after_store_blob', 'after_base_vote', 'after_journal_begin',
    'mid_publish', 'after_publish', 'after_base_finish',
    'after_journal_commit', 'mid_checkpoint',
)
# Only transactions whose blobs are not in the commit log sync their files.
NOT_INLINE_POINTS = COMMIT_POINTS + ('after_staging_fsync',)
# With dedup on, a file of a content committed already is linked to it.
DEDUP_POINTS = ('mid_dedup_link',)
# Checkpoints every few transactions, not only at close.
CHECKPOINTS = ('--checkpoint-every', '4')
# The shapes of commit: blob bytes in the log; files synced one by one;
# many files synced by one syncfs.
MODES = ((), ('--not-inline',), ('--not-inline', '--many'))
PACK_POINTS = ('after_base_pack', 'mid_pack_removal')


def run_child(directory, *args, kill_point=None, timeout=120):
    env = dict(os.environ)
    env.pop(KILL_POINT_VARIABLE, None)
    if kill_point:
        env[KILL_POINT_VARIABLE] = kill_point
    return subprocess.run(
        [sys.executable, '-m', 'zodbblob.tests.crash_child', directory]
        + list(args), env=env, timeout=timeout, capture_output=True)


def start_child(directory, *args):
    env = dict(os.environ)
    env.pop(KILL_POINT_VARIABLE, None)
    return subprocess.Popen(
        [sys.executable, '-m', 'zodbblob.tests.crash_child', directory]
        + list(args), env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)


def open_after_kill(open_storage, timeout=60.0):
    """`open_storage()` once the killed process's locks are free.

    A storage process killed from outside while its scrubber started the
    hashing process leaves that process holding a copy of the locks from
    its fork to its exec (``killpoints.SPAWNING``): a moment, longer on a
    loaded machine.  This waits for them, as a supervisor's restart does,
    at most `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return open_storage()
        except (zc.lockfile.LockError, BlobDirectoryInUse):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class CrashTestCase(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-crash-')
        self.addCleanup(shutil.rmtree, self.dir, True)

    def committed_log(self):
        """(last tid the child saw committed, expected sha256 per key)."""
        expected, last_tid = {}, None
        path = os.path.join(self.dir, 'committed')
        if not os.path.exists(path):
            return None, expected
        with open(path) as f:
            for line in f:
                if not line.endswith('\n'):
                    break  # the child died while logging: not seen
                entry = json.loads(line)
                last_tid = bytes.fromhex(entry['tid'])
                expected.update(entry['changed'])
        return last_tid, expected

    def open_storage(self):
        """The storage the check reopens: as the child opened it."""
        return BlobStorage(os.path.join(self.dir, 'blobs'),
                           ZODB.FileStorage.FileStorage(
                               os.path.join(self.dir, 'Data.fs')))

    def check_guarantee(self, pack=False):
        storage = open_after_kill(self.open_storage)
        db = ZODB.DB(storage)
        try:
            self.assertEqual(len(storage._shared.commit_log), 0)
            self.assertEqual(storage._shared.journal.garbage(), [])
            self.assertEqual(
                os.listdir(os.path.join(storage.fshelper.base_dir, 'tmp')),
                [])
            last_tid, expected = self.committed_log()
            if last_tid is not None:
                # Read as of the last transaction the child saw commit: a
                # later one may have committed without being logged.
                conn = db.open(at=last_tid)
                root = conn.root()
                for key, sha in expected.items():
                    if sha is None:
                        self.assertNotIn(key, root)
                        continue
                    with root[key].open() as f:
                        self.assertEqual(
                            hashlib.sha256(f.read()).hexdigest(), sha,
                            'wrong bytes for %s after the crash' % key)
                conn.close()
            if pack:
                time.sleep(0.002)
                db.pack()  # finishes what a killed pack started
            records, last = set(), None
            for txn in storage.base.iterator():
                last = txn.tid
                for record in txn:
                    if ZODB.blob.is_blob_record(record.data):
                        records.add((record.oid, record.tid))
            on_disk = {(oid, tid)
                       for oid, tid, path in storage.fshelper.iter_blobs()}
            self.assertEqual(on_disk - records, set(),
                             'files of uncommitted transactions left')
            self.assertEqual(records - on_disk, set(),
                             'committed blob files lost')
            self.rebase_log(db, last)
            return last_tid, expected
        finally:
            db.close()


    def rebase_log(self, db, last_tid):
        """Make the database's current state the next check's baseline.

        The child may have committed one transaction it did not live to
        log; its files were checked above, but the log cannot know its
        bytes.  The log also loses any half-written last line.
        """
        state = {}
        with db.transaction() as conn:
            for key, blob in conn.root().items():
                with blob.open() as f:
                    state[key] = hashlib.sha256(f.read()).hexdigest()
        for key in self.committed_log()[1]:
            state.setdefault(key, None)
        path = os.path.join(self.dir, 'committed')
        with open(path + '.new', 'w') as f:
            f.write(json.dumps({'tid': last_tid.hex(),
                                'changed': state}) + '\n')
        os.replace(path + '.new', path)


class KillPointTests(CrashTestCase):
    """A kill at each named point of the commit and pack protocols."""

    def kill_at(self, point, *args):
        result = run_child(self.dir, '30', *args, kill_point=point)
        self.assertEqual(result.returncode, -signal.SIGKILL,
                         'child was not killed at %s: %s'
                         % (point, result.stderr.decode()[-2000:]))

    def kill_at_each(self, points, *args, hit=6):
        for point in points:
            with self.subTest(point=point):
                shutil.rmtree(self.dir)
                os.mkdir(self.dir)
                # The 6th hit: whatever the shape of the transactions, at
                # least one transaction was committed (and logged) before.
                # The 3rd checkpoint follows at least 8 transactions.
                self.kill_at('%s:%d' % (
                    point, 3 if point == 'mid_checkpoint' else hit),
                    *CHECKPOINTS, *args)
                last_tid, expected = self.check_guarantee()
                self.assertIsNotNone(last_tid)

    def test_kill_at_each_commit_point(self):
        # Small transactions: the blobs' bytes are in the commit log, and
        # their files are not synced before the checkpoint.
        self.kill_at_each(COMMIT_POINTS)

    def test_kill_at_each_commit_point_with_synced_files(self):
        # Files made durable one by one, staged names kept until the
        # checkpoint.
        self.kill_at_each(NOT_INLINE_POINTS, '--not-inline')

    def test_kill_at_each_commit_point_with_many_files(self):
        # 12 files per transaction, made durable by one syncfs.
        self.kill_at_each(NOT_INLINE_POINTS, '--not-inline', '--many',
                          hit=30)

    def test_kill_at_each_commit_point_with_dedup(self):
        # Contents drawn from a few: most files are links to equal ones.
        self.kill_at_each(COMMIT_POINTS + DEDUP_POINTS, '--dedup')

    def test_kill_at_each_commit_point_with_dedup_and_synced_files(self):
        self.kill_at_each(NOT_INLINE_POINTS + DEDUP_POINTS, '--not-inline',
                          '--dedup')

    def test_kill_at_each_commit_point_with_dedup_and_many_files(self):
        self.kill_at_each(NOT_INLINE_POINTS + DEDUP_POINTS, '--not-inline',
                          '--many', '--dedup', hit=30)

    def test_kill_at_each_pack_point(self):
        for point in PACK_POINTS:
            with self.subTest(point=point):
                shutil.rmtree(self.dir)
                os.mkdir(self.dir)
                self.kill_at(point + ':2', '--pack')
                self.check_guarantee(pack=True)

    def test_kill_during_recovery_then_recover_again(self):
        self.kill_at('after_journal_begin:4')
        # The next open replays the intent, and is killed while doing it.
        result = run_child(self.dir, '1', kill_point='mid_recovery')
        self.assertEqual(result.returncode, -signal.SIGKILL)
        self.check_guarantee()

    def test_pack_killed_while_removing_is_finished_by_the_next_open(self):
        self.kill_at('mid_pack_removal:1', '--pack')
        blob_dir = os.path.join(self.dir, 'blobs')
        storage = BlobStorage(blob_dir, ZODB.FileStorage.FileStorage(
            os.path.join(self.dir, 'Data.fs')))
        try:
            self.assertEqual(storage._shared.journal.garbage(), [])
        finally:
            storage.close()
        self.check_guarantee()


class LostWritesTests(CrashTestCase):
    """What a power cut could lose after a crash, and the log restores.

    A SIGKILL keeps the page cache; a power cut does not.  Until a
    checkpoint, zodbblob syncs neither the files of transactions whose
    commit record holds their bytes, nor final names, nor catalog rows.
    Each test kills the child, takes away what a power cut could have (for
    the transactions in the log only: a checkpoint made the rest
    durable), and checks the guarantee.
    """

    def kill_child(self, *args):
        # A log large enough that no checkpoint comes before the kill.
        result = run_child(self.dir, '30', '--log-mib', '256', *args,
                           kill_point='after_journal_commit:20')
        self.assertEqual(result.returncode, -signal.SIGKILL)
        blob_dir = os.path.join(self.dir, 'blobs')
        log = CommitLog(commit_log_path(blob_dir), read_only=True)
        self.addCleanup(log.close)
        fshelper = FilesystemHelper(blob_dir)
        logged = [(entry, fshelper.getBlobFilename(entry.oid, record.tid))
                  for record in log.records for entry in record.entries]
        self.assertGreater(len(logged), 19)
        return logged

    def check_recovered(self, said='rolled forward', level=logging.WARNING):
        with self.assertLogs('zodbblob.storage', level) as logs:
            self.check_guarantee()
        self.assertIn(said, '\n'.join(
            line for line in logs.output
            if line.startswith(logging.getLevelName(level) + ':')))

    def test_lost_and_emptied_files_are_rewritten_from_the_log(self):
        logged = self.kill_child()
        inline = [final for entry, final in logged if entry.data is not None]
        # Transactions of more than INLINE_LIMIT bytes (several 3 MiB
        # blobs) log names instead; their files were synced.
        self.assertGreater(len(inline), len(logged) / 2)
        for number, final in enumerate(inline):
            if number % 2:
                os.remove(final)
            else:
                open(final, 'wb').close()
        self.check_recovered()

    def test_lost_final_names_are_linked_from_the_staged_names(self):
        logged = self.kill_child('--not-inline')
        for entry, final in logged:
            self.assertIsNone(entry.data)
            os.remove(final)
        self.check_recovered()

    def verify_read_only(self):
        storage = BlobStorage(
            os.path.join(self.dir, 'blobs'), ZODB.FileStorage.FileStorage(
                os.path.join(self.dir, 'Data.fs'), read_only=True))
        try:
            return verify(storage)
        finally:
            storage.close()

    def test_verify_read_only_reports_only_what_recovery_would_change(self):
        logged = self.kill_child()
        blob_dir = os.path.join(self.dir, 'blobs')
        self.assertGreater(unfinished_records(commit_log_path(blob_dir)), 1)
        # Every logged transaction finished before the kill: recovery
        # would at most write the catalog rows still in memory then.
        self.assertEqual(self.verify_read_only().unfinished, [])
        entry, final = next((entry, final) for entry, final in logged
                            if entry.data is not None)
        os.remove(final)
        oid, tid = FilesystemHelper(blob_dir).splitBlobFilename(final)
        report = self.verify_read_only()
        self.assertEqual(report.unfinished, [
            'unfinished: transaction %s was interrupted; recovery would '
            'roll its blob files forward: run `zodbblob recover`'
            % oid_repr(tid)])
        self.check_recovered()

    def test_lost_catalog_rows_are_added_again(self):
        logged = self.kill_child()
        blob_dir = os.path.join(self.dir, 'blobs')
        db = sqlite3.connect(journal_path(blob_dir), isolation_level=None)
        with db:
            db.execute('BEGIN')
            for entry, final in logged:
                oid, tid = FilesystemHelper(blob_dir).splitBlobFilename(final)
                db.execute('DELETE FROM blob WHERE oid = ? AND tid = ?',
                           (oid, tid))
            db.execute("UPDATE meta SET value = (SELECT total(size) FROM "
                       "blob) WHERE name = 'total_size'")
        db.close()
        # Rows alone are routine (every unclosed stop leaves some): INFO.
        self.check_recovered('wrote the catalog rows of', logging.INFO)
        storage = BlobStorage(blob_dir, ZODB.FileStorage.FileStorage(
            os.path.join(self.dir, 'Data.fs')))
        try:
            files = [(oid, tid, os.path.getsize(path)) for oid, tid, path
                     in storage.fshelper.iter_blobs()]
            self.assertEqual(sorted(storage._shared.journal.committed()),
                             sorted(files))
            self.assertEqual(storage.getSize() - storage.base.getSize(),
                             sum(size for oid, tid, size in files))
        finally:
            storage.close()


class RandomKillTests(CrashTestCase):
    """SIGKILL at random moments, 40 times over one growing store.

    (The power-cut tests in ``zodbblob.powercut`` cut hundreds of times
    more; these kill the process only, where the page cache keeps all.)
    """

    level = 2
    child_args = ()
    kills = 40   # 60 until the suite passed 15 minutes on two busy cores

    def test_random_kills(self):
        rng = random.Random(20261122)
        for iteration in range(self.kills):
            child = start_child(self.dir, *CHECKPOINTS, *self.child_args,
                                *MODES[iteration % len(MODES)])
            self.assertEqual(child.stdout.readline().strip(), b'ready')
            time.sleep(rng.uniform(0.0, 0.4))
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            child.stderr.close()
            self.check_guarantee()


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
