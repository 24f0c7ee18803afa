"""Dedup: with it on, equal contents share one inode; nothing else does.

Real FileStorages on disk, real files: a link is checked with
``os.stat`` (one ``st_ino``, ``st_nlink``), bytes are read back.
"""

import errno
import io
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest

import blake3
import transaction
import ZConfig
import ZEO
import ZODB
import ZODB.config
import ZODB.FileStorage
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.Connection import TransactionMetaData
from ZODB.utils import z64

from zodbblob import BlobStorage
from zodbblob.cli import main
from zodbblob.cli.serve import serve_config
from zodbblob.layout import FilesystemHelper
from zodbblob.storage import commit
from zodbblob.storage.dedup import CANDIDATES
from zodbblob.storage.catalog import journal_path
from zodbblob.storage.commitlog import CommitLog, commit_log_path
from zodbblob.storage.tests.test_crash import CrashTestCase, run_child
from zodbblob.testing import ServerProcess, free_port, serve_command
from zodbblob.tools.verify import verify
from zodbblob.tests.test_config import commit_blob

CONTENT = b'the same quarterly report\n' * 40


class Hung(Exception):
    pass


def fail_after(seconds):
    """Raise Hung in this thread after `seconds` (a FIFO opened would
    wait for a writer forever); `fail_after(0)` cancels."""
    def hung(signum, frame):
        raise Hung(f'still waiting after {seconds} s')
    signal.signal(signal.SIGALRM, hung if seconds else signal.SIG_DFL)
    signal.alarm(seconds)


class DedupTestCase(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-dedup-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.blob_dir = os.path.join(self.dir, 'blobs')
        self.data_fs = os.path.join(self.dir, 'Data.fs')

    def open_db(self, dedup=True, layout='automatic', **kw):
        storage = BlobStorage(self.blob_dir, ZODB.FileStorage.FileStorage(
            self.data_fs, **kw), layout, dedup=dedup)
        db = ZODB.DB(storage)
        # Looked up when called: DB.close replaces itself once closed.
        self.addCleanup(lambda: db.close())
        return db

    def not_inline(self):
        """Transactions log their files' names, not their bytes."""
        saved = commit.INLINE_LIMIT
        commit.INLINE_LIMIT = -1
        self.addCleanup(setattr, commit, 'INLINE_LIMIT', saved)

    def store(self, db, **blobs):
        with db.transaction() as conn:
            for key, data in blobs.items():
                conn.root()[key] = Blob(data)

    def path(self, db, key):
        with db.transaction() as conn:
            blob = conn.root()[key]
            blob._p_activate()
            return db.storage.fshelper.getBlobFilename(blob._p_oid,
                                                       blob._p_serial)

    def read(self, db, key):
        with db.transaction() as conn:
            with conn.root()[key].open() as f:
                return f.read()

    def assert_one_inode(self, db, *keys, links=None):
        infos = [os.stat(self.path(db, key)) for key in keys]
        self.assertEqual({info.st_ino for info in infos}, {infos[0].st_ino})
        self.assertEqual(infos[0].st_nlink, links or len(keys))

    def assert_own_inodes(self, db, *keys):
        infos = [os.stat(self.path(db, key)) for key in keys]
        self.assertEqual(len({info.st_ino for info in infos}), len(keys))
        self.assertEqual([info.st_nlink for info in infos], [1] * len(keys))

    def assert_no_leftovers(self):
        staging = os.path.join(self.blob_dir, 'tmp')
        for name in os.listdir(staging):
            self.assertEqual(os.listdir(os.path.join(staging, name)), [],
                             name)


class LinkTests(DedupTestCase):

    def test_equal_contents_of_one_transaction_share_one_inode(self):
        db = self.open_db()
        self.store(db, a=CONTENT, b=CONTENT)
        self.assert_one_inode(db, 'a', 'b')
        self.assertEqual(self.read(db, 'a'), CONTENT)
        self.assertEqual(self.read(db, 'b'), CONTENT)
        self.assert_no_leftovers()

    def test_equal_contents_of_two_transactions_share_one_inode(self):
        db = self.open_db()
        self.store(db, a=CONTENT)
        self.store(db, b=CONTENT)
        self.assert_one_inode(db, 'a', 'b')
        self.assertEqual(self.read(db, 'b'), CONTENT)
        self.assert_no_leftovers()

    def test_files_that_are_not_inline_share_one_inode(self):
        # Hashed in threads, made durable themselves; their staged names
        # stay until the checkpoint, the final ones are the links.
        self.not_inline()
        db = self.open_db()
        self.store(db, a=CONTENT, b=CONTENT)
        self.store(db, c=CONTENT)
        # a's staged name is a fourth until the checkpoint.
        self.assert_one_inode(db, 'a', 'b', 'c', links=4)
        self.assertEqual(self.read(db, 'c'), CONTENT)
        db.close()
        db = self.open_db()
        self.assert_one_inode(db, 'a', 'b', 'c')
        self.assertEqual(self.read(db, 'c'), CONTENT)

    def test_copies_of_a_megabyte_or_more_are_freed_by_their_commit(self):
        # The new copy of b, linked away, is held by its staged name
        # alone: its commit checkpoints, and the copy's bytes are free.
        self.not_inline()
        db = self.open_db()
        big = os.urandom(commit.HELD_LIMIT)
        self.store(db, a=big)
        self.store(db, b=big)
        self.assert_one_inode(db, 'a', 'b')
        self.assertEqual(len(db.storage._shared.commit_log), 0)
        self.assert_no_leftovers()
        self.assertEqual(self.read(db, 'b'), big)

    def test_copies_held_add_up_to_a_checkpoint(self):
        self.not_inline()
        held_limit = commit.HELD_LIMIT
        commit.HELD_LIMIT = 2 * len(CONTENT)
        self.addCleanup(setattr, commit, 'HELD_LIMIT', held_limit)
        db = self.open_db()
        self.store(db, a=CONTENT)
        self.store(db, b=CONTENT)
        # a's staged name; b's copy held by its own until a checkpoint.
        self.assert_one_inode(db, 'a', 'b', links=3)
        self.assertEqual(db.storage._shared.held, len(CONTENT))
        self.store(db, c=CONTENT)
        self.assert_one_inode(db, 'a', 'b', 'c')
        self.assertEqual(db.storage._shared.held, 0)
        self.assert_no_leftovers()

    def test_an_inline_file_links_to_one_that_was_not(self):
        db = self.open_db()
        self.not_inline()
        self.store(db, a=CONTENT)
        commit.INLINE_LIMIT = 8 << 20
        self.store(db, b=CONTENT)
        self.assert_one_inode(db, 'a', 'b', links=3)   # a's staged name

    def test_equal_contents_share_one_inode_in_the_lawn_layout(self):
        db = self.open_db(layout='lawn')
        self.store(db, a=CONTENT)
        self.store(db, b=CONTENT)
        self.assertEqual(db.storage.fshelper.layout_name, 'lawn')
        self.assert_one_inode(db, 'a', 'b')

    def test_dedup_off_keeps_a_file_per_blob(self):
        db = self.open_db(dedup=False)
        self.store(db, a=CONTENT, b=CONTENT)
        self.store(db, c=CONTENT)
        self.assert_own_inodes(db, 'a', 'b', 'c')

    def test_dedup_is_the_storage_s_option_not_the_directory_s(self):
        db = self.open_db()
        self.assertTrue(db.storage.dedup)
        self.store(db, a=CONTENT)
        db.close()
        db = self.open_db(dedup=False)
        self.assertFalse(db.storage.dedup)
        self.store(db, b=CONTENT)
        self.assert_own_inodes(db, 'a', 'b')

    def test_different_contents_of_one_size_are_not_linked(self):
        db = self.open_db()
        self.store(db, a=b'A' * 1000, b=b'B' * 1000)
        self.store(db, c=b'C' * 1000)
        self.assert_own_inodes(db, 'a', 'b', 'c')
        self.assertEqual(self.read(db, 'c'), b'C' * 1000)

    def test_a_forged_digest_match_is_refused_by_comparing_bytes(self):
        db = self.open_db()
        self.store(db, a=b'A' * 1000)
        # The catalog says that a holds what b will hold: a collision, as
        # far as the digests can tell.
        journal = db.storage._shared.journal
        journal.flush()
        forged = sqlite3.connect(journal_path(self.blob_dir))
        with forged:
            forged.execute('UPDATE blob SET digest = ?',
                           (blake3.blake3(b'B' * 1000).digest(),))
        forged.close()
        with self.assertLogs('zodbblob.storage.dedup', logging.WARNING) as log:
            self.store(db, b=b'B' * 1000)
        self.assertIn('has its digest and size in the catalog but other '
                      'bytes', log.output[0])
        self.assert_own_inodes(db, 'a', 'b')
        self.assertEqual(self.read(db, 'a'), b'A' * 1000)
        self.assertEqual(self.read(db, 'b'), b'B' * 1000)
        self.assert_no_leftovers()

    def test_a_committed_file_gone_leaves_the_new_one_a_copy(self):
        db = self.open_db()
        self.store(db, a=CONTENT)
        os.remove(self.path(db, 'a'))   # its row stays: a lost file
        with self.assertLogs('zodbblob.storage.dedup', logging.DEBUG) as log:
            self.store(db, b=CONTENT)
        self.assertIn('Kept blob file', log.output[0])
        self.assertEqual(self.read(db, 'b'), CONTENT)
        self.assert_own_inodes(db, 'b')
        self.assert_no_leftovers()

    def test_a_file_at_the_link_limit_leaves_the_new_one_a_copy(self):
        db = self.open_db()
        self.store(db, a=CONTENT)
        # Links elsewhere on the filesystem, up to its limit (ext4: 65000).
        links = os.path.join(self.dir, 'links')
        os.mkdir(links)
        for number in range(200000):
            try:
                os.link(self.path(db, 'a'), os.path.join(links, str(number)))
            except OSError as e:
                self.assertEqual(e.errno, errno.EMLINK)
                break
        else:
            self.skipTest('no link limit below 200000 links here')
        with self.assertLogs('zodbblob.storage.dedup', logging.DEBUG) as log:
            self.store(db, b=CONTENT)
        self.assertIn('Too many links', '\n'.join(log.output))
        self.assertEqual(self.read(db, 'b'), CONTENT)
        self.assert_own_inodes(db, 'b')
        self.assert_no_leftovers()

    def test_an_abort_after_the_link_removes_the_link_only(self):
        # The serial protocol publishes at vote: an abort after it
        # removes the new name, and the committed file keeps its bytes.
        db = self.open_db()
        self.assertEqual(db.storage.commit_protocol, 'serial')
        self.store(db, a=CONTENT)
        committed = self.path(db, 'a')
        storage = db.storage
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        oid = storage.new_oid()
        upload = os.path.join(storage.temporaryDirectory(), 'upload.blob')
        with open(upload, 'wb') as f:
            f.write(CONTENT)
        storage.storeBlob(oid, z64, b'not read', upload, '', txn)
        storage.tpc_vote(txn)
        self.assertEqual(os.stat(committed).st_nlink, 2)
        storage.tpc_abort(txn)
        self.assertEqual(os.stat(committed).st_nlink, 1)
        self.assertEqual(self.read(db, 'a'), CONTENT)
        self.assert_no_leftovers()

    def test_a_content_of_many_names_gives_a_few_candidates(self):
        # A lookup costs the same however many names dedup gave the
        # content: the latest CANDIDATES rows, not every row.
        db = self.open_db()
        for i in range(CANDIDATES + 4):
            self.store(db, **{f'name{i}': CONTENT})
        names = [f'name{i}' for i in range(CANDIDATES + 4)]
        self.assert_one_inode(db, *names)
        with db.transaction() as conn:
            pairs = [(conn.root()[name]._p_oid, conn.root()[name]._p_serial)
                     for name in names]
        key = (blake3.blake3(CONTENT).digest(), len(CONTENT))
        journal = db.storage._shared.journal
        journal.flush()
        self.assertEqual(journal.same_content([key], CANDIDATES),
                         {key: pairs[::-1][:CANDIDATES]})
        self.assertEqual(journal.same_content([key], 2), {key: pairs[:-3:-1]})

    def test_empty_files_are_not_linked(self):
        db = self.open_db()
        self.store(db, a=b'', b=b'')
        self.assert_own_inodes(db, 'a', 'b')

    def test_get_size_counts_each_name(self):
        db = self.open_db()
        base = db.storage.base.getSize()
        self.store(db, a=CONTENT, b=CONTENT)
        self.assert_one_inode(db, 'a', 'b')
        self.assertEqual(db.storage.getSize() - db.storage.base.getSize(),
                         2 * len(CONTENT))
        self.assertGreater(db.storage.base.getSize(), base)


class OtherFilesystemTests(DedupTestCase):
    """A directory of the blob tree that is a mount point: a link across
    it fails with EXDEV, so dedup does not apply there."""

    def move_to_a_tmpfs(self, directory):
        """Put `directory`'s files on a tmpfs mounted on it, until the
        test's cleanup; skip the test where no tmpfs can be mounted."""
        if os.geteuid() != 0:
            self.skipTest('mounting a tmpfs needs root')
        if shutil.which('mount') is None:
            self.skipTest('no mount command here')
        aside = os.path.join(self.dir, 'aside')
        shutil.copytree(directory, aside)
        mounted = subprocess.run(
            ['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', directory],
            capture_output=True, text=True)
        if mounted.returncode:
            self.skipTest(f'cannot mount a tmpfs on {directory}: '
                          f'{mounted.stderr.strip()}')

        def unmount():
            if subprocess.run(['umount', directory]).returncode:
                subprocess.run(['umount', '-l', directory], check=True)
        self.addCleanup(unmount)
        for name in os.listdir(aside):
            shutil.copy2(os.path.join(aside, name), directory)

    def test_an_equal_content_on_another_filesystem_is_not_linked(self):
        db = self.open_db(layout='lawn')
        self.store(db, a=CONTENT)
        elsewhere = self.path(db, 'a')
        self.move_to_a_tmpfs(os.path.dirname(elsewhere))
        self.assertNotEqual(os.stat(elsewhere).st_dev,
                            os.stat(self.blob_dir).st_dev)
        with self.assertLogs('zodbblob.storage.dedup', logging.DEBUG) as logs:
            self.store(db, b=CONTENT)
        self.assertIn('could not link', logs.output[0])
        self.assertIn(os.strerror(errno.EXDEV), logs.output[0])
        self.assert_own_inodes(db, 'a', 'b')
        self.assertEqual(self.read(db, 'a'), CONTENT)
        self.assertEqual(self.read(db, 'b'), CONTENT)
        # On the blob directory's own filesystem, dedup still applies.
        self.store(db, c=CONTENT)
        self.assert_one_inode(db, 'b', 'c')
        self.assert_no_leftovers()
        report = verify(db.storage, checksum=True)
        self.assertTrue(report.clean, report.lines())


class PackAndUndoTests(DedupTestCase):

    def pack(self, db):
        time.sleep(0.01)
        db.pack()

    def test_pack_after_deleting_one_of_two_keeps_the_other_s_bytes(self):
        db = self.open_db()
        self.store(db, a=CONTENT)
        self.store(db, b=CONTENT)
        gone = self.path(db, 'a')
        kept = self.path(db, 'b')
        self.assert_one_inode(db, 'a', 'b')
        with db.transaction() as conn:
            del conn.root()['a']
        self.pack(db)
        self.assertFalse(os.path.exists(gone))
        self.assertEqual(os.stat(kept).st_nlink, 1)
        self.assertEqual(self.read(db, 'b'), CONTENT)

    def test_undo_of_one_keeps_the_other_s_bytes(self):
        db = self.open_db()
        self.store(db, a=CONTENT)
        self.store(db, b=CONTENT)
        kept = self.path(db, 'a')
        self.assert_one_inode(db, 'a', 'b')
        # Undo the transaction that added b, then pack its file away.
        db.undo(db.undoLog(0, 1)[0]['id'])
        transaction.commit()
        with db.transaction() as conn:
            self.assertNotIn('b', conn.root())
        self.pack(db)
        self.assertEqual(os.stat(kept).st_nlink, 1)
        self.assertEqual(self.read(db, 'a'), CONTENT)

    def test_undo_links_the_restored_revision_as_before(self):
        db = self.open_db()
        self.store(db, a=CONTENT)
        self.store(db, b=CONTENT)
        with db.transaction() as conn:
            with conn.root()['a'].open('w') as f:
                f.write(b'changed')
        db.undo(db.undoLog(0, 1)[0]['id'])
        transaction.commit()
        self.assertEqual(self.read(db, 'a'), CONTENT)
        self.assert_one_inode(db, 'a', 'b', links=3)
        self.assert_no_leftovers()


class HostileTests(DedupTestCase):
    """What stands under a committed blob name is never followed."""

    def test_a_directory_linked_outside_is_not_followed(self):
        db = self.open_db()
        self.store(db, a=CONTENT)
        committed = self.path(db, 'a')
        directory = os.path.dirname(committed)
        # The oid's directory becomes a link to one outside, holding a
        # file of the same name and bytes.
        outside = os.path.join(self.dir, 'outside')
        shutil.move(directory, outside)
        os.symlink(outside, directory)
        self.store(db, b=CONTENT)
        new = os.stat(self.path(db, 'b'))
        self.assertNotEqual(new.st_ino, os.stat(
            os.path.join(outside, os.path.basename(committed))).st_ino)
        self.assertEqual(new.st_nlink, 1)
        self.assertEqual(self.read(db, 'b'), CONTENT)

    def test_a_fifo_under_a_committed_name_is_never_opened(self):
        db = self.open_db()
        self.store(db, a=CONTENT)
        committed = self.path(db, 'a')
        os.remove(committed)
        os.mkfifo(committed)
        fail_after(60)
        try:
            self.store(db, b=CONTENT)
        finally:
            fail_after(0)
        self.assert_own_inodes(db, 'b')
        self.assertEqual(self.read(db, 'b'), CONTENT)
        self.assert_no_leftovers()


    def test_a_writable_file_linked_in_from_outside_is_not_shared(self):
        # A committed name replaced by a hard link to a writable file
        # outside, with the same bytes: whoever writes that file would
        # change every blob linked to it.
        db = self.open_db()
        self.store(db, a=CONTENT)
        committed = self.path(db, 'a')
        outside = os.path.join(self.dir, 'outside.bin')
        with open(outside, 'wb') as f:
            f.write(CONTENT)
        os.chmod(outside, 0o644)
        os.remove(committed)
        os.link(outside, committed)
        self.store(db, b=CONTENT)
        new = os.stat(self.path(db, 'b'))
        self.assertNotEqual(new.st_ino, os.stat(outside).st_ino)
        self.assertEqual(new.st_nlink, 1)
        self.assertEqual(self.read(db, 'b'), CONTENT)
        self.assert_no_leftovers()


class CompatibilityTests(DedupTestCase):

    def test_stock_filestorage_reads_a_deduplicated_directory(self):
        db = self.open_db()
        self.store(db, a=CONTENT, b=CONTENT)
        self.store(db, c=CONTENT)
        self.assert_one_inode(db, 'a', 'b', 'c')
        db.close()
        stock = ZODB.DB(ZODB.FileStorage.FileStorage(
            self.data_fs, blob_dir=self.blob_dir))
        self.addCleanup(stock.close)
        for key in 'abc':
            self.assertEqual(self.read(stock, key), CONTENT)


class MigrationTests(DedupTestCase):

    def test_a_catalog_without_the_digest_index_gets_it_at_open(self):
        db = self.open_db()
        self.store(db, a=CONTENT)
        db.close()
        old = sqlite3.connect(journal_path(self.blob_dir))
        old.execute('DROP INDEX blob_digest')
        old.close()
        with self.assertLogs('zodbblob.storage.catalog', logging.INFO) as log:
            db = self.open_db()
        self.assertIn('indexed the digests of 1 rows', '\n'.join(log.output))
        self.store(db, b=CONTENT)
        self.assert_one_inode(db, 'a', 'b')
        plan = db.storage._shared.journal._db.execute(
            'EXPLAIN QUERY PLAN SELECT oid FROM blob WHERE digest IN (?)',
            (b'x',)).fetchall()
        self.assertIn('blob_digest', str(plan))


CONFIG = """
%import zodbblob
<zodb>
  <zodbblob>
    blob-dir {blob_dir}
    {dedup}
    <filestorage>
      path {data_fs}
    </filestorage>
  </zodbblob>
</zodb>
"""


class ConfigurationTests(DedupTestCase):

    def config_file(self, dedup):
        path = os.path.join(self.dir, 'zope.conf')
        with open(path, 'w') as f:
            f.write(CONFIG.format(blob_dir=self.blob_dir, data_fs=self.data_fs,
                                  dedup=dedup))
        return path

    def test_dedup_on_in_a_config_file_reaches_the_storage(self):
        db = ZODB.config.databaseFromFile(open(self.config_file('dedup on')))
        self.addCleanup(db.close)
        self.assertTrue(db.storage.dedup)
        self.assertEqual(db.storage.commit_protocol, 'one sync')
        self.store(db, a=CONTENT)
        self.store(db, b=CONTENT)
        self.assert_one_inode(db, 'a', 'b')

    def test_dedup_is_off_unless_asked(self):
        db = ZODB.config.databaseFromFile(open(self.config_file('')))
        self.addCleanup(db.close)
        self.assertFalse(db.storage.dedup)
        self.store(db, a=CONTENT, b=CONTENT)
        self.assert_own_inodes(db, 'a', 'b')

    def test_a_wrong_value_is_zconfig_s_error(self):
        with self.assertRaises(ZConfig.ConfigurationError) as caught:
            ZODB.config.databaseFromFile(open(self.config_file('dedup maybe')))
        self.assertIn("not a valid boolean value: 'maybe'",
                      str(caught.exception))
        self.assertFalse(os.path.exists(self.data_fs))


class ServeTests(DedupTestCase):

    def test_serve_dedup_writes_dedup_on(self):
        schema = ZConfig.loadSchema(
            os.path.join(os.path.dirname(ZEO.__file__), 'schema.xml'))
        var = os.path.join(self.dir, 'var')
        os.makedirs(os.path.join(var, 'filestorage'))
        for dedup in (False, True):
            config, _ = ZConfig.loadConfigFile(schema, io.StringIO(
                serve_config(var=var, dedup=dedup)))
            self.assertIs(config.storages[0].config.dedup, dedup)

    def test_serve_dedup_with_config_is_refused(self):
        saved, sys.stderr = sys.stderr, io.StringIO()
        try:
            with self.assertRaises(SystemExit) as caught:
                main(['serve', '--config', 'zeo.conf', '--dedup'])
            said = sys.stderr.getvalue()
        finally:
            sys.stderr = saved
        self.assertEqual(caught.exception.code, 2)
        self.assertIn('--dedup', said)

    def test_a_server_started_with_dedup_links_its_clients_blobs(self):
        address = ('127.0.0.1', free_port())
        var = os.path.join(self.dir, 'var')
        server = ServerProcess(
            serve_command('--address', f'127.0.0.1:{address[1]}',
                          '--var', var, '--dedup'),
            address, cwd=self.dir,
            log_path=os.path.join(self.dir, 'server.log'))
        server.start()
        self.addCleanup(server.stop)
        for name in ('first', 'second'):
            client = ZEO.DB(address,
                            blob_dir=os.path.join(self.dir, name + '-cache'))
            commit_blob(client, CONTENT, key=name)
            client.close()
        self.assertEqual(server.stop(), 0, server.output())
        self.assertIn('dedup on', server.output())
        self.blob_dir = os.path.join(var, 'blobstorage')
        self.data_fs = os.path.join(var, 'filestorage', 'Data.fs')
        db = self.open_db(read_only=True)
        self.assert_one_inode(db, 'first', 'second')
        self.assertEqual(self.read(db, 'second'), CONTENT)


    def test_a_config_with_dedup_on_links_two_open_clients_blobs(self):
        # Both clients connected at once, each committing the content in
        # its own transaction, into its own folder (a shared one could
        # conflict: invalidations reach the other client when they do).
        address = ('127.0.0.1', free_port())
        var = os.path.join(self.dir, 'var')
        os.makedirs(os.path.join(var, 'filestorage'))
        config = os.path.join(self.dir, 'zeo.conf')
        with open(config, 'w') as f:
            f.write(serve_config(address, var=var, dedup=True))
        server = ServerProcess(serve_command('--config', config), address,
                               cwd=self.dir,
                               log_path=os.path.join(self.dir, 'server.log'))
        server.start()
        self.addCleanup(server.stop)
        clients = []
        try:
            for i in range(2):
                clients.append(ZEO.DB(address, blob_dir=os.path.join(
                    self.dir, f'cache-{i}')))
                if i == 0:
                    with clients[0].transaction() as conn:
                        conn.root()['client0'] = PersistentMapping()
                        conn.root()['client1'] = PersistentMapping()
            for i, client in enumerate(clients):
                with client.transaction() as conn:
                    conn.root()[f'client{i}']['blob'] = Blob(CONTENT)
            with clients[1].transaction() as conn:
                conn.root()['client1']['both'] = Blob(CONTENT)
                conn.root()['client1']['other'] = Blob(CONTENT[::-1])
        finally:
            for client in clients:
                client.close()
        self.assertEqual(server.stop(), 0, server.output())
        self.blob_dir = os.path.join(var, 'blobstorage')
        self.data_fs = os.path.join(var, 'filestorage', 'Data.fs')
        db = self.open_db(read_only=True)
        with db.transaction() as conn:
            root = conn.root()
            blobs = [root['client0']['blob'], root['client1']['blob'],
                     root['client1']['both'], root['client1']['other']]
            infos = [os.stat(blob.committed()) for blob in blobs]
            with blobs[1].open() as f:
                self.assertEqual(f.read(), CONTENT)
        self.assertEqual({info.st_ino for info in infos[:3]},
                         {infos[0].st_ino})
        self.assertEqual(infos[0].st_nlink, 3)
        self.assertNotEqual(infos[3].st_ino, infos[0].st_ino)
        self.assertEqual(infos[3].st_nlink, 1)

class CrashTests(CrashTestCase):
    """A kill while a file is linked, and what a power cut could leave."""

    def linked_files(self):
        blob_dir = os.path.join(self.dir, 'blobs')
        return [path for path in (
            os.path.join(directory, name)
            for directory, dirs, names in os.walk(blob_dir)
            for name in names if name.endswith('.blob'))
            if os.stat(path).st_nlink > 1]

    def kill_mid_link(self, *args):
        result = run_child(self.dir, '30', '--dedup', '--checkpoint-every',
                           '4', *args, kill_point='mid_dedup_link:6')
        self.assertEqual(result.returncode, -signal.SIGKILL,
                         result.stderr.decode()[-2000:])
        self.assertTrue(self.linked_files())
        last_tid, _ = self.check_guarantee()
        self.assertIsNotNone(last_tid)

    def test_kill_mid_link_of_an_inline_transaction(self):
        self.kill_mid_link()

    def test_kill_mid_link_of_files_that_are_not_inline(self):
        self.kill_mid_link('--not-inline')

    def test_kill_in_the_checkpoint_that_frees_held_copies(self):
        # No checkpoint for the log's length: each one here is a commit's
        # whose links left copies of a megabyte or more held.
        # A seed whose transactions link copies of a megabyte or more
        # more than once: with another, the close's checkpoint may be the
        # second.
        result = run_child(self.dir, '30', '--dedup', '--not-inline',
                           '--checkpoint-every', '1000', '--seed', '7',
                           kill_point='mid_checkpoint:2')
        self.assertEqual(result.returncode, -signal.SIGKILL,
                         result.stderr.decode()[-2000:])
        self.assertTrue(self.linked_files())
        last_tid, _ = self.check_guarantee()
        self.assertIsNotNone(last_tid)

    def test_kill_mid_link_with_one_sync(self):
        self.open_storage = lambda: ZODB.config.storageFromString(f"""
            %import zodbblob
            <zodbblob>
              blob-dir {os.path.join(self.dir, 'blobs')}
              <filestorage>
                path {os.path.join(self.dir, 'Data.fs')}
              </filestorage>
            </zodbblob>
            """)
        self.kill_mid_link('--config')

    def test_a_link_whose_bytes_were_lost_is_relinked_from_staged(self):
        # A file that is not inline may be linked to an inline one whose
        # bytes are not durable before the checkpoint: a power cut leaves
        # the final name, with other bytes.  Recovery compares it with the
        # staged file, whose bytes are durable, and links that instead.
        # Seeded: which files a run links before its last checkpoint
        # depends on its contents (a run of its own pid's found none
        # once, under load); seed 1 links dozens.
        result = run_child(self.dir, '30', '--dedup', '--not-inline',
                           '--log-mib', '256', '--seed', '1',
                           kill_point='after_journal_commit:20')
        self.assertEqual(result.returncode, -signal.SIGKILL)
        blob_dir = os.path.join(self.dir, 'blobs')
        log = CommitLog(commit_log_path(blob_dir), read_only=True)
        fshelper = FilesystemHelper(blob_dir)
        damaged = 0
        for record in log.records:
            for entry in record.entries:
                final = fshelper.getBlobFilename(entry.oid, record.tid)
                staged = os.path.join(fshelper.temp_dir, entry.staged)
                if entry.size and os.path.exists(final) and \
                        not os.path.samefile(final, staged):
                    os.remove(final)
                    with open(final, 'wb') as f:
                        f.write(b'\0' * entry.size)
                    damaged += 1
        log.close()
        self.assertGreater(damaged, 0)
        with self.assertLogs('zodbblob.storage', logging.WARNING) as logs:
            self.check_guarantee()
        self.assertIn('rolled forward', '\n'.join(logs.output))

    def test_recovery_never_opens_a_fifo_under_a_logged_name(self):
        result = run_child(self.dir, '30', '--dedup', '--not-inline',
                           '--log-mib', '256',
                           kill_point='after_journal_commit:20')
        self.assertEqual(result.returncode, -signal.SIGKILL)
        blob_dir = os.path.join(self.dir, 'blobs')
        log = CommitLog(commit_log_path(blob_dir), read_only=True)
        record = log.records[-1]
        log.close()
        final = FilesystemHelper(blob_dir).getBlobFilename(
            record.entries[0].oid, record.tid)
        os.remove(final)
        os.mkfifo(final)
        fail_after(60)
        try:
            storage = self.open_storage()
            report = verify(storage)
            storage.close()
        finally:
            fail_after(0)
        self.assertEqual([path for path, kind in report.not_files], [final])


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
