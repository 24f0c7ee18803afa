"""Power cuts while the client cache installs files, backing up, migrating.

The cache: after a cut (and a restart, which a power cut is: a new boot
id), every file the index says is there must read back exactly.  Backup:
with the destination on the power-cut filesystem, the last snapshot that
``backup`` reported taken must pass ``check`` after the cut, and the next
backup must finish what the cut left.  Migrate: a migration that
returned has its marker and every file after a cut.
"""

import os
import shutil
import sqlite3
import uuid

from ZODB.blob import Blob

import zodbblob.cache.downloads
import zodbblob.cache.syncs
from zodbblob.cache import BlobCache
from zodbblob.cache.index import INDEX
from zodbblob.cache.schema import COMPLETE
from zodbblob.layout import FilesystemHelper, read_marker
from zodbblob.powercut.tests.test_storage import (
    PowerCutStorageTestCase,
    acknowledged,
)
from zodbblob.powercut.tests.workload import cache_bytes, open_database
from zodbblob.tools.backup import check
from zodbblob.tools.migrate import migrate


def read_bytes(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read()


# A cache and a backup do more before their first file is done than a
# commit: a cut anywhere in their first seconds.
TOOL_MOST = {'write': 1500, 'fsync': 200, 'rename': 300}


class CachePowerCutTests(PowerCutStorageTestCase):

    def prepare(self, backing):
        # A cache in use: its directory and index are on disk.
        BlobCache(os.path.join(backing, 'cache')).close()

    def restart(self) -> None:
        """This process is now a process of the next boot."""
        for module in (zodbblob.cache.syncs, zodbblob.cache.downloads):
            self.addCleanup(setattr, module, 'BOOT', module.BOOT)
            module.BOOT = str(uuid.uuid4())

    def check_cache(self, seed: int) -> int:
        """Every file the index has as complete reads back exactly."""
        self.restart()
        cache = BlobCache(os.path.join(self.mnt, 'cache'))
        try:
            index = sqlite3.connect(os.path.join(cache.directory, INDEX))
            try:
                rows = index.execute('SELECT oid, tid FROM blobs WHERE '
                                     'state = ?', (COMPLETE,)).fetchall()
            finally:
                index.close()
            for oid, tid in rows:
                path = cache.path(oid, tid)
                self.assertTrue(os.path.exists(path),
                                'seed %d: the index has %s, not the disk'
                                % (seed, path))
                with open(path, 'rb') as f:
                    self.assertEqual(
                        f.read(), cache_bytes(int.from_bytes(oid, 'big'),
                                              int.from_bytes(tid, 'big')),
                        'seed %d: cached file %s is not what was '
                        'downloaded' % (seed, path))
        finally:
            cache.close()
        return len(rows)

    def test_power_cuts_while_the_cache_installs_files(self):
        found = 0
        for seed in self.seeds(500, 3):
            self.run_until_cut('cache', seed, most=TOOL_MOST)
            found += self.check_cache(seed)
        self.assertGreater(found, 0, 'no file survived any cut')


class BackupPowerCutTests(PowerCutStorageTestCase):

    def prepare(self, backing):
        pass

    def setUp(self):
        super().setUp()
        self.make_source()

    def make_source(self) -> None:
        """The database backed up, outside the power-cut filesystem."""
        source = os.path.join(self.top, 'source')
        shutil.rmtree(source, ignore_errors=True)
        os.mkdir(source)
        open_database(source).close()

    def begin_again(self):
        super().begin_again()
        self.make_source()

    def check_backup(self, seed: int) -> bool:
        taken = [e for e in acknowledged(self.report) if 'snapshot' in e]
        if taken:
            report = check(taken[-1]['snapshot'])
            self.assertTrue(report.clean, 'seed %d: %s'
                            % (seed, report.lines()))

    def test_power_cuts_while_backing_up(self):
        for seed in self.seeds(600, 3):
            self.run_until_cut('backup', seed, most=TOOL_MOST)
            self.check_backup(seed)


class ManyToolPowerCutTests(CachePowerCutTests, BackupPowerCutTests):
    """Hundreds of cuts."""

    level = 2

    def test_power_cuts_while_the_cache_installs_files(self):
        found = 0
        for seed in self.seeds(5000, 30):
            self.run_until_cut('cache', seed, most=TOOL_MOST)
            found += self.check_cache(seed)
        self.assertGreater(found, 0, 'no file survived any cut')

    def test_power_cuts_while_backing_up(self):
        for seed in self.seeds(6000, 20):
            self.run_until_cut('backup', seed, most=TOOL_MOST)
            self.check_backup(seed)


class MigratePowerCutTests(PowerCutStorageTestCase):
    """A migration that returned is on disk: the marker and every file."""

    def prepare(self, backing):
        db = open_database(backing)
        with db.transaction() as conn:
            for number in range(20):
                conn.root()['blob-%d' % number] = Blob(b'%d' % number * 999)
        db.close()

    def test_a_finished_migration_survives_a_power_cut(self):
        source = os.path.join(self.mnt, 'blobs')
        destination = os.path.join(self.mnt, 'lawn')
        migrate(source, destination, 'lawn')
        expected = {os.path.basename(path): read_bytes(path)
                    for oid, tid, path in FilesystemHelper(
                        source).iter_blobs()}
        self.fs.remount()
        self.assertEqual(read_marker(destination), 'lawn')
        helper = FilesystemHelper(destination, 'lawn')
        self.assertEqual({os.path.basename(path): read_bytes(path)
                          for oid, tid, path in helper.iter_blobs()},
                         expected)
