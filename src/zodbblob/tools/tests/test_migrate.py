"""``zodbblob migrate``: real stores, real directories, real interruptions.

Every migrated directory is checked three ways: the same ``(oid, tid)``
pairs with the same bytes as its source, no migration leftovers, and a
storage over a copy of the source's ``Data.fs`` (zodbblob's, and stock
ZODB's where the layout is a stock one) reads every blob revision.
"""

import contextlib
import io
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import unittest
from unittest import mock

import ZEO
import ZEO.ClientStorage
import ZODB
import ZODB.blob
import ZODB.FileStorage
from ZODB.blob import Blob
from ZODB.utils import p64

from zodbblob import BlobStorage
from zodbblob import cli
from zodbblob.tools import placement
from zodbblob.cache import BUCKETS, BlobCache
from zodbblob.storage.catalog import Journal, JournalError, journal_path
from zodbblob.layout import LAYOUT_MARKER, FilesystemHelper, read_marker
from zodbblob.tools.inventory import inventory, iter_source
from zodbblob.tools.migrate import (
    STATE_FILE,
    TEMPORARY_DIR,
    MigrationError,
    migrate,
)
from zodbblob.storage import BlobDirectoryInUse
from zodbblob.tools.verify import verify

STOCK_LAYOUTS = ('bushy', 'lawn')


def contents(blob_dir, layout=None):
    """``{(oid, tid): bytes}`` of every blob file of `blob_dir`."""
    layout = layout or read_marker(blob_dir)
    result = {}
    for oid, tid, path in iter_source(blob_dir, layout):
        with open(path, 'rb') as f:
            result[oid, tid] = f.read()
    return result


def snapshot(path):
    """Names, sizes and times below `path`: what a refusal must not change.

    A storage lock file is only listed: taking a lock rewrites the pid in
    it, which is how every zodbblob tool holds a directory.
    """
    if not os.path.exists(path):
        return None
    found = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), path)] = 'dir'
        for name in filenames:
            full = os.path.join(dirpath, name)
            relative = os.path.relpath(full, path)
            if relative == os.path.join('.zodbblob', 'lock'):
                found[relative] = 'lock'
                continue
            info = os.stat(full)
            found[relative] = (info.st_size, info.st_mtime_ns, info.st_ino)
    return found


def read_root(conn):
    """``{key: bytes}`` of the blobs in the root of `conn`."""
    result = {}
    for key, blob in conn.root().items():
        with blob.open() as f:
            result[key] = f.read()
    return result


def run_cli(*args):
    """`cli.main` with its output: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(['migrate', *args])
        except SystemExit as e:   # argparse refused the arguments
            status = e.code
    return status, out.getvalue(), err.getvalue()


class MigrateTestCase(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-migrate-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.data = os.path.join(self.dir, 'Data.fs')

    def path(self, *names):
        return os.path.join(self.dir, *names)

    def commit_blobs(self, db):
        """Five blobs, three of them with two more revisions: 11 files."""
        with db.transaction() as conn:
            for i in range(5):
                conn.root()[f'b{i}'] = Blob(b'first %d ' % i * (i + 1))
        for round in range(2):
            with db.transaction() as conn:
                for i in range(3):
                    with conn.root()[f'b{i}'].open('w') as f:
                        f.write(b'round %d of %d ' % (round, i) * 7)
        with db.transaction() as conn:
            return read_root(conn)

    def make_store(self, blob_dir='blobs', layout='bushy'):
        """A FileStorage + zodbblob.BlobStorage store, closed."""
        db = ZODB.DB(BlobStorage(self.path(blob_dir),
                                 ZODB.FileStorage.FileStorage(self.data),
                                 layout=layout))
        try:
            self.expected = self.commit_blobs(db)
        finally:
            db.close()
        return self.path(blob_dir)

    def make_stock_store(self, blob_dir='stock', layout='bushy'):
        """A FileStorage + stock ZODB.blob.BlobStorage store, closed."""
        storage = ZODB.blob.BlobStorage(
            self.path(blob_dir), ZODB.FileStorage.FileStorage(self.data),
            layout=layout)
        db = ZODB.DB(storage)
        try:
            self.expected = self.commit_blobs(db)
        finally:
            db.close()
        return self.path(blob_dir)

    def assert_reads_everything(self, blob_dir, revisions, stock=False):
        """A storage over `blob_dir` and a copy of Data.fs reads each
        revision's bytes and each current blob."""
        data = self.path(f'copy-{len(os.listdir(self.dir))}.fs')
        shutil.copyfile(self.data, data)
        if stock:
            storage = ZODB.FileStorage.FileStorage(data, blob_dir=blob_dir)
        else:
            storage = BlobStorage(blob_dir, ZODB.FileStorage.FileStorage(data))
        db = ZODB.DB(storage)
        try:
            for (oid, tid), data in revisions.items():
                with open(storage.loadBlob(oid, tid), 'rb') as f:
                    self.assertEqual(f.read(), data)
            with db.transaction() as conn:
                self.assertEqual(read_root(conn), self.expected)
        finally:
            db.close()

    def assert_finished(self, source, destination, layout):
        """`destination` is a plain, finished `layout` copy of `source`."""
        self.assertEqual(read_marker(destination), layout)
        for leftover in (STATE_FILE, TEMPORARY_DIR):
            self.assertFalse(
                os.path.exists(os.path.join(destination, leftover)),
                leftover)
        # Of zodbblob's state, only a catalog with the source's digests.
        state = os.path.join(destination, '.zodbblob')
        if os.path.exists(state):
            self.assertEqual(sorted(os.listdir(state)),
                             ['journal.sqlite', 'lock'])
        revisions = contents(source)
        self.assertEqual(contents(destination, layout), revisions)
        return revisions


class ChainTests(MigrateTestCase):

    def test_bushy_chunky_flat_lawn_bushy_each_opens_and_reads(self):
        source = self.make_store()
        revisions = contents(source)
        self.assertEqual(len(revisions), 11)
        steps = [('chunky', 'api'), ('flat', 'cli'), ('lawn', 'subprocess'),
                 ('bushy', 'cli')]
        for layout, how in steps:
            destination = self.path(f'to-{layout}')
            if how == 'api':
                report = migrate(source, destination, layout)
                self.assertEqual((report.files, report.linked, report.copied,
                                  report.skipped), (11, 11, 0, 0))
                self.assertEqual(report.bytes, sum(map(len,
                                                       revisions.values())))
            elif how == 'cli':
                status, out, err = run_cli(source, destination, '--layout',
                                           layout)
                self.assertEqual((status, err), (0, ''))
                self.assertIn('Migrated 11 blob files', out)
                self.assertIn('11 linked, 0 copied, 0 already there', out)
            else:
                result = subprocess.run(
                    [sys.executable, '-m', 'zodbblob.cli', 'migrate', source,
                     destination, '--layout', layout],
                    capture_output=True, text=True, timeout=120)
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIn(f'to {destination} ({layout}): 11 linked',
                              result.stdout)
            self.assertEqual(self.assert_finished(source, destination,
                                                  layout), revisions)
            if layout in STOCK_LAYOUTS:
                self.assert_reads_everything(destination, revisions,
                                             stock=True)
            # zodbblob's storage builds its catalog from a scan; the next
            # step then migrates a directory a zodbblob storage has used.
            self.assert_reads_everything(destination, revisions)
            source = destination

    def test_each_directory_is_listed_once(self):
        # The source once (its inventory is kept for the final check), the
        # destination once (that check).
        source = self.make_store()
        for layout in ('lawn', 'chunky'):
            destination = self.path(f'listed-{layout}')
            listed = []
            real_scandir = os.scandir

            def scandir(path='.'):
                if not isinstance(path, int):   # shutil.rmtree's
                    listed.append(os.path.abspath(path))
                return real_scandir(path)

            with mock.patch('os.scandir', scandir):
                migrate(source, destination, layout)
            self.assert_finished(source, destination, layout)
            for top in (source, destination):
                below = [path for path in listed
                         if path == top or path.startswith(top + os.sep)]
                self.assertTrue(below, top)
                self.assertEqual(len(below), len(set(below)), top)

    def test_a_destination_file_lost_before_the_check_is_found(self):
        source = self.make_store()
        destination = self.path('lawn')
        lost = []

        def lose_one(done, total):
            # After the last file is in place, before the check.
            if done == total:
                (oid, tid), = list(contents(source))[:1]
                path = FilesystemHelper(destination, 'lawn').getBlobFilename(
                    oid, tid)
                os.remove(path)
                lost.append(path)

        with self.assertRaises(MigrationError) as raised:
            migrate(source, destination, 'lawn', progress=lose_one)
        self.assertIn(f'missing: {source}', str(raised.exception))
        self.assertIsNone(read_marker(destination))
        status, out, err = run_cli(source, destination, '--layout', 'lawn')
        self.assertEqual((status, err), (0, ''))
        self.assertIn('1 linked, 0 copied, 10 already there', out)
        self.assert_finished(source, destination, 'lawn')

    def test_a_destination_file_changed_or_added_before_the_check(self):
        source = self.make_store()
        destination = self.path('bushy')
        helper = FilesystemHelper(destination, 'bushy')
        (oid, tid), = list(contents(source))[:1]

        def meddle(done, total):
            if done == total:
                # A link shares its bytes with the source file: replace it.
                path = helper.getBlobFilename(oid, tid)
                os.remove(path)
                with open(path, 'wb') as f:
                    f.write(b'changed')
                os.makedirs(helper.getPathForOID(p64(0x4321)))
                with open(helper.getBlobFilename(p64(0x4321), tid), 'wb') as f:
                    f.write(b'extra')

        with self.assertRaises(MigrationError) as raised:
            migrate(source, destination, 'bushy', progress=meddle)
        message = str(raised.exception)
        self.assertIn('2 differences', message)
        self.assertIn('7 bytes instead of', message)
        self.assertIn(f'not in the source: '
                      f'{helper.getBlobFilename(p64(0x4321), tid)}', message)
        self.assertIsNone(read_marker(destination))

    def test_links_share_the_source_files(self):
        source = self.make_store()
        destination = self.path('chunky')
        with self.assertNoLogs('zodbblob.tools.migrate', logging.WARNING):
            migrate(source, destination, 'chunky')
        for oid, tid, path in iter_source(source, 'bushy'):
            migrated = FilesystemHelper(destination, 'chunky') \
                .getBlobFilename(oid, tid)
            self.assertTrue(os.path.samefile(path, migrated))

    def test_stock_blob_storage_directory_migrates_and_opens_in_stock(self):
        source = self.make_stock_store()
        self.assertFalse(os.path.exists(os.path.join(source, '.zodbblob')))
        destination = self.path('lawn')
        status, out, err = run_cli(source, destination, '--layout', 'lawn',
                                   '--quiet')
        self.assertEqual((status, err), (0, ''))
        revisions = self.assert_finished(source, destination, 'lawn')
        self.assertEqual(len(revisions), 11)
        self.assert_reads_everything(destination, revisions, stock=True)

    def test_unmarked_used_directory_is_lawn_by_zodbs_rule(self):
        source = self.make_stock_store(layout='lawn')
        os.remove(os.path.join(source, LAYOUT_MARKER))
        report = migrate(source, self.path('bushy'), 'bushy')
        self.assertEqual((report.source_layout, report.files), ('lawn', 11))
        self.assert_reads_everything(self.path('bushy'),
                                     contents(source, 'lawn'), stock=True)

    def test_temporaries_hidden_files_and_state_are_not_migrated(self):
        source = self.make_store()
        revisions = contents(source)
        oid, tid = next(iter(revisions))
        helper = FilesystemHelper(source, 'bushy')
        final = helper.getBlobFilename(oid, tid)
        for leftover in (final + '-1234', final[:-len('.blob')] + 'x.tmp',
                         os.path.join(os.path.dirname(final), '.hidden.blob'),
                         os.path.join(source, 'tmp', 'BUC123.blob'),
                         os.path.join(source, '.zodbblob', '0x01.blob')):
            with open(leftover, 'wb') as f:
                f.write(b'not a committed blob')
        destination = self.path('flat')
        report = migrate(source, destination, 'flat')
        self.assertEqual(report.files, 11)
        self.assertEqual(sorted(name for name in os.listdir(destination)
                                if not name.endswith('.blob')),
                         ['.layout', '.zodbblob', 'tmp'])
        self.assertEqual(contents(destination, 'flat'), revisions)
        self.assertEqual(os.listdir(os.path.join(destination, 'tmp')), [])


class ZEOCacheTests(MigrateTestCase):

    def stock_cache(self, source):
        """A cache directory laid out by ZEO's own BlobCacheLayout."""
        cache = self.path('cache')
        layout = ZEO.ClientStorage.BlobCacheLayout()
        for oid, tid, path in iter_source(source, 'bushy'):
            target = os.path.join(cache, layout.getBlobFilePath(oid, tid))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(path, target)
            # What stock ZEO leaves beside them.
            for name in ('.lock', f'{os.path.basename(target)}.dl'):
                with open(os.path.join(os.path.dirname(target), name),
                          'w') as f:
                    f.write('x')
        os.makedirs(os.path.join(cache, 'tmp'))
        with open(os.path.join(cache, 'tmp', '0.0123456789abcdef.blob'),
                  'w') as f:
            f.write('a stock temporary file')
        with open(os.path.join(cache, 'check_size.lock'), 'w') as f:
            f.write('x')
        with open(os.path.join(cache, LAYOUT_MARKER), 'w') as f:
            f.write('zeocache')
        return cache

    def test_stock_zeo_cache_layout_migrates_to_a_readable_bushy_dir(self):
        source = self.make_store()
        revisions = contents(source)
        cache = self.stock_cache(source)
        self.assertEqual(contents(cache, 'zeocache'), revisions)
        before = snapshot(cache)
        destination = self.path('bushy')
        status, out, err = run_cli(cache, destination, '--layout', 'bushy')
        self.assertEqual((status, err), (0, ''))
        self.assertIn(f'from {cache} (zeocache)', out)
        self.assertEqual(snapshot(cache), before)
        self.assertEqual(self.assert_finished(cache, destination, 'bushy'),
                         revisions)
        self.assert_reads_everything(destination, revisions, stock=True)

    def test_only_files_where_zeo_puts_a_blob_are_listed(self):
        source = self.make_store()
        cache = self.stock_cache(source)
        tid_hex = '03ec2b3f2e5c1a88'
        # Names ZEO never writes: an oid in another spelling or bucket,
        # oids past 2**64, other suffixes and hex spellings.
        junk = [name % tid_hex for name in (
            '01/2.%s.blob', '997/0.%s.blob', '5/01.%s.blob',
            f'5/{2 ** 64 // BUCKETS + 1}.%s.blob', '5/2.%s.blobx', '5/2.%s',
            'x5/2.%s.blob', '.tmp/2.%s.blob', '5/2.%s.blob.dl')]
        junk += ['5/2.%s.blob' % tid_hex.upper(),
                 '5/2.%s.blob' % tid_hex[1:]]
        for name in junk:
            os.makedirs(os.path.dirname(os.path.join(cache, name)),
                        exist_ok=True)
            with open(os.path.join(cache, name), 'w') as f:
                f.write('x')
        # Written the way ZEO writes them: 2 * 997 + 5 in bucket 5.
        for name in ('5/2.%s.blob' % tid_hex, '996/0.%s.blob' % tid_hex):
            os.makedirs(os.path.dirname(os.path.join(cache, name)),
                        exist_ok=True)
            with open(os.path.join(cache, name), 'w') as f:
                f.write('a blob')
        # The reference: every name below a bucket that ZEO's own layout
        # writes for the oid and tid it spells.
        layout = ZEO.ClientStorage.BlobCacheLayout()
        expected = []
        for bucket in sorted(os.listdir(cache)):
            if not os.path.isdir(os.path.join(cache, bucket)):
                continue
            for name in sorted(os.listdir(os.path.join(cache, bucket))):
                base, _, rest = name.partition('.')
                try:
                    number = int(base) * BUCKETS + int(bucket)
                    tid = bytes.fromhex(rest.partition('.')[0])
                except ValueError:
                    continue
                if not (0 <= number < 2 ** 64 and len(tid) == 8):
                    continue
                if layout.getBlobFilePath(p64(number), tid) == os.path.join(
                        bucket, name):
                    expected.append((p64(number), tid,
                                     os.path.join(cache, bucket, name)))
        listed = list(iter_source(cache, 'zeocache'))
        self.assertEqual(sorted(listed), sorted(expected))
        self.assertEqual(len(listed), len(contents(source)) + 2)
        self.assertIn(
            (p64(2 * BUCKETS + 5), bytes.fromhex(tid_hex),
             os.path.join(cache, '5', '2.%s.blob' % tid_hex)), listed)

    def test_zodbblob_cache_with_its_index_migrates(self):
        source = self.make_store()
        revisions = contents(source)
        cache = BlobCache(self.path('cache'))
        try:
            for oid, tid, path in iter_source(source, 'bushy'):
                copy = self.path('incoming')
                shutil.copyfile(path, copy)
                cache.admit(oid, tid, copy)
        finally:
            cache.close()
        destination = self.path('lawn')
        report = migrate(cache.directory, destination, 'lawn')
        self.assertEqual((report.source_layout, report.files),
                         ('zeocache', 11))
        self.assertEqual(contents(destination, 'lawn'), revisions)

    def test_real_zeo_client_cache_migrates(self):
        server_blobs = self.path('server-blobs')
        address, stop = ZEO.server(path=self.data, blob_dir=server_blobs,
                                   threaded=False)
        cache = self.path('client-cache')
        try:
            db = ZEO.DB(address, blob_dir=cache, shared_blob_dir=False)
            try:
                self.expected = self.commit_blobs(db)
            finally:
                db.close()
        finally:
            stop()
        self.assertEqual(read_marker(cache), 'zeocache')
        revisions = contents(cache, 'zeocache')
        self.assertTrue(revisions)
        server = contents(server_blobs)
        self.assertLessEqual(revisions.items(), server.items())
        destination = self.path('bushy')
        migrate(cache, destination, 'bushy')
        self.assertEqual(contents(destination, 'bushy'), revisions)


class CopyTests(MigrateTestCase):

    def other_filesystem(self):
        shm = '/dev/shm'
        if not os.path.isdir(shm) or not os.access(shm, os.W_OK):
            self.skipTest(f'{shm} is not a writable directory here')
        if os.stat(shm).st_dev == os.stat(self.dir).st_dev:
            self.skipTest(f'{shm} is on the same filesystem as {self.dir}: '
                          'links would work, nothing would be copied')
        other = tempfile.mkdtemp(prefix='zodbblob-migrate-', dir=shm)
        self.addCleanup(shutil.rmtree, other, True)
        return other

    def test_across_filesystems_copies_with_one_warning(self):
        source = self.make_store()
        destination = os.path.join(self.other_filesystem(), 'chunky')
        with self.assertLogs('zodbblob.tools.migrate', logging.WARNING) as logs:
            report = migrate(source, destination, 'chunky')
        self.assertEqual(len(logs.records), 1)
        message = logs.records[0].getMessage()
        self.assertIn(source, message)
        self.assertIn(destination, message)
        self.assertIn('Copying', message)
        self.assertEqual((report.linked, report.copied), (0, 11))
        revisions = self.assert_finished(source, destination, 'chunky')
        for oid, tid, path in iter_source(source, 'bushy'):
            copy = FilesystemHelper(destination, 'chunky').getBlobFilename(
                oid, tid)
            self.assertEqual(os.stat(copy).st_mode, os.stat(path).st_mode)
        self.assert_reads_everything(destination, revisions)

    def test_interrupted_copy_leaves_no_partial_file_under_a_blob_name(self):
        source = self.make_store()
        destination = os.path.join(self.other_filesystem(), 'bushy')
        real_copy = placement.copy_blob_file

        def copy_half(source_file, target, tree=None):
            # Dies the way a kill in the middle of a copy would leave it.
            with open(source_file, 'rb') as f, open(target, 'wb') as out:
                out.write(f.read()[:5])
            raise KeyboardInterrupt

        with mock.patch('zodbblob.tools.placement.copy_blob_file', copy_half), \
                self.assertLogs('zodbblob.tools.migrate', logging.WARNING):
            with self.assertRaises(KeyboardInterrupt):
                migrate(source, destination, 'bushy')
        self.assertEqual(contents(destination, 'bushy'), {})
        self.assertIsNone(read_marker(destination))
        with mock.patch('zodbblob.tools.placement.copy_blob_file', real_copy), \
                self.assertLogs('zodbblob.tools.migrate', logging.WARNING):
            report = migrate(source, destination, 'bushy')
        self.assertEqual((report.copied, report.skipped), (11, 0))
        self.assert_finished(source, destination, 'bushy')


DEDUP_CONTENT = b'one content, four names ' * 50


class DedupTests(MigrateTestCase):
    """A deduplicated store migrates into a deduplicated one: the names
    that share an inode share one after, and the catalog's digests too."""

    other_filesystem = CopyTests.other_filesystem

    def make_dedup_store(self, count=4):
        """`count` blobs of one content, linked by dedup, and two others."""
        db = ZODB.DB(BlobStorage(self.path('blobs'),
                                 ZODB.FileStorage.FileStorage(self.data),
                                 dedup=True))
        try:
            for i in range(count):
                with db.transaction() as conn:
                    conn.root()[f'same{i}'] = Blob(DEDUP_CONTENT)
            with db.transaction() as conn:
                conn.root()['other'] = Blob(b'another content')
                conn.root()['third'] = Blob(b'a third content')
            with db.transaction() as conn:
                self.expected = read_root(conn)
        finally:
            db.close()
        source = self.path('blobs')
        self.assertEqual(self.inode_groups(source, 'bushy'),
                         [(count, count), (1, 1), (1, 1)])
        return source

    def inode_groups(self, blob_dir, layout):
        """``(names in blob_dir, st_nlink)`` of each inode of `blob_dir`,
        most names first."""
        names = {}
        for oid, tid, path in iter_source(blob_dir, layout):
            info = os.stat(path)
            names.setdefault((info.st_ino, info.st_nlink), []).append(path)
        return sorted(((len(paths), nlink) for (ino, nlink), paths
                       in names.items()), reverse=True)

    def digests(self, blob_dir):
        journal = Journal(blob_dir, read_only=True)
        try:
            return {(oid, tid): digest
                    for batch in journal.rows(digests=True)
                    for oid, tid, size, digest in batch}
        finally:
            journal.close()

    def assert_verified(self, destination, layout, source):
        """The destination's store reads everything, keeps the source's
        digests without a scan, and verify --checksum finds it clean."""
        self.assertEqual(self.digests(destination), self.digests(source))
        self.assertNotIn(None, self.digests(destination).values())
        data = self.path(f'copy-{len(os.listdir(self.dir))}.fs')
        shutil.copyfile(self.data, data)
        with self.assertNoLogs('zodbblob.storage', logging.WARNING):
            storage = BlobStorage(destination,
                                  ZODB.FileStorage.FileStorage(data))
        db = ZODB.DB(storage)
        try:
            report = verify(storage, checksum=True)
            self.assertTrue(report.clean, report.lines())
            self.assertEqual(report.unrecorded, 0)
            self.assertEqual(report.contents.links, 3)
            with db.transaction() as conn:
                self.assertEqual(read_root(conn), self.expected)
        finally:
            db.close()

    def test_a_file_damaged_in_the_source_stays_found_in_the_destination(
            self):
        # Truncated after its digest was recorded: the destination's row
        # keeps the recorded size and digest, so its verify says what the
        # source's says, and no scrub can take the damage for the content.
        source = self.make_dedup_store(count=1)
        (oid, tid, path), = [
            found for found in iter_source(source, 'bushy')
            if pathlib.Path(found[2]).read_bytes() == b'another content']
        digest = self.digests(source)[oid, tid]
        os.chmod(path, 0o644)
        os.truncate(path, 3)
        destination = self.path('lawn')
        with self.assertLogs('zodbblob.tools', logging.WARNING) as logs:
            migrate(source, destination, 'lawn')
        self.assertIn('has 3 bytes, its catalog recorded 15',
                      '\n'.join(logs.output))
        self.assertEqual(self.digests(destination)[oid, tid], digest)
        data = self.path('copy.fs')
        shutil.copyfile(self.data, data)
        storage = BlobStorage(destination, ZODB.FileStorage.FileStorage(data),
                              scrub=False)
        try:
            report = verify(storage, checksum=True)
        finally:
            storage.close()
        self.assertFalse(report.clean)
        self.assertIn('size mismatch', '\n'.join(report.lines()))

    def test_a_catalog_that_cannot_be_written_leaves_a_finished_migration(
            self):
        # The destination's catalog fails (a full disk, say) after every
        # file is in place: the migration stands, says what it lacks, and
        # a storage opened on it scans it.
        source = self.make_dedup_store(count=2)
        destination = self.path('lawn')

        def journal(blob_dir, *args, **kw):
            if blob_dir == destination:
                raise JournalError('database or disk is full')
            return Journal(blob_dir, *args, **kw)

        with mock.patch('zodbblob.tools.migrate.Journal',
                        side_effect=journal), \
                self.assertLogs('zodbblob.tools', logging.WARNING) as logs:
            report = migrate(source, destination, 'lawn')
        self.assertEqual((report.linked, report.copied), (4, 0))
        self.assertEqual(logs.output, [
            f'WARNING:zodbblob.tools.migrate:Migrated {source} without its '
            f'digests: cannot write a catalog to {journal_path(destination)}'
            f' (database or disk is full)'])
        self.assertFalse(os.path.exists(journal_path(destination)))
        self.assertEqual(read_marker(destination), 'lawn')
        data = self.path('copy.fs')
        shutil.copyfile(self.data, data)
        db = ZODB.DB(BlobStorage(destination,
                                 ZODB.FileStorage.FileStorage(data)))
        try:
            with db.transaction() as conn:
                self.assertEqual(read_root(conn), self.expected)
            report = verify(db.storage)
            self.assertTrue(report.clean, report.lines())
        finally:
            db.close()

    def test_a_deduplicated_store_keeps_its_links_in_another_layout(self):
        source = self.make_dedup_store()
        destination = self.path('lawn')
        report = migrate(source, destination, 'lawn')
        self.assertEqual((report.linked, report.copied), (6, 0))
        # Linked to the source's files: one inode for all eight names.
        self.assertEqual(self.inode_groups(destination, 'lawn'),
                         [(4, 8), (1, 2), (1, 2)])
        self.assert_verified(destination, 'lawn', source)

    def test_across_filesystems_the_copies_keep_dedup_s_links(self):
        source = self.make_dedup_store()
        destination = os.path.join(self.other_filesystem(), 'chunky')
        with self.assertLogs('zodbblob.tools.migrate', logging.WARNING):
            report = migrate(source, destination, 'chunky')
        # One copy per content, the other names linked to it.
        self.assertEqual((report.linked, report.copied), (3, 3))
        groups = [(4, 4), (1, 1), (1, 1)]
        self.assertEqual(self.inode_groups(destination, 'chunky'), groups)
        self.assertEqual(self.inode_groups(source, 'bushy'), groups)
        self.assert_verified(destination, 'chunky', source)

    def test_sigkill_mid_copy_then_a_rerun_keeps_dedup_s_links(self):
        source = self.make_dedup_store(count=6)
        destination = os.path.join(self.other_filesystem(), 'chunky')
        child = subprocess.run(
            [sys.executable, '-c', KILLING_CHILD, source, destination, '3'],
            capture_output=True, timeout=120)
        self.assertEqual(child.returncode, -signal.SIGKILL, child.stderr)
        self.assertIsNone(read_marker(destination))
        with self.assertLogs('zodbblob.tools.migrate', logging.WARNING):
            report = migrate(source, destination, 'chunky')
        self.assertEqual(report.skipped, 3)
        self.assertEqual(self.inode_groups(destination, 'chunky'),
                         [(6, 6), (1, 1), (1, 1)])
        self.assertEqual(self.digests(destination), self.digests(source))


KILLING_CHILD = textwrap.dedent('''
    import os, signal, sys
    from zodbblob.tools.migrate import migrate

    def progress(done, total):
        if done == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)

    migrate(sys.argv[1], sys.argv[2], 'chunky', progress=progress)
''')


# Killed in the last window: the destination has its marker, and still
# its state file.
FINISH_KILLING_CHILD = textwrap.dedent('''
    import os, signal, sys
    import zodbblob.tools.migrate
    from zodbblob.layout import FilesystemHelper

    class KilledAfterTheMarker(FilesystemHelper):
        def create(self):
            super().create()
            os.kill(os.getpid(), signal.SIGKILL)

    zodbblob.tools.migrate.FilesystemHelper = KilledAfterTheMarker
    zodbblob.tools.migrate.migrate(sys.argv[1], sys.argv[2], 'chunky')
''')


class InterruptionTests(MigrateTestCase):

    def make_many(self, count=60):
        db = ZODB.DB(BlobStorage(self.path('blobs'),
                                 ZODB.FileStorage.FileStorage(self.data)))
        try:
            with db.transaction() as conn:
                for i in range(count):
                    conn.root()[f'b{i}'] = Blob(b'%d' % i * (i + 1))
            with db.transaction() as conn:
                self.expected = read_root(conn)
        finally:
            db.close()
        return self.path('blobs')

    def test_sigkill_mid_migration_then_a_rerun_completes(self):
        source = self.make_many()
        destination = self.path('chunky')
        child = subprocess.run(
            [sys.executable, '-c', KILLING_CHILD, source, destination, '25'],
            capture_output=True, timeout=120)
        self.assertEqual(child.returncode, -signal.SIGKILL, child.stderr)
        self.assertIsNone(read_marker(destination))
        self.assertTrue(os.path.exists(os.path.join(destination,
                                                    STATE_FILE)))
        migrated = inventory(iter_source(destination, 'chunky'))
        self.assertEqual(len(migrated), 25)
        # One file of the earlier run has the wrong size now: replaced.
        (oid, tid), (size, path) = next(iter(migrated.items()))
        os.remove(path)
        with open(path, 'wb') as f:
            f.write(b'x' * (size + 1))
        status, out, err = run_cli(source, destination, '--layout', 'chunky')
        self.assertEqual((status, err), (0, ''))
        self.assertIn('36 linked, 0 copied, 24 already there', out)
        revisions = self.assert_finished(source, destination, 'chunky')
        self.assertEqual(len(revisions), 60)
        self.assert_reads_everything(destination, revisions)

    def test_sigkill_between_the_marker_and_the_state_file_then_a_rerun(
            self):
        source = self.make_many(10)
        destination = self.path('chunky')
        child = subprocess.run(
            [sys.executable, '-c', FINISH_KILLING_CHILD, source, destination],
            capture_output=True, timeout=120)
        self.assertEqual(child.returncode, -signal.SIGKILL, child.stderr)
        self.assertEqual(read_marker(destination), 'chunky')
        self.assertTrue(os.path.exists(os.path.join(destination,
                                                    STATE_FILE)))
        status, out, err = run_cli(source, destination, '--layout', 'chunky')
        self.assertEqual((status, err), (0, ''))
        self.assertIn('0 linked, 0 copied, 10 already there', out)
        self.assertFalse(os.path.exists(os.path.join(destination,
                                                     STATE_FILE)))
        revisions = self.assert_finished(source, destination, 'chunky')
        self.assert_reads_everything(destination, revisions)

    def test_no_marker_until_verified(self):
        source = self.make_many(5)
        destination = self.path('lawn')
        seen = []

        def progress(done, total):
            seen.append((done, total, read_marker(destination),
                         os.path.exists(os.path.join(destination,
                                                     STATE_FILE))))

        migrate(source, destination, 'lawn', progress=progress)
        self.assertEqual(seen, [(i, 5, None, True) for i in range(1, 6)])
        self.assertEqual(read_marker(destination), 'lawn')

    def test_ctrl_c_exits_130_and_a_rerun_resumes(self):
        source = self.make_many(10)
        destination = self.path('flat')

        class Interrupting:
            enabled = False

            def __init__(self, *args, **kw):
                pass

            def __call__(self, done, total):
                if done == 4:
                    raise KeyboardInterrupt

        with mock.patch('zodbblob.cli.migrate.Progress', Interrupting):
            status, out, err = run_cli(source, destination, '--layout',
                                       'flat')
        self.assertEqual(status, 130)
        self.assertEqual(out, '')
        self.assertIn(f'interrupted: {destination} is not finished', err)
        self.assertIn('run the same command again to resume', err)
        self.assertIsNone(read_marker(destination))
        status, out, err = run_cli(source, destination, '--layout', 'flat')
        self.assertEqual(status, 0, err)
        self.assertIn('6 linked, 0 copied, 4 already there', out)
        self.assert_finished(source, destination, 'flat')

    def test_files_packed_away_since_the_interruption_are_removed(self):
        source = self.make_store()

        def stop_at_the_end(done, total):
            if done == total:
                raise KeyboardInterrupt

        destination = self.path('chunky')
        with self.assertRaises(KeyboardInterrupt):
            migrate(source, destination, 'chunky', progress=stop_at_the_end)
        db = ZODB.DB(BlobStorage(source,
                                 ZODB.FileStorage.FileStorage(self.data)))
        db.pack()
        db.close()
        revisions = contents(source)
        self.assertEqual(len(revisions), 5)
        with self.assertLogs('zodbblob.tools.migrate', logging.WARNING) as logs:
            report = migrate(source, destination, 'chunky')
        self.assertIn('no longer holds', logs.output[0])
        self.assertEqual((report.files, report.skipped, report.removed),
                         (5, 5, 6))
        self.assertEqual(self.assert_finished(source, destination, 'chunky'),
                         revisions)
        self.assert_reads_everything(destination, revisions)

    def test_rerun_of_a_finished_migration_has_nothing_to_do(self):
        source = self.make_store()
        destination = self.path('chunky')
        migrate(source, destination, 'chunky')
        before = snapshot(destination)
        status, out, err = run_cli(source, destination, '--layout', 'chunky')
        self.assertEqual((status, err), (0, ''))
        self.assertIn('Nothing to do', out)
        self.assertEqual(snapshot(destination), before)

    def test_killed_after_the_marker_before_the_state_file_went(self):
        source = self.make_store()
        destination = self.path('bushy2')
        migrate(source, destination, 'bushy')
        # Then the carried catalog is not written yet either.
        shutil.rmtree(os.path.join(destination, '.zodbblob'))
        with open(os.path.join(destination, STATE_FILE), 'w') as f:
            f.write('{"source": "%s", "layout": "bushy"}'
                    % os.path.realpath(source))
        report = migrate(source, destination, 'bushy')
        self.assertEqual(report.skipped, 11)
        self.assert_finished(source, destination, 'bushy')


class RefusalTests(MigrateTestCase):

    def assert_refused(self, source, destination, *options,
                       message, status=2):
        before = snapshot(source), snapshot(destination)
        code, out, err = run_cli(source, destination, *options)
        self.assertEqual(code, status, err)
        self.assertEqual(out, '')
        self.assertIn(message, err)
        self.assertEqual((snapshot(source), snapshot(destination)), before)
        return err

    def test_refused_while_a_storage_holds_the_source(self):
        source = self.make_store()
        storage = BlobStorage(source, ZODB.FileStorage.FileStorage(self.data))
        self.addCleanup(storage.close)
        err = self.assert_refused(source, self.path('new'), '--layout',
                                  'chunky', message='in use by a running '
                                                    'storage')
        self.assertIn(source, err)
        self.assertFalse(os.path.exists(self.path('new')))
        with self.assertRaises(BlobDirectoryInUse):
            migrate(source, self.path('new'), 'chunky')

    def test_refused_while_a_storage_holds_the_finished_destination(self):
        source = self.make_store()
        destination = self.path('lawn')
        migrate(source, destination, 'lawn')
        data = self.path('copy.fs')
        shutil.copyfile(self.data, data)
        storage = BlobStorage(destination,
                              ZODB.FileStorage.FileStorage(data))
        self.addCleanup(storage.close)
        self.assert_refused(source, destination, '--layout', 'lawn',
                            message=f'Blob directory {destination} is in use')

    def test_refused_for_a_source_its_storage_did_not_close(self):
        source = self.make_store()
        journal = Journal(source)
        journal.set_meta(state='open')
        journal.close()
        self.assert_refused(source, self.path('new'), '--layout', 'flat',
                            message='run `zodbblob recover` on it first')

    def test_bad_sources_layouts_and_nesting_change_nothing(self):
        source = self.make_store()
        not_blobs = self.path('not-blobs')
        os.mkdir(not_blobs)
        with open(os.path.join(not_blobs, 'notes.txt'), 'w') as f:
            f.write('x')
        unknown = self.path('unknown')
        os.makedirs(os.path.join(unknown, '0x01'))
        with open(os.path.join(unknown, LAYOUT_MARKER), 'w') as f:
            f.write('sideways')
        cases = [
            (self.path('missing'), self.path('new'), 'chunky',
             'does not exist'),
            (self.data, self.path('new'), 'chunky', 'is not a directory'),
            (not_blobs, self.path('new'), 'chunky',
             'is not a blob directory'),
            (unknown, self.path('new'), 'chunky', 'layout `sideways`'),
            (source, self.path('new'), 'sideways',
             "argument --layout: invalid choice: 'sideways' (choose from "),
            (source, os.path.join(source, 'inside'), 'chunky',
             'is inside the source'),
            (source, source, 'chunky', 'is the source directory'),
            (source, self.dir, 'chunky', 'is inside the destination'),
            (source, not_blobs, 'chunky', 'is not empty'),
        ]
        for src, dst, layout, message in cases:
            with self.subTest(src=src, dst=dst, layout=layout):
                self.assert_refused(src, dst, '--layout', layout,
                                    message=message)
                self.assertFalse(os.path.exists(self.path('new')))
        with self.assertRaisesRegex(MigrationError,
                                    'Unknown blob directory layout '
                                    '`sideways`'):
            migrate(source, self.path('new'), 'sideways')
        self.assertFalse(os.path.exists(self.path('new')))

    def test_finished_destinations_of_another_kind_are_refused(self):
        source = self.make_store()
        other = self.make_stock_store('other')
        self.assert_refused(source, other, '--layout', 'lawn',
                            message='blob directory of layout `bushy` '
                                    'already')
        self.assert_refused(source, other, '--layout', 'bushy',
                            message='differs from')

    def test_unfinished_migration_of_another_source_is_refused(self):
        source = self.make_store()
        other = self.make_stock_store('other')
        destination = self.path('dst')

        def stop(done, total):
            raise KeyboardInterrupt

        with self.assertRaises(KeyboardInterrupt):
            migrate(other, destination, 'flat', progress=stop)
        self.assert_refused(source, destination, '--layout', 'flat',
                            message=f'unfinished migration of {other}')
        self.assert_refused(other, destination, '--layout', 'chunky',
                            message='to layout `flat`')

    def test_a_storage_opened_on_an_unfinished_destination(self):
        source = self.make_store()
        destination = self.path('dst')

        def stop(done, total):
            raise KeyboardInterrupt

        with self.assertRaises(KeyboardInterrupt):
            migrate(source, destination, 'bushy', progress=stop)
        data = self.path('copy.fs')
        shutil.copyfile(self.data, data)
        BlobStorage(destination, ZODB.FileStorage.FileStorage(data),
                    layout='bushy').close()
        with self.assertRaises(MigrationError) as raised:
            migrate(source, destination, 'bushy')
        self.assertIn('A storage opened', str(raised.exception))

    def test_a_storage_opening_the_destination_midway_is_refused(self):
        source = self.make_store()
        destination = self.path('dst')
        data = self.path('copy.fs')
        shutil.copyfile(self.data, data)
        refused = []

        def open_storage(done, total):
            if done == 3:
                base = ZODB.FileStorage.FileStorage(data)
                try:
                    with self.assertRaises(BlobDirectoryInUse):
                        BlobStorage(destination, base)
                finally:
                    base.close()
                refused.append(done)

        try:
            migrate(source, destination, 'chunky', progress=open_storage)
        except MigrationError as e:
            # The storage wrote its marker before it found the lock held.
            self.assertIn('got a marker for layout `lawn`', str(e))
            self.assertEqual(read_marker(destination), 'lawn')
            self.assertTrue(os.path.exists(os.path.join(destination,
                                                        STATE_FILE)))
        else:
            self.assert_finished(source, destination, 'chunky')
        self.assertEqual(refused, [3])
