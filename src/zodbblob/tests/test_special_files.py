"""What is under a blob name but is no regular file: a FIFO, a link to
/dev/zero, a link to a file only root may read, a device node.

Every tool is run as a user runs it (``python -m zodbblob.cli``) on a
real blob directory where such things replaced committed blob files.
Each must finish (a subprocess timeout guards against a hang: a hang
fails the test), name every such path in one line, and neither follow,
copy, link nor wait on any of them.
"""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import unittest

import ZODB
import ZODB.FileStorage
from ZODB.blob import Blob

from zodbblob import BlobStorage

SECRET = b'the root-only file outside the blob directory\n'
# Long enough for any of these runs on a busy machine; a tool waiting on
# a FIFO or reading /dev/zero never ends.
HANG_GUARD = 120


def zodbblob(*args):
    return subprocess.run(
        [sys.executable, '-m', 'zodbblob.cli'] + [str(a) for a in args],
        capture_output=True, text=True, timeout=HANG_GUARD)


def entries_below(top):
    """Every path below `top` with its lstat mode, and the bytes of its
    regular files."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            data = None
            if stat.S_ISREG(mode):
                with open(path, 'rb') as f:
                    data = f.read()
            found[path] = (mode, data)
    return found


class SpecialFilesTests(unittest.TestCase):

    layout = None
    level = 2   # a dozen processes per layout

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-special-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.data = os.path.join(self.dir, 'Data.fs')
        self.blob_dir = os.path.join(self.dir, 'blobs')
        self.storage_args = ('--data', self.data, '--blob-dir',
                             self.blob_dir)
        self.secret = os.path.join(self.dir, 'secret')
        with open(self.secret, 'wb') as f:
            f.write(SECRET)
        os.chmod(self.secret, 0o600)
        db = ZODB.DB(BlobStorage(self.blob_dir, ZODB.FileStorage.FileStorage(
            self.data), self.layout))
        with db.transaction() as conn:
            for name in ('regular', 'fifo', 'zero', 'outside', 'device'):
                conn.root()[name] = Blob(name.encode() * 100)
        paths = {}
        with db.transaction() as conn:
            for name, blob in conn.root().items():
                blob._p_activate()
                paths[name] = db.storage.loadBlob(blob._p_oid,
                                                  blob._p_serial)
        db.close()
        for name in ('fifo', 'zero', 'outside', 'device'):
            os.remove(paths[name])
        os.mkfifo(paths['fifo'])
        os.symlink('/dev/zero', paths['zero'])
        os.symlink(self.secret, paths['outside'])
        if os.geteuid() == 0:
            # /dev/zero's own device numbers, under a blob name.
            os.mknod(paths['device'], 0o600 | stat.S_IFCHR,
                     os.makedev(1, 5))
        else:
            os.symlink('/dev/zero', paths['device'])  # mknod needs root
        self.specials = [paths[name] for name in
                         ('fifo', 'zero', 'outside', 'device')]
        self.regular = paths['regular']

    def assertNamesEachOnce(self, output):
        lines = output.splitlines()
        for path in self.specials:
            naming = [line for line in lines if path in line]
            self.assertEqual(len(naming), 1, output)
            self.assertIn('not a regular file', naming[0])

    def assertHoldsNoSpecial(self, top):
        """Below `top`: regular files and directories only, and none with
        the bytes of the outside file."""
        for path, (mode, data) in entries_below(top).items():
            self.assertTrue(stat.S_ISREG(mode) or stat.S_ISDIR(mode),
                            f'{path}: mode {mode:o}')
            self.assertNotEqual(data, SECRET, path)

    def test_verify_reports_each_and_exits_1(self):
        for options in ((), ('--checksum',)):
            with self.subTest(options=options):
                result = zodbblob('verify', *self.storage_args, *options)
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertNamesEachOnce(result.stdout)
                self.assertIn('5 blob records', result.stdout)
                self.assertEqual(result.stderr, '')

    def test_backup_and_restore_copy_none_of_them(self):
        destination = os.path.join(self.dir, 'backup')
        result = zodbblob('backup', *self.storage_args, destination,
                          '--quiet')
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNamesEachOnce(result.stdout)
        self.assertHoldsNoSpecial(destination)
        [snapshot] = [name for name in os.listdir(destination)
                      if not name.startswith('.')]
        restored = os.path.join(self.dir, 'restored')
        result = zodbblob('restore', os.path.join(destination, snapshot),
                          restored, '--quiet')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertHoldsNoSpecial(restored)
        # The regular blob came through; the others are missing, and
        # verify of the restored store says so.
        restored_blobs = entries_below(os.path.join(restored, 'blobs'))
        self.assertIn(b'regular' * 100, [data for mode, data in
                                         restored_blobs.values()])
        check = zodbblob('verify', '--data',
                         os.path.join(restored, 'Data.fs'), '--blob-dir',
                         os.path.join(restored, 'blobs'))
        self.assertEqual(check.returncode, 1)
        self.assertEqual(check.stdout.count('missing:'), 4, check.stdout)

    def test_migrate_carries_none_of_them_over(self):
        for target in ('chunky', 'flat'):
            with self.subTest(target=target):
                destination = os.path.join(self.dir, target)
                result = zodbblob('migrate', self.blob_dir, destination,
                                  '--layout', target, '--quiet')
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertNamesEachOnce(result.stdout)
                self.assertHoldsNoSpecial(destination)
                self.assertIn(b'regular' * 100, [
                    data for mode, data in
                    entries_below(destination).values()])

    def test_export_refuses_each_naming_it_and_writes_nothing(self):
        names = ('fifo', 'zero', 'outside', 'device')
        for name, path in zip(names, self.specials):
            with self.subTest(name):
                target = os.path.join(self.dir, f'{name}.zexp')
                result = zodbblob('export', *self.storage_args, '--path',
                                  f'/{name}', target)
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertEqual(len(result.stderr.splitlines()), 1,
                                 result.stderr)
                self.assertIn(path, result.stderr)
                self.assertIn('not a regular file', result.stderr)
                self.assertEqual([n for n in os.listdir(self.dir)
                                  if n.startswith(name)], [])
        result = zodbblob('export', *self.storage_args, '--path',
                          '/regular', os.path.join(self.dir, 'r.zexp'))
        self.assertEqual(result.returncode, 0, result.stderr)


class BushySpecialFilesTests(SpecialFilesTests):
    layout = 'bushy'


class LawnSpecialFilesTests(SpecialFilesTests):
    layout = 'lawn'


del SpecialFilesTests


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
