"""The pool by content: each content once, links restored, format 2 read.

``format2.tar.gz`` is a store and its destination of format 2, made by
zodbblob before the pool by content (commit 7b2d935): two snapshots,
whose second lists four blob files of two contents (oids 1, 2 and 3's
second revision hold one, 3's first revision the other).
"""

import json
import logging
import os
import signal
import tarfile

from ZODB.blob import Blob

from zodbblob.tools.backup import (
    DESTINATION_MARKER,
    PLACING_KILL_VARIABLE,
    Manifest,
    check,
    snapshots,
)
from zodbblob.tools.backup.tests.backup_stores import (
    StoreTestCase,
    files_below,
    listed,
    open_db,
    pool_files,
    pooled,
    read_store,
    run,
    run_process,
)

SAME = b'same bytes ' * 50
OTHER = b'other bytes ' * 40
FIXTURE = os.path.join(os.path.dirname(__file__), 'format2.tar.gz')


def inodes_by_content(directory):
    """bytes -> [(st_ino, st_nlink)] of the blob files below `directory`."""
    result = {}
    for path in files_below(directory, '.blob'):
        full = os.path.join(directory, path)
        with open(full, 'rb') as f:
            data = f.read()
        info = os.stat(full)
        result.setdefault(data, []).append((info.st_ino, info.st_nlink))
    return result


def pool_bytes(destination):
    return sum(os.stat(os.path.join(destination, '.contents', path)).st_size
               for path in pool_files(destination))


class ContentPoolTests(StoreTestCase):

    def equal_contents(self):
        self.commit({'a': SAME, 'b': SAME, 'c': OTHER, 'd': SAME})

    def test_a_deduplicated_store_is_backed_up_one_content_once(self):
        self.dedup = True
        self.equal_contents()
        # The store keeps the three equal contents as one inode.
        self.assertEqual(sorted(len({ino for ino, _ in found}) for found in
                                inodes_by_content(self.blob_dir).values()),
                         [1, 1])
        out = self.backup()
        self.assertIn('blob files: 4, 2 copied', out)
        self.assertEqual(len(pool_files(self.dest)), 2)
        self.assertEqual(pool_bytes(self.dest), len(SAME) + len(OTHER))

    def test_a_store_without_dedup_pools_equal_contents_once(self):
        self.equal_contents()
        self.assertEqual(sorted(len({ino for ino, _ in found}) for found in
                                inodes_by_content(self.blob_dir).values()),
                         [1, 3])
        out = self.backup()
        self.assertIn('blob files: 4, 2 copied', out)
        self.assertEqual(len(pool_files(self.dest)), 2)
        self.assertEqual(pool_bytes(self.dest), len(SAME) + len(OTHER))
        [snapshot] = self.snapshot_paths()
        self.assertTrue(check(snapshot).clean)

    def test_a_later_snapshot_copies_no_content_the_pool_has(self):
        self.equal_contents()
        self.backup()
        before = pool_files(self.dest)
        # New oids and a new revision, of contents the pool has.
        self.commit({'e': SAME, 'a': OTHER})
        out = self.backup()
        self.assertIn('blob files: 6, 0 copied (0 bytes), 6 already backed '
                      'up', out)
        self.assertEqual(pool_files(self.dest), before)
        self.assertEqual(read_store(self.restore(self.snapshot_paths()[-1])),
                         self.expected)

    def test_restore_links_equal_contents_and_no_links_copies(self):
        self.dedup = True
        self.equal_contents()
        self.backup()
        [snapshot] = self.snapshot_paths()
        target = os.path.join(self.dir, 'linked')
        status, out, err = run('restore', snapshot, target)
        self.assertEqual(status, 0, err)
        self.assertIn('2 blob files are hard links to a restored file of '
                      'the same content', out)
        found = inodes_by_content(target)
        self.assertEqual(found[SAME], [found[SAME][0]] * 3)
        self.assertEqual(found[SAME][0][1], 3)
        self.assertEqual(found[OTHER][0][1], 1)
        # Not the pool's inodes: the restored files are the store's own.
        self.assertFalse({ino for ino, _ in found[SAME]}
                         & set(pool_files(self.dest).values()))
        copied = self.restore(snapshot, 'copied', '--no-links')
        found = inodes_by_content(copied)
        self.assertEqual(len({ino for ino, _ in found[SAME]}), 3)
        self.assertEqual({nlink for _, nlink in found[SAME]}, {1})
        for restored in (target, copied):
            self.assertVerifies(restored)
            self.assertEqual(read_store(restored), self.expected)
            self.assertEqual(read_store(restored, dedup=True), self.expected)
        # With dedup on, the restored store links a new equal content to
        # the restored file, once its digests are recorded.
        status, out, err = run(
            'verify', '--record-checksums', '--data',
            os.path.join(target, 'Data.fs'), '--blob-dir',
            os.path.join(target, 'blobs'))
        self.assertEqual(status, 0, out + err)
        db = open_db(target, dedup=True)
        try:
            with db.transaction() as conn:
                conn.root()['f'] = Blob(SAME)
        finally:
            db.close()
        self.assertEqual([nlink for _, nlink in
                          inodes_by_content(target)[SAME]], [4] * 4)

    def test_a_content_the_pool_lacks_is_named_and_nothing_restored(self):
        self.equal_contents()
        self.backup()
        [snapshot] = self.snapshot_paths()
        [lost] = [path for path, _ in pool_files(self.dest).items()
                  if os.path.getsize(os.path.join(
                      self.dest, '.contents', path)) == len(OTHER)]
        lost = os.path.join(self.dest, '.contents', lost)
        os.remove(lost)
        target = os.path.join(self.dir, 'restored')
        status, out, err = run('restore', snapshot, target)
        self.assertEqual(status, 2)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn(f'the pool lacks {lost}', err)
        self.assertFalse(os.path.exists(target))
        self.assertIn(f'missing from the pool: {lost}',
                      '\n'.join(check(snapshot).problems))

    def test_collect_removes_the_contents_no_manifest_lists(self):
        self.commit({'a': SAME, 'b': OTHER})
        self.backup()
        # b's content goes; a's old content is c's now.
        self.commit({'a': b'third', 'b': b'fourth', 'c': SAME})
        self.pack()
        self.backup()
        first, second = self.snapshot_paths()
        self.assertEqual(len(pooled(self.dest)), 4)
        status, out, err = run('backup', '--data', self.data, '--blob-dir',
                               self.blob_dir, '--keep', '1', self.dest)
        self.assertEqual(status, 0, err)
        self.assertEqual(pooled(self.dest), listed(second))
        self.assertEqual(len(pooled(self.dest)), 3)
        self.assertEqual(read_store(self.restore(second)), self.expected)


class Format2TestCase(StoreTestCase):
    """A destination of format 2, as the code before format 3 left it."""

    def setUp(self):
        super().setUp()
        with tarfile.open(FIXTURE) as archive:
            archive.extractall(self.dir, filter='data')
        self.source = os.path.join(self.dir, 'format2', 'source')
        self.data = os.path.join(self.source, 'Data.fs')
        self.blob_dir = os.path.join(self.source, 'blobs')
        self.dest = os.path.join(self.dir, 'format2', 'backups')
        self.expected = {'a': SAME, 'b': SAME, 'c': SAME}
        self.old_pool = os.path.join(self.dest, '.blobs')

    def marker_format(self):
        with open(os.path.join(self.dest, DESTINATION_MARKER)) as f:
            return json.load(f)['format']


class Format2Tests(Format2TestCase):

    def test_its_snapshots_check_and_restore_with_links(self):
        first, second = self.snapshot_paths()
        for snapshot in (first, second):
            self.assertChecks(snapshot)
        restored = self.restore(second)
        self.assertEqual(read_store(restored), self.expected)
        self.assertVerifies(restored)
        found = inodes_by_content(restored)
        self.assertEqual([nlink for _, nlink in found[SAME]], [3] * 3)
        self.assertEqual(len({ino for ino, _ in found[SAME]}), 1)
        # Reading changed nothing: still format 2, no pool by content.
        self.assertEqual(self.marker_format(), 2)
        self.assertFalse(os.path.exists(os.path.join(self.dest,
                                                     '.contents')))

    def test_a_backup_upgrades_it_and_links_the_old_files_in(self):
        self.commit({'d': b'new content'})
        with self.assertLogs('zodbblob.tools.backup', logging.WARNING) as logs:
            out = self.backup()
        upgraded = [line for line in logs.output if 'is now of format 3'
                    in line]
        self.assertEqual(len(upgraded), 1, logs.output)
        self.assertEqual(self.marker_format(), 3)
        # Only d's content was copied; the two old contents were linked.
        self.assertIn('blob files: 5, 1 copied', out)
        old_inodes = set(files_below(self.old_pool, '.blob').values())
        contents = pool_files(self.dest)
        self.assertEqual(len(contents), 3)
        self.assertEqual(len(set(contents.values()) & old_inodes), 2)
        first, second, third = self.snapshot_paths()
        for snapshot in (first, second, third):
            self.assertChecks(snapshot)
        self.expected['d'] = b'new content'
        self.assertEqual(read_store(self.restore(third)), self.expected)
        # The old snapshots go with their pool's files; the contents stay.
        status, out, err = run('backup', '--data', self.data, '--blob-dir',
                               self.blob_dir, '--keep', '1', self.dest)
        self.assertEqual(status, 0, err)
        self.assertEqual(files_below(self.old_pool, '.blob'), {})
        self.assertEqual(pool_files(self.dest), contents)
        self.assertEqual(read_store(self.restore(third, 'again')),
                         self.expected)

    def test_a_killed_upgrade_loses_nothing_and_the_rerun_finishes(self):
        self.commit({'d': b'new content'})
        killed = run_process(
            'backup', '--data', self.data, '--blob-dir', self.blob_dir,
            self.dest, env={PLACING_KILL_VARIABLE: '1'})
        self.assertEqual(killed.returncode, -signal.SIGKILL, killed.stderr)
        first, second, third = snapshots(self.dest)
        self.assertFalse(third.complete)
        self.assertEqual(len(pool_files(self.dest)), 1)
        rerun = run_process('backup', '--data', self.data, '--blob-dir',
                            self.blob_dir, self.dest)
        self.assertEqual(rerun.returncode, 0, rerun.stderr)
        self.assertIn('resumed and complete', rerun.stdout)
        self.assertEqual(pooled(self.dest), listed(third.path))
        self.assertEqual(len(pool_files(self.dest)), 3)
        self.expected['d'] = b'new content'
        self.assertEqual(read_store(self.restore(third.path)), self.expected)
        self.assertEqual(read_store(self.restore(second.path, 'old')),
                         {'a': SAME, 'b': SAME, 'c': SAME})


class KilledPlacingTests(StoreTestCase):

    layout = 'lawn'

    def test_killed_while_placing_contents_loses_nothing(self):
        # 300 blobs of 150 contents: more than one batch (256 rows).
        self.commit({f'b{i}': b'content %d' % (i % 150) for i in range(300)})
        killed = run_process(
            'backup', '--data', self.data, '--blob-dir', self.blob_dir,
            self.dest, env={PLACING_KILL_VARIABLE: '100'})
        self.assertEqual(killed.returncode, -signal.SIGKILL, killed.stderr)
        [unfinished] = snapshots(self.dest)
        self.assertFalse(unfinished.complete)
        # Every content in the pool is listed by the manifest already.
        self.assertEqual(len(pooled(self.dest)), 100)
        self.assertLessEqual(pooled(self.dest), listed(unfinished.path))
        rerun = run_process('backup', '--data', self.data, '--blob-dir',
                            self.blob_dir, self.dest)
        self.assertEqual(rerun.returncode, 0, rerun.stderr)
        self.assertIn(f'{unfinished.path}: resumed and complete',
                      rerun.stdout)
        self.assertEqual(pooled(self.dest), listed(unfinished.path))
        self.assertEqual(len(pooled(self.dest)), 150)
        self.assertEqual(
            [n for d, _, names in os.walk(self.dest) for n in names
             if n.endswith('.partial') or '.incoming' in d], [])
        self.assertChecks(unfinished.path)
        self.assertEqual(read_store(self.restore(unfinished.path)),
                         self.expected)

    def test_after_a_reboot_a_named_content_that_lost_data_is_copied_again(
            self):
        self.commit({f'b{i}': b'content %d' % i for i in range(20)})
        killed = run_process(
            'backup', '--data', self.data, '--blob-dir', self.blob_dir,
            self.dest, env={PLACING_KILL_VARIABLE: '5'})
        self.assertEqual(killed.returncode, -signal.SIGKILL, killed.stderr)
        [unfinished] = snapshots(self.dest)
        manifest = Manifest(unfinished.path)
        try:
            manifest.set_meta(boot_id='a boot before a power cut')
        finally:
            manifest.close()
        # Named in the pool, its row not yet done: a power cut garbles it
        # at its size.
        [name, *_] = sorted(pool_files(self.dest))
        path = os.path.join(self.dest, '.contents', name)
        os.chmod(path, 0o644)
        with open(path, 'r+b') as f:
            f.write(b'!')
        rerun = run_process('backup', '--data', self.data, '--blob-dir',
                            self.blob_dir, self.dest)
        self.assertEqual(rerun.returncode, 0, rerun.stderr)
        self.assertTrue(check(unfinished.path).clean)
        self.assertEqual(read_store(self.restore(unfinished.path)),
                         self.expected)
