"""BlobStorage: blob support for any ZODB storage, as a wrapper.

A drop-in for ``ZODB.blob.BlobStorage(blob_dir, base, layout)``.  The
wrapper defines every method that has to see blob files and delegates the
rest explicitly: the base's methods are bound onto the wrapper at
construction (``copied_methods``) and ``__getattr__`` covers anything else,
so there is no proxy whose methods rebind to the base behind our back.

What it does with blob files it hands to its collaborators: opening the
blob directory and recovering it (``recovery``), the commit protocol and
its checkpoints (``commit``), pack and undo (``pack``).
"""

from __future__ import annotations

import logging
import os
import shutil

import ZODB.blob
import ZODB.interfaces
import zope.interface
from ZODB.POSException import POSKeyError

from zodbblob.layout import check_id
from zodbblob.storage.catalog import JournalError, kill_point
from zodbblob.storage.checkpoint import Shared, checkpoint
from zodbblob.storage.commit import CommitProtocol, link_or_copy
from zodbblob.storage.datamanager import TransactionDirectories
from zodbblob.storage.filestorage import FileStorageOpener
from zodbblob.storage.lock import BlobStorageError
from zodbblob.storage.binding import refuse_a_used_prefix
from zodbblob.storage.objects import check_cache_size, open_bucket
from zodbblob.storage.pack import Packer
from zodbblob.storage.recovery import open_blob_directory, open_with_base

logger = logging.getLogger(__name__)


@zope.interface.implementer(ZODB.interfaces.IBlobStorage,
                            ZODB.interfaces.IStorageWrapper)
class BlobStorage:
    """Blob support for `base`, with blob files under `blob_dir`."""

    # Bound from the base at construction: these need no blob handling.
    copied_methods = (
        'getName', 'getTid', 'history', 'isReadOnly',
        'load', 'loadBefore', 'loadSerial', 'new_oid', 'prefetch',
        'release', 'sortKey', 'supportsUndo',
        'undoInfo', 'undoLog', 'checkCurrentSerialInTransaction',
        'iterator', 'record_iternext', 'poll_invalidations', 'sync',
        'lastInvalidations', 'loadEx', 'pack_gc',
    )

    def __init__(self, blob_dir: str, base, layout: str = 'automatic',
                 dedup: bool = False, _shared: Shared | None = None,
                 scrub: bool = True, *, object_store=None,
                 cache_size: int | None = None):
        """`base` is a storage, or a `FileStorageOpener` (what
        ``zodbblob.open_filestorage`` and the ``<zodbblob>`` section
        give): then the storage opens its base itself, once the blob
        directory is locked and a torn last transaction rolled back, and
        commits with one sync.  ``commit_protocol`` says which.

        With `dedup`, a committed blob whose bytes equal a committed
        file's is stored as a hard link to it (``storage/dedup.py``); on
        an object store, each content is stored once (``contents.py``).
        With `scrub` (writable storages only), a background thread hashes
        the committed files that have no digest yet (``storage/scrub.py``).

        With `object_store` (an ``ObjectStoreSettings`` or a ``Bucket``),
        committed blobs are objects in that bucket, and the blob
        directory keeps their local copies in a cache of at most
        `cache_size` bytes (``storage/objects.py``).
        """
        remote = None
        if object_store is not None:
            # Checked before anything on disk changes.
            bucket = open_bucket(object_store)
            from zodbblob.objectstore.bucket import ObjectStoreError
            try:
                refuse_a_used_prefix(bucket, blob_dir)
            except ObjectStoreError as e:
                raise BlobStorageError(f'Blob directory {blob_dir}: '
                                       f'{e}') from None
            remote = (bucket, check_cache_size(cache_size, blob_dir),
                      bool(dedup))
        elif cache_size is not None:
            raise BlobStorageError(
                f'Blob directory {blob_dir}: cache_size bounds the local '
                f'copies of an object store, and none was given')
        if isinstance(base, FileStorageOpener):
            base, _shared = open_with_base(base, blob_dir, layout, remote)
            _shared.dedup = bool(dedup)
            self._owner = True
            try:
                self._wrap(blob_dir, base, layout, _shared)
            except BaseException:
                base.close()
                self._close_opened(_shared)
                raise
        else:
            self._owner = _shared is None
            self._wrap(blob_dir, base, layout, _shared, remote)
            if self._owner:
                self._shared.dedup = bool(dedup)
        if self._owner and self._shared.objects is not None:
            # On a bucket, the prefix's binding says (``binding.py``).
            self._shared.dedup = self._shared.objects.contents is not None
        if self._owner and scrub:
            self._shared.start_scrubber()

    def _wrap(self, blob_dir: str, base, layout: str,
              _shared: Shared | None, remote=None) -> None:
        if ZODB.interfaces.IBlobStorage.providedBy(base):
            name = getattr(base, 'getName', lambda: repr(base))()
            raise BlobStorageError(
                'Storage %s supports blobs already; zodbblob.BlobStorage '
                'wraps a storage without blob support (remove its '
                'blob-dir, or do not wrap it)' % name)
        self.base = self.storage = base
        for name in self.copied_methods:
            method = getattr(base, name, None)
            if method is not None:
                setattr(self, name, method)
        # Only where the base has it: copyTransactionsFrom asks whether a
        # storage can restore.
        if getattr(base, 'restore', None) is not None:
            self.restore = self._restore
        provided = [zope.interface.providedBy(base)]
        if ZODB.interfaces.IStorageRestoreable.providedBy(base):
            provided.insert(0, ZODB.interfaces.IBlobStorageRestoreable)
        zope.interface.directlyProvides(self, *provided)

        self._db = None
        self._closed = False
        if _shared is None:
            _shared = open_blob_directory(base, blob_dir, layout, remote)
        self._shared = _shared
        self.fshelper = _shared.fshelper
        self._commit = CommitProtocol(base, _shared)
        self._packer = Packer(base, _shared, self._commit,
                              self.is_blob_record)

    @property
    def commit_protocol(self) -> str:
        """'one sync' or 'serial' (``doc/design.rst``, "Commit")."""
        return 'one sync' if self._shared.one_sync else 'serial'

    @property
    def object_store(self):
        """The `ObjectStore` keeping the committed blobs, or None."""
        return self._shared.objects

    @property
    def dedup(self) -> bool:
        """Whether commits link equal contents (``storage/dedup.py``)."""
        return self._shared.dedup

    # opening and closing

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        shared = self._shared
        if not self._owner:
            self.base.close()
            return
        shared.stop_scrubber()
        try:
            if shared.failed:
                # A checkpoint would make the failed transaction's files
                # durable, and the open mark's reset would keep the next
                # open from rolling it back.
                logger.warning('Closed blob directory %s without a '
                               'checkpoint: %s', self.fshelper.base_dir,
                               shared.failed)
            elif shared.journal is not None and not shared.read_only:
                try:
                    checkpoint(shared, removals=True)
                    shared.journal.set_meta(
                        state='closed', last_tid=self.base.lastTransaction())
                    # Last: everything committed is durable now, so the
                    # next open has no torn transaction to look for.
                    if shared.commit_log.open_one_sync:
                        shared.commit_log.mark_open_one_sync(False)
                except Exception as e:
                    # Nothing committed is lost: the commit log keeps the
                    # transactions whose rows could not be written (or
                    # whose aborted uploads a bucket did not delete), and
                    # the next open replays them.
                    logger.warning('Closed blob directory %s without a '
                                   'checkpoint (%s); the next open replays '
                                   'its commit log', self.fshelper.base_dir,
                                   e)
        finally:
            self.base.close()
            self._close_opened(shared)

    @staticmethod
    def _close_opened(shared: Shared) -> None:
        """Release what opening the blob directory took."""
        # Staged names no checkpoint let go (files that could not be
        # published; a checkpoint that failed, whose commit log the next
        # open replays from them) stay for the next open.
        if (shared.staging_dir is not None and shared.unpublished is None
                and not shared.linked):
            shutil.rmtree(shared.staging_dir, ignore_errors=True)
            shared.staging_dir = None
        if shared.directories is not None:
            shared.directories.remove()
        shared.close()
        if shared.commit_log is not None:
            shared.commit_log.close()
        if shared.journal is not None:
            try:
                shared.journal.close()
            except JournalError:
                pass  # logged above; the commit log has the rows
        if shared.lock is not None:
            shared.lock.close()

    def lastTransaction(self) -> bytes:
        # With one sync, a transaction whose base has finished stays
        # unseen until its files are published and its callback ran.
        visible = self._shared.visible_tid
        if visible is not None:
            return visible
        return self.base.lastTransaction()

    def new_instance(self) -> BlobStorage:
        """A wrapped instance of an MVCC base, sharing this blob dir."""
        instance = BlobStorage(self.fshelper.base_dir, self.base.new_instance(),
                               _shared=self._shared)
        instance._db = self._db
        return instance

    def __getattr__(self, name):
        # Only reached for what the wrapper neither defines nor copied.
        if name == 'base':
            raise AttributeError(name)
        return getattr(self.base, name)

    def __len__(self):
        return len(self.base)

    def __repr__(self):
        return '<zodbblob.BlobStorage %s (%s) over %r>' % (
            self.fshelper.base_dir, self.fshelper.layout_name, self.base)

    # IStorageWrapper: the base reports to us, we report to the database

    def registerDB(self, db) -> None:
        self._db = db
        self._shared.untransform_record_data = getattr(
            db, 'untransform_record_data', lambda data: data)
        register = getattr(self.base, 'registerDB', None)
        if register is not None:
            register(self)

    def invalidate(self, transaction_id, oids, version=''):
        if self._db is not None:
            self._db.invalidate(transaction_id, oids)

    def invalidateCache(self):
        if self._db is not None:
            self._db.invalidateCache()

    def references(self, record, oids=None):
        if self._db is not None:
            return self._db.references(record, oids)
        from ZODB.serialize import referencesf
        return referencesf(record, oids)

    def transform_record_data(self, data):
        if self._db is None:
            return data
        return self._db.transform_record_data(data)

    def untransform_record_data(self, data):
        return self._shared.untransform_record_data(data)

    def is_blob_record(self, record) -> bool:
        return bool(record) and ZODB.blob.is_blob_record(
            self._shared.untransform_record_data(record))

    # reading

    def _check_id(self, value, kind: str) -> bytes:
        return check_id(value, kind, self.fshelper.base_dir)

    def loadBlob(self, oid: bytes, serial: bytes) -> str:
        # A ZEO client's sendBlob names both: checked before the path is
        # built, or a serial holding '/..' could name any file.
        serial = self._check_id(serial, 'serial')
        oid = self._check_id(oid, 'oid')
        shared = self._shared
        if shared.objects is not None:
            # Uploads go to their final keys before the base commits:
            # a tid it has not committed is nobody's to read (a ZEO
            # client may name any tid), and is never downloaded.
            if serial > self.base.lastTransaction():
                raise POSKeyError('No committed blob of tid %s'
                                  % serial.hex(), oid, serial)
            return shared.objects.load(oid, serial)
        filename = self.fshelper.getBlobFilename(oid, serial)
        if shared.publishing == serial:
            # One sync: whoever learned the tid early (a load of the
            # current record) waits for its files.
            with shared.published:
                while shared.publishing == serial:
                    shared.published.wait()
        if not os.path.exists(filename):
            raise POSKeyError('No blob file at %s' % filename, oid, serial)
        return filename

    def openCommittedBlobFile(self, oid: bytes, serial: bytes, blob=None):
        filename = self.loadBlob(oid, serial)   # checks oid and serial
        if blob is None:
            return open(filename, 'rb')
        return ZODB.blob.BlobFile(filename, 'r', blob)

    def temporaryDirectory(self) -> str:
        """The current transaction's directory for new blob files.

        It belongs to the transaction's BlobDataManager (joined here on
        first use), which keeps blob savepoints right and removes the
        directory when the transaction ends.  It lies in this storage's
        directory below ``tmp``, named for the process, so that the next
        open can tell the files of a process that died (removed) from
        those of a live one (kept).

        ZODB asks ``temporaryDirectory()`` without saying for which
        transaction; ``zodbblob.storage.datamanager
        .asking_transaction_manager`` finds the Blob or the Connection
        that asks.  Anything else asking gets the process directory, as
        does a transaction already committing.
        """
        shared = self._shared
        if shared.read_only:
            return self.fshelper.temp_dir
        if shared.directories is None:
            shared.directories = TransactionDirectories(self.fshelper.temp_dir)
        return shared.directories.directory()

    def getSize(self) -> int:
        journal = self._shared.journal
        blob_bytes = journal.total_size() if journal is not None else 0
        return self.base.getSize() + blob_bytes

    # writing

    def tpc_begin(self, transaction, tid=None, status=' '):
        return self._commit.begin(transaction, tid, status)

    # A ZEO client chooses the oids it stores.  FileStorage writes an oid
    # of bytes that are not 8 cut to 8, then fails to index it at
    # tpc_finish and closes itself: the server stops serving everyone.
    # Other types it refuses itself, after checking the transaction (as
    # ZODB's conformance tests expect), so those are left to it.

    def _check_length(self, value, kind: str):
        if isinstance(value, bytes) and len(value) != 8:
            self._check_id(value, kind)
        return value

    def store(self, oid, oldserial, data, version, transaction):
        return self.base.store(self._check_length(oid, 'oid'), oldserial,
                               data, version, transaction)

    def _restore(self, oid, serial, data, version, prev_txn, transaction):
        return self.base.restore(self._check_length(oid, 'oid'),
                                 self._check_length(serial, 'serial'), data,
                                 version, prev_txn, transaction)

    def storeBlob(self, oid, oldserial, data, blobfilename, version,
                  transaction):
        assert not version, "Versions aren't supported."
        # Before the file is taken or the base sees the oid: a ZEO client
        # chooses it, and the base would record it cut to 8 bytes.
        oid = self._check_id(oid, 'oid')
        # The file is ours from here on, whatever the base says next; a
        # ConflictError below leaves it staged, and tpc_abort removes it.
        self._commit.take(oid, blobfilename, transaction)
        result = self.base.store(oid, oldserial, data, '', transaction)
        kill_point('after_store_blob')
        return result

    def restoreBlob(self, oid, serial, data, blobfilename, prev_txn,
                    transaction):
        oid = self._check_id(oid, 'oid')
        serial = self._check_id(serial, 'serial')
        self._commit.take(oid, blobfilename, transaction)
        self.base.restore(oid, serial, data, '', prev_txn, transaction)

    def undo(self, transaction_id, transaction):
        return self._packer.undo(transaction_id, transaction)

    def copyTransactionsFrom(self, other) -> None:
        """Copy all of `other`'s transactions, blob files included."""
        for trans in other.iterator():
            self.tpc_begin(trans, trans.tid, trans.status)
            for record in trans:
                blobfilename = None
                if ZODB.blob.is_blob_record(record.data):
                    try:
                        blobfilename = other.loadBlob(record.oid, record.tid)
                    except POSKeyError:
                        pass
                if blobfilename is None:
                    self.restore(record.oid, record.tid, record.data, '',
                                 record.data_txn, trans)
                    continue
                copy = self._commit.staging_path()
                link_or_copy(blobfilename, copy)
                self.restoreBlob(record.oid, record.tid, record.data, copy,
                                 record.data_txn, trans)
            self.tpc_vote(trans)
            self.tpc_finish(trans)

    def tpc_vote(self, transaction):
        return self._commit.vote(transaction)

    def tpc_finish(self, transaction, f=None):
        return self._commit.finish(transaction, f)

    def tpc_abort(self, transaction):
        return self._commit.abort(transaction)

    # pack

    def pack(self, packtime, referencesf, *args, **kw):
        """Pack the base, then remove the blob files it no longer needs."""
        return self._packer.pack(packtime, referencesf, *args, **kw)
