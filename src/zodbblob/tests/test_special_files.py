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


class LinkedDirectoryTests(unittest.TestCase):
    """The directory above a blob file replaced by a symbolic link to a
    directory elsewhere that holds a file under the blob's name: no tool
    follows it, each names the link."""

    layout = None
    level = 2   # a dozen processes per layout

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-linked-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.data = os.path.join(self.dir, 'Data.fs')
        self.blob_dir = os.path.join(self.dir, 'blobs')
        self.storage_args = ('--data', self.data, '--blob-dir',
                             self.blob_dir)
        db = ZODB.DB(BlobStorage(self.blob_dir, ZODB.FileStorage.FileStorage(
            self.data), self.layout))
        with db.transaction() as conn:
            for name in ('regular', 'linked'):
                conn.root()[name] = Blob(name.encode() * 100)
        with db.transaction() as conn:
            blob = conn.root()['linked']
            blob._p_activate()
            path = db.storage.loadBlob(blob._p_oid, blob._p_serial)
        db.close()
        self.link = os.path.dirname(path)
        outside = os.path.join(self.dir, 'elsewhere')
        shutil.copytree(self.link, outside)
        with open(os.path.join(outside, os.path.basename(path)), 'wb') as f:
            f.write(SECRET)
        shutil.rmtree(self.link)
        os.symlink(outside, self.link)
        self.outside = outside

    def assertNamesTheLink(self, output):
        naming = [line for line in output.splitlines() if self.link in line]
        self.assertEqual(len(naming), 1, output)
        self.assertIn('is a symbolic link to a directory under the blob '
                      'directory', naming[0])

    def assertHoldsNoOutsideFile(self, top):
        for path, (mode, data) in entries_below(top).items():
            self.assertFalse(stat.S_ISLNK(mode), path)
            self.assertNotEqual(data, SECRET, path)

    def test_verify_names_the_link_not_a_missing_file(self):
        for options in ((), ('--checksum',)):
            with self.subTest(options=options):
                result = zodbblob('verify', *self.storage_args, *options)
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertNamesTheLink(result.stdout)
                self.assertNotIn('missing:', result.stdout)

    def test_backup_and_restore_copy_nothing_from_behind_it(self):
        destination = os.path.join(self.dir, 'backup')
        result = zodbblob('backup', *self.storage_args, destination,
                          '--quiet')
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNamesTheLink(result.stdout)
        self.assertHoldsNoOutsideFile(destination)
        [snapshot] = [name for name in os.listdir(destination)
                      if not name.startswith('.')]
        restored = os.path.join(self.dir, 'restored')
        result = zodbblob('restore', os.path.join(destination, snapshot),
                          restored, '--quiet')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertHoldsNoOutsideFile(restored)
        self.assertIn(b'regular' * 100, [
            data for mode, data in entries_below(restored).values()])

    def test_restore_follows_no_link_in_the_pool(self):
        destination = os.path.join(self.dir, 'backup')
        os.remove(self.link)
        shutil.copytree(self.outside, self.link)   # a sound store again
        with open(os.path.join(self.link, os.listdir(self.link)[0]),
                  'wb') as f:
            f.write(b'linked' * 100)
        result = zodbblob('backup', *self.storage_args, destination,
                          '--quiet')
        self.assertEqual(result.returncode, 0, result.stdout)
        [snapshot] = [name for name in os.listdir(destination)
                      if not name.startswith('.')]
        # The pool's directory of one file replaced by a link to a
        # directory that holds another file with the pooled file's name
        # (and its size and digest would not match: restore must not
        # even read it).
        pooled = [os.path.join(top, name) for top, _, names in os.walk(
            os.path.join(destination, '.contents')) for name in names
            if '.incoming' not in top]
        victim = os.path.dirname(min(pooled))
        elsewhere = os.path.join(self.dir, 'pool-elsewhere')
        shutil.copytree(victim, elsewhere)
        for name in os.listdir(elsewhere):
            with open(os.path.join(elsewhere, name), 'wb') as f:
                f.write(SECRET)
        shutil.rmtree(victim)
        os.symlink(elsewhere, victim)
        restored = os.path.join(self.dir, 'restored')
        result = zodbblob('restore', os.path.join(destination, snapshot),
                          restored, '--quiet')
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertIn(victim, result.stderr)
        self.assertIn('symbolic link to a directory', result.stderr)
        self.assertFalse(os.path.exists(os.path.join(restored, 'Data.fs')))
        if os.path.exists(restored):
            self.assertHoldsNoOutsideFile(restored)

    def test_migrate_carries_nothing_from_behind_it(self):
        for target in ('chunky', 'flat'):
            with self.subTest(target=target):
                destination = os.path.join(self.dir, target)
                result = zodbblob('migrate', self.blob_dir, destination,
                                  '--layout', target, '--quiet')
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertNamesTheLink(result.stdout)
                self.assertHoldsNoOutsideFile(destination)
                self.assertIn(b'regular' * 100, [
                    data for mode, data in
                    entries_below(destination).values()])

    def test_export_refuses_naming_the_link(self):
        target = os.path.join(self.dir, 'linked.zexp')
        result = zodbblob('export', *self.storage_args, '--path', '/linked',
                          target)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn(self.link, result.stderr)
        self.assertIn('symbolic link to a directory', result.stderr)
        self.assertEqual([n for n in os.listdir(self.dir)
                          if n.startswith('linked')], [])


    def test_import_takes_nothing_from_behind_it(self):
        # A file without blob data, as a storage without blob support
        # writes it: its blob comes from --source-blob-dir.
        db = ZODB.DB(ZODB.FileStorage.FileStorage(self.data, read_only=True))
        exported = os.path.join(self.dir, 'linked.zexp')
        with db.transaction() as conn, open(exported, 'w+b') as f:
            conn.exportFile(conn.root()['linked']._p_oid, f)
        db.close()
        new = os.path.join(self.dir, 'new')
        os.mkdir(new)
        into = ('--data', os.path.join(new, 'Data.fs'), '--blob-dir',
                os.path.join(new, 'blobs'))
        BlobStorage(into[3], ZODB.FileStorage.FileStorage(into[1])).close()
        result = zodbblob('import', *into, '--source-blob-dir',
                          self.blob_dir, '--quiet', exported)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn(self.link, result.stderr)
        self.assertIn('symbolic link to a directory', result.stderr)
        self.assertHoldsNoOutsideFile(new)


class BushyLinkedDirectoryTests(LinkedDirectoryTests):
    layout = 'bushy'


class LawnLinkedDirectoryTests(LinkedDirectoryTests):
    layout = 'lawn'


del LinkedDirectoryTests


class DirectoryUnderABlobNameTests(unittest.TestCase):

    layout = None
    level = 2

    def test_migrate_names_it_and_exits_1(self):
        top = tempfile.mkdtemp(prefix='zodbblob-dirname-')
        self.addCleanup(shutil.rmtree, top, True)
        blob_dir = os.path.join(top, 'blobs')
        db = ZODB.DB(BlobStorage(blob_dir, ZODB.FileStorage.FileStorage(
            os.path.join(top, 'Data.fs')), self.layout))
        with db.transaction() as conn:
            for name in ('regular', 'directory'):
                conn.root()[name] = Blob(name.encode() * 100)
        with db.transaction() as conn:
            blob = conn.root()['directory']
            blob._p_activate()
            path = db.storage.loadBlob(blob._p_oid, blob._p_serial)
        db.close()
        os.remove(path)
        os.mkdir(path)
        destination = os.path.join(top, 'flat')
        result = zodbblob('migrate', blob_dir, destination, '--layout',
                          'flat', '--quiet')
        self.assertEqual(result.returncode, 1, result.stdout)
        naming = [line for line in result.stdout.splitlines()
                  if path in line]
        self.assertEqual(len(naming), 1, result.stdout)
        self.assertIn('is a directory under a blob name', naming[0])


class BushyDirectoryUnderABlobNameTests(DirectoryUnderABlobNameTests):
    layout = 'bushy'


class LawnDirectoryUnderABlobNameTests(DirectoryUnderABlobNameTests):
    layout = 'lawn'


del DirectoryUnderABlobNameTests


class LinkedBlobDirectoryTests(unittest.TestCase):
    """A blob directory that is itself a symbolic link, or sits under one
    (/srv/blobs -> /mnt/disk2/blobs), works with every tool."""

    level = 2

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-linked-root-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        disk = os.path.join(self.dir, 'disk2')
        os.mkdir(disk)
        os.symlink(disk, os.path.join(self.dir, 'srv'))

    def check_every_tool(self, layout, data, blob_dir):
        db = ZODB.DB(BlobStorage(blob_dir, ZODB.FileStorage.FileStorage(
            data), layout))
        with db.transaction() as conn:
            for name in ('one', 'two'):
                conn.root()[name] = Blob(name.encode() * 100)
        db.close()
        storage_args = ('--data', data, '--blob-dir', blob_dir)
        work = os.path.join(self.dir, 'srv', f'work-{layout}')
        os.mkdir(work)
        result = zodbblob('verify', *storage_args, '--checksum')
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn('2 blob files, clean', result.stdout)
        backups = os.path.join(work, 'backup')
        result = zodbblob('backup', *storage_args, backups, '--quiet')
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        [snapshot] = [name for name in os.listdir(backups)
                      if not name.startswith('.')]
        restored = os.path.join(work, 'restored')
        result = zodbblob('restore', os.path.join(backups, snapshot),
                          restored, '--quiet')
        self.assertEqual(result.returncode, 0, result.stderr)
        result = zodbblob('verify', '--data',
                          os.path.join(restored, 'Data.fs'), '--blob-dir',
                          os.path.join(restored, 'blobs'))
        self.assertEqual(result.returncode, 0, result.stdout)
        migrated = os.path.join(work, 'migrated')
        result = zodbblob('migrate', blob_dir, migrated, '--layout',
                          'chunky', '--quiet')
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn('Migrated 2 blob files', result.stdout)
        exported = os.path.join(work, 'one.zexp')
        result = zodbblob('export', *storage_args, '--path', '/one',
                          exported)
        self.assertEqual(result.returncode, 0, result.stderr)
        # import with --source-blob-dir: a file without blob data.
        plain = ZODB.DB(ZODB.FileStorage.FileStorage(data, read_only=True))
        without_blobs = os.path.join(work, 'two.zexp')
        with plain.transaction() as conn, open(without_blobs, 'w+b') as f:
            conn.exportFile(conn.root()['two']._p_oid, f)
        plain.close()
        result = zodbblob('import', '--data',
                          os.path.join(restored, 'Data.fs'), '--blob-dir',
                          os.path.join(restored, 'blobs'),
                          '--source-blob-dir', blob_dir, '--name',
                          'imported', '--quiet', without_blobs)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr, '')

    def test_a_blob_directory_that_is_a_link(self):
        for layout in ('bushy', 'lawn'):
            with self.subTest(layout):
                real = os.path.join(self.dir, 'disk2', f'real-{layout}')
                os.mkdir(real)
                blob_dir = os.path.join(self.dir, f'blobs-{layout}')
                os.symlink(real, blob_dir)
                self.check_every_tool(layout, os.path.join(
                    self.dir, f'{layout}.fs'), blob_dir)

    def test_a_blob_directory_under_a_link(self):
        for layout in ('bushy', 'lawn'):
            with self.subTest(layout):
                self.check_every_tool(
                    layout, os.path.join(self.dir, f'{layout}.fs'),
                    os.path.join(self.dir, 'srv', f'blobs-{layout}'))


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
