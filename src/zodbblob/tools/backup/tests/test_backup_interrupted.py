"""A backup or restore that dies, or is interrupted, and is run again.

The rerun finishes what the first run left (a snapshot without
``COMPLETE``, a restore among its final renames) and loses nothing.
"""

import json
import logging
import os
import signal

from zodbblob.tools.backup.tests.backup_stores import (
    StoreTestCase,
    listed,
    pool_files,
    pooled,
    read_store,
    run_process,
)
from zodbblob.tools.backup import (
    COMPLETE_NAME,
    KILL_VARIABLE,
    RESTORE_KILL_VARIABLE,
    RESTORING_NAME,
    Manifest,
    check,
    content_path,
    snapshots,
)


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
        self.assertTrue(partial.startswith(os.path.join(
            self.dest, '.contents', '.incoming')))
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
            kept = {os.path.relpath(content_path(self.dest, sha256),
                                    os.path.join(self.dest, '.contents'))
                    for *_, sha256, state in manifest.blobs()}
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
            *_, sha256, state = next(manifest.blobs(1))
            manifest.set_meta(boot_id='a boot before a power cut')
        finally:
            manifest.close()
        # What a power cut can do to a file whose data was not yet synced.
        os.truncate(content_path(self.dest, sha256), 0)
        with self.assertLogs('zodbblob.tools.backup', logging.WARNING) as logs:
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
        with self.assertLogs('zodbblob.tools.backup', logging.WARNING) as logs:
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
