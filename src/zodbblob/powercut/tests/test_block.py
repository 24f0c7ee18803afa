"""Power cuts under ext4 on a loop device whose image is on the power-cut
filesystem (``zodbblob.powercut.block``).

The FUSE filesystem cannot serve ``syncfs``, so there zodbblob syncs
file by file; on ext4 it trusts ``syncfs`` (commits of 8 or more files,
the checkpoint).  Here that path meets power cuts, at the disk's Nth
write or cache flush, and ext4's journal is replayed at every boot.
"""

import os
import subprocess

from zodbblob.powercut.block import ExtDisk, unavailable
from zodbblob.powercut.tests.test_filesystem import read, write
from zodbblob.powercut.tests import test_storage
from zodbblob.powercut.tests.test_storage import PowerCutStorageTestCase
from zodbblob.powercut.tests.workload import open_database
from zodbblob.storage.catalog import syncfs_works

# The disk's writes and flushes in about the first second of a workload.
DISK_MOST = {'write': 1500, 'fsync': 250}


def syncfs(path: str) -> None:
    subprocess.run(['sync', '-f', path], check=True)


class ExtDiskTestCase(PowerCutStorageTestCase):
    """A database on ext4, on a disk whose power the test cuts."""

    series = 1000
    # ext4 commits its journal when a program syncs (ExtDisk's default).
    commit_interval = 600

    def prepare(self, backing):
        pass

    def setUp(self):
        super().setUp()
        reason = unavailable()
        if reason:
            self.skipTest('power cuts under ext4 need a loop device: '
                          + reason)
        disk = ExtDisk(self.fs, os.path.join(self.top, 'ext4'),
                       commit_interval=self.commit_interval)
        self.addCleanup(disk.close)
        self.fs, self.mnt = disk, disk.directory
        self.prepare_database()

    def prepare_database(self) -> None:
        open_database(self.mnt, self.stock, self.one_sync).close()
        syncfs(self.mnt)

    def cut_and_check(self, workload: str, cuts: int, first_seed: int = 0):
        for seed in self.seeds(first_seed, cuts):
            self.run_until_cut(workload, seed, most=DISK_MOST)
            self.check_database(seed)


class ExtDiskTests(ExtDiskTestCase):

    def prepare_database(self):
        pass

    def test_a_disk_keeps_what_ext4_flushed_and_loses_the_rest(self):
        write(os.path.join(self.mnt, 'synced'), b'synced', sync=True)
        write(os.path.join(self.mnt, 'unsynced'), b'unsynced')
        self.fs.remount()
        self.assertEqual(read(os.path.join(self.mnt, 'synced')), b'synced')
        self.assertFalse(os.path.exists(os.path.join(self.mnt, 'unsynced')))

    def test_syncfs_flushes_here_as_it_cannot_on_fuse(self):
        self.assertTrue(syncfs_works(self.mnt))
        for name in 'abc':
            write(os.path.join(self.mnt, name), name.encode())
        syncfs(self.mnt)
        self.fs.remount()
        for name in 'abc':
            self.assertEqual(read(os.path.join(self.mnt, name)),
                             name.encode())


class ExtCommitPowerCutTests(ExtDiskTestCase):

    def test_power_cuts_during_commits_of_every_shape(self):
        self.cut_and_check('commit', 6, first_seed=10000)

    def test_power_cuts_during_pack(self):
        self.cut_and_check('pack', 3, first_seed=10100)


class ExtOneSyncPowerCutTests(ExtCommitPowerCutTests):

    one_sync = True


class ExtTornWindowPowerCutTests(ExtDiskTestCase,
                                 test_storage.TornWindowPowerCutTests):
    """One sync's torn window under ext4: where syncfs works, a commit
    whose record's sync failed makes its files durable with one syncfs,
    which fails on the dead disk too."""


class ExtPackRemovalPowerCutTests(ExtDiskTestCase,
                                  test_storage.PackRemovalPowerCutTests):
    """A cut right after a pack under ext4, where the checkpoint's one
    syncfs is what makes pack's removals durable."""


class ManyExtPowerCutTests(ExtDiskTestCase):

    level = 2

    def test_many_power_cuts_during_commits(self):
        self.cut_and_check('commit', 15, first_seed=11000)

    def test_many_power_cuts_during_undo(self):
        self.cut_and_check('undo', 5, first_seed=12000)


class ManyExtOneSyncPowerCutTests(ManyExtPowerCutTests):

    one_sync = True


class ManyExtOneSyncOwnJournalCommitsTests(ManyExtOneSyncPowerCutTests):
    """The same with ext4 committing its journal every 5 s by itself, as
    it does on a real machine: a record's fdatasync that waits for such a
    commit can end after the base's fsync of Data.fs.  Here one sync once
    reported a commit whose record's sync then failed, and whose files
    could not be made durable either: the next open rolled it back."""

    commit_interval = None
