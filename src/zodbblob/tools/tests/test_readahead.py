"""`zodbblob.tools.readahead`: the kernel asked to read files in ahead."""

import os
import resource
import shutil
import tempfile
import unittest
from unittest import mock

from zodbblob.layout import BlobTree
from zodbblob.tools.readahead import read_ahead


def open_blob_files():
    """The blob files this process has open."""
    opened = []
    for fd in os.listdir('/proc/self/fd'):
        try:
            opened.append(os.readlink('/proc/self/fd/' + fd))
        except FileNotFoundError:
            pass   # the listing's own
    return [path for path in opened if path.endswith('.blob')]


class Tree:
    """A BlobTree that says which files were opened, and when."""

    def __init__(self, root, log):
        self._tree = BlobTree(root)
        self.log = log

    def open(self, path):
        fd = self._tree.open(path)
        self.log.append(('ahead', os.path.basename(path)))
        return fd

    def close(self):
        self._tree.close()


class ReadAheadTests(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-readahead-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.paths = []
        for i in range(10):
            path = os.path.join(self.dir, f'{i}.blob')
            with open(path, 'wb') as f:
                f.write(b'%d' % i * 100)
            self.paths.append(path)
        self.log = []
        self.tree = Tree(self.dir, self.log)
        self.addCleanup(self.tree.close)

    def items(self):
        return [(i, path) for i, path in enumerate(self.paths)]

    def test_items_come_in_order_each_advised_ahead_of_its_turn(self):
        advised = []
        with mock.patch('os.posix_fadvise',
                        lambda fd, offset, length, advice: advised.append(
                            (os.readlink(f'/proc/self/fd/{fd}'), advice))):
            for i, path in read_ahead(self.items(), self.tree, ahead=3):
                self.log.append(('turn', f'{i}.blob'))
        self.assertEqual([path for path, advice in advised], self.paths)
        self.assertEqual({advice for path, advice in advised},
                         {os.POSIX_FADV_WILLNEED})
        # Each file advised three items before its turn (or as the walk
        # starts), and every item yielded once, in order.
        self.assertEqual(self.log[:5], [('ahead', '0.blob'),
                                        ('ahead', '1.blob'),
                                        ('ahead', '2.blob'),
                                        ('ahead', '3.blob'),
                                        ('turn', '0.blob')])
        self.assertEqual([name for kind, name in self.log if kind == 'turn'],
                         [f'{i}.blob' for i in range(10)])
        for i in range(10):
            self.assertLess(self.log.index(('ahead', f'{i}.blob')),
                            self.log.index(('turn', f'{i}.blob')))

    def test_no_file_is_kept_open(self):
        walk = read_ahead(self.items(), self.tree, ahead=5)
        next(walk)
        self.assertEqual(len(self.log), 6)   # six advised by now
        self.assertEqual(open_blob_files(), [])
        walk.close()

    def test_a_file_that_cannot_be_opened_is_passed_on_for_its_turn(self):
        os.remove(self.paths[4])
        os.remove(self.paths[6])
        os.mkfifo(self.paths[6])   # never opened: not a regular file
        self.assertEqual(list(read_ahead(self.items(), self.tree)),
                         self.items())

    def test_out_of_descriptors_the_walk_goes_on(self):
        # A low ``ulimit -n``: room for one more descriptor, which the
        # walk's own open in its turn needs.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = {int(fd) for fd in os.listdir('/proc/self/fd')}
        free = [fd for fd in range(len(in_use) + 4) if fd not in in_use]
        resource.setrlimit(resource.RLIMIT_NOFILE, (free[1] + 1, hard))
        read = []
        try:
            for i, path in read_ahead(self.items(), self.tree, ahead=5):
                fd = os.open(path, os.O_RDONLY)
                try:
                    read.append(os.read(fd, 1000))
                finally:
                    os.close(fd)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        self.assertEqual(read, [b'%d' % i * 100 for i in range(10)])


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
