"""ZEXP export and import: stock ZODB's format both ways, old files, damage."""

import contextlib
import gc
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

import transaction
import ZEO
import ZEO.ClientStorage
import zodbpickle
import zodbpickle.pickle
import ZODB
import ZODB.FileStorage
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from persistent.mapping import PersistentMapping
from persistent.wref import WeakRef
from ZODB.blob import Blob
from ZODB.TimeStamp import TimeStamp
from ZODB.POSException import ExportError
from ZODB.utils import oid_repr
from ZODB.utils import p64

from zodbblob import BlobStorage
from zodbblob.cli import main
from zodbblob.cli import zexp as zexp_command
from zodbblob.storage.catalog import KILL_POINT_VARIABLE
from zodbblob.testing import ZEOServerLayer
from zodbblob.tools import zexp
from zodbblob.tools.zexp import BLOB_MARKER
from zodbblob.tools.zexp import ImportReport
from zodbblob.tools.zexp import ZexpError
from zodbblob.tools.zexp import export as zexp_export
from zodbblob.tools.zexp import export_file
from zodbblob.tools.zexp import import_file
from zodbblob.tools.zexp import importer as zexp_importer


BIG = hashlib.sha256(b'big').digest() * (3 * 1024 * 1024 // 32 + 7)


class Ref:
    """Stands for a persistent reference while a test writes a record."""

    def __init__(self, oid):
        self.oid = oid


class Fussy(Persistent):
    """Refuses a state saying so, as a class with a strict setstate may."""

    def __setstate__(self, state):
        if state.get('refuse'):
            raise ValueError('refused')
        super().__setstate__(state)


def fill(folder, weak=True):
    """Nested objects with references, a cycle, a weak reference, blobs."""
    folder['empty'] = Blob(b'')
    folder['small'] = Blob(b'small blob')
    folder['big'] = Blob(BIG)
    folder['tree'] = OOBTree()
    for i in range(200):   # enough for the tree to have buckets of its own
        folder['tree']['item%03d' % i] = PersistentMapping(number=i)
    folder['tree']['item007']['blob'] = Blob(b'seven')
    folder['shared'] = folder['tree']['item100']
    folder['self'] = folder
    if weak:   # ZODB's importer cannot read weak references
        folder['weak'] = WeakRef(folder['tree']['item001'])


def snapshot(obj, seen=None):
    """A plain picture of `obj` and what it references, blobs read."""
    seen = {} if seen is None else seen
    if isinstance(obj, Blob):
        with obj.open() as f:
            return ('blob', hashlib.sha256(f.read()).hexdigest())
    if isinstance(obj, WeakRef):
        return ('weak', snapshot(obj(), seen))
    if isinstance(obj, (PersistentMapping, OOBTree)):
        if id(obj) in seen:
            return ('seen', seen[id(obj)])
        seen[id(obj)] = len(seen)
        return {key: snapshot(value, seen) for key, value in obj.items()}
    return obj


def blob_files(blob_dir):
    return sorted(os.path.relpath(os.path.join(d, name), blob_dir)
                  for d, dirs, names in os.walk(blob_dir)
                  for name in names
                  if name.endswith(('.blob', '.tmp', '.spb'))
                  or d.startswith(os.path.join(blob_dir, 'tmp')))


def strip_blob_blocks(data):
    """A ZEXP file as a storage without blob support writes it."""
    out, position = io.BytesIO(), 4
    out.write(data[:4])
    while data[position:position + 16] != zexp.END_MARKER:
        length = int.from_bytes(data[position + 8:position + 16], 'big')
        end = position + 16 + length
        out.write(data[position:end])
        position = end
        if data[position:position + len(BLOB_MARKER)] == BLOB_MARKER:
            start = position + len(BLOB_MARKER)
            position = start + 8 + int.from_bytes(data[start:start + 8],
                                                  'big')
    out.write(data[position:])
    return out.getvalue()


def close(db):
    # Tests close databases early; ZODB's DB.close fails a second time.
    with contextlib.suppress(AttributeError):
        db.close()


class ZexpTestCase(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-zexp-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.tm = transaction.TransactionManager()

    def path(self, *names):
        return os.path.join(self.dir, *names)

    def open_db(self, name='db', layout='bushy', stock=False, blobs=True,
                dedup=False):
        os.makedirs(self.path(name), exist_ok=True)
        data, blob_dir = self.path(name, 'Data.fs'), self.path(name, 'blobs')
        if stock:
            storage = ZODB.FileStorage.FileStorage(
                data, blob_dir=blob_dir if blobs else None,
                read_only=not blobs)
        else:
            storage = BlobStorage(blob_dir, ZODB.FileStorage.FileStorage(data),
                                  layout, dedup=dedup)
        db = ZODB.DB(storage)
        self.addCleanup(close, db)
        return db

    def make_source(self, name='source', weak=True, **kw):
        """A database with root['folder'] filled; closed again."""
        db = self.open_db(name, **kw)
        with db.transaction() as conn:
            fill(conn.root().setdefault('folder', PersistentMapping()), weak)
        with db.transaction() as conn:
            expected = snapshot(conn.root()['folder'])
        db.close()
        return expected

    def export_stock(self, name='source', path='stock.zexp', blobs=True):
        """Export root['folder'] with ZODB's own exportFile."""
        db = self.open_db(name, stock=True, blobs=blobs)
        with db.transaction() as conn:
            conn.exportFile(conn.root()['folder']._p_oid,
                            self.path(path)).close()
        db.close()
        return self.path(path)

    def connect(self, db):
        conn = db.open(transaction_manager=self.tm)
        self.addCleanup(conn.close)
        return conn

    def import_into(self, db, path, name='copy', **kw):
        conn = self.connect(db)
        obj = import_file(conn, path, **kw)
        conn.root()[name] = obj
        self.tm.commit()
        return conn.root()[name]


class RoundTripTests(ZexpTestCase):

    def test_ours_to_ours_keeps_objects_references_and_blobs(self):
        expected = self.make_source()
        db = self.open_db('source')
        conn = self.connect(db)
        folder = conn.root()['folder']
        report = export_file(conn, folder._p_oid, self.path('ours.zexp'))
        self.assertEqual((report.blobs, report.blob_bytes),
                         (4, len(BIG) + len(b'small blob') + 5))
        copy = self.import_into(db, self.path('ours.zexp'))
        self.assertEqual(snapshot(copy), expected)
        self.assertIs(copy['self'], copy)
        self.assertIs(copy['shared'], copy['tree']['item100'])
        self.assertIs(copy['weak'](), copy['tree']['item001'])
        self.assertNotEqual(copy._p_oid, folder._p_oid)
        self.assertNotEqual(copy['big']._p_oid, folder['big']._p_oid)

    def test_our_file_is_stocks_byte_for_byte(self):
        self.make_source()
        stock = self.export_stock()
        db = self.open_db('source')
        conn = self.connect(db)
        export_file(conn, conn.root()['folder']._p_oid, self.path('ours.zexp'))
        with open(stock, 'rb') as a, open(self.path('ours.zexp'), 'rb') as b:
            self.assertEqual(a.read(), b.read())

    def test_our_file_imports_with_stock_import_file(self):
        expected = self.make_source(weak=False)
        db = self.open_db('source')
        conn = self.connect(db)
        export_file(conn, conn.root()['folder']._p_oid, self.path('ours.zexp'))
        target = self.open_db('target', stock=True)
        with target.transaction() as conn:
            conn.root()['copy'] = conn.importFile(self.path('ours.zexp'))
        with target.transaction() as conn:
            self.assertEqual(snapshot(conn.root()['copy']), expected)

    def test_stock_file_imports_with_ours(self):
        expected = self.make_source(stock=True)
        stock = self.export_stock()
        target = self.open_db('target')
        copy = self.import_into(target, stock)
        self.assertEqual(snapshot(copy), expected)

    def test_nothing_is_stored_unless_the_caller_commits(self):
        self.make_source()
        stock = self.export_stock()
        target = self.open_db('target')
        before = target.storage.lastTransaction()
        conn = self.connect(target)
        import_file(conn, stock)
        self.tm.abort()
        self.assertEqual(target.storage.lastTransaction(), before)
        # Nothing committed; the uncommitted files go with their blobs
        # (ZODB's rule; the imported objects hold a cycle, so when the
        # garbage collector gets to them), and at the latest with the
        # storage's process directory when it closes.
        blobs = self.path('target', 'blobs')
        self.assertEqual([path for path in blob_files(blobs)
                          if not path.startswith('tmp' + os.sep)], [])
        conn.close()
        target.close()
        self.assertEqual(blob_files(blobs), [])

    def test_weak_reference_out_of_the_file_points_nowhere(self):
        db = self.open_db('source')
        with db.transaction() as conn:
            conn.root()['outside'] = outside = PersistentMapping()
            conn.root()['folder'] = PersistentMapping(weak=WeakRef(outside))
        conn = self.connect(db)
        export_file(conn, conn.root()['folder']._p_oid, self.path('w.zexp'))
        copy = self.import_into(db, self.path('w.zexp'))
        self.assertIsNone(copy['weak']())

    def test_references_to_another_database_stay_with_it(self):
        databases = {}
        db = ZODB.DB(BlobStorage(self.path('blobs'),
                                 ZODB.FileStorage.FileStorage(
                                     self.path('Data.fs'))),
                     databases=databases, database_name='main')
        self.addCleanup(close, db)
        other = ZODB.DB(None, databases=databases, database_name='other')
        self.addCleanup(close, other)
        with db.transaction() as conn:
            conn.get_connection('other').root()['target'] = (
                PersistentMapping())
        with db.transaction() as conn:
            target = conn.get_connection('other').root()['target']
            conn.root()['folder'] = PersistentMapping(link=target)
        conn = self.connect(db)
        export_file(conn, conn.root()['folder']._p_oid, self.path('x.zexp'))
        copy = self.import_into(db, self.path('x.zexp'))
        link = copy['link']
        self.assertIs(link._p_jar.db(), other)
        self.assertEqual(link._p_oid, target._p_oid)
        alone = self.open_db('alone')
        with self.assertRaisesRegex(ZexpError, "database 'other'"):
            import_file(self.connect(alone), self.path('x.zexp'))

    def test_export_refuses_a_missing_blob_file_and_writes_nothing(self):
        self.make_source()
        db = self.open_db('source')
        conn = self.connect(db)
        small = conn.root()['folder']['small']
        small._p_activate()
        os.remove(db.storage.loadBlob(small._p_oid, small._p_serial))
        with self.assertRaisesRegex(ExportError,
                                    'blob file of oid .* is missing'):
            export_file(conn, conn.root()['folder']._p_oid,
                        self.path('x.zexp'))
        self.assertEqual(os.listdir(self.dir), ['source'])


SAME = b'one content under three names\n' * 100


class DedupTests(ZexpTestCase):
    """Export from a deduplicated store; import where dedup is on (the
    copies are links, to each other and to an equal content already
    there) or off (plain files).  The bytes are the same either way."""

    def inodes(self, folder):
        """``{key: (st_ino, st_nlink)}`` of `folder`'s blobs' files."""
        return {key: (info.st_ino, info.st_nlink) for key, info in (
            (key, os.stat(blob.committed())) for key, blob in folder.items()
            if isinstance(blob, Blob))}

    def assert_bytes(self, folder):
        read = {}
        for key in folder:
            with folder[key].open() as f:
                read[key] = f.read()
        self.assertEqual(read, {'a': SAME, 'b': SAME, 'c': SAME,
                                'other': b'another content'})

    def export_deduplicated(self):
        db = self.open_db('source', dedup=True)
        with db.transaction() as conn:
            folder = conn.root()['folder'] = PersistentMapping()
            for key in ('a', 'b', 'c'):
                folder[key] = Blob(SAME)
            folder['other'] = Blob(b'another content')
        conn = self.connect(db)
        folder = conn.root()['folder']
        self.assertEqual(len(set(self.inodes(folder).values())), 2)
        export_file(conn, folder._p_oid, self.path('dedup.zexp'))
        self.tm.abort()
        conn.close()
        db.close()
        return self.path('dedup.zexp')

    def test_import_with_dedup_on_links_the_copies_and_what_was_there(self):
        path = self.export_deduplicated()
        db = self.open_db('target', dedup=True)
        with db.transaction() as conn:
            conn.root()['existing'] = Blob(SAME)
        copy = self.import_into(db, path)
        inodes = self.inodes(copy)
        existing = os.stat(self.connect(db).root()['existing'].committed())
        same = {inodes[key] for key in ('a', 'b', 'c')}
        self.assertEqual(same, {(existing.st_ino, 4)})
        self.assertEqual(inodes['other'][1], 1)
        self.assert_bytes(copy)

    def test_import_with_dedup_off_writes_plain_files(self):
        path = self.export_deduplicated()
        db = self.open_db('target')
        with db.transaction() as conn:
            conn.root()['existing'] = Blob(SAME)
        copy = self.import_into(db, path)
        inodes = self.inodes(copy)
        self.assertEqual(len(set(inodes.values())), 4)
        self.assertEqual({nlink for ino, nlink in inodes.values()}, {1})
        self.assert_bytes(copy)


class OldFileTests(ZexpTestCase):
    """Files whose blob records have no data after them."""

    def old_file(self, name='source'):
        """Export as stock ZODB does through a storage without blobs."""
        path = self.export_stock(name, 'old.zexp', blobs=False)
        with open(path, 'rb') as f:
            self.assertNotIn(BLOB_MARKER, f.read())
        return path

    def test_stock_zodb_cannot_import_an_old_file(self):
        self.make_source(weak=False)
        old = self.old_file()
        target = self.open_db('target', stock=True)
        conn = target.open()
        with self.assertRaisesRegex(ValueError, 'No data for blob object'):
            conn.importFile(old)
        transaction.abort()
        conn.close()

    def test_old_file_takes_blobs_from_the_source_in_every_layout(self):
        target = self.open_db('target')
        for layout in ('bushy', 'lawn', 'chunky', 'flat'):
            with self.subTest(layout=layout):
                expected = self.make_source(layout, layout=layout)
                old = self.old_file(layout)
                report = ImportReport()
                copy = self.import_into(
                    target, old, layout, report=report,
                    source_blob_dir=self.path(layout, 'blobs'))
                self.assertEqual(snapshot(copy), expected)
                self.assertEqual(report.empty_blobs, [])
                self.assertEqual(len(report.source_blobs), 4)
                self.assertEqual(report.guessed_blobs, [])

    def test_old_file_takes_blobs_from_a_zeo_client_cache(self):
        expected = self.make_source()
        old = self.old_file()
        cache = self.path('cache')
        layout = ZEO.ClientStorage.BlobCacheLayout()
        source = self.open_db('source')
        for oid, tid, path in source.storage.fshelper.iter_blobs():
            target = os.path.join(cache, layout.getBlobFilePath(oid, tid))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(path, target)
        source.close()
        with open(os.path.join(cache, '.layout'), 'w') as f:
            f.write('zeocache')
        copy = self.import_into(self.open_db('target'), old,
                                source_blob_dir=cache)
        self.assertEqual(snapshot(copy), expected)

    def test_old_file_without_source_imports_empty_blobs_and_reports(self):
        expected = self.make_source()
        old = self.old_file()
        report = ImportReport()
        copy = self.import_into(self.open_db('target'), old, report=report)
        empty = ('blob', hashlib.sha256(b'').hexdigest())
        expected.update(empty=empty, small=empty, big=empty)
        expected['tree']['item007']['blob'] = empty
        self.assertEqual(snapshot(copy), expected)
        self.assertEqual(
            sorted(new for old, new in report.empty_blobs),
            sorted([copy['empty']._p_oid, copy['small']._p_oid,
                    copy['big']._p_oid, copy['tree']['item007']['blob']
                    ._p_oid]))
        self.assertEqual(len(report.lines()), 4)

    def test_a_python_2_era_file_with_an_unmarked_lawn_directory(self):
        # Protocol 1 pickles, the (module, name) class form, oids as Python
        # 2 strings, and the blob directory of ZODB 3.8: lawn, no marker.
        def record(meta, state):
            f = io.BytesIO()
            pickler = zodbpickle.pickle.Pickler(f, 1)
            pickler.persistent_id = lambda obj: (
                zodbpickle.binary(obj.oid) if isinstance(obj, Ref) else None)
            pickler.dump(meta)
            pickler.dump(state)
            return f.getvalue()

        folder, doc, blob = p64(1), p64(0x85), p64(3)
        records = [
            (folder, record((('persistent.mapping', 'PersistentMapping'),
                             None),
                            {'data': {'doc': Ref(doc), 'blob': Ref(blob)}})),
            (doc, record(PersistentMapping, {'data': {'title': 'Doc'}})),
            (blob, record(Blob, None)),
        ]
        path = self.path('zope2.zexp')
        with open(path, 'wb') as f:
            f.write(b'ZEXP')
            for oid, data in records:
                f.write(oid + p64(len(data)) + data)
            f.write(zexp.END_MARKER)
        lawn = self.path('old-blobs', '0x03')
        os.makedirs(lawn)
        tid = TimeStamp(2009, 5, 1, 12, 0, 0).raw()
        with open(os.path.join(lawn, oid_repr(tid) + '.blob'), 'wb') as f:
            f.write(b'from 2009')
        copy = self.import_into(self.open_db('target'), path,
                                source_blob_dir=self.path('old-blobs'))
        self.assertEqual(copy['doc']['title'], 'Doc')
        with copy['blob'].open() as f:
            self.assertEqual(f.read(), b'from 2009')

    def test_a_blob_the_source_lacks_is_imported_empty_and_reported(self):
        self.make_source()
        old = self.old_file()
        source = self.path('source', 'blobs')
        db = self.open_db('source')
        small = db.open().root()['folder']['small']
        small._p_activate()
        os.remove(db.storage.loadBlob(small._p_oid, small._p_serial))
        db.close()
        report = ImportReport()
        copy = self.import_into(self.open_db('target'), old, report=report,
                                source_blob_dir=source)
        self.assertEqual(report.empty_blobs,
                         [(small._p_oid, copy['small']._p_oid)])
        with copy['big'].open() as f:
            self.assertEqual(f.read(), BIG)

    def test_of_several_revisions_the_one_current_when_written_is_taken(self):
        self.make_source()
        old = self.old_file()
        db = self.open_db('source')
        with db.transaction() as conn:
            small = conn.root()['folder']['small']
            small._p_activate()
            first = small._p_serial
            with small.open('w') as f:
                f.write(b'changed after the export')
        with db.transaction() as conn:
            second = conn.root()['folder']['small']._p_serial
        db.close()
        between = (TimeStamp(first).timeTime()
                   + TimeStamp(second).timeTime()) / 2
        os.utime(old, (between, between))
        target = self.open_db('target')
        source = self.path('source', 'blobs')
        report = ImportReport()
        copy = self.import_into(target, old, report=report,
                                source_blob_dir=source)
        with copy['small'].open() as f:
            self.assertEqual(f.read(), b'small blob')
        self.assertEqual([new for old_oid, new, path
                          in report.guessed_blobs], [copy['small']._p_oid])
        # A file copied since (its time is now) is taken as the newest.
        os.utime(old)
        copy = self.import_into(target, old, 'again',
                                source_blob_dir=source)
        with copy['small'].open() as f:
            self.assertEqual(f.read(), b'changed after the export')


class DamagedFileTests(ZexpTestCase):

    def setUp(self):
        super().setUp()
        self.make_source()
        with open(self.export_stock(), 'rb') as f:
            self.good = f.read()
        self.target = self.open_db('target')
        with self.target.transaction() as conn:
            conn.root()['kept'] = Blob(b'kept')
        self.blob_dir = self.path('target', 'blobs')
        self.before = (self.target.storage.lastTransaction(),
                       blob_files(self.blob_dir))

    def refused(self, data, offset=None, problem=''):
        path = self.path('damaged.zexp')
        with open(path, 'wb') as f:
            f.write(data)
        conn = self.connect(self.target)
        with self.assertRaises(ZexpError) as caught:
            import_file(conn, path)
        error = caught.exception
        self.assertIn(path, str(error))
        self.assertIn(f'at byte {error.offset}', str(error))
        self.assertIn(problem, str(error))
        if offset is not None:
            self.assertEqual(error.offset, offset)
        self.tm.abort()
        self.assertEqual((self.target.storage.lastTransaction(),
                          blob_files(self.blob_dir)), self.before)
        return error

    def test_truncated_files_are_refused_with_the_offset(self):
        first_length = int.from_bytes(self.good[12:20], 'big')
        blob = self.good.index(BLOB_MARKER)
        cuts = [0, 2, 4, 11, 20, 20 + first_length // 2, blob + 3, blob + 14,
                blob + 40, len(self.good) // 2, len(self.good) - 16,
                len(self.good) - 1]
        for cut in cuts:
            with self.subTest(cut=cut):
                error = self.refused(self.good[:cut], problem='truncated')
                self.assertLessEqual(error.offset, cut)

    def test_corrupt_files_are_refused_with_the_offset(self):
        good = self.good
        first_length = int.from_bytes(good[12:20], 'big')
        second = 20 + first_length
        damaged = {
            'magic': (b'ZEXQ' + good[4:], 0, 'not a ZEXP file'),
            'length': (good[:12] + b'\x7f' + good[13:], 4, 'claims'),
            'pickle': (good[:21] + b'\xfe' + good[22:], 4, 'cannot be read'),
            'state': (good[:second - 1] + b'\xfe' + good[second:], 4,
                      'cannot be read'),
            'padding': (good[:12] + p64(first_length + 1) + good[20:second]
                        + b'.' + good[second:], 4, 'bytes after its state'),
            'after end': (good + b'x', len(good), 'after the end marker'),
            'duplicate': (good[:second] + good[4:second] + good[second:],
                          second, 'second record of oid'),
        }
        for name, (data, offset, problem) in damaged.items():
            with self.subTest(name):
                self.refused(data, offset, problem)

    def test_a_refused_file_adds_nothing_to_the_transaction(self):
        conn = self.connect(self.target)
        conn.root()['mine'] = 1
        path = self.path('damaged.zexp')
        with open(path, 'wb') as f:
            f.write(self.good[:-1])
        with self.assertRaises(ZexpError):
            import_file(conn, path)
        self.tm.commit()
        with self.target.transaction() as check:
            self.assertEqual(sorted(check.root()), ['kept', 'mine'])
        # One record changed (the root), nothing added.
        self.assertEqual(len(self.target.storage), 2)

    def test_an_unimportable_class_is_refused_before_anything_is_added(self):
        data = self.good.replace(b'persistent.mapping\nPersistentMapping',
                                 b'persistent.mapping\nPersistentMappinX')
        self.refused(data, 4, 'persistent.mapping.PersistentMappinX')

    def test_a_failure_while_making_objects_rolls_the_import_back(self):
        db = self.open_db('fussy')
        with db.transaction() as conn:
            conn.root()['folder'] = PersistentMapping(
                blob=Blob(b'x'), fussy=Fussy())
        with db.transaction() as conn:
            conn.root()['folder']['fussy'].refuse = True
        conn = self.connect(db)
        export_file(conn, conn.root()['folder']._p_oid, self.path('f.zexp'))
        conn.root()['mine'] = 1
        with self.assertRaisesRegex(ValueError, 'refused'):
            import_file(conn, self.path('f.zexp'))
        self.tm.commit()
        gc.collect()
        with db.transaction() as check:
            self.assertEqual(check.root()['mine'], 1)
        self.assertEqual(len(db.storage), 4)   # root, folder, blob, fussy
        self.assertEqual(len(blob_files(self.path('fussy', 'blobs'))), 1)


class Terminal(io.StringIO):

    def isatty(self):
        return True


@contextlib.contextmanager
def output():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


class CommandTests(ZexpTestCase):

    def setUp(self):
        super().setUp()
        self.expected = self.make_source()
        self.storage = ['--data', self.path('source', 'Data.fs'),
                        '--blob-dir', self.path('source', 'blobs')]

    def run_main(self, *args):
        with output() as (out, err):
            status = main(list(args))
        return status, out.getvalue(), err.getvalue()

    def snapshot_at(self, *keys):
        """A snapshot of the object at `keys`; the database closed again."""
        db = self.open_db('source')
        try:
            with db.transaction() as conn:
                obj = conn.root()
                for key in keys:
                    obj = obj[key]
                return snapshot(obj)
        finally:
            db.close()

    def test_export_then_import_into_a_container(self):
        status, out, err = self.run_main(
            'export', *self.storage, '--path', '/folder/tree/item007',
            self.path('seven.zexp'))
        self.assertEqual(status, 0, err)
        self.assertIn('2 objects, 1 blobs', out)
        status, out, err = self.run_main(
            'import', *self.storage, '--path', '/folder/tree',
            self.path('seven.zexp'))
        self.assertEqual(status, 0, err)
        self.assertIn('imported as /folder/tree/seven', out)
        self.assertEqual(self.snapshot_at('folder', 'tree', 'seven'),
                         self.expected['tree']['item007'])

    def test_import_of_an_old_file_names_its_empty_blobs(self):
        old = self.export_stock('source', 'old.zexp', blobs=False)
        status, out, err = self.run_main(
            'import', *self.storage, '--name', 'empty', old)
        self.assertEqual(status, 1, err)
        self.assertIn('imported as /empty', out)
        self.assertEqual(err.count('empty blob: oid'), 4, err)
        status, out, err = self.run_main(
            'import', *self.storage, '--source-blob-dir',
            self.path('source', 'blobs'), old)
        self.assertEqual(status, 0, err)
        self.assertEqual(err, '')
        self.assertEqual(self.snapshot_at('old'), self.expected)

    def test_import_names_each_empty_blob_once_and_exits_1(self):
        old = self.export_stock('source', 'old.zexp', blobs=False)
        # In a process of its own, as a user runs it: no logging configured.
        result = subprocess.run(
            [sys.executable, '-m', 'zodbblob.cli', 'import', *self.storage,
             '--quiet', old],
            capture_output=True, text=True, timeout=120, check=False)
        self.assertEqual(result.returncode, 1, result.stderr)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 4, result.stderr)
        for line in lines:
            self.assertRegex(line, r'^empty blob: oid 0x[0-9a-f]+ \(oid '
                                   r'0x[0-9a-f]+ in the file\) has no data')

    def test_progress_shows_on_a_terminal_unless_quiet(self):
        path = self.path('f.zexp')
        for command, args in [('export', ('--path', '/folder', path)),
                              ('import', ('--name', 'a', path)),
                              ('import', ('--name', 'b', '--quiet', path))]:
            terminal = Terminal()
            with output() as (out, _), contextlib.redirect_stderr(terminal):
                self.assertEqual(main([command, *self.storage, *args]), 0)
            with self.subTest(command=command, args=args):
                if '--quiet' in args:
                    self.assertEqual(terminal.getvalue(), '')
                else:
                    self.assertIn(f'\r{command} [', terminal.getvalue())
                    self.assertTrue(terminal.getvalue().endswith(
                        '100% {0}/{0}\n'.format(
                            terminal.getvalue().rsplit('/', 1)[1][:-1])))
                self.assertIn(path, out.getvalue())

    def test_errors_name_the_thing_and_change_nothing(self):
        path = self.path('f.zexp')
        self.assertEqual(self.run_main('export', *self.storage, '--path',
                                       '/folder', path)[0], 0)
        with open(path, 'rb') as f:
            good = f.read()
        with open(path, 'wb') as f:
            f.write(good[:100])
        before = blob_files(self.path('source', 'blobs'))
        for args, message in [
                (('--path', '/nowhere'), "no object at / has a key "
                                         "'nowhere'"),
                (('--path', '/folder', '--name', 'small'),
                 "/folder already holds 'small'"),
                (('--name', 'x'), f'Cannot import {path}: truncated'),
                (('--source-blob-dir', self.path('no')),
                 f'--source-blob-dir {self.path("no")}: no such directory'),
        ]:
            with self.subTest(args):
                status, out, err = self.run_main('import', *self.storage,
                                                 *args, path)
                self.assertEqual(status, 2)
                self.assertIn(message, err)
        missing = self.path('missing.zexp')
        status, out, err = self.run_main('import', *self.storage, missing)
        self.assertEqual(status, 2)
        self.assertIn(f'{missing}: no such file', err)
        self.assertEqual(sorted(self.snapshot_at()), ['folder'])
        self.assertEqual(blob_files(self.path('source', 'blobs')), before)

    def test_export_reads_beside_a_live_storage_and_import_refuses_it(self):
        holder = subprocess.Popen(
            [sys.executable, '-c',
             'import sys, ZODB.FileStorage, zodbblob\n'
             's = zodbblob.BlobStorage(sys.argv[2], '
             'ZODB.FileStorage.FileStorage(sys.argv[1]))\n'
             'print("open", flush=True)\n'
             'sys.stdin.read()\n', *self.storage[1::2]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(holder.wait)
        self.addCleanup(holder.stdin.close)
        self.assertEqual(holder.stdout.readline().strip(), b'open')
        holder.stdout.close()
        status, out, err = self.run_main('export', *self.storage, '--path',
                                         '/folder', self.path('f.zexp'))
        self.assertEqual(status, 0, err)
        db = self.open_db('copy')
        self.assertEqual(snapshot(self.import_into(db, self.path('f.zexp'))),
                         self.expected)
        db.close()
        with open(self.path('g.zexp'), 'wb') as f:
            f.write(b'ZEXP' + zexp.END_MARKER)
        status, out, err = self.run_main('import', *self.storage,
                                         self.path('g.zexp'))
        self.assertEqual(status, 2)
        self.assertIn('the storage is in use by another process', err)

    def test_export_during_a_pack_that_removed_its_blobs_says_run_again(
            self):
        live = self.open_db('source')
        write_blob = zexp_export._write_blob
        packed = []

        def pack_then_write(*args):
            # Once the export has its view: new revisions of every blob,
            # and a pack that removes the files of the ones it exports.
            if not packed:
                with live.transaction() as conn:
                    folder = conn.root()['folder']
                    for blob in (folder['empty'], folder['small'],
                                 folder['big'],
                                 folder['tree']['item007']['blob']):
                        with blob.open('w') as f:
                            f.write(b'new')
                live.pack(time.time() + 1)
                packed.append(True)
            return write_blob(*args)

        path = self.path('f.zexp')
        with mock.patch.object(zexp_export, '_write_blob',
                               side_effect=pack_then_write):
            status, out, err = self.run_main('export', *self.storage,
                                             '--quiet', '--path', '/folder',
                                             path)
        self.assertEqual(packed, [True])
        self.assertEqual(status, 2, err)
        self.assertEqual(out, '')
        data_fs = self.path('source', 'Data.fs')
        self.assertEqual(err, f'zodbblob export: error: {data_fs} was '
                              f'replaced (packed?) while export read it: '
                              f'{path} not written; run the export again\n')
        self.assertEqual(sorted(os.listdir(self.dir)), ['source'])
        status, out, err = self.run_main('export', *self.storage, '--quiet',
                                         '--path', '/folder', path)
        self.assertEqual(status, 0, err)
        live.close()
        db = self.open_db('copy')
        folder = self.import_into(db, path)
        with folder['small'].open() as f:
            self.assertEqual(f.read(), b'new')

    def test_export_opened_as_a_pack_replaced_data_fs_says_run_again(self):
        live = self.open_db('source')
        with live.transaction() as conn:
            conn.root()['folder']['small'] = Blob(b'second revision')
        open_storage = zexp_command.open_storage

        def open_then_pack(*args, **kw):
            # The index read from the file a pack then replaces.
            storage = open_storage(*args, **kw)
            live.pack(time.time() + 1)
            return storage

        path = self.path('f.zexp')
        with mock.patch.object(zexp_command, 'open_storage',
                               side_effect=open_then_pack):
            status, out, err = self.run_main('export', *self.storage,
                                             '--quiet', '--path', '/folder',
                                             path)
        self.assertEqual(status, 2, err)
        self.assertEqual(out, '')
        self.assertEqual(err, f'zodbblob export: error: '
                              f'{self.path("source", "Data.fs")} was '
                              f'replaced (packed?) while export read it: '
                              f'{path} not written; run the export again\n')
        self.assertEqual(sorted(os.listdir(self.dir)), ['source'])

    def test_export_skipping_a_dangling_reference_names_it_and_exits_1(
            self):
        db = self.open_db('source')
        with db.transaction() as conn:
            ghost = PersistentMapping()
            # A reference to an oid no transaction stored.
            ghost._p_oid, ghost._p_jar = conn.db().storage.new_oid(), conn
            conn.root()['folder']['ghost'] = ghost
        db.close()
        path = self.path('f.zexp')
        # In a process of its own, as a user runs it: no logging configured.
        result = subprocess.run(
            [sys.executable, '-m', 'zodbblob.cli', 'export', *self.storage,
             '--quiet', '--path', '/folder', path],
            capture_output=True, text=True, timeout=120, check=False)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn(f'{path}: exported /folder', result.stdout)
        self.assertEqual(result.stderr,
                         f'skipped: oid {oid_repr(ghost._p_oid)} is '
                         f'referenced but not in the database\n')

    def test_export_of_a_database_without_a_root_says_so(self):
        os.mkdir(self.path('new'))
        data_fs = self.path('new', 'Data.fs')
        BlobStorage(self.path('new', 'blobs'),
                    ZODB.FileStorage.FileStorage(data_fs)).close()
        path = self.path('f.zexp')
        status, out, err = self.run_main(
            'export', '--data', data_fs, '--blob-dir',
            self.path('new', 'blobs'), path)
        self.assertEqual(status, 2)
        self.assertEqual(out, '')
        self.assertEqual(err, f'zodbblob export: error: {data_fs} holds no '
                              f'root object (no client has opened the '
                              f'database yet): nothing to export\n')
        self.assertFalse(os.path.exists(path))

    def test_interrupted_export_exits_130_and_leaves_no_file(self):
        path = self.path('f.zexp')
        with mock.patch.object(zexp_export, '_write_blob',
                               side_effect=KeyboardInterrupt):
            try:
                status, out, err = self.run_main(
                    'export', *self.storage, '--quiet', '--path', '/folder',
                    path)
            except KeyboardInterrupt:
                status = 'a traceback'
        self.assertEqual(status, 130)
        self.assertEqual(out, '')
        self.assertEqual(err, f'zodbblob export: error: interrupted: {path} '
                              f'not written\n')
        self.assertEqual(sorted(os.listdir(self.dir)), ['source'])

    def test_interrupted_import_leaves_nothing_and_can_be_run_again(self):
        path = self.path('f.zexp')
        self.run_main('export', *self.storage, '--path', '/folder', path)
        before = blob_files(self.path('source', 'blobs'))
        with mock.patch.object(zexp_importer, '_fill_blob',
                               side_effect=KeyboardInterrupt):
            status, out, err = self.run_main('import', *self.storage, path)
        self.assertEqual(status, 130)
        self.assertIn('interrupted: nothing of', err)
        env = dict(os.environ)
        # Before the base commits, in either commit protocol (the command
        # opens Data.fs itself, so it commits with one sync).
        env[KILL_POINT_VARIABLE] = 'after_base_vote'
        killed = subprocess.run(
            [sys.executable, '-m', 'zodbblob.cli', 'import', *self.storage,
             path], env=env, capture_output=True, timeout=120)
        self.assertEqual(killed.returncode, -signal.SIGKILL)
        self.assertEqual(sorted(self.snapshot_at()), ['folder'])
        self.assertEqual(blob_files(self.path('source', 'blobs')), before)
        env.pop(KILL_POINT_VARIABLE)
        again = subprocess.run(
            [sys.executable, '-m', 'zodbblob.cli', 'import', *self.storage,
             path], env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertRegex(again.stdout, r'imported as /f: \d+ objects, 4 blobs')
        self.assertEqual(self.snapshot_at('f'), self.expected)


# A server of our own: the test commits into it, which the shared
# ZEO_SERVER layer's other users should not see.
EXPORT_SERVER = ZEOServerLayer(name='EXPORT_SERVER', module=__name__)


def blob_bytes(generation, number):
    return b'%d:%d;' % (generation, number) * 300


class LiveServerExportTests(unittest.TestCase):
    """``zodbblob export`` of a store a ``zodbblob serve`` process serves
    while a ZEO client commits to it."""

    layer = EXPORT_SERVER
    level = 2
    blobs = 20

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-zexp-live-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        # server_sync: a transaction begins with a round trip, so it sees
        # what another client committed before (invalidations are sent
        # ahead of the answer).
        self.db = ZEO.DB(self.layer.address, server_sync=True,
                         blob_dir=os.path.join(self.dir, 'cache'))
        self.addCleanup(close, self.db)
        self.storage = ['--data', self.layer.data_fs,
                        '--blob-dir', self.layer.blob_dir]

    def zodbblob(self, *args):
        return subprocess.run(
            [sys.executable, '-m', 'zodbblob.cli', *args],
            capture_output=True, text=True, timeout=300, check=False)

    def commit_generation(self, generation):
        """Every blob of root['folder'] rewritten, in one transaction."""
        with self.db.transaction() as conn:
            folder = conn.root().setdefault('folder', PersistentMapping())
            folder['generation'] = generation
            for number in range(self.blobs):
                blob = folder.setdefault(f'b{number}', Blob())
                with blob.open('w') as f:
                    f.write(blob_bytes(generation, number))

    def committer(self, stop, committed):
        generation = committed[-1]
        while not stop.is_set():
            generation += 1
            self.commit_generation(generation)
            committed.append(generation)

    def wait_for(self, committed, count, thread):
        deadline = time.monotonic() + 120
        while len(committed) < count:
            self.assertTrue(thread.is_alive(), 'the committer failed')
            self.assertLess(time.monotonic(), deadline,
                            'the committer made no progress')
            time.sleep(0.01)

    def assertOneGeneration(self, folder, at_least):
        """`folder` is one committed state: every blob of its generation."""
        generation = folder['generation']
        self.assertGreaterEqual(generation, at_least)
        for number in range(self.blobs):
            with folder[f'b{number}'].open() as f:
                self.assertEqual(f.read(), blob_bytes(generation, number),
                                 f'blob b{number} of generation '
                                 f'{generation}')
        return generation

    def test_export_beside_a_live_server_imports_elsewhere_with_its_bytes(
            self):
        self.commit_generation(0)
        stop, committed = threading.Event(), [0]
        thread = threading.Thread(target=self.committer,
                                  args=(stop, committed))
        thread.start()
        try:
            self.wait_for(committed, 3, thread)
            before_export = committed[-1]
            path = os.path.join(self.dir, 'folder.zexp')
            exported = self.zodbblob('export', *self.storage, '--path',
                                     '/folder', path)
            self.wait_for(committed, len(committed) + 2, thread)
        finally:
            stop.set()
            thread.join()
        self.assertEqual(exported.returncode, 0, exported.stderr)
        self.assertIn(f'{self.blobs} blobs', exported.stdout)

        # Into another zodbblob storage, by the command ...
        os.mkdir(os.path.join(self.dir, 'copy'))
        copy = ['--data', os.path.join(self.dir, 'copy', 'Data.fs'),
                '--blob-dir', os.path.join(self.dir, 'copy', 'blobs')]
        ZODB.DB(BlobStorage(copy[3], ZODB.FileStorage.FileStorage(
            copy[1]))).close()
        imported = self.zodbblob('import', *copy, path)
        self.assertEqual(imported.returncode, 0, imported.stderr)
        db = ZODB.DB(BlobStorage(copy[3], ZODB.FileStorage.FileStorage(
            copy[1])))
        try:
            with db.transaction() as conn:
                generation = self.assertOneGeneration(
                    conn.root()['folder'], before_export)
        finally:
            db.close()

        # ... and into a stock FileStorage, by stock importFile.
        stock = ZODB.DB(ZODB.FileStorage.FileStorage(
            os.path.join(self.dir, 'stock.fs'),
            blob_dir=os.path.join(self.dir, 'stock-blobs')))
        try:
            with stock.transaction() as conn:
                conn.root()['folder'] = conn.importFile(path)
            with stock.transaction() as conn:
                self.assertEqual(self.assertOneGeneration(
                    conn.root()['folder'], before_export), generation)
        finally:
            stock.close()

        # The server went on serving: the committer committed after the
        # export, and a new client commits and reads back.
        self.assertGreater(committed[-1], generation)
        other = ZEO.DB(self.layer.address,
                       blob_dir=os.path.join(self.dir, 'cache2'))
        try:
            with other.transaction() as conn:
                conn.root()['after'] = Blob(b'after the export')
        finally:
            other.close()
        with self.db.transaction() as conn, \
                conn.root()['after'].open() as f:
            self.assertEqual(f.read(), b'after the export')


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
