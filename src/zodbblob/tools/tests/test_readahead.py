"""`zodbblob.tools.readahead`: files opened ahead of their turn."""

import os
import resource
import shutil
import tempfile
import unittest

from zodbblob.tools.readahead import fd_of, opened_ahead


class OpenedAheadTests(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-readahead-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.paths = []
        for i in range(10):
            path = os.path.join(self.dir, f'{i}.blob')
            with open(path, 'wb') as f:
                f.write(b'%d' % i * 100)
            self.paths.append(path)
        self.opened = []

    def open_file(self, path):
        self.opened.append(path)
        return os.open(path, os.O_RDONLY)

    def items(self):
        return [(i, path) for i, path in enumerate(self.paths)]

    def test_each_file_is_opened_ahead_and_yielded_in_order(self):
        read = []
        for i, path, *opened in opened_ahead(self.items(), self.open_file,
                                             ahead=3):
            # This file and the three after it are open by now.
            self.assertEqual(self.opened, self.paths[:min(i + 4, 10)])
            fd = fd_of(opened, self.open_file, path)
            try:
                read.append(os.read(fd, 1000))
            finally:
                os.close(fd)
        self.assertEqual(read, [b'%d' % i * 100 for i in range(10)])

    def test_a_file_that_cannot_be_opened_is_its_own_error(self):
        os.remove(self.paths[4])
        results = []
        for i, path, *opened in opened_ahead(self.items(), self.open_file):
            try:
                fd = fd_of(opened, self.open_file, path)
            except FileNotFoundError as e:
                results.append(('missing', e.filename))
            else:
                os.close(fd)
                results.append(('read', i))
        self.assertEqual(results[4], ('missing', self.paths[4]))
        self.assertEqual([r for r in results if r[0] == 'read'],
                         [('read', i) for i in range(10) if i != 4])

    def test_files_not_reached_are_closed_when_the_walk_stops(self):
        before = set(os.listdir('/proc/self/fd'))
        walk = opened_ahead(self.items(), self.open_file, ahead=5)
        i, path, fd = next(walk)
        os.close(fd)
        self.assertEqual(len(self.opened), 6)
        walk.close()
        self.assertEqual(set(os.listdir('/proc/self/fd')), before)

    def test_out_of_descriptors_each_file_is_opened_in_its_turn(self):
        # A low ``ulimit -n``: room for three more descriptors.  Reading
        # one file at a time, as verify did before it read ahead, fits.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = {int(fd) for fd in os.listdir('/proc/self/fd')}
        free = [fd for fd in range(len(in_use) + 4) if fd not in in_use]
        resource.setrlimit(resource.RLIMIT_NOFILE, (free[2] + 1, hard))
        read = []
        try:
            for i, path, *opened in opened_ahead(self.items(),
                                                 self.open_file, ahead=5):
                fd = fd_of(opened, self.open_file, path)
                try:
                    read.append(os.read(fd, 1000))
                finally:
                    os.close(fd)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        self.assertEqual(read, [b'%d' % i * 100 for i in range(10)])

    def test_without_an_opened_fd_the_file_is_opened_now(self):
        fd = fd_of([], self.open_file, self.paths[0])
        os.close(fd)
        self.assertEqual(self.opened, [self.paths[0]])


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
