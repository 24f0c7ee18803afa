"""``zodbblob backup`` and ``zodbblob restore``, end to end on real stores.

Every test builds a FileStorage with zodbblob blobs, runs the commands as
a user does (``zodbblob.cli.main``, or ``python -m zodbblob.cli`` where a
process must die), restores, and reads the restored database back.
"""

import hashlib
import json
import logging
import os

import ZODB
import ZODB.FileStorage
from ZODB.blob import Blob

from zodbblob import BlobStorage
from zodbblob.tools.backup.tests.backup_stores import (
    StoreTestCase,
    directories,
    files_below,
    listed,
    open_db,
    pool_files,
    read_store,
    run,
    tree,
)
from zodbblob.tools.backup import (
    COMPLETE_NAME,
    Manifest,
    backup,
    check,
)


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
            self.assertEqual(json.load(f)['format'], 3)
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
        # One new directory, the snapshot, and at most the pool's
        # directory of the new content: no tree of the blob files.
        made = directories(self.dest) - dirs_before - {second}
        self.assertLessEqual(made, {os.path.dirname(
            os.path.join(self.dest, '.contents', path))
            for path in set(after) - set(before)})
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
        damaged = os.path.join(self.dest, '.contents', sorted(before)[2])
        os.chmod(damaged, 0o644)
        with open(damaged, 'r+b') as f:
            f.write(b'!')
        self.assertFalse(check(first).clean)
        self.commit({'b0': b'new'})
        with self.assertLogs('zodbblob.tools.backup', logging.WARNING) as logs:
            out = self.backup('--full')
        self.assertIn(f'Content {damaged} in the pool is damaged',
                      '\n'.join(logs.output))
        # The new revision and the damaged file: copied from the source.
        self.assertIn('blob files: 6, 2 copied', out)
        self.assertIn('4 already backed up', out)
        after = pool_files(self.dest)
        for path, inode in before.items():
            if os.path.join(self.dest, '.contents', path) == damaged:
                # Copied again (its inode number may be reused): the
                # bytes it is named for.
                with open(damaged, 'rb') as f:
                    self.assertEqual(hashlib.sha256(f.read()).hexdigest(),
                                     os.path.basename(path))
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
        path = os.path.join(self.dest, '.contents',
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
        path = os.path.join(self.dest, '.contents',
                            sorted(pool_files(self.dest))[0])
        os.remove(path)
        status, out, err = run('restore', '--check', snapshot)
        self.assertEqual(status, 1)
        self.assertIn(f'missing from the pool: {path}', out)

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
        with self.assertLogs('zodbblob.tools.backup', logging.WARNING) as logs:
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
        with self.assertLogs('zodbblob.tools.backup', logging.WARNING):
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
