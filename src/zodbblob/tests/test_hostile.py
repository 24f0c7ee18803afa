"""Oids and tids that are not 8 bytes, from a ZEO client or anyone else.

``oid_repr`` writes ``repr()`` for an id of another length, slashes and
``..`` included: a path built from it can leave the blob directory.  Every
layout, the storage, the commit log and the ZEO client refuse such an id
before any file is touched; a real ``zodbblob serve`` process refuses a
raw ZEO client's hostile ``storeBlob*`` and ``sendBlob`` calls and goes on
serving the others.
"""

import collections
import os
import shutil
import tempfile
import unittest

import transaction
import ZEO.ClientStorage
import ZODB
import ZODB.FileStorage
from ZEO.Exceptions import ServerException
from ZODB.blob import Blob
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import StorageTransactionError
from ZODB.utils import p64, z64

import zodbblob
from zodbblob.cli import format_address
from zodbblob.layout import LAYOUTS, FilesystemHelper, InvalidIdError
from zodbblob.storage import INLINE_LIMIT
from zodbblob.storage.commitlog import CommitLog, Entry, commit_log_path
from zodbblob.testing import ServerProcess, free_port, serve_command
from zodbblob.tests.test_config import commit_blob, read_blob
from zodbblob.zeo import ClientStorage

LAYOUT_NAMES = ('bushy', 'lawn', 'chunky', 'flat')


def escaping_id(levels_up, *names):
    """An "id": 8 zero bytes, then `levels_up` times ``/..`` and `names`.

    ``oid_repr`` of it is ``b'\\x00...\\x00/../..../NAME'``: below the
    blob directory, a path `levels_up - 1` levels above it.
    """
    return z64 + b'/..' * levels_up + b''.join(
        b'/' + name.encode() for name in names)


def tree(path, skip=()):
    """Every entry below `path` (relative names), but those in `skip`."""
    found = set()
    for directory, dirs, names in os.walk(path):
        for name in dirs + names:
            relative = os.path.relpath(os.path.join(directory, name), path)
            if not relative.startswith(skip):
                found.add(relative)
    return found


class TemporaryDirectory(unittest.TestCase):

    prefix = 'zodbblob-hostile-'

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix=self.prefix)
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.addCleanup(transaction.abort)

    def path(self, *names):
        return os.path.join(self.directory, *names)


class LayoutTests(TemporaryDirectory):

    def test_every_layout_refuses_an_oid_or_tid_that_is_not_8_bytes(self):
        tid = p64(0x03e1)
        for name in LAYOUT_NAMES:
            layout = LAYOUTS[name]
            with self.subTest(layout=name):
                for oid in (z64[:7], z64 + b'\0', escaping_id(2, 'x'),
                            '0x01', -1, 1 << 64, None):
                    self.assertRaises(InvalidIdError, layout.oid_to_path, oid)
                    self.assertRaises(InvalidIdError, layout.oid_directory,
                                      oid)
                    self.assertRaises(InvalidIdError, layout.getBlobFilePath,
                                      oid, tid)
                    self.assertRaises(InvalidIdError, layout.getBlobFilePath,
                                      p64(1), oid)

    def test_the_helper_refuses_before_creating_anything(self):
        for name in LAYOUT_NAMES:
            with self.subTest(layout=name):
                blob_dir = self.path(name, 'blobs')
                fshelper = FilesystemHelper(blob_dir, name)
                fshelper.create()
                before = tree(self.path(name))
                oid = escaping_id(3, 'outside', 'x')
                with self.assertRaises(InvalidIdError) as caught:
                    fshelper.createPathForOID(oid)
                message = str(caught.exception)
                self.assertIn('Refused oid', message)
                self.assertIn(fshelper.base_dir, message)
                self.assertIn('exactly 8 bytes, this is 27 bytes', message)
                self.assertNotIn('\n', message)
                self.assertRaises(InvalidIdError, fshelper.blob_mkstemp,
                                  oid, p64(1))
                self.assertRaises(InvalidIdError, fshelper.blob_mkstemp,
                                  p64(1), oid)
                self.assertRaises(InvalidIdError, fshelper.getBlobFilename,
                                  p64(1), z64 + b'/../x')
                self.assertEqual(tree(self.path(name)), before)

    def test_integer_ids_still_name_their_8_bytes(self):
        fshelper = FilesystemHelper(self.path('blobs'), 'lawn')
        self.assertEqual(fshelper.getBlobFilename(1, 2),
                         fshelper.getBlobFilename(p64(1), p64(2)))

    def test_a_long_id_is_shown_cut_on_one_line(self):
        with self.assertRaises(InvalidIdError) as caught:
            LAYOUTS['lawn'].oid_to_path(b'\n' * 10000)
        message = str(caught.exception)
        self.assertLess(len(message), 200)
        self.assertNotIn('\n', message)
        self.assertIn('this is 10000 bytes', message)


class StorageTests(TemporaryDirectory):

    def open(self, layout, where='.'):
        storage = zodbblob.BlobStorage(
            self.path(where, 'blobs'),
            ZODB.FileStorage.FileStorage(self.path(where, 'Data.fs')), layout)
        self.addCleanup(storage.close)
        return storage

    def new_file(self, data=b'hostile bytes'):
        fd, path = tempfile.mkstemp(dir=self.directory, suffix='.upload')
        os.write(fd, data)
        os.close(fd)
        return path

    def test_store_blob_refuses_the_oid_before_taking_the_file(self):
        for layout in ('lawn', 'flat'):
            with self.subTest(layout=layout):
                os.mkdir(self.path(layout))
                storage = self.open(layout, layout)
                upload = self.new_file()
                before = tree(self.directory)
                txn = TransactionMetaData()
                storage.tpc_begin(txn)
                with self.assertRaises(InvalidIdError) as caught:
                    storage.storeBlob(escaping_id(3, 'outside', 'x'), z64,
                                      b'data', upload, '', txn)
                storage.tpc_abort(txn)
                self.assertIn(storage.fshelper.base_dir,
                              str(caught.exception))
                # Still the caller's, where it was: nothing was moved.
                self.assertEqual(tree(self.directory), before)
                # And the storage commits as before.
                db = ZODB.DB(storage)
                commit_blob(db, b'after')
                self.assertEqual(read_blob(db), b'after')
                db.close()

    def test_store_and_restore_refuse_the_oid_before_the_base_sees_it(self):
        storage = self.open('bushy')
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        self.assertRaises(InvalidIdError, storage.store, z64 + b'\0', z64,
                          b'data', '', txn)
        self.assertRaises(InvalidIdError, storage.restore, z64 + b'\0',
                          p64(1), b'data', '', None, txn)
        self.assertRaises(InvalidIdError, storage.restore, p64(1),
                          z64 + b'\0', b'data', '', None, txn)
        storage.tpc_abort(txn)
        # Nothing reached the base: it commits, and closes, as before.
        db = ZODB.DB(storage)
        commit_blob(db, b'after')
        self.assertEqual(read_blob(db), b'after')
        db.close()

    def test_restore_blob_refuses_oid_and_serial(self):
        storage = self.open('lawn')
        upload = self.new_file()
        txn = TransactionMetaData()
        storage.tpc_begin(txn, p64(5))
        self.assertRaises(InvalidIdError, storage.restoreBlob,
                          escaping_id(1, 'x'), p64(5), b'data', upload,
                          None, txn)
        self.assertRaises(InvalidIdError, storage.restoreBlob,
                          p64(1), escaping_id(1, 'x'), b'data', upload,
                          None, txn)
        storage.tpc_abort(txn)
        self.assertTrue(os.path.exists(upload))

    def test_load_blob_never_names_a_file_outside_the_blob_dir(self):
        storage = self.open('lawn')
        db = ZODB.DB(storage)
        commit_blob(db, b'inside')
        with db.transaction() as connection:
            blob = connection.root()['blob']
            blob._p_activate()
            oid, tid = blob._p_oid, blob._p_serial
        # A secret beside the blob directory, and the directory that a
        # serial holding '/..' would walk through, as an earlier hostile
        # store could have made it: without the check, loadBlob names
        # the secret (``oid_repr`` of the serial ends in a quote).
        with open(self.path("secret'.blob"), 'w') as f:
            f.write('not a blob')
        serial = escaping_id(3, 'secret')
        first = self.path('blobs', storage.fshelper.layout.oid_to_path(oid),
                          repr(serial).split('/')[0])
        os.mkdir(first)
        for call in (storage.loadBlob, storage.openCommittedBlobFile):
            with self.subTest(call=call.__name__):
                with self.assertRaises(InvalidIdError) as caught:
                    call(oid, serial)
                self.assertIn('Refused serial', str(caught.exception))
                self.assertRaises(InvalidIdError, call,
                                  escaping_id(2, 'secret'), tid)
        self.assertEqual(storage.loadBlob(oid, tid),
                         storage.fshelper.getBlobFilename(oid, tid))
        db.close()


    def committed_blob(self, storage, data):
        """Commit a blob of `data`: its oid, serial, record and file."""
        db = ZODB.DB(storage)
        self.addCleanup(db.close)
        commit_blob(db, data)
        with db.transaction() as connection:
            blob = connection.root()['blob']
            blob._p_activate()
            oid, serial = blob._p_oid, blob._p_serial
        record, _ = storage.load(oid)
        return db, oid, serial, record, storage.loadBlob(oid, serial)

    def test_tpc_begin_refuses_a_tid_not_after_the_last_or_far_ahead(self):
        storage = self.open('bushy')
        db, oid, serial, record, path = self.committed_blob(storage,
                                                            b'committed')
        last = storage.lastTransaction()
        two_days = 2 * 24 * 60 << 32   # a tid's high 32 bits count minutes
        for tid, expected in ((serial, 'after its last transaction'),
                              (z64, 'after its last transaction'),
                              (b'\xff' * 8, 'no more than a day ahead'),
                              (p64(ZODB.utils.u64(last) + two_days),
                               'no more than a day ahead'),
                              (z64[:7], 'exactly 8 bytes'),
                              (escaping_id(1, 'x'), 'exactly 8 bytes')):
            with self.subTest(tid=tid):
                txn = TransactionMetaData()
                with self.assertRaises(StorageTransactionError) as caught:
                    storage.tpc_begin(txn, tid)
                message = str(caught.exception)
                self.assertIn('Refused tid', message)
                self.assertIn(storage.getName(), message)
                self.assertIn(expected, message)
                self.assertNotIn('\n', message)
                # Nothing begun: the base's commit lock is free, and a
                # later transaction commits after the last one.
                storage.tpc_abort(txn)
        self.assertEqual(read_blob(db), b'committed')
        commit_blob(db, b'after', key='after')
        self.assertEqual(read_blob(db, 'after'), b'after')
        self.assertGreater(storage.lastTransaction(), last)
        with open(path, 'rb') as f:
            self.assertEqual(f.read(), b'committed')

    def test_a_tid_after_the_last_transaction_is_accepted(self):
        storage = self.open('lawn')
        db, oid, serial, record, path = self.committed_blob(storage, b'one')
        tid = p64(ZODB.utils.u64(storage.lastTransaction()) + 1)
        txn = TransactionMetaData()
        storage.tpc_begin(txn, tid)
        storage.storeBlob(oid, serial, record, self.new_file(b'two'), '',
                          txn)
        storage.tpc_vote(txn)
        self.assertEqual(storage.tpc_finish(txn), tid)
        with open(storage.loadBlob(oid, tid), 'rb') as f:
            self.assertEqual(f.read(), b'two')

    def test_vote_never_replaces_the_blob_file_of_a_committed_transaction(
            self):
        for size in (100, INLINE_LIMIT + 1):
            with self.subTest(size=size):
                where = 'inline' if size == 100 else 'logged-by-name'
                os.mkdir(self.path(where))
                storage = self.open('bushy', where)
                committed = b'c' * size
                db, oid, serial, record, path = self.committed_blob(
                    storage, committed)
                # Past tpc_begin's check, as a base that chose the tid
                # itself might be: the vote still refuses.
                txn = TransactionMetaData()
                storage.base.tpc_begin(txn, serial)
                storage.storeBlob(oid, serial, record,
                                  self.new_file(b'hostile'), '', txn)
                with self.assertRaises(StorageTransactionError) as caught:
                    storage.tpc_vote(txn)
                storage.tpc_abort(txn)
                self.assertIn(path, str(caught.exception))
                with open(path, 'rb') as f:
                    self.assertEqual(f.read(), committed)
                self.assertEqual(read_blob(db), committed)
                commit_blob(db, b'after', key='after')
                self.assertEqual(read_blob(db, 'after'), b'after')


class CommitLogTests(TemporaryDirectory):

    def test_a_record_of_an_id_that_is_not_8_bytes_is_refused_unwritten(self):
        blob_dir = self.path('blobs')
        os.makedirs(os.path.join(blob_dir, '.zodbblob'))
        path = commit_log_path(blob_dir)
        log = CommitLog(path)
        log.append(p64(1), [Entry(p64(7), 1, data=b'x')])
        with open(path, 'rb') as f:
            before = f.read()
        for tid, oid in ((p64(2), z64 + b'\0'), (z64[:7], p64(7)),
                         (escaping_id(1, 'x'), p64(7))):
            with self.subTest(tid=tid, oid=oid):
                with self.assertRaises(InvalidIdError) as caught:
                    log.append(tid, [Entry(oid, 1, data=b'x')])
                self.assertIn(blob_dir, str(caught.exception))
                self.assertRaises(InvalidIdError, log.abort, z64 + b'\0')
        log.close()
        with open(path, 'rb') as f:
            self.assertEqual(f.read(), before)
        log = CommitLog(path)
        self.assertEqual([record.tid for record in log.records], [p64(1)])
        log.close()


class Server:
    """A ``zodbblob serve`` process in `directory`/var, layout `layout`."""

    def __init__(self, test, layout):
        self.var = test.path('var')
        self.data_fs = os.path.join(self.var, 'filestorage', 'Data.fs')
        self.blob_dir = os.path.join(self.var, 'blobstorage')
        self.address = ('127.0.0.1', free_port())
        self.process = ServerProcess(
            serve_command('--address', format_address(self.address),
                          '--var', self.var, '--layout', layout),
            self.address, cwd=test.directory,
            log_path=test.path('server.log'))
        self.process.start()
        test.addCleanup(self.process.stop)


class RawClient:
    """A stock ZEO client sending protocol calls as a hostile one would."""

    def __init__(self, test, address):
        self.storage = ZEO.ClientStorage.ClientStorage(address,
                                                       wait_timeout=30)
        test.addCleanup(self.storage.close)

    def store_blob(self, oid, data):
        """Send a blob of `oid` and vote: return the error it got."""
        return self.commit([
            ('storeBlobStart', ()),
            ('storeBlobChunk', (data,)),
            ('storeBlobEnd', (oid, z64, b'hostile pickle')),
        ])

    def store(self, oid):
        """Send a record of `oid` and vote: return the error it got."""
        return self.commit([('storea', (oid, z64, b'hostile pickle'))])

    def restore(self, oid, serial):
        return self.commit([('restorea', (oid, serial, b'hostile pickle',
                                          None))])

    def commit(self, messages, tid=None, finish=False):
        """Send `messages` in a transaction (with `tid`, if given) and
        vote: return the error it got.  An accepted one is left voted, or
        finished if `finish`."""
        storage = self.storage
        txn = TransactionMetaData()
        storage.tpc_begin(txn, tid)
        # Calls that name the transaction end with its id, as ZEO's do.
        storage._async_iter(iter([
            (name, args + (id(txn),) if name != 'storeBlobStart'
             and name != 'storeBlobChunk' else args)
            for name, args in messages]))
        try:
            storage.tpc_vote(txn)
        except (ServerException, StorageTransactionError) as e:
            storage.tpc_abort(txn)
            return e
        # Accepted: left voted, as a hostile client may leave it (an abort
        # would remove the files the layout published at vote).
        if finish:
            storage.tpc_finish(txn)
        return None

    def send_blob(self, oid, serial):
        """Ask for a blob: return the error it got."""
        try:
            self.storage._call('sendBlob', oid, serial)
        except ServerException as e:
            return e
        return None


class ServeTests(TemporaryDirectory):
    """A real server refuses a raw client's hostile ids, serves others."""

    layouts = LAYOUT_NAMES

    def test_hostile_oids_and_serials_leave_nothing_outside_the_blob_dir(
            self):
        top = self.directory
        for layout in self.layouts:
            with self.subTest(layout=layout):
                # A directory each: a failed layout's server may still run.
                self.directory = os.path.join(top, layout)
                os.mkdir(self.directory)
                self.check_layout(layout)

    def check_layout(self, layout):
        server = self.server = Server(self, layout)
        outside = self.path('outside')
        os.mkdir(outside)
        # A normal client first: the hostile calls meet a blob directory in
        # use, and ask for a blob that exists.
        normal = self.client('first')
        commit_blob(normal, b'before')
        with normal.transaction() as connection:
            blob = connection.root()['blob']
            blob._p_activate()
            blob_oid = blob._p_oid
        normal.close()
        skip = (os.path.join('var', 'filestorage', 'Data.fs'), 'server.log',
                os.path.join('var', 'blobstorage', '.zodbblob'),
                os.path.join('var', 'blobstorage', 'tmp'))
        before = tree(self.directory, skip)

        hostile = RawClient(self, server.address)
        # From var/blobstorage/<repr dir>: up to var/blobstorage, var, the
        # test dir.
        oid = escaping_id(3, 'outside', 'planted')
        error = hostile.store_blob(oid, b'planted bytes')
        self.assertEqual(os.listdir(outside), [])
        self.assertEqual(tree(self.directory, skip), before)
        self.assertRefused(error, 'oid', server.blob_dir)

        # Records without a blob: FileStorage would write the oid cut to 8
        # bytes, fail to index it at finish and close itself.
        self.assertRefused(hostile.store(oid), 'oid', server.blob_dir)
        self.assertRefused(hostile.restore(oid, p64(1)), 'oid',
                           server.blob_dir)
        self.assertRefused(hostile.restore(p64(1), z64 + b'/..'), 'serial',
                           server.blob_dir)

        error = hostile.send_blob(blob_oid, escaping_id(4, 'outside'))
        self.assertRefused(error, 'serial', server.blob_dir)
        error = hostile.send_blob(oid, z64)
        self.assertRefused(error, 'oid', server.blob_dir)
        self.assertEqual(tree(self.directory, skip), before)

        # The server goes on serving everyone: a new client commits, and
        # another one reads what it committed.
        writer = self.client('writer')
        commit_blob(writer, b'after', key='after')
        writer.close()
        reader = self.client('reader')
        self.assertEqual(read_blob(reader, 'after'), b'after')
        self.assertEqual(read_blob(reader), b'before')
        reader.close()
        self.assertEqual(server.process.stop(), 0,
                         server.process.output())

    def assertRefused(self, error, kind, blob_dir):
        """`error` is the server's InvalidIdError about a `kind`, as ZEO
        hands it to the client (a ServerException naming the class)."""
        self.assertIsNotNone(error, f'a hostile {kind} was accepted')
        self.assertIn('InvalidIdError', repr(error))
        self.assertIn(f'Refused {kind} ', str(error))
        self.assertIn(blob_dir, str(error))

    def client(self, name):
        db = ZODB.DB(ClientStorage(
            self.server.address, blob_dir=self.path(name + '-cache'),
            wait_timeout=30))
        self.addCleanup(lambda: db.close())
        return db


class ChosenTidTests(TemporaryDirectory):
    """A raw client choosing its transaction's tid: refused at vote when
    it names a committed transaction or lies far in the future."""

    def setUp(self):
        super().setUp()
        self.server = Server(self, 'bushy')
        writer = self.client('writer')
        commit_blob(writer, b'committed')
        with writer.transaction() as connection:
            blob = connection.root()['blob']
            blob._p_activate()
            self.oid, self.serial = blob._p_oid, blob._p_serial
            self.record, _ = connection._storage.load(self.oid)
        writer.close()

    def client(self, name):
        db = ZODB.DB(ClientStorage(
            self.server.address, blob_dir=self.path(name + '-cache'),
            wait_timeout=30))
        self.addCleanup(lambda: db.close())
        return db

    def store_with_tid(self, tid):
        hostile = RawClient(self, self.server.address)
        error = hostile.commit([
            ('storeBlobStart', ()),
            ('storeBlobChunk', (b'hostile bytes',)),
            ('storeBlobEnd', (self.oid, self.serial, self.record)),
        ], tid=tid, finish=True)
        hostile.storage.close()
        return error

    def assertServing(self):
        """A new client opens a DB, reads the blob whole, and commits."""
        db = self.client('after-%d' % len(os.listdir(self.directory)))
        self.assertEqual(read_blob(db), b'committed')
        commit_blob(db, b'after', key='after')
        self.assertEqual(read_blob(db, 'after'), b'after')
        db.close()

    def test_a_committed_blob_keeps_its_bytes_against_its_own_tid(self):
        error = self.store_with_tid(self.serial)
        self.assertIsNotNone(error, 'a tid of a committed transaction was '
                             'accepted')
        self.assertIn('Refused tid %s' % self.serial.hex(), str(error))
        fshelper = FilesystemHelper(self.server.blob_dir)
        with open(fshelper.getBlobFilename(self.oid, self.serial), 'rb') as f:
            self.assertEqual(f.read(), b'committed')
        self.assertServing()
        self.assertEqual(self.server.process.stop(), 0,
                         self.server.process.output())

    def test_a_tid_far_in_the_future_leaves_the_storage_usable(self):
        error = self.store_with_tid(b'\xff' * 8)
        self.assertIsNotNone(error, 'a tid far in the future was accepted')
        self.assertIn('Refused tid ffffffffffffffff', str(error))
        self.assertServing()
        self.assertEqual(self.server.process.stop(), 0,
                         self.server.process.output())


class ClientTests(TemporaryDirectory):
    """zodbblob.zeo.ClientStorage checks the ids it is given."""

    def setUp(self):
        super().setUp()
        self.server = Server(self, 'lawn')
        self.cache = self.path('cache')
        self.storage = ClientStorage(self.server.address,
                                     blob_dir=self.cache, wait_timeout=30)
        self.addCleanup(self.storage.close)

    def test_received_blob_calls_with_hostile_ids_are_refused(self):
        before = tree(self.directory, ('server.log', 'var'))
        for oid, serial in ((escaping_id(2, 'x'), z64),
                            (p64(1), escaping_id(2, 'x'))):
            for call, args in ((self.storage.receiveBlobStart, ()),
                               (self.storage.receiveBlobChunk, (b'bytes',)),
                               (self.storage.receiveBlobStop, ())):
                with self.subTest(call=call.__name__, oid=oid):
                    with self.assertRaises(InvalidIdError) as caught:
                        call(oid, serial, *args)
                    self.assertIn(self.cache, str(caught.exception))
        self.assertEqual(tree(self.directory, ('server.log', 'var')), before)

    def test_load_blob_refuses_before_asking_the_server(self):
        self.assertRaises(InvalidIdError, self.storage.loadBlob,
                          p64(1), escaping_id(2, 'x'))
        self.assertRaises(InvalidIdError, self.storage.openCommittedBlobFile,
                          escaping_id(2, 'x'), z64)

    def test_store_blob_refuses_before_taking_the_file(self):
        upload = self.path('upload')
        with open(upload, 'wb') as f:
            f.write(b'bytes')
        txn = TransactionMetaData()
        self.storage.tpc_begin(txn)
        self.assertRaises(InvalidIdError, self.storage.storeBlob,
                          escaping_id(2, 'x'), z64, b'data', upload, '', txn)
        self.storage.tpc_abort(txn)
        self.assertTrue(os.path.exists(upload))


class StoreOnceTests(TemporaryDirectory):
    """One data record per blob object per transaction in the server's
    Data.fs (ZEO's client sends the pickle with store() and again with
    storeBlobEnd, and the server stores both)."""

    def test_each_blob_object_is_stored_once(self):
        server = Server(self, 'bushy')
        db = self.client(server, 'writer')
        with db.transaction() as connection:
            root = connection.root()
            for key in 'abc':
                root[key] = Blob(key.encode() * 100)
        with db.transaction() as connection:
            blobs = {connection.root()[key]._p_oid for key in 'abc'}
            with connection.root()['b'].open('w') as f:
                f.write(b'changed')
        # Stored once, still whole: the writer's object cache (updated
        # from the client's buffer at tpc_finish) and a new client agree.
        expected = {'a': b'a' * 100, 'b': b'changed', 'c': b'c' * 100}
        for reader in (db, self.client(server, 'reader')):
            self.assertEqual(
                {key: read_blob(reader, key) for key in 'abc'}, expected)
            reader.close()
        self.assertEqual(server.process.stop(), 0, server.process.output())

        storage = ZODB.FileStorage.FileStorage(
            server.data_fs, read_only=True)
        try:
            transactions = [collections.Counter(record.oid
                                                for record in transaction)
                            for transaction in storage.iterator()]
        finally:
            storage.close()
        created, changed = transactions[-2:]
        self.assertEqual({oid: created[oid] for oid in blobs},
                         dict.fromkeys(blobs, 1))
        self.assertEqual(sorted(changed[oid] for oid in blobs), [0, 0, 1])

    def client(self, server, name):
        db = ZODB.DB(ClientStorage(server.address,
                                   blob_dir=self.path(name + '-cache'),
                                   wait_timeout=30))
        self.addCleanup(lambda: db.close())
        return db
