"""``zodbblob backup`` and ``zodbblob restore``, end to end on real stores.

Every test builds a FileStorage with zodbblob blobs, runs the commands as
a user does (``zodbblob.cli.main``, or ``python -m zodbblob.cli`` where a
process must die), restores, and reads the restored database back.
"""

import concurrent.futures
import contextlib
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

import transaction
import ZEO
import ZODB
import ZODB.FileStorage
from ZODB.blob import Blob

# zodbblob.backup imports zodbblob.cli.arguments, and zodbblob.cli imports
# zodbblob.backup: the command line first, until backup moves to tools/.
import zodbblob.cli

# isort: split
import zodbblob.backup
from zodbblob import BlobStorage
from zodbblob.backup import (
    COLLECT_KILL_VARIABLE,
    COMPLETE_NAME,
    KILL_VARIABLE,
    RESTORE_KILL_VARIABLE,
    RESTORING_NAME,
    Manifest,
    backup,
    check,
    pool_path,
    prune,
    snapshots,
)
from zodbblob.cli import main
from zodbblob.journal import pack_under_way
from zodbblob.testing import ServerProcess, ZEOServerLayer, free_port


def run(*argv):
    """``zodbblob ARGV`` in this process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(arg) for arg in argv])
    return status, out.getvalue(), err.getvalue()


def run_process(*argv, env=None):
    """``python -m zodbblob.cli ARGV`` in a child process."""
    environment = dict(os.environ)
    environment.pop(KILL_VARIABLE, None)
    environment.pop(COLLECT_KILL_VARIABLE, None)
    environment.pop(RESTORE_KILL_VARIABLE, None)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, '-m', 'zodbblob.cli'] + [str(a) for a in argv],
        capture_output=True, text=True, env=environment, timeout=120)


def open_db(directory, layout='automatic', read_only=False):
    base = ZODB.FileStorage.FileStorage(
        os.path.join(directory, 'Data.fs'), read_only=read_only)
    return ZODB.DB(BlobStorage(os.path.join(directory, 'blobs'), base,
                               layout))


def blob_bytes(seed, size=100):
    return random.Random(seed).randbytes(size)


def read_blobs(root):
    """name -> bytes of every blob in `root`."""
    result = {}
    for name, value in root.items():
        if isinstance(value, Blob):
            with value.open('r') as f:
                result[name] = f.read()
    return result


def read_store(directory):
    db = open_db(directory, read_only=True)
    try:
        with db.transaction() as conn:
            return read_blobs(conn.root())
    finally:
        db.close()


def files_below(top, suffix=''):
    """Path below `top` -> inode, for every file whose name ends so."""
    result = {}
    for dirpath, dirs, names in os.walk(top):
        for name in names:
            if name.endswith(suffix):
                path = os.path.join(dirpath, name)
                result[os.path.relpath(path, top)] = os.stat(path).st_ino
    return result


def pool_files(destination):
    """Path below the pool -> inode, for every blob file in it."""
    return files_below(os.path.join(destination, '.blobs'), '.blob')


def directories(top):
    return {dirpath for dirpath, dirs, names in os.walk(top)}


def listed(snapshot):
    """(oid, tid) of every blob file the manifest of `snapshot` lists."""
    manifest = Manifest(snapshot, read_only=True)
    try:
        return {(oid, tid) for oid, tid, *_ in manifest.blobs()}
    finally:
        manifest.close()


def pooled(destination):
    """(oid, tid) of every blob file in the pool of `destination`."""
    from zodbblob.backup import POOL_LAYOUT
    top = os.path.join(destination, '.blobs')
    return {POOL_LAYOUT.blob_path_to_oid_tid(path)
            for path in files_below(top, '.blob')}


def tree(path):
    return sorted((dirpath, sorted(files))
                  for dirpath, dirs, files in os.walk(path))


class StoreTestCase(unittest.TestCase):

    layout = 'automatic'

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-backup-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.source = os.path.join(self.dir, 'source')
        os.mkdir(self.source)
        self.data = os.path.join(self.source, 'Data.fs')
        self.blob_dir = os.path.join(self.source, 'blobs')
        self.dest = os.path.join(self.dir, 'backups')
        self.expected = {}

    def commit(self, changes):
        """Set the blobs in `changes` (name -> bytes), in one transaction."""
        db = open_db(self.source, self.layout)
        try:
            with db.transaction() as conn:
                root = conn.root()
                for name, data in changes.items():
                    if name in root:
                        with root[name].open('w') as f:
                            f.write(data)
                    else:
                        root[name] = Blob(data)
        finally:
            db.close()
        self.expected.update(changes)

    def make_store(self, count):
        self.commit({f'b{i}': blob_bytes(i) for i in range(count)})

    def pack(self):
        db = open_db(self.source, self.layout)
        try:
            db.pack(time.time() + 1)
        finally:
            db.close()

    def backup(self, *options):
        status, out, err = run('backup', '--data', self.data, '--blob-dir',
                               self.blob_dir, *options, self.dest)
        self.assertEqual(status, 0, out + err)
        return out

    def restore(self, snapshot, name='restored', *options):
        target = os.path.join(self.dir, name)
        status, out, err = run('restore', *options, snapshot, target)
        self.assertEqual(status, 0, out + err)
        return target

    def assertVerifies(self, directory):
        status, out, err = run(
            'verify', '--checksum', '--data',
            os.path.join(directory, 'Data.fs'), '--blob-dir',
            os.path.join(directory, 'blobs'))
        self.assertEqual(status, 0, out + err)
        self.assertIn('clean', out)

    def assertChecks(self, snapshot):
        status, out, err = run('restore', '--check', snapshot)
        self.assertEqual(status, 0, out + err)

    def snapshot_paths(self):
        return [s.path for s in snapshots(self.dest)]


class BackupRestoreTests(StoreTestCase):

    def test_restored_store_verifies_and_every_blob_reads_its_bytes(self):
        self.make_store(30)
        out = self.backup()
        [snapshot] = self.snapshot_paths()
        self.assertIn('blob files: 30, 30 copied', out)
        # The snapshot is its Data.fs part, manifest and marker; its blob
        # files are in the destination's pool.
        self.assertEqual(sorted(os.listdir(snapshot)), [
            COMPLETE_NAME, f'Data.fs.0000000000000000-'
            f'{os.path.getsize(self.data):016x}', 'manifest.sqlite'])
        self.assertEqual(len(pool_files(self.dest)), 30)
        with open(os.path.join(self.dest, '.zodbblob-backup')) as f:
            self.assertEqual(json.load(f)['format'], 2)
        restored = self.restore(snapshot)
        self.assertVerifies(restored)
        self.assertEqual(read_store(restored), self.expected)
        with open(os.path.join(restored, 'Data.fs'), 'rb') as copy, \
                open(self.data, 'rb') as original:
            self.assertEqual(copy.read(), original.read())

    def test_second_backup_copies_only_the_changed_files_and_makes_no_tree(
            self):
        self.make_store(100)
        self.backup()
        old = dict(self.expected)
        before = pool_files(self.dest)
        dirs_before = directories(self.dest)
        self.commit({'b7': b'changed'})  # 1%
        out = self.backup()
        first, second = self.snapshot_paths()
        # The old revision of b7 is still a record in Data.fs: listed too.
        self.assertIn('blob files: 101, 1 copied (7 bytes), 100 already '
                      'backed up', out)
        after = pool_files(self.dest)
        self.assertEqual(len(after), 101)
        self.assertEqual(len(set(after) - set(before)), 1)
        for path, inode in before.items():
            self.assertEqual(after[path], inode, path)
        # One new directory, the snapshot: no tree of the blob files.
        self.assertEqual(directories(self.dest) - dirs_before, {second})
        self.assertEqual(len(listed(second)), 101)
        self.assertLess(listed(first), listed(second))
        # Data.fs: the first snapshot's part linked, the appended bytes new.
        first_part, = [n for n in os.listdir(first) if n.startswith('Data')]
        self.assertEqual(
            os.stat(os.path.join(first, first_part)).st_ino,
            os.stat(os.path.join(second, first_part)).st_ino)
        self.assertEqual(read_store(self.restore(second)), self.expected)
        self.assertEqual(read_store(self.restore(first, 'older')), old)
        self.assertVerifies(os.path.join(self.dir, 'restored'))

    def test_backup_with_nothing_new_is_up_to_date(self):
        self.make_store(3)
        self.backup()
        out = self.backup()
        self.assertIn('up to date', out)
        self.assertEqual(len(self.snapshot_paths()), 1)

    def test_full_backup_copies_again_a_damaged_pool_file_and_keeps_others(
            self):
        self.make_store(5)
        self.backup()
        [first] = self.snapshot_paths()
        before = pool_files(self.dest)
        damaged = os.path.join(self.dest, '.blobs', sorted(before)[2])
        os.chmod(damaged, 0o644)
        with open(damaged, 'r+b') as f:
            f.write(b'!')
        self.assertFalse(check(first).clean)
        self.commit({'b0': b'new'})
        with self.assertLogs('zodbblob.backup', logging.WARNING) as logs:
            out = self.backup('--full')
        self.assertIn(f'Blob file {damaged} in the pool is missing or '
                      f'damaged', '\n'.join(logs.output))
        # The new revision and the damaged file: copied from the source.
        self.assertIn('blob files: 6, 2 copied', out)
        self.assertIn('4 already backed up', out)
        after = pool_files(self.dest)
        for path, inode in before.items():
            if os.path.join(self.dest, '.blobs', path) == damaged:
                self.assertNotEqual(after[path], inode)
            else:
                self.assertEqual(after[path], inode)
        # The repaired file is the first snapshot's too.
        self.assertTrue(check(first).clean)
        second = self.snapshot_paths()[-1]
        self.assertEqual(len([n for n in os.listdir(second)
                              if n.startswith('Data.fs.')]), 1)
        self.assertEqual(read_store(self.restore(second)), self.expected)

    def test_check_reports_a_corrupted_byte_and_exits_1(self):
        self.make_store(10)
        self.backup()
        [snapshot] = self.snapshot_paths()
        status, out, err = run('restore', '--check', snapshot)
        self.assertEqual(status, 0, out + err)
        self.assertIn('1 Data.fs parts, 10 blob files, clean', out)
        path = os.path.join(self.dest, '.blobs',
                            sorted(pool_files(self.dest))[3])
        os.chmod(path, 0o644)
        with open(path, 'r+b') as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 1]))
        status, out, err = run('restore', '--check', snapshot)
        self.assertEqual(status, 1)
        self.assertIn(f'checksum mismatch: {path} has sha256', out)
        self.assertIn('1 problems', out)
        # Restoring it, checked or not, linked or not, stops and leaves
        # nothing.
        target = os.path.join(self.dir, 'restored')
        status, out, err = run('restore', '--check', snapshot, target)
        self.assertEqual(status, 1)
        self.assertFalse(os.path.exists(target))
        for options in ([], ['--link']):
            status, out, err = run('restore', *options, snapshot, target)
            self.assertEqual(status, 2)
            self.assertIn(f'checksum mismatch: {path}', err)
            self.assertFalse(os.path.exists(target))

    def test_check_reports_a_missing_pool_file(self):
        self.make_store(3)
        self.backup()
        [snapshot] = self.snapshot_paths()
        path = os.path.join(self.dest, '.blobs',
                            sorted(pool_files(self.dest))[0])
        os.remove(path)
        status, out, err = run('restore', '--check', snapshot)
        self.assertEqual(status, 1)
        self.assertIn(f'unreadable: {path}', out)

    def test_check_reports_a_corrupted_data_fs_part(self):
        self.make_store(2)
        self.backup()
        [snapshot] = self.snapshot_paths()
        [part] = [n for n in os.listdir(snapshot) if n.startswith('Data')]
        path = os.path.join(snapshot, part)
        os.chmod(path, 0o644)
        with open(path, 'r+b') as f:
            f.seek(100)
            f.write(b'X')
        status, out, err = run('restore', '--check', snapshot)
        self.assertEqual(status, 1)
        self.assertIn(f'checksum mismatch: {path}', out)

    def test_restore_refuses_a_directory_with_a_data_fs_and_changes_nothing(
            self):
        self.make_store(2)
        self.backup()
        [snapshot] = self.snapshot_paths()
        target = os.path.join(self.dir, 'occupied')
        os.mkdir(target)
        with open(os.path.join(target, 'Data.fs'), 'w') as f:
            f.write('precious')
        before = tree(target)
        status, out, err = run('restore', snapshot, target)
        self.assertEqual(status, 2)
        self.assertIn(f'{target}/Data.fs exists', err)
        self.assertEqual(tree(target), before)

    def test_restore_refuses_a_non_empty_blob_directory(self):
        self.make_store(2)
        self.backup()
        [snapshot] = self.snapshot_paths()
        target = os.path.join(self.dir, 'occupied')
        os.makedirs(os.path.join(target, 'blobs'))
        with open(os.path.join(target, 'blobs', 'x'), 'w'):
            pass
        before = tree(target)
        status, out, err = run('restore', snapshot, target)
        self.assertEqual(status, 2)
        self.assertIn('blobs exists and is not empty', err)
        self.assertEqual(tree(target), before)

    def test_restore_refuses_a_blob_directory_a_live_storage_holds(self):
        self.make_store(2)
        self.backup()
        [snapshot] = self.snapshot_paths()
        target = os.path.join(self.dir, 'target')
        os.mkdir(target)
        live = ZODB.DB(BlobStorage(
            os.path.join(target, 'blobs'),
            ZODB.FileStorage.FileStorage(os.path.join(self.dir, 'other.fs'))))
        try:
            before = tree(target)
            status, out, err = run('restore', snapshot, target)
            self.assertEqual(tree(target), before)
        finally:
            live.close()
        self.assertEqual(status, 2)
        self.assertIn(f'Blob directory {target}/blobs is in use by a running '
                      f'storage', err)

    def test_restore_into_an_empty_blob_directory(self):
        self.make_store(2)
        self.backup()
        [snapshot] = self.snapshot_paths()
        target = os.path.join(self.dir, 'restored')
        os.makedirs(os.path.join(target, 'blobs'))
        self.restore(snapshot)
        self.assertEqual(read_store(target), self.expected)

    def test_restore_refuses_an_unfinished_snapshot(self):
        self.make_store(2)
        self.backup()
        [snapshot] = self.snapshot_paths()
        os.remove(os.path.join(snapshot, COMPLETE_NAME))
        status, out, err = run('restore', snapshot,
                               os.path.join(self.dir, 'r'))
        self.assertEqual(status, 2)
        self.assertIn('is unfinished', err)
        self.assertFalse(os.path.exists(os.path.join(self.dir, 'r')))

    def test_restored_store_opens_without_rescanning_its_blobs(self):
        self.make_store(3)
        self.backup()
        restored = self.restore(self.snapshot_paths()[0])
        with self.assertNoLogs('zodbblob.storage', logging.WARNING):
            db = open_db(restored)
        try:
            self.assertEqual(len(db.storage._shared.journal), 3)
            with db.transaction() as conn:
                conn.root()['b0'] = Blob(b'after the restore')
        finally:
            db.close()
        self.assertVerifies(restored)

    def test_restore_writes_the_data_fs_index_and_leaves_data_fs_as_taken(
            self):
        self.make_store(3)
        self.backup()
        restored = self.restore(self.snapshot_paths()[0])
        self.assertEqual(sorted(os.listdir(restored)),
                         ['Data.fs', 'Data.fs.index', 'blobs'])
        with open(os.path.join(restored, 'Data.fs'), 'rb') as copy, \
                open(self.data, 'rb') as original:
            self.assertEqual(copy.read(), original.read())
        storage = ZODB.FileStorage.FileStorage(
            os.path.join(restored, 'Data.fs'), read_only=True)
        try:
            # ZODB's marker: the index was read, Data.fs not scanned.
            self.assertEqual(storage._used_index, 1)
        finally:
            storage.close()

    def test_restore_copies_by_default_and_links_with_link(self):
        self.make_store(4)
        self.backup()
        [snapshot] = self.snapshot_paths()
        pool = set(pool_files(self.dest).values())
        copied = self.restore(snapshot, 'copied')
        self.assertFalse(pool & set(files_below(copied, '.blob').values()))
        target = os.path.join(self.dir, 'linked')
        status, out, err = run('restore', '--link', snapshot, target)
        self.assertEqual(status, 0, err)
        self.assertIn('4 blob files are hard links to the backup\'s files, '
                      '0 are copies', out)
        self.assertEqual(set(files_below(target, '.blob').values()), pool)
        self.assertVerifies(target)
        self.assertEqual(read_store(target), self.expected)

    def test_restore_into_another_layout(self):
        self.make_store(4)
        self.backup()
        restored = self.restore(self.snapshot_paths()[0], 'restored',
                                '--layout', 'chunky')
        with open(os.path.join(restored, 'blobs', '.layout')) as f:
            self.assertEqual(f.read(), 'chunky')
        self.assertVerifies(restored)
        self.assertEqual(read_store(restored), self.expected)

    def test_backup_beside_a_storage_open_for_writing(self):
        self.make_store(5)
        db = open_db(self.source)
        try:
            # The open storage holds the blob directory's lock; the backup
            # takes no lock of the storage's.
            self.backup()
            with db.transaction() as conn:
                conn.root()['b1'] = Blob(b'while open')
            self.expected['b1'] = b'while open'
            self.backup()
        finally:
            db.close()
        restored = self.restore(self.snapshot_paths()[-1])
        self.assertEqual(read_store(restored), self.expected)

    def test_backup_after_a_pack_copies_data_fs_whole_and_reuses_the_pool(
            self):
        self.make_store(20)
        self.backup()
        self.commit({'b0': b'new'})
        self.pack()
        with self.assertLogs('zodbblob.backup', logging.WARNING) as logs:
            status, out, err = run('backup', '--data', self.data,
                                   '--blob-dir', self.blob_dir, self.dest)
        self.assertEqual(status, 0, out + err)
        self.assertIn('(packed?): copying it whole', logs.output[0])
        self.assertIn('blob files: 20, 1 copied (3 bytes), 19 already '
                      'backed up', out)
        second = self.snapshot_paths()[-1]
        self.assertEqual(len([n for n in os.listdir(second)
                              if n.startswith('Data.fs.')]), 1)
        restored = self.restore(second)
        self.assertVerifies(restored)
        self.assertEqual(read_store(restored), self.expected)

    def test_blob_missing_from_the_source_is_reported_and_exits_1(self):
        self.make_store(3)
        db = open_db(self.source)
        with db.transaction() as conn:
            blob = conn.root()['b2']
            blob._p_activate()
            path = db.storage.loadBlob(blob._p_oid, blob._p_serial)
        db.close()
        os.remove(path)
        with self.assertLogs('zodbblob.backup', logging.WARNING):
            status, out, err = run('backup', '--quiet', '--data', self.data,
                                   '--blob-dir', self.blob_dir, self.dest)
        self.assertEqual(status, 1)
        self.assertIn(f'missing: {path}', out)
        [snapshot] = self.snapshot_paths()
        status, out, err = run('restore', '--check', snapshot)
        self.assertEqual(status, 1)
        self.assertIn('was not in the source', out)

    def test_backup_reads_a_zope_conf(self):
        self.make_store(3)
        conf = os.path.join(self.dir, 'zope.conf')
        with open(conf, 'w') as f:
            f.write('%%import zodbblob\n'
                    '<zodb_db main>\n'
                    '  <zodbblob>\n'
                    '    blob-dir %s\n'
                    '    <filestorage>\n'
                    '      path %s\n'
                    '    </filestorage>\n'
                    '  </zodbblob>\n'
                    '</zodb_db>\n' % (self.blob_dir, self.data))
        status, out, err = run('backup', '--config', conf, self.dest)
        self.assertEqual(status, 0, out + err)
        restored = self.restore(self.snapshot_paths()[0])
        self.assertEqual(read_store(restored), self.expected)

    def test_another_backup_into_the_same_destination_is_refused(self):
        self.make_store(2)
        os.makedirs(self.dest)
        import zc.lockfile
        lock = zc.lockfile.LockFile(os.path.join(self.dest, '.lock'))
        try:
            status, out, err = run('backup', '--data', self.data,
                                   '--blob-dir', self.blob_dir, self.dest)
        finally:
            lock.close()
        self.assertEqual(status, 2)
        self.assertIn('Another backup is writing into', err)
        self.assertEqual(self.snapshot_paths(), [])


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
            f'format 2', self.dir)

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
            f'reads format 2', self.dir)

    def test_a_destination_marker_of_another_format_is_refused(self):
        self.backup()
        marker = os.path.join(self.dest, '.zodbblob-backup')
        with open(marker, 'w') as f:
            f.write('{"format": 3}\n')
        self.commit({'b1': b'new'})
        self.assertRefused(
            self.backup_argv(self.dest),
            f'{self.dest} is a backup destination of format 3 ({marker})',
            self.dest)

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
        with self.assertLogs('zodbblob.backup', logging.WARNING) as logs:
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
            f'{copy}: its blob files are in {away}/.blobs, which does not '
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


class PruneTests(StoreTestCase):
    """Removing snapshots, and the pool files only they listed."""

    def three_snapshots(self):
        """Three snapshots; Data.fs packed before each of the last two, so
        that each older one lists revisions the newer ones do not."""
        self.make_store(10)
        self.backup()
        for round in (1, 2):
            self.commit({f'b{i}': blob_bytes(f'{round}-{i}') for i in range(5)})
            self.pack()
            self.backup()
        return self.snapshot_paths()

    def test_keep_removes_old_snapshots_and_the_files_only_they_listed(self):
        first, second, third = self.three_snapshots()
        self.assertEqual(len(pooled(self.dest)), 20)
        self.commit({'b9': b'the newest'})
        out = self.backup('--keep', '2')
        fourth = self.snapshot_paths()[-1]
        self.assertEqual(self.snapshot_paths(), [third, fourth])
        self.assertIn(f'{self.dest}: removed snapshot '
                      f'{os.path.basename(first)}', out)
        self.assertIn(f'{self.dest}: removed snapshot '
                      f'{os.path.basename(second)}', out)
        # The first's 5 and the second's 5 revisions of b0-b4.
        self.assertIn('freed 10 blob files (1000 bytes)', out)
        self.assertEqual(pooled(self.dest), listed(third) | listed(fourth))
        self.assertEqual(sorted(os.listdir(os.path.join(self.dest,
                                                        '.manifests'))),
                         [os.path.basename(third) + '.sqlite',
                          os.path.basename(fourth) + '.sqlite'])
        for snapshot in (third, fourth):
            self.assertChecks(snapshot)
        self.assertEqual(read_store(self.restore(fourth)), self.expected)

    def test_prune_keeps_the_newest_and_is_idempotent(self):
        *_, third = self.three_snapshots()
        result = prune(self.dest, 1)
        self.assertEqual((len(result.removed), result.files), (2, 10))
        self.assertEqual(pooled(self.dest), listed(third))
        again = prune(self.dest, 1)
        self.assertEqual((again.removed, again.files), ([], 0))
        self.assertEqual(read_store(self.restore(third)), self.expected)

    def test_a_snapshot_deleted_by_hand_is_collected_by_the_next_backup(
            self):
        first, second, third = self.three_snapshots()
        shutil.rmtree(first)
        out = self.backup()
        self.assertIn('up to date', out)
        self.assertEqual(pooled(self.dest), listed(second) | listed(third))
        self.assertEqual(len(pooled(self.dest)), 15)
        self.assertChecks(second)

    def test_a_killed_collection_removes_nothing_needed_and_a_rerun_finishes(
            self):
        first, second, third = self.three_snapshots()
        killed = run_process(
            'backup', '--keep', '1', '--data', self.data, '--blob-dir',
            self.blob_dir, self.dest, env={COLLECT_KILL_VARIABLE: '3'})
        self.assertEqual(killed.returncode, -signal.SIGKILL, killed.stderr)
        self.assertEqual(self.snapshot_paths(), [third])
        # Killed after 3 of the 10 files: the remaining snapshot has all
        # of its files, and the removed ones are still listed for later.
        self.assertEqual(len(pooled(self.dest)), 17)
        self.assertLess(listed(third), pooled(self.dest))
        self.assertChecks(third)
        self.assertEqual(len(os.listdir(os.path.join(self.dest,
                                                     '.manifests'))), 3)
        rerun = run_process('backup', '--keep', '1', '--data', self.data,
                            '--blob-dir', self.blob_dir, self.dest)
        self.assertEqual(rerun.returncode, 0, rerun.stderr)
        self.assertEqual(pooled(self.dest), listed(third))
        self.assertEqual(os.listdir(os.path.join(self.dest, '.manifests')),
                         [os.path.basename(third) + '.sqlite'])
        self.assertEqual(read_store(self.restore(third)), self.expected)

    def test_a_killed_removal_is_finished_by_the_next_backup(self):
        first, second, third = self.three_snapshots()
        # Where a kill between the rename and the delete leaves it.
        os.rename(first, os.path.join(self.dest, '.removing-'
                                      + os.path.basename(first)))
        self.backup()
        self.assertEqual(sorted(n for n in os.listdir(self.dest)
                                if n.startswith('.removing')), [])
        self.assertEqual(pooled(self.dest), listed(second) | listed(third))


class LawnLayoutTests(StoreTestCase):

    layout = 'lawn'

    def test_snapshot_and_restore_keep_the_layout(self):
        self.make_store(4)
        self.backup()
        [snapshot] = self.snapshot_paths()
        manifest = Manifest(snapshot, read_only=True)
        try:
            self.assertEqual(manifest.meta()['layout'], 'lawn')
        finally:
            manifest.close()
        restored = self.restore(snapshot)
        with open(os.path.join(restored, 'blobs', '.layout')) as f:
            self.assertEqual(f.read(), 'lawn')
        self.assertVerifies(restored)
        self.assertEqual(read_store(restored), self.expected)


class InterruptedBackupTests(StoreTestCase):
    """A backup process that dies, or is interrupted, and is run again."""

    # Resuming does not depend on the layout; lawn's one directory per oid
    # (bushy makes eight) keeps these tests of 300 blobs fast.
    layout = 'lawn'

    def setUp(self):
        super().setUp()
        # More than one batch (256 files), so some are marked done.
        self.make_store(300)

    def backup_process(self, kill=None):
        return run_process(
            'backup', '--data', self.data, '--blob-dir', self.blob_dir,
            self.dest, env={KILL_VARIABLE: kill} if kill else None)

    def partial_files(self):
        return [os.path.join(d, n) for d, _, names in os.walk(self.dest)
                for n in names if n.endswith('.partial')]

    def done_files(self, snapshot):
        manifest = Manifest(snapshot)
        try:
            return manifest.counts().get(1, 0)
        finally:
            manifest.close()

    def test_killed_backup_resumes_keeping_done_files(self):
        killed = self.backup_process(kill='280')
        self.assertEqual(killed.returncode, -signal.SIGKILL, killed.stderr)
        [snapshot] = snapshots(self.dest)
        self.assertFalse(snapshot.complete)
        # Killed in the middle of a file: its partial copy is left.
        [partial] = self.partial_files()
        self.assertTrue(partial.startswith(os.path.join(self.dest,
                                                        '.blobs')))
        done = self.done_files(snapshot.path)
        self.assertEqual(done, 256)
        inodes = pool_files(self.dest)

        rerun = self.backup_process()
        self.assertEqual(rerun.returncode, 0, rerun.stderr)
        self.assertIn('Resuming unfinished snapshot', rerun.stderr)
        self.assertIn(f'{snapshot.path}: resumed and complete', rerun.stdout)
        self.assertIn(f'blob files: 300, {300 - done} copied', rerun.stdout)
        self.assertEqual(self.partial_files(), [])
        [finished] = snapshots(self.dest)
        self.assertTrue(finished.complete)
        # The files done before the kill were kept, not copied again.
        manifest = Manifest(snapshot.path, read_only=True)
        try:
            kept = {os.path.relpath(pool_path(self.dest, oid, tid),
                                    os.path.join(self.dest, '.blobs'))
                    for oid, tid, *_ in manifest.blobs()}
        finally:
            manifest.close()
        after = pool_files(self.dest)
        self.assertEqual(set(after), kept)
        self.assertEqual(sum(after[p] == i for p, i in inodes.items()),
                         done)
        with open(os.path.join(snapshot.path, COMPLETE_NAME)) as f:
            self.assertEqual(json.load(f)['blob_files'], 300)
        self.assertChecks(snapshot.path)
        restored = self.restore(snapshot.path)
        self.assertVerifies(restored)
        self.assertEqual(read_store(restored), self.expected)

    def test_resume_after_a_reboot_copies_again_a_done_file_that_lost_data(
            self):
        killed = self.backup_process(kill='280')
        self.assertEqual(killed.returncode, -signal.SIGKILL)
        [snapshot] = snapshots(self.dest)
        manifest = Manifest(snapshot.path)
        try:
            oid, tid, *_ = next(manifest.blobs(1))
            manifest.set_meta(boot_id='a boot before a power cut')
        finally:
            manifest.close()
        # What a power cut can do to a file whose data was not yet synced.
        os.truncate(pool_path(self.dest, oid, tid), 0)
        with self.assertLogs('zodbblob.backup', logging.WARNING) as logs:
            self.backup()
        self.assertIn('checked the files it had finished; 1 to copy again',
                      '\n'.join(logs.output))
        self.assertTrue(check(snapshot.path).clean)
        self.assertEqual(read_store(self.restore(snapshot.path)),
                         self.expected)

    def test_ctrl_c_exits_130_with_a_message_and_a_rerun_finishes(self):
        interrupted = self.backup_process(kill='100:INT')
        self.assertEqual(interrupted.returncode, 130, interrupted.stderr)
        [snapshot] = snapshots(self.dest)
        self.assertIn(f'interrupted; snapshot {snapshot.path} is '
                      f'unfinished: run the same command again',
                      interrupted.stderr)
        self.assertNotIn('Traceback', interrupted.stderr)
        self.assertEqual(self.partial_files(), [])
        # What was copied before Ctrl-C is kept: of the 100 files, the
        # Data.fs part and 99 blob files.
        self.assertEqual(self.done_files(snapshot.path), 99)
        rerun = self.backup_process()
        self.assertEqual(rerun.returncode, 0, rerun.stderr)
        self.assertIn('blob files: 300, 201 copied', rerun.stdout)
        self.assertTrue(check(snapshot.path).clean)

    def test_resumed_backup_then_snapshots_the_newer_transactions(self):
        killed = self.backup_process(kill='50')
        self.assertEqual(killed.returncode, -signal.SIGKILL)
        self.commit({'b1': b'after the crash'})
        rerun = self.backup_process()
        self.assertEqual(rerun.returncode, 0, rerun.stderr)
        first, second = snapshots(self.dest)
        self.assertTrue(first.complete and second.complete)
        self.assertIn('blob files: 301, 1 copied', rerun.stdout)
        self.assertEqual(read_store(self.restore(second.path)),
                         self.expected)


class InterruptedRestoreTests(StoreTestCase):

    def test_restore_killed_between_its_final_renames_is_finished_by_a_rerun(
            self):
        self.make_store(20)
        self.backup()
        [snapshot] = self.snapshot_paths()
        # After 1 rename: blobs/ in place, Data.fs not; after 2: its
        # index too.
        for renamed in (1, 2):
            with self.subTest(renamed=renamed):
                target = os.path.join(self.dir, f'killed-after-{renamed}')
                killed = run_process('restore', '--quiet', snapshot, target,
                                     env={RESTORE_KILL_VARIABLE:
                                          str(renamed)})
                self.assertEqual(killed.returncode, -signal.SIGKILL)
                self.assertTrue(os.listdir(os.path.join(target, 'blobs')))
                self.assertFalse(os.path.exists(
                    os.path.join(target, 'Data.fs')))
                rerun = run_process('restore', '--quiet', snapshot, target)
                self.assertEqual(rerun.returncode, 0, rerun.stderr)
                self.assertIn('restored transaction', rerun.stdout)
                self.assertIn('20 blob files', rerun.stdout)
                self.assertNotIn(RESTORING_NAME, os.listdir(target))
                self.assertEqual(sorted(n for n in os.listdir(target)
                                        if n.startswith('.')), [])
                self.assertVerifies(target)
                self.assertEqual(read_store(target), self.expected)
                # Finished: a third run is refused as any occupied one.
                again = run_process('restore', '--quiet', snapshot, target)
                self.assertEqual(again.returncode, 2)
                self.assertIn('Data.fs exists', again.stderr)

    def test_interrupted_restore_of_another_snapshot_is_not_finished(self):
        self.make_store(5)
        self.backup()
        self.commit({'b1': b'newer'})
        self.backup()
        first, second = self.snapshot_paths()
        target = os.path.join(self.dir, 'restored')
        killed = run_process('restore', '--quiet', first, target,
                             env={RESTORE_KILL_VARIABLE: '1'})
        self.assertEqual(killed.returncode, -signal.SIGKILL)
        before = sorted(os.listdir(target))
        other = run_process('restore', '--quiet', second, target)
        self.assertEqual(other.returncode, 2)
        self.assertIn(f'restore of snapshot {os.path.basename(first)} that '
                      f'was interrupted', other.stderr)
        self.assertEqual(sorted(os.listdir(target)), before)
        self.assertEqual(run_process('restore', '--quiet', first,
                                     target).returncode, 0)


class PackedUnfinishedTests(StoreTestCase):

    def test_unfinished_snapshot_of_a_packed_source_is_replaced(self):
        self.make_store(50)
        killed = run_process(
            'backup', '--data', self.data, '--blob-dir', self.blob_dir,
            self.dest, env={KILL_VARIABLE: '10'})
        self.assertEqual(killed.returncode, -signal.SIGKILL)
        [unfinished] = snapshots(self.dest)
        # b1's file, among the first copied, is no record after the pack.
        self.commit({'b1': b'new'})
        self.pack()
        with self.assertLogs('zodbblob.backup', logging.WARNING) as logs:
            self.backup()
        self.assertIn(f'Removed unfinished snapshot {unfinished.path}',
                      logs.output[0])
        [snapshot] = snapshots(self.dest)
        self.assertTrue(snapshot.complete)
        self.assertNotEqual(snapshot.path, unfinished.path)
        # What the removed snapshot had copied and no snapshot lists is
        # gone from the pool, with its partial file.
        self.assertEqual(pooled(self.dest), listed(snapshot.path))
        self.assertEqual(
            [n for d, _, names in os.walk(self.dest) for n in names
             if n.endswith('.partial')], [])
        self.assertEqual(read_store(self.restore(snapshot.path)),
                         self.expected)


# A server of our own: the tests commit into it, which the shared
# ZEO_SERVER layer's other users should not see.
BACKUP_SERVER = ZEOServerLayer(name='BACKUP_SERVER', module=__name__)


class ServedDatabaseTestCase(unittest.TestCase):
    """A ZEO client of the layer's server, and a backup destination."""

    prefix = 'zodbblob-backup-live-'

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix=self.prefix)
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.db = ZEO.DB(self.layer.address,
                         blob_dir=os.path.join(self.dir, 'cache'))
        self.addCleanup(lambda: self.db.close())
        self.dest = os.path.join(self.dir, 'backups')


class LiveServerTests(ServedDatabaseTestCase):
    """A backup of a database that a ZEO server serves and commits to."""

    layer = BACKUP_SERVER
    level = 2

    def committer(self, stop, commits):
        rng = random.Random(1)
        counter = 0
        while not stop.is_set():
            counter += 1
            with self.db.transaction() as conn:
                root = conn.root()
                with root[f'b{rng.randrange(200)}'].open('w') as f:
                    f.write(blob_bytes(f'changed {counter}', 2000))
                root[f'new{counter}'] = Blob(blob_bytes(counter, 500))
            commits.append(counter)

    def test_snapshots_taken_while_a_client_commits_restore_the_database_as_of_their_tid(  # noqa: E501
            self):
        with self.db.transaction() as conn:
            for i in range(200):
                conn.root()[f'b{i}'] = Blob(blob_bytes(i, 1000))
        stop, commits = threading.Event(), []
        thread = threading.Thread(target=self.committer,
                                  args=(stop, commits))
        thread.start()

        def wait_for(count):
            deadline = time.monotonic() + 60
            while len(commits) < count:
                self.assertTrue(thread.is_alive(), 'the committer failed')
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.01)

        try:
            wait_for(5)
            started = len(commits)
            argv = ['backup', '--quiet', '--data',
                    self.layer.data_fs, '--blob-dir',
                    self.layer.blob_dir, self.dest]
            first = run(*argv)
            self.assertEqual(first[0], 0, first)
            first_pool = pool_files(self.dest)
            wait_for(started + 10)
            second = run(*argv)
            self.assertEqual(second[0], 0, second)
            during = len(commits) - started
        finally:
            stop.set()
            thread.join()
        self.assertGreater(during, 10)
        taken = snapshots(self.dest)
        self.assertEqual(len(taken), 2)
        # The second is incremental: it lists every file of the first,
        # which it left in the pool as they were.
        self.assertLess(listed(taken[0].path), listed(taken[1].path))
        second_pool = pool_files(self.dest)
        for path, inode in first_pool.items():
            self.assertEqual(second_pool[path], inode)
        transaction.begin()
        self.assertGreater(self.db.lastTransaction(), taken[-1].tid)
        for number, snapshot in enumerate(taken):
            restored = os.path.join(self.dir, f'restored{number}')
            status, out, err = run('restore', '--check', snapshot.path,
                                   restored)
            self.assertEqual(status, 0, out + err)
            status, out, err = run(
                'verify', '--checksum', '--data',
                os.path.join(restored, 'Data.fs'), '--blob-dir',
                os.path.join(restored, 'blobs'))
            self.assertEqual(status, 0, out + err)
            conn = self.db.open(at=snapshot.tid)
            try:
                expected = read_blobs(conn.root())
            finally:
                conn.close()
            self.assertGreater(len(expected), 200)
            self.assertEqual(read_store(restored), expected)


def listing(top):
    """Every path below `top`: a file's inode, size and modification time,
    a directory's None (the names it gained and lost change its times),
    and the lock's None (every run that takes it writes its pid there)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames:
            found[os.path.join(dirpath, name)] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name == '.lock':
                found[path] = None
                continue
            info = os.lstat(path)
            found[path] = (info.st_ino, info.st_size, info.st_mtime_ns)
    return found


# A server of its own: these tests pack its database.
PACK_SERVER = ZEOServerLayer(name='PACK_SERVER', module=__name__)


class LivePackTests(ServedDatabaseTestCase):
    """A backup beside a pack of the live storage it reads.

    The pack runs over ZEO, in the real server process, at a known point
    of the backup (a ZEO pack returns once the server has packed and
    removed the blob files it packed away): no timing decides the order.
    """

    layer = PACK_SERVER
    level = 2
    prefix = 'zodbblob-backup-pack-'

    def setUp(self):
        super().setUp()
        self.argv = ['backup', '--quiet', '--data', self.layer.data_fs,
                     '--blob-dir', self.layer.blob_dir, self.dest]
        self.packed_message = (
            f'zodbblob backup: error: {self.layer.data_fs} was packed while '
            f'the snapshot was taken; run backup again\n')

    def commit(self, version):
        with self.db.transaction() as conn:
            root = conn.root()
            for i in range(5):
                data = blob_bytes(f'{version} {i}', 1000)
                if f'b{i}' in root:
                    with root[f'b{i}'].open('w') as f:
                        f.write(data)
                else:
                    root[f'b{i}'] = Blob(data)

    def pack(self):
        self.db.pack(time.time() + 1)

    def assertRestoresAsTheServerHasIt(self):
        [*_, newest] = snapshots(self.dest)
        self.assertTrue(newest.complete)
        restored = os.path.join(self.dir, 'restored')
        status, out, err = run('restore', '--check', newest.path, restored)
        self.assertEqual(status, 0, out + err)
        status, out, err = run(
            'verify', '--checksum', '--data',
            os.path.join(restored, 'Data.fs'), '--blob-dir',
            os.path.join(restored, 'blobs'))
        self.assertEqual(status, 0, out + err)
        transaction.begin()
        with self.db.transaction() as conn:
            expected = read_blobs(conn.root())
        self.assertEqual(read_store(restored), expected)

    def test_a_pack_that_removes_files_the_snapshot_lists_drops_it_and_exits_2(
            self):
        self.commit('first')
        status, out, err = run(*self.argv)
        self.assertEqual(status, 0, out + err)
        # Revisions the next snapshot lists, which the pack removes.
        self.commit('second')
        self.commit('third')
        before = listing(self.dest)
        copy_blob = zodbblob.backup._SnapshotWriter._blob
        packed = []

        def pack_then_copy(writer, *args):
            # Once the snapshot is planned and its manifest linked, before
            # its first blob file is copied.
            if not packed:
                self.pack()
                packed.append(True)
            return copy_blob(writer, *args)

        with mock.patch.object(zodbblob.backup._SnapshotWriter, '_blob',
                               pack_then_copy):
            status, out, err = run(*self.argv)
        self.assertEqual(packed, [True])
        self.assertEqual((status, out, err), (2, '', self.packed_message))
        # The earlier snapshot as it was, and nothing of the dropped one:
        # no directory, pool file, manifest link or empty directory.
        self.assertEqual(listing(self.dest), before)
        status, out, err = run(*self.argv)
        self.assertEqual(status, 0, out + err)
        self.assertEqual(len(snapshots(self.dest)), 2)
        self.assertRestoresAsTheServerHasIt()

    def test_a_pack_after_the_storage_opened_leaves_no_new_destination(
            self):
        self.commit('fourth')
        self.commit('fifth')
        open_storage = zodbblob.backup.open_storage

        def open_then_pack(*args, **kw):
            # The index read from the file a pack then replaces.
            storage = open_storage(*args, **kw)
            self.pack()
            return storage

        with mock.patch.object(zodbblob.backup, 'open_storage',
                               open_then_pack):
            status, out, err = run(*self.argv)
        self.assertEqual((status, out, err), (2, '', self.packed_message))
        self.assertFalse(os.path.lexists(self.dest))
        status, out, err = run(*self.argv)
        self.assertEqual(status, 0, out + err)
        self.assertRestoresAsTheServerHasIt()


class HeldPackTests(unittest.TestCase):
    """A backup while a live storage's pack is under way: recorded in its
    catalog, held there (`held_pack_server`) before Data.fs is packed."""

    level = 2

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-backup-held-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.var = os.path.join(self.dir, 'var')
        os.mkdir(self.var)
        address = ('127.0.0.1', free_port())
        server = ServerProcess(
            [sys.executable, '-m', 'zodbblob.tests.held_pack_server',
             self.var, str(address[1])], address, cwd=self.dir,
            log_path=os.path.join(self.dir, 'server.log'))
        server.start(timeout=60)
        self.addCleanup(server.stop, timeout=60)
        self.release = os.path.join(self.var, 'release')
        self.db = ZEO.DB(address, blob_dir=os.path.join(self.dir, 'cache'),
                         wait_timeout=60)
        self.addCleanup(lambda: self.db.close())
        self.blob_dir = os.path.join(self.var, 'blobs')
        self.data_fs = os.path.join(self.var, 'Data.fs')
        self.dest = os.path.join(self.dir, 'backups')
        self.argv = ['backup', '--quiet', '--data', self.data_fs,
                     '--blob-dir', self.blob_dir, self.dest]
        for version in ('first', 'second'):
            with self.db.transaction() as conn:
                for i in range(5):
                    conn.root()[f'b{i}'] = Blob(
                        blob_bytes(f'{version} {i}', 1000))
        self.packing = None

    def start_pack(self):
        """A pack over ZEO, in a thread; returns once it is under way."""
        executor = concurrent.futures.ThreadPoolExecutor(1)
        self.addCleanup(executor.shutdown)
        self.packing = executor.submit(self.db.pack, time.time() + 1)
        self.addCleanup(self.finish_pack)
        deadline = time.monotonic() + 60
        while not pack_under_way(self.blob_dir):
            if self.packing.done():
                self.packing.result()   # its error, if it failed
                self.fail('the pack finished before it was released')
            self.assertLess(time.monotonic(), deadline, 'the pack never '
                            'started')
            time.sleep(0.05)

    def finish_pack(self):
        with open(self.release, 'w'):
            pass
        self.packing.result(120)

    def assertDroppedThenTakenAfterThePack(self, status, out, err):
        self.assertEqual((status, out), (2, ''))
        self.assertEqual(err, f'zodbblob backup: error: {self.data_fs} was '
                              f'packed while the snapshot was taken; run '
                              f'backup again\n')
        self.assertFalse(os.path.lexists(self.dest))
        self.finish_pack()
        self.assertFalse(pack_under_way(self.blob_dir))
        status, out, err = run(*self.argv)
        self.assertEqual(status, 0, out + err)
        [snapshot] = snapshots(self.dest)
        restored = os.path.join(self.dir, 'restored')
        status, out, err = run('restore', '--check', snapshot.path, restored)
        self.assertEqual(status, 0, out + err)
        transaction.begin()
        with self.db.transaction() as conn:
            self.assertEqual(read_store(restored), read_blobs(conn.root()))

    def test_a_pack_under_way_when_the_backup_starts_drops_it(self):
        self.start_pack()
        self.assertDroppedThenTakenAfterThePack(*run(*self.argv))

    def test_a_pack_under_way_when_the_files_are_copied_drops_it(self):
        copy_blob = zodbblob.backup._SnapshotWriter._blob

        def pack_then_copy(writer, *args):
            # The pack starts once the snapshot is planned; it packs
            # nothing yet, so every file is there to be copied.
            if self.packing is None:
                self.start_pack()
            return copy_blob(writer, *args)

        with mock.patch.object(zodbblob.backup._SnapshotWriter, '_blob',
                               pack_then_copy):
            result = run(*self.argv)
        self.assertIsNotNone(self.packing)
        self.assertDroppedThenTakenAfterThePack(*result)


class APITests(StoreTestCase):

    def test_backup_returns_what_it_did(self):
        self.make_store(4)
        results = []
        for change in ({}, {'b0': b'new'}):
            self.commit(change)
            db = open_db(self.source, read_only=True)
            try:
                results += backup(db.storage, self.dest)
            finally:
                db.close()
        result, second = results
        self.assertEqual((result.blob_files, result.copied, result.pooled),
                         (4, 4, 0))
        self.assertEqual(second.data_fs_size, os.path.getsize(self.data))
        self.assertEqual(second.snapshot,
                         os.path.join(self.dest, second.tid.hex()))
        self.assertEqual((second.blob_files, second.copied, second.pooled),
                         (5, 1, 4))
