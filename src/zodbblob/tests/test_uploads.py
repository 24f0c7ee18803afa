"""A ZEO client's blob uploads that are never stored leave the server's disk.

ZEO's server writes an upload (``storeBlobStart``, ``storeBlobChunk``,
``storeBlobEnd``) to a temporary file in the storage's
``temporaryDirectory()``; a real ``zodbblob serve`` process must remove
it when the transaction is aborted, its vote is refused, or its client
goes away mid-upload or before voting, and go on serving the others.
"""

import os
import time

import ZEO.ClientStorage
import ZODB
from ZEO.Exceptions import ServerException
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError
from ZODB.utils import z64

from zodbblob.tests.test_config import commit_blob, read_blob
from zodbblob.tests.test_hostile import Server, TemporaryDirectory, escaping_id
from zodbblob.zeo import ClientStorage

MB = 1 << 20
CHUNK = 59000   # what ZEO's client sends per storeBlobChunk
WAIT = 60       # seconds: a busy machine may take long, nothing asserts it

def uploads(blob_dir):
    """The files below the storage's temporary directories (``tmp/proc-*``)
    of `blob_dir`, as {path: size}."""
    found = {}
    temp_dir = os.path.join(blob_dir, 'tmp')
    if not os.path.isdir(temp_dir):
        return found
    for name in os.listdir(temp_dir):
        if not name.startswith('proc-'):
            continue
        for directory, _, names in os.walk(os.path.join(temp_dir, name)):
            for file_name in names:
                path = os.path.join(directory, file_name)
                try:
                    found[path] = os.path.getsize(path)
                except FileNotFoundError:
                    pass
    return found


class UploadTests(TemporaryDirectory):

    prefix = 'zodbblob-uploads-'

    def setUp(self):
        super().setUp()
        self.server = Server(self, 'bushy')

    def raw_client(self):
        storage = ZEO.ClientStorage.ClientStorage(self.server.address,
                                                  wait_timeout=30)
        self.addCleanup(storage.close)
        return storage

    def upload(self, storage, txn, oid, serial=z64, data=b'pickle'):
        """Send a blob of 1 MB of `oid` in `txn`, as ZEO's client does;
        return once the server has written it."""
        messages = [('storeBlobStart', ())]
        messages += [('storeBlobChunk', (b'u' * CHUNK,))] * (MB // CHUNK)
        messages.append(('storeBlobEnd', (oid, serial, data, id(txn))))
        storage._async_iter(iter(messages))

    def assertUploadOnDisk(self, files=1):
        """Wait until the server holds the whole upload (and, with
        `files` 2, the next one's file): the test checks something."""
        expected = [MB // CHUNK * CHUNK] + [0] * (files - 1)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            sizes = sorted(uploads(self.server.blob_dir).values(),
                           reverse=True)
            if sizes == expected:
                break
            time.sleep(0.05)
        self.assertEqual(sizes, expected, self.server.process.output())

    def assertUploadsGone(self):
        """No upload file stays (the server may need a moment to hear of
        a client that died), and the server serves others as before."""
        deadline = time.monotonic() + WAIT
        while uploads(self.server.blob_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(uploads(self.server.blob_dir), {},
                         self.server.process.output())
        db = ZODB.DB(ClientStorage(
            self.server.address, blob_dir=self.path('other-cache'),
            wait_timeout=30))
        self.addCleanup(lambda: db.close())
        commit_blob(db, b'another client')
        self.assertEqual(read_blob(db), b'another client')
        db.close()
        reader = ZODB.DB(ClientStorage(
            self.server.address, blob_dir=self.path('reader-cache'),
            wait_timeout=30))
        self.addCleanup(lambda: reader.close())
        self.assertEqual(read_blob(reader), b'another client')
        reader.close()
        self.assertEqual(uploads(self.server.blob_dir), {})
        self.assertEqual(self.server.process.stop(), 0,
                         self.server.process.output())

    def test_an_upload_aborted_before_vote_leaves_no_temp_file(self):
        storage = self.raw_client()
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        self.upload(storage, txn, storage.new_oid())
        self.assertUploadOnDisk()
        storage.tpc_abort(txn)
        self.assertUploadsGone()

    def test_an_upload_of_a_refused_oid_leaves_no_temp_file(self):
        storage = self.raw_client()
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        self.upload(storage, txn, escaping_id(3, 'outside', 'x'))
        self.assertUploadOnDisk()
        with self.assertRaises(ServerException) as caught:
            storage.tpc_vote(txn)
        self.assertIn('Refused oid', str(caught.exception))
        storage.tpc_abort(txn)
        self.assertUploadsGone()

    def test_an_upload_of_a_conflicting_serial_leaves_no_temp_file(self):
        db = ZODB.DB(ClientStorage(
            self.server.address, blob_dir=self.path('writer-cache'),
            wait_timeout=30))
        self.addCleanup(lambda: db.close())
        commit_blob(db, b'committed')
        commit_blob(db, b'committed again')
        with db.transaction() as connection:
            blob = connection.root()['blob']
            blob._p_activate()
            oid = blob._p_oid
        db.close()
        storage = self.raw_client()
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        # The serial of no revision: the base refuses it at store.
        self.upload(storage, txn, oid, serial=z64)
        self.assertUploadOnDisk()
        with self.assertRaises(ConflictError):
            storage.tpc_vote(txn)
        storage.tpc_abort(txn)
        self.assertUploadsGone()

    def test_a_client_gone_in_the_middle_of_an_upload_leaves_no_temp_file(
            self):
        storage = self.raw_client()
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        messages = [('storeBlobStart', ())]
        messages += [('storeBlobChunk', (b'u' * CHUNK,))] * (MB // CHUNK)
        storage._async_iter(iter(messages))
        self.assertUploadOnDisk()
        storage.close()   # the socket closes, no storeBlobEnd
        self.assertUploadsGone()

    def test_a_client_gone_after_its_upload_before_vote_leaves_no_temp_file(
            self):
        storage = self.raw_client()
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        self.upload(storage, txn, storage.new_oid())
        # The start of another: its file shows the end was handled.
        storage._async_iter(iter([('storeBlobStart', ())]))
        self.assertUploadOnDisk(files=2)
        storage.close()
        self.assertUploadsGone()
