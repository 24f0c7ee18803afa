"""Blob directory layouts: paths, markers, detection, compatibility.

``bushy`` and ``lawn`` are checked against ``ZODB.blob`` itself, path by
path and on disk in both directions, because invariant 1 of the design
(a blob directory moves between stock ZODB and zodbblob unchanged) rests
on them.
"""

import contextlib
import os
import random
import shutil
import tempfile
import unittest
from unittest import mock

import transaction
import ZODB
import ZODB.blob
import ZODB.FileStorage
import ZODB.MappingStorage
import zope.interface
import zope.interface.verify
from hypothesis import example, given, settings
from hypothesis import strategies as st
from ZODB.utils import p64, z64

import zodbblob
from zodbblob import layout
from zodbblob.interfaces import ILayout
from zodbblob.layout import (
    LAYOUT_MARKER,
    LAYOUTS,
    FilesystemHelper,
    auto_layout_select,
    read_marker,
    register_layout,
)

BUILTIN_LAYOUTS = ('bushy', 'lawn', 'chunky', 'flat')
STOCK_LAYOUTS = {'bushy': ZODB.blob.BushyLayout(),
                 'lawn': ZODB.blob.LawnLayout()}
MAX_OID = b'\xff' * 8

# No example database: it would be written into the working directory.
property_settings = settings(max_examples=200, deadline=None, database=None)
oids = st.binary(min_size=8, max_size=8)
tids = st.binary(min_size=8, max_size=8)
# Strings built from the characters oid paths are made of, so that most
# of them come close to a valid path.
near_paths = st.text(alphabet='0x123abf/.\n', max_size=40)


def temporary_directory(test):
    path = tempfile.mkdtemp(prefix='zodbblob-test-')
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def snapshot(path):
    """Every name below `path` with the bytes of each file."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), path)] = None
        for name in filenames:
            full = os.path.join(dirpath, name)
            with open(full, 'rb') as f:
                found[os.path.relpath(full, path)] = f.read()
    return found


def write_blob_file(fshelper, oid, tid, data=b''):
    fshelper.createPathForOID(oid)
    filename = fshelper.getBlobFilename(oid, tid)
    with open(filename, 'wb') as f:
        f.write(data or filename.encode())
    return filename


@contextlib.contextmanager
def recording_listings():
    """The directories listed (``os.scandir``, which ``os.walk`` uses too)
    while the block runs."""
    listed = []
    real_scandir = os.scandir

    def scandir(path='.'):
        listed.append(os.path.abspath(path))
        return real_scandir(path)

    with mock.patch('os.scandir', scandir):
        yield listed


def random_revisions(seed, count):
    """`count` distinct (oid, tid), with oids close together and apart.

    Neighbouring oids share a chunky leaf directory and a bushy parent;
    repeated oids give several revisions in one place.
    """
    rng = random.Random(seed)
    revisions = set()
    while len(revisions) < count:
        kind = rng.random()
        if kind < 0.4:
            oid = p64(rng.randrange(5000))
        elif kind < 0.5 and revisions:
            oid = rng.choice(sorted(revisions))[0]
        else:
            oid = rng.randbytes(8)
        revisions.add((oid, rng.randbytes(8)))
    return revisions


class StockPathsTests(unittest.TestCase):
    """bushy and lawn name every oid and file exactly as ZODB.blob does."""

    @given(oid=oids, tid=tids)
    @example(oid=z64, tid=z64)
    @example(oid=p64(1), tid=p64(1))
    @example(oid=MAX_OID, tid=MAX_OID)
    @example(oid=p64(0x100), tid=p64(0x03e1f4a2b3c4d5e6))
    @property_settings
    def test_paths_equal_stock_zodb_paths(self, oid, tid):
        for name, stock in STOCK_LAYOUTS.items():
            ours = LAYOUTS[name]
            path = stock.oid_to_path(oid)
            self.assertEqual(ours.oid_to_path(oid), path, name)
            self.assertEqual(ours.path_to_oid(path), stock.path_to_oid(path),
                             name)
            self.assertEqual(ours.getBlobFilePath(oid, tid),
                             stock.getBlobFilePath(oid, tid), name)

    @given(oid=oids, tid=tids)
    @example(oid=z64, tid=z64)
    @example(oid=MAX_OID, tid=MAX_OID)
    @property_settings
    def test_helper_file_names_equal_stock_helper_file_names(self, oid, tid):
        for name in STOCK_LAYOUTS:
            ours = FilesystemHelper('/srv/blobs', name)
            stock = ZODB.blob.FilesystemHelper('/srv/blobs', name)
            filename = stock.getBlobFilename(oid, tid)
            self.assertEqual(ours.getBlobFilename(oid, tid), filename)
            self.assertEqual(ours.getPathForOID(oid),
                             stock.getPathForOID(oid))
            self.assertEqual(ours.splitBlobFilename(filename),
                             stock.splitBlobFilename(filename))

    def test_integer_oids_and_tids_name_the_same_files_as_bytes(self):
        for name in STOCK_LAYOUTS:
            ours = FilesystemHelper('/srv/blobs', name)
            stock = ZODB.blob.FilesystemHelper('/srv/blobs', name)
            self.assertEqual(ours.getBlobFilename(0x1234, 0x3e1),
                             stock.getBlobFilename(p64(0x1234), p64(0x3e1)))
            self.assertEqual(ours.getPathForOID(0x1234),
                             stock.getPathForOID(0x1234))

    @given(path=near_paths)
    @property_settings
    def test_every_path_we_accept_names_the_oid_stock_zodb_reads(self, path):
        for name, stock in STOCK_LAYOUTS.items():
            try:
                oid = LAYOUTS[name].path_to_oid(path)
            except ValueError:
                continue
            self.assertEqual(stock.path_to_oid(path), oid, name)


class RoundTripTests(unittest.TestCase):
    """Every layout maps an oid to a path and back, and nothing else."""

    @given(oid=oids, tid=tids)
    @example(oid=z64, tid=z64)
    @example(oid=p64(1), tid=p64(1))
    @example(oid=MAX_OID, tid=MAX_OID)
    @property_settings
    def test_oid_and_tid_survive_a_round_trip_through_paths(self, oid, tid):
        for name in BUILTIN_LAYOUTS:
            chosen = LAYOUTS[name]
            self.assertEqual(chosen.path_to_oid(chosen.oid_to_path(oid)),
                             oid, name)
            self.assertEqual(chosen.blob_path_to_oid_tid(
                chosen.getBlobFilePath(oid, tid)), (oid, tid), name)

    @given(path=near_paths)
    @example(path='0x01')
    @example(path='0x0001')
    @example(path='0x00/0x00/0x00/0x00/0x00/0x00/0x00/0x01')
    @example(path='0x0000/0x000/0x000/0x000/0x001')
    @property_settings
    def test_a_path_names_an_oid_only_if_it_is_that_oids_path(self, path):
        # Two names for one oid would let a directory walk report files
        # that getBlobFilename never points at.
        for name in BUILTIN_LAYOUTS:
            chosen = LAYOUTS[name]
            try:
                oid = chosen.path_to_oid(path)
            except ValueError as e:
                self.assertEqual(str(e), f'Not a valid OID path: `{path}`')
            else:
                self.assertEqual(chosen.oid_to_path(oid), path, name)

    def test_paths_that_name_no_oid_raise_value_error(self):
        bad = {
            'bushy': ['tmp', '', '0x', 'abc', '0x01', '0x1',
                      '0x00/0x00/0x00/0x00/0x00/0x00/0x01',
                      '0x00/0x00/0x00/0x00/0x00/0x00/0x00/0x00/0x01',
                      '0x00/0x00/0x00/0x00/0x00/0x00/0x00/0x1',
                      '0x00/0x00/0x00/0x00/0x00/0x00/0x00/0xAB',
                      '/0x00/0x00/0x00/0x00/0x00/0x00/0x00/0x01'],
            'lawn': ['tmp', '', '0x', 'abc', '0x1', '0x0001', '0xAB',
                     '0x01/0x02', '0x01\n', '0x' + '00' * 9],
            'chunky': ['tmp', '', '0x', 'abc', '0x0000',
                       '0x0000/0x000/0x000/0x000',
                       '0x0000/0x000/0x000/0x000/0x001/0x000',
                       '0x000/0x0000/0x000/0x000/0x001',
                       '0x0000/0x000/0x000/0x000/0x1'],
            'flat': ['tmp', '', '0x', 'abc', '0x1', '0x0001', '0x01/0x02'],
        }
        for name, paths in bad.items():
            for path in paths:
                with self.subTest(layout=name, path=path):
                    with self.assertRaises(ValueError) as raised:
                        LAYOUTS[name].path_to_oid(path)
                    self.assertEqual(str(raised.exception),
                                     f'Not a valid OID path: `{path}`')

    def test_file_names_that_carry_no_tid_raise_value_error(self):
        for name in BUILTIN_LAYOUTS:
            chosen = LAYOUTS[name]
            oid_path = chosen.oid_to_path(p64(1))
            sep = os.sep if chosen.directory_per_oid else '.'
            for tail in ('README.blob', '0x0003.blob', '0x3.blob', 'x.blob',
                         '0x03.tmp'):
                path = oid_path + sep + tail
                with self.subTest(layout=name, path=path):
                    with self.assertRaises(ValueError) as raised:
                        chosen.blob_path_to_oid_tid(path)
                    self.assertIn(path, str(raised.exception))

    def test_every_registered_layout_provides_ilayout(self):
        for name, chosen in LAYOUTS.items():
            self.assertTrue(zope.interface.verify.verifyObject(
                ILayout, chosen), name)
            self.assertEqual(chosen.name, name)


class EnumerationTests(unittest.TestCase):
    """iter_blob_paths finds exactly the committed blob files."""

    def write_foreign_files(self, fshelper):
        """Files and directories no layout may report as blobs."""
        base = fshelper.base_dir
        oid = p64(0x1234)
        fshelper.createPathForOID(oid)
        fd, _ = fshelper.blob_mkstemp(oid, p64(7))
        os.close(fd)
        in_tmp = os.path.join(fshelper.temp_dir, 'staged-1', '0x00')
        os.makedirs(in_tmp)
        junk = [
            os.path.join(fshelper.temp_dir, '0x01.0x03.blob'),
            os.path.join(in_tmp, '0x03.blob'),
            os.path.join(base, '.hidden', '0x01.0x03.blob'),
            os.path.join(base, '.0x01.0x03.blob'),
            os.path.join(base, 'README'),
            os.path.join(base, 'README.blob'),
            os.path.join(base, 'junk', '0x03.blob'),
            os.path.join(base, '0x1.0x03.blob'),
            fshelper.getPathForOID(oid) + os.sep + 'notes.blob',
            fshelper.getBlobFilename(oid, p64(3))[:-len('.blob')] + '.txt',
        ]
        for path in junk:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'wb') as f:
                f.write(b'not a blob')
        # A directory with a blob file's name is not a blob file.
        os.makedirs(os.path.join(base, '0x01.0x04.blob'), exist_ok=True)

    def test_iteration_finds_exactly_the_files_written(self):
        for name in BUILTIN_LAYOUTS:
            with self.subTest(layout=name):
                fshelper = FilesystemHelper(
                    os.path.join(temporary_directory(self), 'blobs'), name)
                fshelper.create()
                written = {}
                for oid, tid in random_revisions(name, 300):
                    written[oid, tid] = write_blob_file(fshelper, oid, tid)
                self.write_foreign_files(fshelper)
                found = {(oid, tid): path
                         for oid, tid, path in fshelper.iter_blobs()}
                self.assertEqual(found, written)

    def test_iteration_never_descends_into_tmp_or_hidden_directories(self):
        # Nothing there can be a committed blob, and there may be much:
        # staged files of running transactions, the journal.
        for name in BUILTIN_LAYOUTS:
            fshelper = FilesystemHelper(temporary_directory(self), name)
            fshelper.create()
            write_blob_file(fshelper, p64(1), p64(2))
            for skipped in ('.zodbblob', '.snapshot'):
                os.makedirs(os.path.join(fshelper.base_dir, skipped, 'deep'))
            os.makedirs(os.path.join(fshelper.temp_dir, 'deep'))
            with recording_listings() as listed:
                self.assertEqual(len(list(fshelper.iter_blobs())), 1)
            entered = {os.path.relpath(path, fshelper.base_dir).split(
                os.sep)[0] for path in listed}
            self.assertEqual(entered & {'tmp', '.zodbblob', '.snapshot'},
                             set(), name)
            self.assertIn('.', entered, name)

    def test_iteration_of_a_missing_or_empty_directory_finds_nothing(self):
        for name in BUILTIN_LAYOUTS:
            base = os.path.join(temporary_directory(self), 'blobs')
            self.assertEqual(list(LAYOUTS[name].iter_blob_paths(base)), [])
            FilesystemHelper(base, name).create()
            self.assertEqual(list(LAYOUTS[name].iter_blob_paths(base)), [])

    def test_list_oids_and_oids_for_serial_follow_the_files(self):
        for name in BUILTIN_LAYOUTS:
            with self.subTest(layout=name):
                fshelper = FilesystemHelper(
                    os.path.join(temporary_directory(self), 'blobs'), name)
                fshelper.create()
                revisions = random_revisions('oids' + name, 50)
                for oid, tid in revisions:
                    write_blob_file(fshelper, oid, tid)
                listed = list(fshelper.listOIDs())
                self.assertEqual(
                    sorted(listed), sorted({(oid, fshelper.getPathForOID(oid))
                                            for oid, tid in revisions}))
                oid, tid = min(revisions)
                self.assertEqual(fshelper.getOIDsForSerial(tid), [oid])

    def test_split_blob_filename_returns_none_for_foreign_names(self):
        for name in BUILTIN_LAYOUTS:
            fshelper = FilesystemHelper('/srv/blobs', name)
            for foreign in ('/srv/blobs/README', '/srv/blobs/README.blob',
                            '/srv/blobs/tmp/0x01.blob'):
                self.assertEqual(fshelper.splitBlobFilename(foreign),
                                 (None, None), (name, foreign))
            filename = fshelper.getBlobFilename(p64(9), p64(10))
            self.assertEqual(fshelper.splitBlobFilename(filename),
                             (p64(9), p64(10)))


def reference_listing(fshelper):
    """What iter_blobs must find, the slow and obvious way.

    Every name below the blob directory (os.walk, links to directories
    not followed), minus ``tmp`` at the top and hidden directories
    anywhere, minus directories (and for ``flat``, anything but files),
    each whole relative path asked of ``splitBlobFilename``; in
    ``os.walk`` order with sorted names.
    """
    base = fshelper.base_dir
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        relative = os.path.relpath(dirpath, base).split(os.sep)
        if relative[0] == 'tmp' or any(
                part.startswith('.') and part != '.' for part in relative):
            continue
        for name in filenames:
            path = os.path.join(dirpath, name)
            if fshelper.layout_name == 'flat' and not os.path.isfile(path):
                continue
            oid, tid = fshelper.splitBlobFilename(path)
            if oid is not None:
                found.append((oid, tid, path))
    return sorted(found, key=lambda item: item[2].split(os.sep))


def write(path, data=b'not a blob'):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)


def oid_directory(fshelper, oid):
    return os.path.join(fshelper.base_dir, fshelper.layout.oid_directory(oid))


# Junk a blob directory may hold besides its blob files, one kind each;
# `blob` is the relative path of a real blob file of the directory.

def junk_in_tmp(fshelper, blob):
    # Staged and uncommitted files, some under a committed file's path.
    write(os.path.join(fshelper.temp_dir, blob))
    write(os.path.join(fshelper.temp_dir, 'staged-1', blob))
    write(os.path.join(fshelper.temp_dir, '0x01.0x03.blob'))


def junk_markers_and_locks(fshelper, blob):
    # .layout is there already; a marker being written, stock ZEO's and
    # backup's lock files.
    base = fshelper.base_dir
    for name in ('.layout-x1y2', '.lock', 'lock', '0x01.lock'):
        write(os.path.join(base, name))
    write(os.path.join(base, os.path.dirname(blob), '.lock'))


def junk_state_directories(fshelper, blob):
    # zodbblob's state, a migration's, a filesystem snapshot's: hidden
    # directories, holding what looks like committed files.
    base = fshelper.base_dir
    for hidden in ('.zodbblob', '.zodbblob-migrate-tmp', '.snapshot'):
        write(os.path.join(base, hidden, 'journal.sqlite'))
        write(os.path.join(base, hidden, blob))
    write(os.path.join(base, os.path.dirname(blob), '.hidden', '0x01.blob'))


def junk_stray_files(fshelper, blob):
    base = fshelper.base_dir
    oid_dir = oid_directory(fshelper, p64(0x1234))
    fd, _ = fshelper.blob_mkstemp(p64(0x1234), p64(7))
    os.close(fd)
    for path in (os.path.join(base, 'README'),
                 os.path.join(base, 'README.blob'),
                 os.path.join(base, '.0x01.0x03.blob'),
                 os.path.join(oid_dir, 'notes.blob'),
                 os.path.join(oid_dir, 'notes'),
                 os.path.join(base, blob)[:-len('.blob')] + '.txt',
                 os.path.join(base, blob) + '~'):
        write(path)


def junk_misspelled_names(fshelper, blob):
    # Names that parse as numbers but are not how ZODB spells an oid or
    # a tid: never where getBlobFilename points.
    base = fshelper.base_dir
    directory, name = os.path.split(blob)
    for wrong in (name.upper(), name.replace('0x', '0x0'),
                  '0x1.0x03.blob', '0x0001.0x03.blob', '0x01.0x0003.blob',
                  '0x01.0xg3.blob'):
        write(os.path.join(base, directory, wrong))
    if directory:
        top, _, rest = directory.partition(os.sep)
        for wrong in (top.upper(), top + '0', top.replace('0x', '0x0'),
                      'x' + top[1:]):
            write(os.path.join(base, wrong, rest, name))


def junk_at_the_wrong_depth(fshelper, blob):
    # A blob file's name one level too high or too low, and a directory
    # that has a blob file's name.
    base = fshelper.base_dir
    directory, name = os.path.split(blob)
    if directory:
        write(os.path.join(base, name))
    write(os.path.join(base, directory, 'deeper', name))
    write(os.path.join(base, directory, '0x01', name))
    if directory:
        write(os.path.join(base, os.path.dirname(directory), name))
    os.makedirs(os.path.join(base, directory, '0x01.0x04.blob'))
    os.makedirs(os.path.join(base, directory, '0x04.blob'))


def junk_links_to_directories(fshelper, blob):
    # Not followed: a link would make one blob file show up twice, and a
    # loop would never end.
    base = fshelper.base_dir
    elsewhere = tempfile.mkdtemp(prefix='zodbblob-test-elsewhere-')
    write(os.path.join(elsewhere, blob))
    directory = os.path.dirname(blob)
    linked = fshelper.getPathForOID(p64(0x4321))
    if fshelper.layout.directory_per_oid:
        os.makedirs(os.path.dirname(linked), exist_ok=True)
        os.symlink(os.path.join(elsewhere, directory), linked)
    os.symlink(base, os.path.join(base, 'loop'))
    os.symlink(elsewhere, os.path.join(base, '0x99'))
    return elsewhere


JUNK = {
    'tmp': junk_in_tmp,
    'markers and locks': junk_markers_and_locks,
    'state directories': junk_state_directories,
    'stray files': junk_stray_files,
    'misspelled names': junk_misspelled_names,
    'wrong depth': junk_at_the_wrong_depth,
    'links to directories': junk_links_to_directories,
}


class ScanTests(unittest.TestCase):
    """iter_blob_paths against a reference listing, junk of every kind."""

    def blob_directory(self, name, revisions=()):
        fshelper = FilesystemHelper(
            os.path.join(temporary_directory(self), 'blobs'), name)
        fshelper.create()
        written = [(oid, tid, write_blob_file(fshelper, oid, tid))
                   for oid, tid in [(p64(0x1234), p64(0x03ec)), *revisions]]
        return fshelper, written

    def assert_finds_only_the_blobs(self, kind):
        for name in BUILTIN_LAYOUTS:
            with self.subTest(layout=name):
                fshelper, written = self.blob_directory(name)
                blob = os.path.relpath(written[0][2], fshelper.base_dir)
                elsewhere = JUNK[kind](fshelper, blob)
                if elsewhere:
                    self.addCleanup(shutil.rmtree, elsewhere)
                self.assertEqual(list(fshelper.iter_blobs()), written)
                self.assertEqual(reference_listing(fshelper), written)

    def test_files_in_tmp_are_not_blobs(self):
        self.assert_finds_only_the_blobs('tmp')

    def test_markers_and_lock_files_are_not_blobs(self):
        self.assert_finds_only_the_blobs('markers and locks')

    def test_hidden_state_directories_are_not_searched(self):
        self.assert_finds_only_the_blobs('state directories')

    def test_stray_and_temporary_files_are_not_blobs(self):
        self.assert_finds_only_the_blobs('stray files')

    def test_names_zodb_would_not_write_are_not_blobs(self):
        self.assert_finds_only_the_blobs('misspelled names')

    def test_blob_names_at_the_wrong_depth_are_not_blobs(self):
        self.assert_finds_only_the_blobs('wrong depth')

    def test_links_to_directories_are_not_followed(self):
        self.assert_finds_only_the_blobs('links to directories')

    def test_scan_equals_the_reference_with_every_junk_mixed_in(self):
        layouts = [*BUILTIN_LAYOUTS, 'test-fanout']
        saved = dict(LAYOUTS)
        self.addCleanup(LAYOUTS.update, saved)
        self.addCleanup(LAYOUTS.clear)
        register_layout(FanoutLayout())
        for name in layouts:
            with self.subTest(layout=name):
                fshelper, written = self.blob_directory(
                    name, random_revisions('scan' + name, 300))
                blob = os.path.relpath(written[0][2], fshelper.base_dir)
                for add_junk in JUNK.values():
                    elsewhere = add_junk(fshelper, blob)
                    if elsewhere:
                        self.addCleanup(shutil.rmtree, elsewhere)
                # Links to files count, as before: a blob file's name is
                # what makes it one.
                target = written[1][2]
                link = fshelper.getBlobFilename(written[1][0], p64(0x7777))
                os.symlink(target, link)
                expected = reference_listing(fshelper)
                self.assertEqual(len(expected), 302)
                self.assertIn((written[1][0], p64(0x7777), link), expected)
                self.assertEqual(list(fshelper.iter_blobs()), expected)
                self.assertEqual(list(fshelper.listOIDs()), [
                    (oid, fshelper.getPathForOID(oid))
                    for oid in dict.fromkeys(oid for oid, _, _ in expected)])

    @given(layout_name=st.sampled_from(BUILTIN_LAYOUTS), oid=oids, tid=tids,
           change=st.sampled_from(['none', 'drop', 'repeat', 'replace']),
           position=st.integers(0, 40), char=st.sampled_from('0x1f.'))
    @example(layout_name='bushy', oid=p64(1), tid=p64(2), change='drop',
             position=0, char='0')
    @example(layout_name='chunky', oid=p64(1), tid=p64(2), change='replace',
             position=4, char='0')
    @property_settings
    def test_scan_takes_a_file_exactly_when_its_path_parses(
            self, layout_name, oid, tid, change, position, char):
        # A blob file's path, changed a little: one level dropped or
        # repeated, or one character replaced.
        chosen = LAYOUTS[layout_name]
        parts = chosen.getBlobFilePath(oid, tid).split(os.sep)
        index = position % len(parts)
        if change == 'drop' and len(parts) > 1:
            del parts[index]
        elif change == 'repeat':
            parts.insert(index, parts[index])
        elif change == 'replace':
            part = parts[index]
            spot = position % len(part)
            parts[index] = part[:spot] + char + part[spot + 1:]
        if any(part in ('', '.', '..') for part in parts):
            return
        base = tempfile.mkdtemp(prefix='zodbblob-test-')
        try:
            fshelper = FilesystemHelper(base, layout_name)
            write(os.path.join(fshelper.base_dir, *parts))
            self.assertEqual(list(fshelper.iter_blobs()),
                             reference_listing(fshelper))
        finally:
            shutil.rmtree(base)

    def test_scan_lists_no_directory_where_no_blob_can_be(self):
        # Foreign trees inside a blob directory (a backup copied in, a
        # checkout) cost nothing to pass over.
        for name in BUILTIN_LAYOUTS:
            with self.subTest(layout=name):
                fshelper, written = self.blob_directory(name)
                base = fshelper.base_dir
                foreign = [os.path.join(base, 'backup', 'deep'),
                           os.path.join(base, '0x0000000', 'deep'),
                           os.path.join(oid_directory(fshelper, p64(5)),
                                        'extra', 'deep')]
                for path in foreign:
                    write(os.path.join(path, '0x01.blob'))
                with recording_listings() as listed:
                    self.assertEqual(list(fshelper.iter_blobs()), written)
                for path in foreign:
                    self.assertNotIn(path, listed)
                    self.assertNotIn(os.path.dirname(path), listed)


class DirectoryShapeTests(unittest.TestCase):
    """chunky and flat create no directory per oid."""

    def directories_and_files(self, fshelper, count):
        for oid in range(0x1000, 0x1000 + count):
            write_blob_file(fshelper, p64(oid), p64(1))
        directories = set()
        for dirpath, dirnames, _ in os.walk(fshelper.base_dir):
            dirnames[:] = [d for d in dirnames
                           if d != 'tmp' and not d.startswith('.')]
            directories.add(dirpath)
        leaves = {os.path.dirname(path)
                  for oid, tid, path in fshelper.iter_blobs()}
        return directories, leaves

    def test_chunky_puts_1000_sequential_oids_in_one_leaf_directory(self):
        fshelper = FilesystemHelper(temporary_directory(self), 'chunky')
        fshelper.create()
        directories, leaves = self.directories_and_files(fshelper, 1000)
        self.assertEqual(leaves, {os.path.join(
            fshelper.base_dir, '0x0000', '0x000', '0x000', '0x001')})
        # The blob directory and four levels: nothing per oid.
        self.assertEqual(len(directories), 5)

    def test_bushy_for_contrast_creates_a_directory_per_oid(self):
        fshelper = FilesystemHelper(temporary_directory(self), 'bushy')
        fshelper.create()
        _, leaves = self.directories_and_files(fshelper, 100)
        self.assertEqual(len(leaves), 100)

    def test_flat_puts_every_file_in_the_blob_directory(self):
        fshelper = FilesystemHelper(temporary_directory(self), 'flat')
        fshelper.create()
        directories, leaves = self.directories_and_files(fshelper, 300)
        self.assertEqual(leaves, {fshelper.base_dir.rstrip(os.sep)})
        self.assertEqual(directories, {fshelper.base_dir})
        self.assertEqual(len(os.listdir(fshelper.base_dir)),
                         300 + len(['tmp', LAYOUT_MARKER]))


class AutoLayoutSelectTests(unittest.TestCase):
    """Automatic selection follows ZODB's rules, and agrees with ZODB."""

    def assertSelects(self, path, expected):
        self.assertEqual(auto_layout_select(path), expected)
        if expected in STOCK_LAYOUTS:
            self.assertEqual(ZODB.blob.auto_layout_select(path), expected)

    def test_missing_directory_selects_bushy(self):
        self.assertSelects(
            os.path.join(temporary_directory(self), 'blobs'), 'bushy')

    def test_empty_directory_selects_bushy(self):
        self.assertSelects(temporary_directory(self), 'bushy')

    def test_directory_with_only_hidden_names_selects_bushy(self):
        base = temporary_directory(self)
        os.mkdir(os.path.join(base, '.zodbblob'))
        with open(os.path.join(base, '.DS_Store'), 'w') as f:
            f.write('finder')
        self.assertSelects(base, 'bushy')

    def test_marker_wins_for_every_registered_layout(self):
        base = temporary_directory(self)
        # Content that would otherwise read as an unmarked lawn directory.
        os.mkdir(os.path.join(base, '0x01'))
        for name in LAYOUTS:
            with open(os.path.join(base, LAYOUT_MARKER), 'w') as f:
                f.write(name + '\n')
            self.assertSelects(base, name)
            self.assertEqual(FilesystemHelper(base).layout_name, name)

    def test_used_directory_without_marker_selects_lawn(self):
        for content in ('0x01', 'foo', 'tmp'):
            base = temporary_directory(self)
            os.mkdir(os.path.join(base, content))
            self.assertSelects(base, 'lawn')

    def test_regular_file_as_blob_directory_raises_naming_it(self):
        path = os.path.join(temporary_directory(self), 'Data.fs')
        with open(path, 'wb') as f:
            f.write(b'FS21')
        with self.assertRaises(ValueError) as raised:
            auto_layout_select(path)
        self.assertIn(path, str(raised.exception))


class MarkerTests(unittest.TestCase):
    """The marker is written once, checked always, and bad input is refused
    without touching the disk."""

    def test_create_writes_the_marker_and_tmp_for_every_layout(self):
        for name in BUILTIN_LAYOUTS:
            base = os.path.join(temporary_directory(self), 'var', 'blobs')
            FilesystemHelper(base, name).create()
            self.assertEqual(read_marker(base), name)
            self.assertEqual(sorted(os.listdir(base)),
                             [LAYOUT_MARKER, 'tmp'])

    def test_marker_has_the_same_mode_as_stock_zodbs(self):
        stock = os.path.join(temporary_directory(self), 'stock')
        ZODB.blob.FilesystemHelper(stock).create()
        ours = os.path.join(temporary_directory(self), 'ours')
        FilesystemHelper(ours).create()

        def mode(base):
            return os.stat(os.path.join(base, LAYOUT_MARKER)).st_mode & 0o777
        self.assertEqual(mode(ours), mode(stock))
        self.assertTrue(mode(ours) & 0o044)

    def test_create_twice_changes_nothing(self):
        base = os.path.join(temporary_directory(self), 'blobs')
        FilesystemHelper(base, 'chunky').create()
        before = snapshot(base)
        FilesystemHelper(base, 'chunky').create()
        FilesystemHelper(base).create()
        self.assertEqual(snapshot(base), before)

    def test_automatic_selection_is_marked_and_sticks(self):
        base = temporary_directory(self)
        os.mkdir(os.path.join(base, '0x01'))
        FilesystemHelper(base).create()
        self.assertEqual(read_marker(base), 'lawn')
        shutil.rmtree(os.path.join(base, '0x01'))
        self.assertEqual(FilesystemHelper(base).layout_name, 'lawn')

    def test_mismatching_marker_raises_and_creates_nothing(self):
        base = os.path.join(temporary_directory(self), 'blobs')
        os.mkdir(base)
        # No tmp yet: stock ZODB would create it before checking.
        with open(os.path.join(base, LAYOUT_MARKER), 'w') as f:
            f.write('bushy')
        before = snapshot(base)
        with self.assertRaises(ValueError) as raised:
            FilesystemHelper(base, 'lawn').create()
        self.assertEqual(
            str(raised.exception),
            f'Directory layout `lawn` selected for blob directory {base}/, '
            'but marker found for layout `bushy`')
        self.assertEqual(snapshot(base), before)

    def test_unknown_layout_name_raises_naming_it_and_the_known_ones(self):
        base = os.path.join(temporary_directory(self), 'blobs')
        with self.assertRaises(ValueError) as raised:
            FilesystemHelper(base, 'grassy')
        message = str(raised.exception)
        self.assertIn('`grassy`', message)
        for name in BUILTIN_LAYOUTS:
            self.assertIn(name, message)
        self.assertFalse(os.path.exists(base))

    def test_unknown_layout_in_marker_raises_naming_the_directory(self):
        base = temporary_directory(self)
        with open(os.path.join(base, LAYOUT_MARKER), 'w') as f:
            f.write('grassy')
        with self.assertRaises(ValueError) as raised:
            FilesystemHelper(base)
        self.assertIn('`grassy`', str(raised.exception))
        self.assertIn(base, str(raised.exception))

    def test_regular_file_as_blob_directory_raises_and_stays_untouched(self):
        path = os.path.join(temporary_directory(self), 'Data.fs')
        with open(path, 'wb') as f:
            f.write(b'FS21')
        for name in ('automatic', 'bushy', 'flat'):
            with self.subTest(layout=name):
                with self.assertRaises(ValueError) as raised:
                    FilesystemHelper(path, name).create()
                self.assertIn(path, str(raised.exception))
                with open(path, 'rb') as f:
                    self.assertEqual(f.read(), b'FS21')

    def test_no_staged_marker_is_left_behind(self):
        base = temporary_directory(self)
        FilesystemHelper(base, 'bushy').create()
        self.assertEqual([name for name in os.listdir(base)
                          if name.startswith(LAYOUT_MARKER + '-')], [])


@zope.interface.implementer(ILayout)
class FanoutLayout(layout.LawnLayout):
    """lawn below 256 buckets chosen by the oid's last byte."""

    name = 'test-fanout'

    def oid_to_path(self, oid):
        return os.path.join(f'0x{oid[-1]:02x}', super().oid_to_path(oid))

    def path_to_oid(self, path):
        bucket, _, rest = path.partition(os.sep)
        try:
            oid = super().path_to_oid(rest)
        except ValueError:
            oid = None
        if oid is None or bucket != f'0x{oid[-1]:02x}':
            raise ValueError(f'Not a valid OID path: `{path}`')
        return oid


class RegisterLayoutTests(unittest.TestCase):

    def setUp(self):
        # The registry is process-wide: whatever a test does to it, even
        # when it fails, is undone before the next test.
        saved = dict(LAYOUTS)
        self.addCleanup(LAYOUTS.update, saved)
        self.addCleanup(LAYOUTS.clear)

    def register(self, chosen):
        return register_layout(chosen)

    def test_registered_layout_is_selected_by_name_and_by_marker(self):
        fanout = self.register(FanoutLayout())
        base = os.path.join(temporary_directory(self), 'blobs')
        fshelper = FilesystemHelper(base, 'test-fanout')
        self.assertIs(fshelper.layout, fanout)
        fshelper.create()
        filename = write_blob_file(fshelper, p64(0x1234), p64(5))
        self.assertEqual(filename, os.path.join(
            base, '0x34', '0x1234', '0x05.blob'))
        reopened = FilesystemHelper(base)
        self.assertEqual(reopened.layout_name, 'test-fanout')
        self.assertEqual([(oid, tid) for oid, tid, path
                          in reopened.iter_blobs()], [(p64(0x1234), p64(5))])

    def test_a_taken_name_cannot_be_registered_again(self):
        impostor = FanoutLayout()
        for name in ('bushy', 'automatic'):
            impostor.name = name
            with self.assertRaises(ValueError) as raised:
                register_layout(impostor)
            self.assertIn(f'`{name}`', str(raised.exception))
        self.assertIsInstance(LAYOUTS['bushy'], layout.BushyLayout)
        self.assertNotIn('automatic', LAYOUTS)

    def test_registering_the_same_layout_twice_is_harmless(self):
        bushy = LAYOUTS['bushy']
        self.assertIs(register_layout(bushy), bushy)

    def test_an_object_that_is_no_layout_is_refused(self):
        class NotALayout:
            name = 'test-not-a-layout'
        with self.assertRaises(zope.interface.Invalid):
            register_layout(NotALayout())
        self.assertNotIn('test-not-a-layout', LAYOUTS)


def commit_blobs(db, revisions):
    """Commit `revisions` (a list of {key: bytes}) into root['blobs']."""
    tm = transaction.TransactionManager()
    connection = db.open(tm)
    root = connection.root()
    for changes in revisions:
        blobs = root.setdefault('blobs', {})
        for key, data in changes.items():
            if key not in blobs:
                blobs[key] = ZODB.blob.Blob()
            with blobs[key].open('w') as f:
                f.write(data)
        root['blobs'] = blobs
        tm.commit()
    connection.close()


def read_blobs(db):
    tm = transaction.TransactionManager()
    connection = db.open(tm)
    try:
        blobs = connection.root()['blobs']
        result = {}
        for key, blob in blobs.items():
            with blob.open('r') as f:
                result[key] = f.read()
        return result
    finally:
        tm.abort()
        connection.close()


REVISIONS = [
    {'report': b'first draft', 'photo': b'\x89PNG' + bytes(range(256))},
    {'report': b'second draft'},
    {'empty': b'', 'photo': b'\x89PNG retouched'},
]
FINAL_BYTES = {'report': b'second draft', 'photo': b'\x89PNG retouched',
               'empty': b''}


class OnDiskCompatibilityTests(unittest.TestCase):
    """Blob directories move between stock ZODB and zodbblob unchanged."""

    def stock_blob_directory(self, name):
        """A blob directory that stock ZODB wrote with layout `name`."""
        base = temporary_directory(self)
        blob_dir = os.path.join(base, 'blobs')
        if name == 'bushy':
            # The way most deployments write one: FileStorage's own blobs.
            storage = ZODB.FileStorage.FileStorage(
                os.path.join(base, 'Data.fs'), blob_dir=blob_dir)
        else:
            storage = ZODB.blob.BlobStorage(
                blob_dir, ZODB.MappingStorage.MappingStorage(), layout=name)
        db = ZODB.DB(storage)
        commit_blobs(db, REVISIONS)
        stock = storage.fshelper
        on_disk = {}
        for _, oid_path in stock.listOIDs():
            for filename in os.listdir(oid_path):
                on_disk[stock.splitBlobFilename(
                    os.path.join(oid_path, filename))] = os.path.join(
                        oid_path, filename)
        db.close()
        return blob_dir, on_disk

    def test_zodbblob_reads_blob_directories_written_by_stock_zodb(self):
        for name in STOCK_LAYOUTS:
            with self.subTest(layout=name):
                blob_dir, on_disk = self.stock_blob_directory(name)
                self.assertEqual(len(on_disk), 5)
                ours = FilesystemHelper(blob_dir)
                self.assertEqual(ours.layout_name, name)
                ours.create()
                found = {(oid, tid): path
                         for oid, tid, path in ours.iter_blobs()}
                self.assertEqual(found, on_disk)
                for (oid, tid), path in on_disk.items():
                    self.assertEqual(ours.getBlobFilename(oid, tid), path)
                    self.assertTrue(os.path.isfile(path))

    def test_stock_zodb_reads_blob_directories_written_by_zodbblob(self):
        for name in STOCK_LAYOUTS:
            with self.subTest(layout=name):
                blob_dir = os.path.join(temporary_directory(self), 'blobs')
                ours = FilesystemHelper(blob_dir, name)
                ours.create()
                written = {}
                for oid, tid in random_revisions('stock' + name, 100):
                    written[oid, tid] = write_blob_file(ours, oid, tid)
                stock = ZODB.blob.FilesystemHelper(blob_dir)
                self.assertEqual(stock.layout_name, name)
                stock.create()
                self.assertEqual({oid for oid, path in stock.listOIDs()},
                                 {oid for oid, tid in written})
                found = {}
                for oid, oid_path in stock.listOIDs():
                    self.assertEqual(oid_path, ours.getPathForOID(oid))
                    for filename in os.listdir(oid_path):
                        path = os.path.join(oid_path, filename)
                        found[stock.splitBlobFilename(path)] = path
                self.assertEqual(found, written)
                for (oid, tid), path in written.items():
                    self.assertEqual(stock.getBlobFilename(oid, tid), path)


class StorageCompatibilityTests(unittest.TestCase):
    """Data.fs and blob directory open in either BlobStorage."""

    def paths(self):
        base = temporary_directory(self)
        return os.path.join(base, 'Data.fs'), os.path.join(base, 'blobs')

    def test_stock_zodb_reads_what_zodbblob_committed(self):
        for name in STOCK_LAYOUTS:
            with self.subTest(layout=name):
                data_fs, blob_dir = self.paths()
                db = ZODB.DB(zodbblob.BlobStorage(
                    blob_dir, ZODB.FileStorage.FileStorage(data_fs),
                    layout=name))
                commit_blobs(db, REVISIONS)
                db.close()
                db = ZODB.DB(ZODB.blob.BlobStorage(
                    blob_dir, ZODB.FileStorage.FileStorage(data_fs),
                    layout=name))
                try:
                    self.assertEqual(read_blobs(db), FINAL_BYTES)
                finally:
                    db.close()

    def test_zodbblob_reads_what_stock_zodb_committed(self):
        for name in STOCK_LAYOUTS:
            with self.subTest(layout=name):
                data_fs, blob_dir = self.paths()
                db = ZODB.DB(ZODB.blob.BlobStorage(
                    blob_dir, ZODB.FileStorage.FileStorage(data_fs),
                    layout=name))
                commit_blobs(db, REVISIONS)
                db.close()
                storage = zodbblob.BlobStorage(
                    blob_dir, ZODB.FileStorage.FileStorage(data_fs))
                db = ZODB.DB(storage)
                try:
                    self.assertEqual(storage.fshelper.layout_name, name)
                    self.assertEqual(read_blobs(db), FINAL_BYTES)
                finally:
                    db.close()
