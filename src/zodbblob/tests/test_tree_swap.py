"""A directory of a blob directory swapped for a symbolic link between
the moment a tool checked it and the moment it opens a file below it.

An attacker with write access to part of the tree (or a confused
operator) moves a directory away and puts a link to a directory
elsewhere in its place, holding files under the same blob names.  The
swap is made at a chosen point (between two files of one directory,
from a tool's progress callback), so each test is deterministic: the
tool refuses, naming the link as it names any linked directory, and
never reads, copies nor links the file behind it.
"""

import os
import shutil
import stat
import tempfile
import unittest

import ZODB
import ZODB.FileStorage
from ZODB.blob import Blob

from zodbblob import BlobStorage
from zodbblob.layout import LINKED_DIRECTORY, BlobTree, NotABlobFile
from zodbblob.tools.migrate import migrate
from zodbblob.tools.verify import verify

SECRET = b'a file outside the blob directory\n'


class DirectorySwapTests(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-swap-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.data = os.path.join(self.dir, 'Data.fs')
        self.blob_dir = os.path.join(self.dir, 'blobs')
        db = ZODB.DB(self.open())
        # Two revisions of one blob share its directory (bushy); the
        # other blob's directory shares the levels above.
        with db.transaction() as conn:
            conn.root()['swapped'] = Blob(b'first revision')
            conn.root()['other'] = Blob(b'other blob')
        with db.transaction() as conn, \
                conn.root()['swapped'].open('w') as f:
            f.write(b'second revision')
        self.paths = {}
        for name in ('swapped', 'other'):
            blob = db.open().root()[name]
            blob._p_activate()
            self.paths[name] = db.storage.loadBlob(blob._p_oid,
                                                   blob._p_serial)
        db.close()
        self.second = self.paths['swapped']
        self.leaf = os.path.dirname(self.second)
        [first_name] = [name for name in os.listdir(self.leaf)
                        if os.path.join(self.leaf, name) != self.second]
        self.first = os.path.join(self.leaf, first_name)
        self.swaps = 0

    def open(self, **kw):
        return BlobStorage(self.blob_dir, ZODB.FileStorage.FileStorage(
            self.data, **kw), 'bushy')

    def swap(self, directory):
        """Move `directory` away and put a link in its place, to a copy
        elsewhere whose every file holds SECRET."""
        self.swaps += 1
        outside = os.path.join(self.dir, f'elsewhere-{self.swaps}')
        shutil.copytree(directory, outside, symlinks=True)
        for top, _, names in os.walk(outside):
            for name in names:
                path = os.path.join(top, name)
                os.chmod(path, 0o644)
                with open(path, 'wb') as f:
                    f.write(SECRET)
        os.rename(directory, os.path.join(self.dir, f'moved-{self.swaps}'))
        os.symlink(outside, directory)

    def read(self, fd):
        with open(fd, 'rb') as f:
            return f.read()

    def assertRefusesTheLink(self, raised, link):
        self.assertEqual((raised.exception.path, raised.exception.kind),
                         (link, LINKED_DIRECTORY))
        self.assertIn(f'{link} is {LINKED_DIRECTORY}',
                      str(raised.exception))

    def assertHoldsNoOutsideFile(self, top):
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                mode = os.lstat(path).st_mode
                self.assertFalse(stat.S_ISLNK(mode), path)
                if stat.S_ISREG(mode):
                    with open(path, 'rb') as f:
                        self.assertNotEqual(f.read(), SECRET, path)

    def test_a_directory_swapped_after_a_file_in_it_was_opened_is_refused(
            self):
        with BlobTree(self.blob_dir) as tree:
            self.assertEqual(self.read(tree.open(self.first)),
                             b'first revision')
            self.swap(self.leaf)
            with self.assertRaises(NotABlobFile) as raised:
                tree.open(self.second)
            self.assertRefusesTheLink(raised, self.leaf)
            with self.assertRaises(NotABlobFile) as raised:
                tree.check(self.second)
            self.assertRefusesTheLink(raised, self.leaf)

    def test_a_directory_swapped_after_its_check_is_refused(self):
        with BlobTree(self.blob_dir) as tree:
            tree.check_directories(self.second)
            self.swap(self.leaf)
            with self.assertRaises(NotABlobFile) as raised:
                tree.open(self.second)
            self.assertRefusesTheLink(raised, self.leaf)

    def test_a_directory_above_swapped_while_held_never_shows_the_outside(
            self):
        above = os.path.dirname(self.leaf)
        self.assertEqual(above, os.path.dirname(
            os.path.dirname(self.paths['other'])))
        with BlobTree(self.blob_dir) as tree:
            self.assertEqual(self.read(tree.open(self.paths['other'])),
                             b'other blob')
            self.swap(above)
            # The tree holds the directory it opened: it reads that one,
            # wherever it was moved, never the link's target.
            self.assertEqual(self.read(tree.open(self.second)),
                             b'second revision')
        # A tree that opens it now refuses it.
        with BlobTree(self.blob_dir) as tree, \
                self.assertRaises(NotABlobFile) as raised:
            tree.open(self.second)
        self.assertRefusesTheLink(raised, above)

    def test_a_link_made_from_a_swapped_directory_is_refused(self):
        target = os.path.join(self.dir, 'linked.blob')
        with BlobTree(self.blob_dir) as tree:
            tree.link(self.first, os.path.join(self.dir, 'first.blob'))
            self.swap(self.leaf)
            with self.assertRaises(NotABlobFile) as raised:
                tree.link(self.second, target)
            self.assertRefusesTheLink(raised, self.leaf)
        self.assertFalse(os.path.lexists(target))

    def test_a_link_to_a_symbolic_link_is_never_made(self):
        os.remove(self.second)
        outside = os.path.join(self.dir, 'secret')
        with open(outside, 'wb') as f:
            f.write(SECRET)
        os.symlink(outside, self.second)
        target = os.path.join(self.dir, 'linked.blob')
        with BlobTree(self.blob_dir) as tree, \
                self.assertRaises(NotABlobFile) as raised:
            tree.link(self.second, target)
        self.assertEqual(raised.exception.kind, 'a symbolic link')
        self.assertFalse(os.path.lexists(target))

    def test_verify_checksum_names_a_directory_swapped_during_its_run(self):
        storage = self.open(read_only=True)
        self.addCleanup(storage.close)

        def progress(done, total):
            if done == 1:   # the first revision checked, the second next
                self.swap(self.leaf)

        report = verify(storage, checksum=True, progress=progress)
        self.assertEqual(self.swaps, 1)
        self.assertEqual(report.not_files, [(self.leaf, LINKED_DIRECTORY)])
        self.assertEqual(report.size_mismatches, [])
        self.assertIn(f'not followed: {self.leaf} is {LINKED_DIRECTORY}',
                      report.lines())
        self.assertFalse(report.clean)

    def test_migrate_carries_over_no_file_from_a_swapped_directory(self):
        destination = os.path.join(self.dir, 'lawn')

        def progress(done, total):
            if done == 1:
                self.swap(self.leaf)

        with self.assertRaises(NotABlobFile) as raised:
            migrate(self.blob_dir, destination, 'lawn', progress=progress)
        self.assertRefusesTheLink(raised, self.leaf)
        self.assertEqual(self.swaps, 1)
        self.assertHoldsNoOutsideFile(destination)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
