"""Power cuts at random points of commit, pack, undo and recovery.

A child process (``workload.py``) writes to a storage whose ``Data.fs``
and blob directory are on the power-cut filesystem, and reports each
transaction whose commit returned, outside it.  The power goes at the Nth
write, fsync or rename (N and the kind drawn from the test's seed); the
child is killed; the filesystem is put back to what a disk that lost
power would hold and mounted again; and a fresh BlobStorage over a fresh
FileStorage (recovery) must show every acknowledged transaction with
every blob byte-exact, nothing uncommitted, and ``verify`` clean.
"""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
import unittest

import ZODB
import ZODB.FileStorage

from zodbblob import BlobStorage
from zodbblob.powercut.tests.launcher import Workload
from zodbblob.powercut.tests.test_filesystem import PowerCutTestCase
from zodbblob.powercut.tests.workload import (
    BUCKET_VARIABLE,
    bucket_settings,
    open_database,
    state_of,
)
from zodbblob.storage.catalog import (
    SYNCFS_FILESYSTEMS,
    filesystem_type,
    syncfs_works,
)
from zodbblob.storage.commitlog import (
    CommitLog,
    CommitLogError,
    commit_log_path,
)
from zodbblob.storage.filestorage import last_transaction
from zodbblob.testing import S3_MISSING, S3_SERVER
from zodbblob.tools.verify import verify

FUSE_SUPER_MAGIC = 0x65735546
# Generous: the machine is busy, and FUSE in Python is slow.
CUT_TIMEOUT = 120.0
# The Nth operation of a kind at which the power goes: about the first
# two seconds of a workload here, startup (recovery) included.
MOST = {'write': 240, 'fsync': 40, 'rename': 120}
# An open after a cut: its recovery does about this much.
OPEN_MOST = {'write': 40, 'fsync': 6, 'rename': 3}


def acknowledged(path: str) -> list[dict]:
    """The complete lines of a report file."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith('\n')]


def disk_state(directory: str) -> str:
    """One line on a database's state: each ``Data.fs*`` file's size and
    last transaction, and the commit log's header and records."""
    words = []
    for name in sorted(os.listdir(directory)):
        if not name.startswith('Data.fs'):
            continue
        path = os.path.join(directory, name)
        last = last_transaction(path) if name == 'Data.fs' else None
        words.append('%s %d bytes%s' % (
            name, os.path.getsize(path),
            ', ends with %s' % last.tid.hex() if last else ''))
    path = commit_log_path(os.path.join(directory, 'blobs'))
    try:
        log = CommitLog(path, read_only=True)
    except (OSError, CommitLogError) as error:
        words.append('commit log: %s' % error)
    else:
        try:
            words.append('commit log: open %s, last durable %s, records %s'
                         % (log.open_one_sync, log.last_durable_tid.hex(),
                            [r.tid.hex() for r in log.records]))
        finally:
            log.close()
    return '; '.join(words)


class PowerCutStorageTestCase(PowerCutTestCase):

    workload = 'commit'
    cuts = 4
    stock = False
    one_sync = False
    dedup = False
    # Cuts on one database before a new one: a database that grows cut
    # after cut makes each cut cost more than the one before.
    series = 10

    def prepare(self, backing):
        # Everything in the backing directory is durable: the database is
        # made before the first mount, as one that has been in use.
        open_database(backing, self.stock, self.one_sync, self.dedup).close()

    def setUp(self):
        super().setUp()
        self.report = os.path.join(self.top, 'report')

    def begin_again(self):
        super().begin_again()
        if os.path.exists(self.report):
            os.unlink(self.report)

    def seeds(self, first: int, cuts: int):
        """`cuts` seeds from `first`, a new database every `series`."""
        for seed in range(first, first + cuts):
            if seed > first and (seed - first) % self.series == 0:
                self.begin_again()
            yield seed

    def run_until_cut(self, workload: str, seed: int,
                      most: dict | None = None) -> dict:
        """Run `workload` until the power goes; kill it; remount."""
        most = most or MOST
        rng = random.Random(seed)
        kind = rng.choice(sorted(most))
        self.fs.arm(kind, rng.randrange(1, most[kind] + 1))
        child = Workload(
            [workload, self.mnt, self.report, str(seed)]
            + (['--stock'] if self.stock else [])
            + (['--one-sync'] if self.one_sync else [])
            + (['--dedup'] if self.dedup else [])
            + (['--bucket', os.environ[BUCKET_VARIABLE]]
               if os.environ.get(BUCKET_VARIABLE) else []),
            os.path.join(self.top, 'child.log'))
        try:
            deadline = time.monotonic() + CUT_TIMEOUT
            cut = False
            while not cut and time.monotonic() < deadline:
                ended = child.ended()
                cut = self.fs.wait_cut(0 if ended else 0.5)
                if ended:
                    break
        finally:
            code = child.kill()
        if not cut:
            # The workload ended first (an open that had little to do).
            self.assertEqual((workload, code), ('open', 0),
                             'seed %d: no cut: %s' % (seed, self.child_log()))
        self.fs.remount()
        return {'kind': kind, 'cut': cut}

    def wait_for_report(self, child, seen: int, key: str,
                        failure: str) -> None:
        """Until a report line after the first `seen` has `key`."""
        deadline = time.monotonic() + CUT_TIMEOUT
        while not [e for e in acknowledged(self.report)[seen:] if key in e]:
            if child.ended() or time.monotonic() > deadline:
                self.fail('%s: %s' % (failure, self.child_log()))
            time.sleep(0.01)

    def child_log(self) -> str:
        path = os.path.join(self.top, 'child.log')
        if not os.path.exists(path):
            return '(no output)'
        with open(path, 'rb') as f:
            return f.read()[-3000:].decode(errors='replace')

    def last_acknowledged(self) -> dict | None:
        entries = [e for e in acknowledged(self.report) if 'tid' in e]
        return entries[-1] if entries else None

    def check_database(self, seed: int) -> None:
        """Recovery, then every acknowledged byte, then verify.

        A failure says what the disk held before the open and what the
        open did with ``Data.fs``: the machine it fails on may be gone
        by the time anyone reads it.
        """
        before = disk_state(self.mnt)
        try:
            self._check_database(seed)
        except AssertionError as error:
            raise AssertionError('%s\nbefore the open: %s\nafter it: %s' % (
                error, before, disk_state(self.mnt))) from None

    def _check_database(self, seed: int) -> None:
        directory = self.mnt
        blob_dir = os.path.join(directory, 'blobs')
        db = open_database(directory, one_sync=self.one_sync,
                           dedup=self.dedup)
        if self.one_sync:
            self.assertEqual(db.storage.commit_protocol, 'one sync')
        try:
            last = self.last_acknowledged()
            if last is not None:
                tid = bytes.fromhex(last['tid'])
                self.assertGreaterEqual(db.lastTransaction(), tid,
                                        'seed %d: acknowledged transaction '
                                        'lost' % seed)
                later = [t.tid for t in db.storage.iterator(tid)][1:]
                self.assertLessEqual(len(later), 1, 'seed %d' % seed)
                conn = db.open(at=tid)
                self.assertEqual(state_of(conn.root()), last['state'],
                                 'seed %d: acknowledged blobs differ after'
                                 ' the cut' % seed)
                conn.close()
            with db.transaction() as conn:
                state = state_of(conn.root())
            self.assertEqual(os.listdir(os.path.join(blob_dir, 'tmp')), [])
            now = db.lastTransaction()
        finally:
            db.close()
        storage = BlobStorage(blob_dir, ZODB.FileStorage.FileStorage(
            os.path.join(directory, 'Data.fs'), read_only=True),
            object_store=bucket_settings())
        try:
            report = verify(storage)
        finally:
            storage.close()
        self.assertTrue(report.clean, 'seed %d: %s' % (seed, report.lines()))
        # What the next cut must keep: the state now, as recovered.
        with open(self.report, 'a') as f:
            f.write(json.dumps({'tid': now.hex(), 'state': state}) + '\n')

    def cut_during_recovery(self, first_seed: int, cuts: int) -> None:
        """A cut during commits, then another during the open that
        recovers from it; then the checks."""
        for seed in self.seeds(first_seed, cuts):
            self.run_until_cut('commit', seed)
            self.run_until_cut('open', seed, most=OPEN_MOST)
            self.check_database(seed)

    def cut_and_check(self, workload: str, cuts: int, first_seed: int = 0):
        # One after the other on the same database: after a failure, the
        # next cuts would only find the same damage.
        for seed in self.seeds(first_seed, cuts):
            self.run_until_cut(workload, seed)
            self.check_database(seed)


class CommitPowerCutTests(PowerCutStorageTestCase):

    def test_power_cuts_during_commits_of_every_shape(self):
        self.cut_and_check('commit', 5)

    def test_power_cuts_during_pack(self):
        self.cut_and_check('pack', 3, first_seed=100)

    def test_power_cuts_during_undo(self):
        self.cut_and_check('undo', 3, first_seed=200)

    def test_power_cuts_during_recovery_after_a_power_cut(self):
        self.cut_during_recovery(300, 3)


class OneSyncPowerCutTests(CommitPowerCutTests):
    """The same cuts, with the storage opened as the configuration and
    ``zodbblob.open_filestorage`` open it: commits with one sync, and an
    open that rolls back a torn last transaction."""

    one_sync = True


class TornWindowPowerCutTests(PowerCutStorageTestCase):
    """The power goes inside one sync's torn window, every time.

    Random cuts never land there: the record's sync is asked for first,
    and the filesystem serves one request at a time.  Here a commit is
    held after the base's fsync of Data.fs returned and before the record's
    sync began, and the power goes then.
    """

    one_sync = True

    def hold_commit(self, seed: int, workload: str = 'torn'):
        """Start `workload`; wait until it holds a commit in the window.

        Returns the child, and the tid of the transaction held.
        """
        seen = len(acknowledged(self.report))
        child = Workload([workload, self.mnt, self.report, str(seed),
                          '--one-sync'], os.path.join(self.top, 'child.log'))
        self.addCleanup(child.kill)
        self.wait_for_report(child, seen, 'torn',
                             'seed %d: no commit held' % seed)
        return child, bytes.fromhex(acknowledged(self.report)[-1]['torn'])

    def assert_rolled_back(self, seed: int, torn: bytes) -> None:
        """The open rolled the held transaction back, and kept its bytes
        aside (after ``check_database``)."""
        now = bytes.fromhex(self.last_acknowledged()['tid'])
        self.assertLess(now, torn, 'seed %d: the torn transaction '
                        'stayed' % seed)
        self.assertTrue([name for name in os.listdir(self.mnt)
                         if name.startswith('Data.fs.tr')], seed)

    def test_a_cut_between_the_base_sync_and_the_record_sync(self):
        for seed in self.seeds(800, 4):
            child, torn = self.hold_commit(seed)
            self.fs.cut()
            child.kill()
            self.fs.remount()
            path = os.path.join(self.mnt, 'Data.fs')
            # The base's sync made the held transaction durable in Data.fs.
            base = ZODB.FileStorage.FileStorage(path, read_only=True)
            self.assertEqual(base.lastTransaction(), torn, 'seed %d' % seed)
            base.close()
            self.check_database(seed)
            self.assert_rolled_back(seed, torn)

    def test_a_commit_that_goes_on_after_the_cut_is_not_reported(self):
        """The power goes in the window, then the held commit goes on:
        its record's sync fails on the dead disk, and so does making its
        files durable instead.  Its tpc_finish must raise, not return:
        the next open rolls it back, so a commit that returned would be
        an acknowledged transaction lost."""
        for seed in self.seeds(900, 2):
            seen = len(acknowledged(self.report))
            child, torn = self.hold_commit(seed, 'torn-go-on')
            self.fs.cut()
            go_on = self.report + '.go'
            open(go_on, 'w').close()
            try:
                self.wait_for_report(child, seen, 'done', 'seed %d: the held '
                                     'commit did not end' % seed)
            finally:
                child.kill()
                os.unlink(go_on)
            self.fs.remount()
            ended = acknowledged(self.report)[seen:]
            failed = [e['failed'] for e in ended if 'failed' in e]
            self.assertTrue(failed, 'seed %d: the held commit reported no '
                            'failure: %s' % (seed, ended))
            self.assertIn('nor its blob files could be made durable', failed[0])
            self.check_database(seed)
            self.assert_rolled_back(seed, torn)


class PackRemovalPowerCutTests(PowerCutStorageTestCase):
    """The power goes after a pack returned, before any sync made its
    removals durable: the files may come back, and the open must remove
    them again (their garbage marks are durable), leaving no orphan."""

    def test_a_cut_right_after_a_pack(self):
        removed = 0
        for seed in self.seeds(1000, 4):
            seen = len(acknowledged(self.report))
            child = Workload(['pack-hold', self.mnt, self.report, str(seed)]
                             + (['--one-sync'] if self.one_sync else []),
                             os.path.join(self.top, 'child.log'))
            self.addCleanup(child.kill)
            self.wait_for_report(child, seen, 'packed',
                                 'seed %d: no pack' % seed)
            self.fs.cut()
            child.kill()
            self.fs.remount()
            removed += acknowledged(self.report)[-1]['removed']
            self.check_database(seed)
        self.assertGreater(removed, 0, 'no pack removed a file')


class OneSyncPackRemovalPowerCutTests(PackRemovalPowerCutTests):

    one_sync = True


class SyncfsTests(PowerCutStorageTestCase):

    def test_syncfs_is_used_only_where_it_flushes(self):
        self.assertEqual(filesystem_type(self.mnt), FUSE_SUPER_MAGIC)
        self.assertFalse(syncfs_works(self.mnt))
        # A path not made yet: its nearest existing parent's filesystem.
        self.assertFalse(syncfs_works(os.path.join(self.mnt, 'a', 'b')))
        self.assertEqual(syncfs_works(os.path.join(self.top, 'a', 'b')),
                         syncfs_works(self.top))
        self.assertEqual(syncfs_works(self.top),
                         filesystem_type(self.top) in SYNCFS_FILESYSTEMS)


class RollBackPowerCutTests(PowerCutStorageTestCase):

    def sync_everything(self) -> None:
        """What a disk that wrote all of its cache would hold."""
        for parent, dirs, names in os.walk(self.mnt):
            for name in names:
                fd = os.open(os.path.join(parent, name), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            fd = os.open(parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    def test_a_rolled_back_transaction_stays_rolled_back_after_a_cut(self):
        # Found by the partial cuts (seed 7032): a transaction killed after
        # its files got their final names, whose names reached the disk;
        # the open rolls it back and checkpoints; then the power goes.
        # The removals must have reached the disk before the checkpoint
        # let the record go, or the files come back with nothing to say
        # whose they are.
        env = dict(os.environ, ZODBBLOB_KILL_POINT='after_publish')
        child = subprocess.run(
            [sys.executable, '-m', 'zodbblob.powercut.tests.workload',
             'commit', self.mnt, self.report, '1'], env=env,
            capture_output=True, timeout=CUT_TIMEOUT, check=False)
        self.assertEqual(child.returncode, -signal.SIGKILL,
                         child.stderr[-2000:])
        self.sync_everything()
        ZODB.DB(BlobStorage(
            os.path.join(self.mnt, 'blobs'), ZODB.FileStorage.FileStorage(
                os.path.join(self.mnt, 'Data.fs')))).close()
        self.fs.remount()
        self.check_database(1)


class DedupPowerCutTests(PowerCutStorageTestCase):
    """Commits with dedup on, most files links to an equal one, and a
    checkpoint after each commit whose links leave copies held by their
    staged names (``HELD_LIMIT``): cut anywhere, every acknowledged blob
    reads back its bytes."""

    dedup = True
    first_seed, cuts = 900, 4

    def linked_files(self) -> int:
        return sum(os.stat(os.path.join(directory, name)).st_nlink > 1
                   for directory, dirs, names in os.walk(
                       os.path.join(self.mnt, 'blobs'))
                   for name in names if name.endswith('.blob'))

    def test_power_cuts_during_commits_with_dedup(self):
        linked = []
        for seed in self.seeds(self.first_seed, self.cuts):
            self.run_until_cut('commit', seed)
            self.check_database(seed)
            linked.append(self.linked_files())
        self.assertTrue(any(linked), 'no file was ever linked')


class DedupOneSyncPowerCutTests(DedupPowerCutTests):

    one_sync = True


class ManyDedupPowerCutTests(DedupPowerCutTests):

    level = 2
    first_seed, cuts = 9000, 20


@unittest.skipIf(S3_MISSING, S3_MISSING)
class BucketPowerCutTests(CommitPowerCutTests):
    """Power cuts of the local disk while the blobs go to a bucket (moto's
    server, outside the filesystem whose power goes): every acknowledged
    blob in the bucket, byte-exact; verify, which lists the bucket,
    clean (no object nobody deletes, none missing)."""

    layer = S3_SERVER

    def prepare(self, backing):
        # A bucket of its own for each new database.
        settings = S3_SERVER.make_bucket(prefix='cut')
        os.environ[BUCKET_VARIABLE] = json.dumps(
            dataclasses.asdict(settings))
        self.addCleanup(os.environ.pop, BUCKET_VARIABLE, None)
        super().prepare(backing)

    # Fewer cuts than on a local disk: moto is a process more on the two
    # cores, and the upload protocol's steps are few.
    def test_power_cuts_during_commits_of_every_shape(self):
        self.cut_and_check('commit', 3)

    def test_power_cuts_during_pack(self):
        self.cut_and_check('pack', 2, first_seed=100)

    def test_power_cuts_during_undo(self):
        self.cut_and_check('undo', 2, first_seed=200)

    def test_power_cuts_during_recovery_after_a_power_cut(self):
        self.cut_during_recovery(300, 2)


class BucketDedupPowerCutTests(BucketPowerCutTests):
    """The same on a bucket by content (dedup): every acknowledged blob
    byte-exact, and verify clean: each record's pointer there, no
    content nobody needs, none missing."""

    dedup = True

    def test_power_cuts_during_commits_of_every_shape(self):
        self.cut_and_check('commit', 3, first_seed=400)

    # Undo and recovery by content are the kill tests' (test_objects_dedup):
    # fewer runs for the suite's 15 minutes on two busy cores.
    test_power_cuts_during_undo = None
    test_power_cuts_during_recovery_after_a_power_cut = None


class PartialPowerCutTests(PowerCutStorageTestCase):
    """A disk that had written a random part of its cache when the power
    went: some unsynced files and names are kept, others lost."""

    seed = 17

    def test_partial_power_cuts_during_commits(self):
        self.cut_and_check('commit', 3, first_seed=700)


class ManyPartialPowerCutTests(PartialPowerCutTests):

    level = 2

    def test_partial_power_cuts_during_commits(self):
        self.cut_and_check('commit', 15, first_seed=7000)

    # No partial cuts during pack: FileStorage renames its packed file over
    # Data.fs before anything syncs it, and a disk that kept the rename
    # but not the bytes leaves a Data.fs without its root (seed 8000).
    # zodbblob's pack syncs both right after, which closes the window only
    # where the rename is not kept alone (ext4's auto_da_alloc flushes
    # such a file's bytes at the rename).


class ManyPowerCutTests(PowerCutStorageTestCase):
    """Hundreds of cuts."""

    level = 2

    def test_many_power_cuts_during_commits(self):
        self.cut_and_check('commit', 40, first_seed=1000)

    def test_many_power_cuts_during_pack(self):
        self.cut_and_check('pack', 15, first_seed=2000)

    def test_many_power_cuts_during_undo(self):
        self.cut_and_check('undo', 15, first_seed=3000)

    def test_many_power_cuts_during_recovery(self):
        self.cut_during_recovery(4000, 15)


class ManyOneSyncPowerCutTests(PowerCutStorageTestCase):
    """More cuts with one sync, where it differs from the serial commit:
    commits, and the open that recovers (and may roll back).  Fewer than
    the serial protocol's, to keep the suite's level 2 within its time."""

    level = 2
    one_sync = True

    def test_many_power_cuts_during_commits(self):
        self.cut_and_check('commit', 30, first_seed=5000)

    def test_many_power_cuts_during_recovery(self):
        self.cut_during_recovery(6000, 10)


class ManyPartialOneSyncPowerCutTests(PartialPowerCutTests):

    level = 2
    one_sync = True

    def test_partial_power_cuts_during_commits(self):
        self.cut_and_check('commit', 15, first_seed=7500)
