"""``zodbblob backup`` and ``zodbblob restore`` given wrong input.

Each is refused with one line naming the path, and changes nothing.
"""

import contextlib
import io
import logging
import os
import shutil

from ZODB.blob import Blob

from zodbblob.cli import main
from zodbblob.tools.backup.tests.backup_stores import (
    StoreTestCase,
    open_db,
    read_store,
    run,
    tree,
)
from zodbblob.tools.backup import (
    COMPLETE_NAME,
    Manifest,
)


class WrongInputTests(StoreTestCase):
    """Each is refused with the path named, and changes nothing."""

    def setUp(self):
        super().setUp()
        self.make_store(3)

    def assertRefused(self, argv, message, path):
        before = tree(path)
        status, out, err = run(*argv)
        self.assertEqual(status, 2, out + err)
        self.assertIn(message, err)
        self.assertNotIn('Traceback', err)
        self.assertEqual(tree(path), before)

    def backup_argv(self, destination):
        return ['backup', '--data', self.data, '--blob-dir', self.blob_dir,
                destination]

    def test_a_destination_of_the_older_format_is_refused(self):
        # Format 1: a tree of blob files in every snapshot, no marker.
        old = os.path.join(self.dest, '040d41ee5deeafdd')
        os.makedirs(os.path.join(old, 'blobs'))
        manifest = Manifest(old, create=True)
        manifest.set_meta(format=1, tid='040d41ee5deeafdd')
        manifest.seal()
        with open(os.path.join(old, COMPLETE_NAME), 'w'):
            pass
        self.assertRefused(
            self.backup_argv(self.dest),
            f'error: {self.dest} holds snapshots of an older backup format '
            f'({old} and others', self.dest)
        self.assertRefused(
            ['restore', old, os.path.join(self.dir, 'r')],
            f'{old} is a snapshot of backup format 1; this zodbblob reads '
            f'formats 2 and 3', self.dir)

    def test_a_snapshot_of_another_format_is_refused(self):
        self.backup()
        [snapshot] = self.snapshot_paths()
        os.remove(os.path.join(snapshot, COMPLETE_NAME))
        manifest = Manifest(snapshot)
        manifest.set_meta(format=1)
        manifest.seal()
        with open(os.path.join(snapshot, COMPLETE_NAME), 'w'):
            pass
        self.assertRefused(
            ['restore', snapshot, os.path.join(self.dir, 'r')],
            f'{snapshot} is a snapshot of backup format 1; this zodbblob '
            f'reads formats 2 and 3', self.dir)

    def test_a_destination_marker_of_another_format_is_refused(self):
        self.backup()
        marker = os.path.join(self.dest, '.zodbblob-backup')
        with open(marker, 'w') as f:
            f.write('{"format": 4}\n')
        self.commit({'b1': b'new'})
        self.assertRefused(
            self.backup_argv(self.dest),
            f'{self.dest} is a backup destination of format 4 ({marker})',
            self.dest)
        [snapshot] = self.snapshot_paths()
        self.assertRefused(
            ['restore', snapshot, os.path.join(self.dir, 'r')],
            f'{self.dest} is a backup destination of format 4 ({marker})',
            self.dir)

    def test_a_directory_of_other_things_is_refused(self):
        os.makedirs(self.dest)
        with open(os.path.join(self.dest, 'notes.txt'), 'w'):
            pass
        self.assertRefused(
            self.backup_argv(self.dest),
            f'{self.dest} is not a backup destination (it has no '
            f'.zodbblob-backup) and is not empty', self.dest)

    def test_a_file_as_destination_is_refused(self):
        with open(self.dest, 'w'):
            pass
        self.assertRefused(self.backup_argv(self.dest),
                           f'{self.dest} is not a directory', self.dir)

    def test_another_database_is_refused(self):
        self.backup()
        other = os.path.join(self.dir, 'other')
        os.mkdir(other)
        db = open_db(other)
        with db.transaction() as conn:
            conn.root()['x'] = Blob(b'another database')
        db.close()
        self.assertRefused(
            ['backup', '--data', os.path.join(other, 'Data.fs'),
             '--blob-dir', os.path.join(other, 'blobs'), self.dest],
            f'{self.dest} holds snapshots of {self.data}, and '
            f'{other}/Data.fs is another database', self.dest)

    def test_a_moved_database_continues_its_destination(self):
        self.backup()
        moved = os.path.join(self.dir, 'moved')
        os.rename(self.source, moved)
        self.source = moved
        self.data = os.path.join(moved, 'Data.fs')
        self.blob_dir = os.path.join(moved, 'blobs')
        self.commit({'b1': b'after the move'})
        with self.assertLogs('zodbblob.tools.backup', logging.WARNING) as logs:
            out = self.backup()
        self.assertIn('holds the same transactions: continuing with it',
                      logs.output[0])
        self.assertIn('blob files: 4, 1 copied', out)
        self.assertEqual(read_store(self.restore(self.snapshot_paths()[-1])),
                         self.expected)

    def test_a_snapshot_away_from_its_destination_is_refused(self):
        self.backup()
        [snapshot] = self.snapshot_paths()
        away = os.path.join(self.dir, 'away')
        os.mkdir(away)
        copy = os.path.join(away, os.path.basename(snapshot))
        shutil.copytree(snapshot, copy)
        self.assertRefused(
            ['restore', copy, os.path.join(self.dir, 'r')],
            f'{copy}: its blob files are in {away}/.contents, which does not '
            f'exist', self.dir)

    def test_the_destination_instead_of_a_snapshot_is_refused(self):
        self.backup()
        [snapshot] = self.snapshot_paths()
        self.assertRefused(
            ['restore', self.dest, os.path.join(self.dir, 'r')],
            f'{self.dest} is a backup destination, not a snapshot: name one '
            f'of its snapshots, such as {snapshot}', self.dir)

    def test_swapped_arguments_name_the_first_as_no_snapshot(self):
        self.backup()
        [snapshot] = self.snapshot_paths()
        for name, make in [('new', None), ('empty', os.mkdir)]:
            target = os.path.join(self.dir, name)
            if make is not None:
                make(target)
            with self.subTest(name):
                status, out, err = run('restore', target, snapshot)
                self.assertEqual(status, 2, out + err)
                self.assertEqual(out, '')
                problem = ('no such directory' if make is None
                           else 'no manifest.sqlite')
                self.assertEqual(
                    err, f'zodbblob restore: error: {target} is not a backup '
                         f'snapshot: {problem}; {snapshot} is one: the '
                         f'snapshot comes first, as in restore SNAPSHOT '
                         f'DEST_DIR\n')
                self.assertEqual(os.path.exists(target), make is not None)
                if make is not None:
                    self.assertEqual(os.listdir(target), [])
        self.assertEqual(sorted(os.listdir(self.dir)),
                         ['backups', 'empty', 'source'])

    def test_a_first_argument_that_is_no_snapshot_is_named(self):
        self.backup()
        some_file = os.path.join(self.dir, 'notes.txt')
        with open(some_file, 'w') as f:
            f.write('x')
        for first, problem in [(some_file, 'not a directory'),
                               (self.source, 'no manifest.sqlite')]:
            with self.subTest(first):
                self.assertRefused(
                    ['restore', first, os.path.join(self.dir, 'r')],
                    f'error: {first} is not a backup snapshot: {problem}\n',
                    self.dir)
                self.assertRefused(
                    ['restore', '--check', first],
                    f'error: {first} is not a backup snapshot: {problem}\n',
                    self.dir)

    def test_keep_needs_a_positive_number(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), \
                self.assertRaises(SystemExit) as exit:
            main(self.backup_argv(self.dest) + ['--keep', '0'])
        self.assertEqual(exit.exception.code, 2)
        self.assertIn("--keep: '0' is not a number of snapshots",
                      err.getvalue())
        self.assertFalse(os.path.exists(self.dest))
