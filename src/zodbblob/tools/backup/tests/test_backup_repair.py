"""A reviewer's findings: ``--full`` repairs the pool when up to date, a
format-2 upgrade names no damaged file as a content, restore and backup
refuse what they cannot do in one line, and prune counts what it freed.
"""

import contextlib
import io
import logging
import os
import pathlib
import signal

from zodbblob.cli import main

from zodbblob.tools.backup.tests.backup_stores import (
    StoreTestCase,
    files_below,
    pool_files,
    read_store,
    run,
    run_process,
    tree,
)
from zodbblob.tools.backup import KILL_VARIABLE
from zodbblob.tools.backup.tests.test_backup_contents import (
    OTHER,
    SAME,
    Format2TestCase,
)


def garble(path):
    """Change one byte of `path`, keeping its size."""
    os.chmod(path, 0o644)
    with open(path, 'r+b') as f:
        f.seek(3)
        byte = f.read(1)
        f.seek(3)
        f.write(bytes([byte[0] ^ 0xff]))


class FullRepairTests(StoreTestCase):

    def setUp(self):
        super().setUp()
        self.make_store(3)
        self.backup()
        self.snapshot, = self.snapshot_paths()
        self.content = os.path.join(self.dest, '.contents',
                                    sorted(pool_files(self.dest))[0])
        garble(self.content)
        status, out, err = run('restore', '--check', self.snapshot)
        self.assertEqual(status, 1, out + err)

    def test_full_repairs_a_damaged_content_when_nothing_was_committed(self):
        with self.assertLogs('zodbblob.tools.backup', logging.WARNING) as logs:
            out = self.backup('--full')
        self.assertIn('up to date', out)
        self.assertIn('pool: 3 files read, 1 missing or damaged copied '
                      'again from the source', out)
        self.assertIn(self.content, '\n'.join(logs.output))
        self.assertEqual(self.snapshot_paths(), [self.snapshot])
        self.assertChecks(self.snapshot)
        self.assertEqual(read_store(self.restore(self.snapshot)),
                         self.expected)

    def test_a_content_the_source_lost_too_is_named_status_1(self):
        for dirpath, _, names in os.walk(self.blob_dir):
            for name in names:
                if name.endswith('.blob'):
                    garble(os.path.join(dirpath, name))
        status, out, err = run('backup', '--full', '--quiet', '--data',
                               self.data, '--blob-dir', self.blob_dir,
                               self.dest)
        self.assertEqual(status, 1, out + err)
        self.assertIn(f'damaged: {self.content} is missing or damaged in '
                      f'the pool, and the source no longer has its content',
                      out)

    def test_a_repair_killed_midway_loses_nothing_and_the_rerun_finishes(
            self):
        second = os.path.join(self.dest, '.contents',
                              sorted(pool_files(self.dest))[1])
        garble(second)
        damaged = {path: pathlib.Path(path).read_bytes()
                   for path in (self.content, second)}
        # Killed in the copy of the second damaged file, the first one
        # repaired.
        killed = run_process('backup', '--full', '--data', self.data,
                             '--blob-dir', self.blob_dir, self.dest,
                             env={KILL_VARIABLE: '1'})
        self.assertEqual(killed.returncode, -signal.SIGKILL, killed.stderr)
        after = {path: pathlib.Path(path).read_bytes() for path in damaged}
        self.assertEqual(
            sorted(after[path] == damaged[path] for path in damaged),
            [False, True], 'one file repaired, the other left as it was')
        # The killed copy's bytes only under their staging name.
        [partial] = files_below(self.dest, '.partial')
        self.assertTrue(partial.startswith(
            os.path.join('.contents', '.incoming', '')), partial)
        status, out, err = run('restore', '--check', self.snapshot)
        self.assertEqual(status, 1, out + err)
        out = self.backup('--full')
        self.assertIn('pool: 3 files read, 1 missing or damaged copied '
                      'again from the source', out)
        self.assertEqual(files_below(self.dest, '.partial'), {})
        self.assertEqual(self.snapshot_paths(), [self.snapshot])
        self.assertChecks(self.snapshot)
        self.assertEqual(read_store(self.restore(self.snapshot)),
                         self.expected)


class Format2UpgradeTests(Format2TestCase):

    def test_a_damaged_old_file_is_not_linked_in_as_its_content(self):
        damaged = sorted(files_below(self.old_pool, '.blob'))
        for path in damaged:
            garble(os.path.join(self.old_pool, path))
        self.commit({'d': b'new content'})
        with self.assertLogs('zodbblob.tools.backup', logging.WARNING) as logs:
            out = self.backup()
        self.assertIn('read once', '\n'.join(logs.output))
        # Every content is copied from the source: none was linked in.
        self.assertIn('blob files: 5, 3 copied', out)
        *_, third = self.snapshot_paths()
        self.assertChecks(third)
        self.expected['d'] = b'new content'
        self.assertEqual(read_store(self.restore(third)), self.expected)

    def test_prune_counts_only_the_files_it_freed(self):
        self.commit({'d': b'new content'})
        self.backup()
        contents = set(pool_files(self.dest).values())
        freed = {}
        for path, inode in files_below(self.old_pool, '.blob').items():
            if inode not in contents:
                freed[inode] = os.path.getsize(os.path.join(self.old_pool,
                                                            path))
        self.assertLess(len(freed), len(files_below(self.old_pool, '.blob')))
        out = self.backup('--keep', '1')
        self.assertIn(f'freed {len(freed)} blob files '
                      f'({sum(freed.values())} bytes)', out)


class RefusedTests(StoreTestCase):

    def setUp(self):
        super().setUp()
        self.dedup = True
        self.commit({'a': SAME, 'b': SAME, 'c': OTHER, 'd': SAME})
        self.backup()
        self.snapshot, = self.snapshot_paths()
        self.target = os.path.join(self.dir, 'restored')

    def assertRefused(self, argv, message):
        before = tree(self.dir)
        status, out, err = run(*argv)
        self.assertEqual(status, 2, out + err)
        self.assertEqual(err.count('\n'), 1, err)
        self.assertIn(message, err)
        self.assertEqual(tree(self.dir), before)

    def test_restore_into_a_blobs_that_is_a_symbolic_link_is_refused(self):
        elsewhere = os.path.join(self.dir, 'elsewhere')
        os.makedirs(elsewhere)
        os.makedirs(self.target)
        link = os.path.join(self.target, 'blobs')
        os.symlink(elsewhere, link)
        self.assertRefused(['restore', self.snapshot, self.target],
                           f'{link} is a symbolic link (to {elsewhere})')
        self.assertEqual(os.listdir(self.target), ['blobs'])
        self.assertEqual(os.listdir(elsewhere), [])
        os.remove(link)
        self.restore(self.snapshot)
        self.assertEqual(read_store(self.target, dedup=True), self.expected)

    def test_restore_into_a_blobs_that_is_a_file_says_so(self):
        os.makedirs(self.target)
        blobs = os.path.join(self.target, 'blobs')
        open(blobs, 'w').close()
        self.assertRefused(['restore', self.snapshot, self.target],
                           f'{blobs} exists and is not a directory')

    def test_link_and_no_links_together_are_refused(self):
        before = tree(self.dir)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), \
                self.assertRaises(SystemExit) as exit:
            main(['restore', '--link', '--no-links', self.snapshot,
                  self.target])
        self.assertEqual(exit.exception.code, 2)
        self.assertEqual(err.getvalue().count('\n'), 1, err.getvalue())
        self.assertIn('--link and --no-links contradict each other',
                      err.getvalue())
        self.assertEqual(tree(self.dir), before)

    def test_link_counts_every_file_linked_to_the_backup(self):
        status, out, err = run('restore', '--link', self.snapshot,
                               self.target)
        self.assertEqual(status, 0, out + err)
        self.assertIn('4 blob files are hard links to the backup\'s files, '
                      '0 are copies', out)
        self.assertNotIn('restored file of the same content', out)
        pool = set(pool_files(self.dest).values())
        restored = files_below(os.path.join(self.target, 'blobs'), '.blob')
        self.assertEqual(len(restored), 4)
        self.assertLessEqual(set(restored.values()), pool)

    def test_backup_inside_the_blob_directory_is_refused(self):
        for destination in (self.blob_dir,
                            os.path.join(self.blob_dir, 'backups')):
            self.assertRefused(
                ['backup', '--data', self.data, '--blob-dir', self.blob_dir,
                 destination],
                f'{destination} is inside the blob directory {self.blob_dir}')
