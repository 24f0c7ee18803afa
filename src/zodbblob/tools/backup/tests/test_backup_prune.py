"""Removing snapshots (``--keep``, `prune`), and the pool files only they list.

Killed at any point (`collect` among its removals), a rerun finishes the
work and removes nothing a remaining snapshot lists.
"""

import os
import shutil
import signal

from zodbblob.tools.backup.tests.backup_stores import (
    StoreTestCase,
    blob_bytes,
    listed,
    pooled,
    read_store,
    run_process,
)
from zodbblob.tools.backup import (
    COLLECT_KILL_VARIABLE,
    prune,
)


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
