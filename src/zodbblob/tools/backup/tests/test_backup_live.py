"""A backup beside a live ZEO server that serves, commits and packs.

The servers are real processes; a pack runs at a known point of the
backup (over ZEO, or held by `held_pack_server`), never by timing.
"""

import concurrent.futures
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

import transaction
import ZEO
from ZODB.blob import Blob

import zodbblob.cli.backup
import zodbblob.tools.backup.writer
from zodbblob.storage.catalog import pack_under_way
from zodbblob.testing import ServerProcess, ZEOServerLayer, free_port
from zodbblob.tools.backup.tests.backup_stores import (
    ServedDatabaseTestCase,
    blob_bytes,
    listed,
    pool_files,
    read_blobs,
    read_store,
    run,
)
from zodbblob.tools.backup import snapshots

# A server of our own: the tests commit into it, which the shared
# ZEO_SERVER layer's other users should not see.
BACKUP_SERVER = ZEOServerLayer(name='BACKUP_SERVER', module=__name__)


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
        copy_blob = zodbblob.tools.backup.writer._SnapshotWriter._blob
        packed = []

        def pack_then_copy(writer, *args):
            # Once the snapshot is planned and its manifest linked, before
            # its first blob file is copied.
            if not packed:
                self.pack()
                packed.append(True)
            return copy_blob(writer, *args)

        with mock.patch.object(zodbblob.tools.backup.writer._SnapshotWriter,
                               '_blob', pack_then_copy):
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
        open_storage = zodbblob.cli.backup.open_storage

        def open_then_pack(*args, **kw):
            # The index read from the file a pack then replaces.
            storage = open_storage(*args, **kw)
            self.pack()
            return storage

        with mock.patch.object(zodbblob.cli.backup, 'open_storage',
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
        copy_blob = zodbblob.tools.backup.writer._SnapshotWriter._blob

        def pack_then_copy(writer, *args):
            # The pack starts once the snapshot is planned; it packs
            # nothing yet, so every file is there to be copied.
            if self.packing is None:
                self.start_pack()
            return copy_blob(writer, *args)

        with mock.patch.object(zodbblob.tools.backup.writer._SnapshotWriter,
                               '_blob', pack_then_copy):
            result = run(*self.argv)
        self.assertIsNotNone(self.packing)
        self.assertDroppedThenTakenAfterThePack(*result)
