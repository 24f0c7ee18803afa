"""The power-cut filesystem keeps exactly what was made durable.

These tests also write down what the kernel does with each sync on a
FUSE mount: ``fsync`` and ``fdatasync`` of a file and ``fsync`` of a
directory reach the filesystem, ``syncfs(2)`` does not.
"""

import ctypes
import errno
import os
import shutil
import sqlite3
import tempfile
import unittest
import unittest.mock

from zodbblob.powercut import PowerCutError, mount, unavailable
from zodbblob.powercut.harness import mounted_at


def fsync(path: str, data_only: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        (os.fdatasync if data_only else os.fsync)(fd)
    finally:
        os.close(fd)


def write(path: str, data: bytes, sync: bool = False) -> None:
    with open(path, 'wb') as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:  # ENOTCONN: its filesystem's daemon is gone
        pass


def read(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read()


class PowerCutTestCase(unittest.TestCase):
    """A power-cut filesystem mounted at ``self.mnt`` for each test."""

    seed = None

    def setUp(self):
        reason = unavailable()
        if reason:
            self.skipTest('power-cut tests need FUSE: ' + reason)
        self.top = tempfile.mkdtemp(prefix='powercut-')
        self.backing = os.path.join(self.top, 'backing')
        os.mkdir(self.backing)
        self.prepare(self.backing)
        self.mnt = os.path.join(self.top, 'mnt')
        self.fs = mount(self.backing, self.mnt, seed=self.seed)
        self.addCleanup(shutil.rmtree, self.top, ignore_errors=True)
        self.addCleanup(self.fs.unmount)

    def run(self, result=None):
        # unittest runs no cleanups on Ctrl-C: a mount, a loop device and
        # processes would stay behind.
        try:
            return super().run(result)
        except KeyboardInterrupt:
            self.doCleanups()
            raise

    def prepare(self, backing: str) -> None:
        """Fill the backing directory: all of it is durable at the start."""

    def begin_again(self) -> None:
        """Unmount, make the tree afresh (``prepare``), mount again."""
        self.fs.unmount()
        for path in (self.backing, self.fs.graveyard):
            shutil.rmtree(path, ignore_errors=True)
        os.mkdir(self.backing)
        self.prepare(self.backing)
        self.fs.start()

    def path(self, *names: str) -> str:
        return os.path.join(self.mnt, *names)


class FilesystemTests(PowerCutTestCase):

    def prepare(self, backing):
        os.mkdir(os.path.join(backing, 'dir'))
        write(os.path.join(backing, 'old'), b'old bytes')

    def test_a_written_unsynced_file_is_gone_after_a_cut(self):
        write(self.path('new'), b'never synced')
        self.fs.remount()
        self.assertFalse(os.path.exists(self.path('new')))

    def test_a_file_and_its_directory_synced_stay(self):
        write(self.path('new'), b'synced', sync=True)
        fsync(self.mnt)
        self.fs.remount()
        self.assertEqual(read(self.path('new')), b'synced')

    def test_a_files_fsync_does_not_make_its_name_durable(self):
        write(self.path('new'), b'synced', sync=True)
        self.fs.remount()
        self.assertFalse(os.path.exists(self.path('new')))

    def test_a_directory_fsync_makes_a_create_durable_not_its_bytes(self):
        write(self.path('new'), b'not synced')
        fsync(self.mnt)
        self.fs.remount()
        self.assertEqual(read(self.path('new')), b'')

    def test_syncfs_makes_nothing_durable_on_fuse(self):
        # The kernel sends FUSE_SYNCFS to virtiofs only: syncfs(2) returns
        # 0 and the filesystem never hears of it.
        write(self.path('new'), b'synced by syncfs?')
        fd = os.open(self.mnt, os.O_RDONLY)
        try:
            self.assertEqual(ctypes.CDLL(None, use_errno=True).syncfs(fd), 0)
        finally:
            os.close(fd)
        self.assertEqual(self.fs.stats()['counts']['fsync'], 0)
        self.fs.remount()
        self.assertFalse(os.path.exists(self.path('new')))

    def test_an_overwrite_and_a_truncate_revert_to_the_synced_bytes(self):
        with open(self.path('old'), 'r+b') as f:
            f.write(b'new')
        os.truncate(self.path('old'), 5)
        with open(self.path('old'), 'ab') as f:
            f.write(b'appended')
        self.fs.remount()
        self.assertEqual(read(self.path('old')), b'old bytes')

    def test_fdatasync_keeps_the_bytes_and_size(self):
        with open(self.path('old'), 'ab') as f:
            f.write(b', more')
            f.flush()
            os.fdatasync(f.fileno())
            f.write(b' and unsynced')
        self.fs.remount()
        self.assertEqual(read(self.path('old')), b'old bytes, more')

    def test_fdatasync_does_not_make_a_mode_durable_fsync_does(self):
        os.chmod(self.path('old'), 0o400)
        fsync(self.path('old'), data_only=True)
        self.fs.remount()
        self.assertEqual(os.stat(self.path('old')).st_mode & 0o777, 0o644)
        os.chmod(self.path('old'), 0o400)
        fsync(self.path('old'))
        self.fs.remount()
        self.assertEqual(os.stat(self.path('old')).st_mode & 0o777, 0o400)

    def test_an_unsynced_rename_reverts(self):
        write(self.path('new'), b'new', sync=True)
        fsync(self.mnt)
        os.rename(self.path('new'), self.path('old'))
        os.rename(self.path('dir'), self.path('moved'))
        self.fs.remount()
        self.assertEqual(read(self.path('old')), b'old bytes')
        self.assertEqual(read(self.path('new')), b'new')
        self.assertEqual(sorted(os.listdir(self.mnt)), ['dir', 'new', 'old'])

    def test_a_rename_is_durable_once_both_directories_are_synced(self):
        os.rename(self.path('old'), self.path('dir', 'old'))
        fsync(self.path('dir'))
        self.fs.remount()
        # The source directory was not synced: the old name is back too,
        # and both name the one inode.
        self.assertEqual(read(self.path('dir', 'old')), b'old bytes')
        self.assertEqual(os.stat(self.path('old')).st_ino,
                         os.stat(self.path('dir', 'old')).st_ino)
        os.unlink(self.path('dir', 'old'))
        fsync(self.path('dir'))
        os.rename(self.path('old'), self.path('dir', 'old'))
        fsync(self.path('dir'))
        fsync(self.mnt)
        self.fs.remount()
        self.assertEqual(os.listdir(self.mnt), ['dir'])
        self.assertEqual(read(self.path('dir', 'old')), b'old bytes')

    def test_hard_links_come_and_go_with_their_directory(self):
        os.link(self.path('old'), self.path('dir', 'linked'))
        os.unlink(self.path('old'))
        self.fs.remount()
        self.assertEqual(os.listdir(self.path('dir')), [])
        self.assertEqual(read(self.path('old')), b'old bytes')
        os.link(self.path('old'), self.path('dir', 'linked'))
        fsync(self.path('dir'))
        os.unlink(self.path('old'))
        fsync(self.mnt)
        self.fs.remount()
        self.assertFalse(os.path.exists(self.path('old')))
        self.assertEqual(read(self.path('dir', 'linked')), b'old bytes')

    def test_a_removed_directory_comes_back_a_new_one_goes(self):
        os.rmdir(self.path('dir'))
        os.makedirs(self.path('a', 'b'))
        write(self.path('a', 'b', 'f'), b'x', sync=True)
        fsync(self.path('a', 'b'))
        fsync(self.path('a'))
        self.fs.remount()
        self.assertEqual(sorted(os.listdir(self.mnt)), ['dir', 'old'])

    def test_after_a_cut_every_operation_fails_with_eio(self):
        self.fs.cut()
        for operation in (lambda: os.stat(self.path('old')),
                          lambda: read(self.path('old')),
                          lambda: write(self.path('new'), b'x')):
            with self.assertRaises(OSError) as raised:
                operation()
            self.assertEqual(raised.exception.errno, errno.EIO)
        self.fs.remount()
        self.assertEqual(read(self.path('old')), b'old bytes')

    def test_an_armed_cut_fails_the_nth_fsync_and_keeps_the_ones_before(self):
        self.fs.arm('fsync', 3)
        for name in 'abc':
            try:
                write(self.path('dir', name), name.encode(), sync=True)
                fsync(self.path('dir'))
            except OSError as error:
                self.assertEqual(error.errno, errno.EIO)
                break
        self.assertTrue(self.fs.wait_cut(60))
        self.assertEqual(self.fs.stats()['cut'], 'fsync 3')
        self.fs.remount()
        # a's file and directory syncs returned; b's file sync failed.
        self.assertEqual(os.listdir(self.path('dir')), ['a'])
        self.assertEqual(read(self.path('dir', 'a')), b'a')

    def test_sqlite_in_wal_mode_keeps_its_committed_rows(self):
        database = sqlite3.connect(self.path('db.sqlite'))
        database.execute('PRAGMA journal_mode=WAL')
        database.execute('PRAGMA synchronous=FULL')
        database.execute('CREATE TABLE t (x)')
        database.commit()
        fsync(self.mnt)
        database.execute('INSERT INTO t VALUES (1)')
        database.commit()
        database.execute('PRAGMA synchronous=OFF')
        database.execute('INSERT INTO t VALUES (2)')
        database.commit()
        database.close()
        self.fs.remount()
        database = sqlite3.connect(self.path('db.sqlite'))
        self.assertEqual(database.execute('SELECT x FROM t').fetchall(),
                         [(1,)])
        database.close()

    def test_the_mount_is_gone_after_a_failing_test(self):
        with self.assertRaises(ZeroDivisionError), \
                mount(self.path('dir'), os.path.join(self.top, 'inner')):
            raise ZeroDivisionError
        self.assertFalse(mounted_at(os.path.join(self.top, 'inner')))

    def test_a_wrong_backing_directory_is_refused(self):
        with self.assertRaises(PowerCutError) as raised:
            mount(os.path.join(self.top, 'missing'),
                  os.path.join(self.top, 'inner'))
        self.assertIn('missing', str(raised.exception))
        self.assertFalse(os.path.exists(os.path.join(self.top, 'inner')))


class SeededCutTests(PowerCutTestCase):
    """A seeded cut keeps a random part of what was not synced."""

    seed = 7

    def prepare(self, backing):
        for number in range(20):
            os.mkdir(os.path.join(backing, 'd%d' % number))

    def test_some_unsynced_creates_survive_and_the_seed_decides_which(self):
        for number in range(20):
            write(self.path('d%d' % number, 'f'), b'data', sync=True)
        self.fs.remount()
        kept = [number for number in range(20)
                if os.path.exists(self.path('d%d' % number, 'f'))]
        self.assertTrue(0 < len(kept) < 20, kept)
        for number in kept:
            self.assertEqual(read(self.path('d%d' % number, 'f')), b'data')
        for number in range(20):
            write(self.path('d%d' % number, 'g'), b'data', sync=True)
        # The same seed and cut number keep the same names.
        self.fs.cuts -= 1
        self.fs.remount()
        self.assertEqual(kept, [number for number in range(20) if
                                os.path.exists(self.path('d%d' % number,
                                                         'g'))])


class BusyMountTests(PowerCutTestCase):

    def test_a_busy_mount_is_detached_and_its_daemon_ended(self):
        held = os.open(self.path('held'), os.O_WRONLY | os.O_CREAT)
        self.addCleanup(close_quietly, held)
        daemon = self.fs.process
        self.fs.unmount()
        self.assertFalse(mounted_at(self.mnt))
        self.assertIsNotNone(daemon.poll())

    def test_without_fusermount3_the_daemon_unmounts_as_it_ends(self):
        daemon = self.fs.process
        with unittest.mock.patch.dict(os.environ, PATH=self.top):
            self.fs.unmount()
        self.assertFalse(mounted_at(self.mnt))
        self.assertIsNotNone(daemon.poll())
