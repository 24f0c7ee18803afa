"""BlobStorage: blob support for any ZODB storage, as a wrapper.

A drop-in for ``ZODB.blob.BlobStorage(blob_dir, base, layout)``.  The
wrapper defines every method that has to see blob files and delegates the
rest explicitly: the base's methods are bound onto the wrapper at
construction (``copied_methods``) and ``__getattr__`` covers anything else,
so there is no proxy whose methods rebind to the base behind our back.

Commit, in short (``doc/design.rst`` has the long form): ``storeBlob``
moves the file into the transaction's staging directory; ``tpc_vote``
votes the base, fsyncs the staged files, writes and fsyncs the journal
intent, and renames the files to their final names; ``tpc_finish`` finishes
the base (the commit point) and marks the intent committed; ``tpc_abort``
removes whatever the transaction staged or published.  Opening the storage
replays unfinished intents.
"""

from __future__ import annotations

import base64
import errno
import itertools
import logging
import os
import shutil
import stat
import threading

import zc.lockfile
import zope.interface
import ZODB.blob
import ZODB.interfaces
from ZODB.POSException import POSKeyError
from ZODB.POSException import ReadOnlyError
from ZODB.utils import oid_repr
from ZODB.utils import z64

from zodbblob.datamanager import PROCESS_PREFIX
from zodbblob.datamanager import TransactionDirectories
from zodbblob.journal import COMMITTED
from zodbblob.journal import STATE_DIR
from zodbblob.journal import SYNCFS_AVAILABLE
from zodbblob.journal import Journal
from zodbblob.journal import JournalError
from zodbblob.journal import journal_path
from zodbblob.journal import kill_point
from zodbblob.journal import sync_filesystem
from zodbblob.layout import FilesystemHelper
from zodbblob.layout import fsync_directory
from zodbblob.layout import makedirs_durable
from zodbblob.layout import process_alive
from zodbblob.layout import remove_if_exists


logger = logging.getLogger(__name__)

STAGING_PREFIX = 'staged-'
# From this many files in one transaction, one syncfs beats an fsync per
# file (1000 files: 18 ms against 173 ms here); below it, fsyncs win, and
# do not pay for other programs' dirty data the way syncfs does.
SYNCFS_THRESHOLD = 8
LOCK_NAME = 'lock'
_staging_counter = itertools.count()


class BlobStorageError(Exception):
    """The blob storage cannot do what was asked, as the message says."""


class BlobDirectoryInUse(BlobStorageError):
    """A live storage holds the blob directory."""


def hold_blob_directory(blob_dir: str):
    """Take the lock a BlobStorage takes on `blob_dir`, for a tool.

    Returns the lock (close it when done), or None when the directory has
    never been used by zodbblob (nothing to hold, and nothing is created).
    Raises BlobDirectoryInUse when a live storage (a running server, an
    application) holds it: tools that change a blob directory must not run
    beside one.
    """
    state_dir = os.path.join(blob_dir, STATE_DIR)
    if not os.path.isdir(state_dir):
        return None
    lock_path = os.path.join(state_dir, LOCK_NAME)
    try:
        return zc.lockfile.LockFile(lock_path)
    except zc.lockfile.LockError:
        raise BlobDirectoryInUse(
            'Blob directory %s is in use by a running storage (lock %s is '
            'held); stop it first' % (blob_dir, lock_path)) from None


def rename_or_copy(source: str, target: str) -> None:
    """Rename `source` to `target`; across filesystems, copy and remove.

    The copy is logged at WARNING: it costs a full read and write of the
    blob, and usually means a temporary directory is on the wrong disk.
    """
    try:
        os.rename(source, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        logger.warning('Copied blob file %s to %s (not on one filesystem, '
                       'so it could not be renamed)', source, target)
        shutil.copyfile(source, target)
        os.remove(source)


def link_or_copy(source: str, target: str) -> None:
    """Hard-link `source` as `target`; copy where links are impossible."""
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK,
                           errno.ENOTSUP):
            raise
        logger.warning('Copied blob file %s to %s (a hard link was not '
                       'possible: %s)', source, target, e.strerror)
        shutil.copyfile(source, target)


def _owner_is_dead(name: str) -> bool:
    """Whether the process that named temp directory `name` has ended."""
    if name.startswith(STAGING_PREFIX):
        # Staging belongs to the storage holding the blob directory's lock,
        # and that is the one opening now.
        return True
    if name.startswith(PROCESS_PREFIX):
        pid = name[len(PROCESS_PREFIX):].split('-')[0]
        return pid.isdigit() and not process_alive(int(pid))
    return False


class _Shared:
    """What all MVCC instances of one storage share."""

    def __init__(self, fshelper, journal, lock, read_only):
        self.fshelper = fshelper
        self.journal = journal
        self.lock = lock
        self.read_only = read_only
        self.pack_lock = threading.Lock()
        self.untransform_record_data = lambda data: data
        self.directories: TransactionDirectories | None = None
        self.staging_dir: str | None = None
        # (oid, tid, staged path) of committed files whose final names
        # are not yet known to be durable: their staged names stay until
        # the next filesystem sync covers the final ones.
        self.linked: list[tuple[bytes, bytes, str]] = []


class _Staged:
    """The blob files of the transaction being committed."""

    def __init__(self, transaction):
        self.transaction = transaction
        self.files: dict[bytes, str] = {}      # oid -> staged path
        self.tid: bytes | None = None          # set once voted
        self.published: list[str] = []         # final paths, once voted
        self.retirable: list[tuple[bytes, bytes, str]] = []
        self.synced_filesystem = False         # how the vote made it durable


@zope.interface.implementer(ZODB.interfaces.IBlobStorage,
                            ZODB.interfaces.IStorageWrapper)
class BlobStorage:
    """Blob support for `base`, with blob files under `blob_dir`."""

    # Bound from the base at construction: these need no blob handling.
    copied_methods = (
        'getName', 'getTid', 'history', 'isReadOnly', 'lastTransaction',
        'load', 'loadBefore', 'loadSerial', 'new_oid', 'prefetch',
        'release', 'restore', 'sortKey', 'store', 'supportsUndo',
        'tpc_begin', 'undoInfo', 'undoLog', 'checkCurrentSerialInTransaction',
        'iterator', 'record_iternext', 'poll_invalidations', 'sync',
        'lastInvalidations', 'loadEx', 'pack_gc',
    )

    def __init__(self, blob_dir: str, base, layout: str = 'automatic',
                 _shared: _Shared | None = None):
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
        provided = [zope.interface.providedBy(base)]
        if ZODB.interfaces.IStorageRestoreable.providedBy(base):
            provided.insert(0, ZODB.interfaces.IBlobStorageRestoreable)
        zope.interface.directlyProvides(self, *provided)

        self._owner = _shared is None
        self._staged: _Staged | None = None
        self._db = None
        self._closed = False
        if _shared is None:
            _shared = self._open_blob_dir(blob_dir, layout)
        self._shared = _shared
        self.fshelper = _shared.fshelper

    # opening and closing

    def _open_blob_dir(self, blob_dir: str, layout: str) -> _Shared:
        read_only = bool(getattr(self.base, 'isReadOnly', bool)())
        fshelper = FilesystemHelper(blob_dir, layout)
        if read_only:
            fshelper.check_marker()
            return _Shared(fshelper, self._open_journal_read_only(fshelper),
                           None, True)
        state_dir = os.path.join(fshelper.base_dir, STATE_DIR)
        lock_path = os.path.join(state_dir, LOCK_NAME)
        # Lock before creating anything where a lock may be held already
        # (a live storage, a tool such as migrate): a refused open writes
        # nothing.
        fshelper.check_marker()
        lock = self._lock(fshelper, lock_path) if os.path.isdir(
            state_dir) else None
        try:
            fshelper.create()
            os.makedirs(state_dir, exist_ok=True)
            if lock is None:
                lock = self._lock(fshelper, lock_path)
        except BaseException:
            if lock is not None:
                lock.close()
            raise
        try:
            journal = self._open_journal(fshelper)
            shared = _Shared(fshelper, journal, lock, False)
            self._shared, self.fshelper = shared, fshelper
            self._recover(journal, fshelper)
            journal.set_meta(state='open')
        except BaseException:
            lock.close()
            raise
        return shared

    def _open_journal(self, fshelper) -> Journal:
        path = journal_path(fshelper.base_dir)
        try:
            journal = Journal(fshelper.base_dir)
        except JournalError as e:
            aside = path + '.corrupt'
            logger.warning('%s; moved it to %s and rebuilding the blob '
                           'catalog from a scan of %s', e, aside,
                           fshelper.base_dir)
            os.replace(path, aside)
            for suffix in ('-wal', '-shm'):
                remove_if_exists(path + suffix)
            journal = Journal(fshelper.base_dir)
        state = journal.get_meta('state')
        last_tid = journal.get_meta('last_tid')
        base_tid = self.base.lastTransaction()
        if state is None:
            self._rebuild(journal, fshelper, 'it has no blob catalog yet')
        elif state == 'closed' and base_tid > (last_tid or z64):
            # Only forward: FileStorage may report, for one open after a
            # crash, the tid of a transaction it truncated (a phantom), and
            # a tid behind ours means a restored Data.fs, not new files.
            self._rebuild(
                journal, fshelper,
                'its base storage was changed without zodbblob (last '
                'transaction %s, catalog knows %s)'
                % (oid_repr(base_tid), oid_repr(last_tid or z64)))
        return journal

    @staticmethod
    def _lock(fshelper, lock_path: str):
        try:
            return zc.lockfile.LockFile(lock_path)
        except zc.lockfile.LockError:
            raise BlobDirectoryInUse(
                'Blob directory %s is in use by another storage (lock %s is '
                'held)' % (fshelper.base_dir, lock_path)) from None

    def _open_journal_read_only(self, fshelper) -> Journal | None:
        try:
            return Journal(fshelper.base_dir, read_only=True)
        except (JournalError, Exception):
            return None

    def _rebuild(self, journal, fshelper, reason: str) -> None:
        blobs = [(oid, tid, os.stat(path).st_size)
                 for oid, tid, path in fshelper.iter_blobs()]
        level = logging.WARNING if blobs else logging.DEBUG
        logger.log(level, 'Rebuilt the blob catalog of %s from a scan (%s): '
                   '%d blob files', fshelper.base_dir, reason, len(blobs))
        journal.rebuild(blobs)

    def _recover(self, journal, fshelper) -> None:
        """Finish or undo what a crash interrupted, then clear staging.

        An intent whose transaction the base storage has is rolled
        forward (its files get their final names); any other is rolled
        back (its files are removed).  Replaying twice is harmless.
        """
        forward = {tid: self._base_has(tid, entries)
                   for tid, entries in journal.pending().items()}
        durable = []
        for oid, tid, state, staged in journal.staged():
            final = fshelper.getBlobFilename(oid, tid)
            staged_path = os.path.join(fshelper.temp_dir, staged)
            if state == COMMITTED or forward[tid]:
                if not os.path.exists(final):
                    if os.path.exists(staged_path):
                        makedirs_durable(os.path.dirname(final))
                        os.link(staged_path, final)
                    else:
                        logger.error('Blob file %s of oid %s tid %s is '
                                     'lost: neither %s nor %s exists',
                                     final, oid_repr(oid), oid_repr(tid),
                                     final, staged_path)
                durable.append((oid, tid, final))
            else:
                remove_if_exists(final)
                remove_if_exists(staged_path)
            kill_point('mid_recovery')
        # Final names must be durable before the staged ones are dropped.
        if SYNCFS_AVAILABLE:
            sync_filesystem(fshelper.base_dir)
        else:
            for directory in {os.path.dirname(f) for o, t, f in durable}:
                fsync_directory(directory)
        for tid, committed in forward.items():
            if committed:
                journal.commit(tid)
            else:
                journal.discard(tid)
            logger.warning(
                'Recovered blob directory %s: rolled %s the blob files '
                'of interrupted transaction %s', fshelper.base_dir,
                'forward' if committed else 'back', oid_repr(tid))
        journal.retire([(oid, tid) for oid, tid, final in durable])
        garbage = journal.garbage()
        if garbage:
            logger.warning('Recovered blob directory %s: finished removing '
                           'the %d blob files of an interrupted pack',
                           fshelper.base_dir, len(garbage))
            self._remove_blob_files(garbage)
        # Uncommitted files of processes that died: nobody can commit them
        # any more.  Loose files directly in tmp/ are left alone: stock ZEO
        # clients with a shared blob directory write there, and may be
        # alive.
        if os.path.isdir(fshelper.temp_dir):
            for name in os.listdir(fshelper.temp_dir):
                path = os.path.join(fshelper.temp_dir, name)
                if os.path.isdir(path) and _owner_is_dead(name):
                    if name.startswith(PROCESS_PREFIX) and os.listdir(path):
                        logger.warning(
                            'Removed %s: uncommitted blob files of a process '
                            'that ended', path)
                    shutil.rmtree(path, ignore_errors=True)

    def _base_has(self, tid: bytes, entries) -> bool:
        oid = entries[0][0]
        try:
            self.base.loadSerial(oid, tid)
        except (POSKeyError, KeyError):
            return False
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        shared = self._shared
        if not self._owner:
            self.base.close()
            return
        try:
            if shared.journal is not None and not shared.read_only:
                self._retire_all()
                shared.journal.set_meta(
                    state='closed', last_tid=self.base.lastTransaction())
        finally:
            self.base.close()
            if shared.staging_dir is not None:
                shutil.rmtree(shared.staging_dir, ignore_errors=True)
                shared.staging_dir = None
            if shared.directories is not None:
                shared.directories.remove()
            if shared.journal is not None:
                shared.journal.close()
            if shared.lock is not None:
                shared.lock.close()

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

    def loadBlob(self, oid: bytes, serial: bytes) -> str:
        filename = self.fshelper.getBlobFilename(oid, serial)
        if not os.path.exists(filename):
            raise POSKeyError('No blob file at %s' % filename, oid, serial)
        return filename

    def openCommittedBlobFile(self, oid: bytes, serial: bytes, blob=None):
        filename = self.loadBlob(oid, serial)
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
        transaction; ``zodbblob.datamanager.asking_transaction_manager``
        finds the Blob or the Connection that asks.  Anything else asking
        gets the process directory, as does a transaction already
        committing.
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

    def _stage(self, transaction) -> _Staged:
        staged = self._staged
        if staged is None or staged.transaction is not transaction:
            if self._shared.read_only:
                raise ReadOnlyError()
            staged = self._staged = _Staged(transaction)
        return staged

    def _staging_path(self) -> str:
        """A new name in the storage's staging directory.

        One directory for the storage's lifetime, not one per transaction:
        a mkdir and an rmdir per commit cost as much as an fsync.
        """
        shared = self._shared
        if shared.staging_dir is None:
            directory = os.path.join(
                self.fshelper.temp_dir, '%s%d-%d' % (
                    STAGING_PREFIX, os.getpid(), next(_staging_counter)))
            os.mkdir(directory)
            if not SYNCFS_AVAILABLE:
                fsync_directory(self.fshelper.temp_dir)
            shared.staging_dir = directory
        return os.path.join(shared.staging_dir,
                            '%d.blob' % next(_staging_counter))

    def _take(self, oid: bytes, filename: str, transaction, link=False):
        """Own `filename` as the blob of `oid` in `transaction`."""
        staged = self._stage(transaction)
        target = self._staging_path()
        if link:
            link_or_copy(filename, target)
        else:
            rename_or_copy(filename, target)
        staged.files[oid] = target

    def storeBlob(self, oid, oldserial, data, blobfilename, version,
                  transaction):
        assert not version, "Versions aren't supported."
        # The file is ours from here on, whatever the base says next; a
        # ConflictError below leaves it staged, and tpc_abort removes it.
        self._take(oid, blobfilename, transaction)
        result = self.base.store(oid, oldserial, data, '', transaction)
        kill_point('after_store_blob')
        return result

    def restoreBlob(self, oid, serial, data, blobfilename, prev_txn,
                    transaction):
        self._take(oid, blobfilename, transaction)
        self.base.restore(oid, serial, data, '', prev_txn, transaction)

    def undo(self, transaction_id, transaction):
        undo_tid, oids = self.base.undo(transaction_id, transaction)
        undone_tid = base64.decodebytes(transaction_id + b'\n')
        # Only the oids the undo touched, not a walk of the directory; and
        # the restored revision is linked, not copied: blob files never
        # change once committed, so two names for one file are safe.
        for oid in oids:
            undone = self.fshelper.getBlobFilename(oid, undone_tid)
            if not os.path.exists(undone):
                continue
            before = self.base.loadBefore(oid, undone_tid)
            source = undone if before is None else (
                self.fshelper.getBlobFilename(oid, before[1]))
            self._take(oid, source, transaction, link=True)
        return undo_tid, oids

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
                copy = self._staging_path()
                link_or_copy(blobfilename, copy)
                self.restoreBlob(record.oid, record.tid, record.data, copy,
                                 record.data_txn, trans)
            self.tpc_vote(trans)
            self.tpc_finish(trans)

    def tpc_vote(self, transaction):
        result = self.base.tpc_vote(transaction)
        staged = self._staged
        if staged is not None and staged.transaction is transaction:
            kill_point('after_base_vote')
            self._publish(staged)
            kill_point('after_publish')
        return result

    def _publish(self, staged: _Staged) -> None:
        """Give the staged files their final names, durably and journaled.

        Runs after the base voted and before it finishes: the files are in
        place before anyone can learn the tid, and a crash from here on
        leaves a journal intent that tells recovery what to do.

        With syncfs, one flush makes the staged files, their names and the
        intent durable together; the final names are hard links, and the
        staged names stay until a later flush has covered the final ones,
        so a crash that loses a final name loses nothing.
        """
        shared = self._shared
        tid = self.base._tid
        temp_dir = self.fshelper.temp_dir
        use_syncfs = staged.synced_filesystem = (
            SYNCFS_AVAILABLE and len(staged.files) >= SYNCFS_THRESHOLD)
        entries = []
        for oid, path in staged.files.items():
            if use_syncfs:
                info = os.stat(path)
            else:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    info = os.fstat(fd)
                finally:
                    os.close(fd)
            entries.append((oid, path, info))
        # Per file, the staged names need not be durable: the final names
        # are made durable below, before the base can commit, and a
        # transaction the base does not have is rolled back by removing
        # its final names (staging directories are swept at open).
        shared.journal.begin(
            tid, [(oid, info.st_size, os.path.relpath(path, temp_dir))
                  for oid, path, info in entries],
            durable=not use_syncfs)
        staged.tid = tid
        kill_point('after_journal_begin')
        if use_syncfs:
            sync_filesystem(self.fshelper.base_dir)
            # Final names linked before this flush are durable now.
            staged.retirable, shared.linked = shared.linked, []
        kill_point('after_staging_fsync')
        directories: dict[str, int] = {}
        for oid, path, info in entries:
            final = self.fshelper.getBlobFilename(oid, tid)
            directory = os.path.dirname(final)
            if directory not in directories:
                if use_syncfs:
                    os.makedirs(directory, exist_ok=True)
                else:
                    makedirs_durable(directory)
                directories[directory] = os.stat(directory).st_mode
            # As in ZODB: committed files are not writable, and readable by
            # whoever may read their directory.
            os.chmod(path, (stat.S_IMODE(info.st_mode) & ~0o222)
                     | (directories[directory] & 0o444))
            try:
                os.link(path, final)
            except FileExistsError:
                os.remove(final)  # left by an earlier, aborted attempt
                os.link(path, final)
            staged.published.append(final)
            kill_point('mid_publish')
        if not use_syncfs:
            for directory in directories:
                fsync_directory(directory)

    def tpc_finish(self, transaction, f=None):
        # Some bases (MappingStorage) call `f` unconditionally.
        if f is None:
            tid = self.base.tpc_finish(transaction)
        else:
            tid = self.base.tpc_finish(transaction, f)
        staged = self._staged
        if staged is not None and staged.transaction is transaction:
            self._staged = None
            if staged.tid is None:
                for path in staged.files.values():
                    remove_if_exists(path)  # stored, but published by nobody
            else:
                if staged.tid != tid:
                    logger.critical(
                        'Base storage %r committed tid %s, but its blob '
                        'files were published for tid %s', self.base,
                        oid_repr(tid), oid_repr(staged.tid))
                kill_point('after_base_finish')
                mine = [(oid, staged.tid, path)
                        for oid, path in staged.files.items()]
                # Final directories were fsynced at vote, unless the
                # transaction was made durable by syncfs: then its final
                # names wait for the next flush.
                retired = staged.retirable + (
                    [] if staged.synced_filesystem else mine)
                self._shared.journal.commit(
                    staged.tid, [(oid, serial) for oid, serial, path
                                 in retired])
                kill_point('after_journal_commit')
                for oid, serial, path in retired:
                    remove_if_exists(path)
                if staged.synced_filesystem:
                    self._shared.linked.extend(mine)
        return tid

    def _retire_all(self) -> None:
        """Make every final name durable and drop the staged names."""
        shared = self._shared
        if not shared.linked:
            return
        sync_filesystem(self.fshelper.base_dir)
        linked, shared.linked = shared.linked, []
        shared.journal.retire([(oid, tid) for oid, tid, path in linked])
        for oid, tid, path in linked:
            remove_if_exists(path)

    def tpc_abort(self, transaction):
        try:
            self.base.tpc_abort(transaction)
        finally:
            staged = self._staged
            if staged is not None and staged.transaction is transaction:
                self._staged = None
                for final in staged.published:
                    remove_if_exists(final)
                for path in staged.files.values():
                    remove_if_exists(path)
                if staged.tid is not None:
                    self._shared.journal.discard(staged.tid)
                # Their final names are durable, but not yet retired.
                self._shared.linked.extend(staged.retirable)

    # pack

    def pack(self, packtime, referencesf, *args, **kw):
        """Pack the base, then remove the blob files it no longer needs.

        The files to remove are the catalog's committed files minus the
        blob records the packed base still holds; the directory is never
        walked.
        """
        shared = self._shared
        if not shared.pack_lock.acquire(blocking=False):
            raise BlobStorageError('Already packing blob directory %s'
                                   % self.fshelper.base_dir)
        try:
            result = self.base.pack(packtime, referencesf, *args, **kw)
            kill_point('after_base_pack')
            # Read the catalog before the base: a file committed after this
            # read is not in `known`, so a pack never removes it.
            known = [(oid, tid) for oid, tid, size
                     in shared.journal.committed()]
            garbage = self._unreferenced(known)
            if garbage:
                shared.journal.mark_garbage(garbage)
                self._remove_blob_files(garbage)
        finally:
            shared.pack_lock.release()
        return result

    def _unreferenced(self, known):
        iterator = getattr(self.base, 'iterator', None)
        if iterator is None:
            garbage = []
            for oid, tid in known:
                try:
                    self.base.loadSerial(oid, tid)
                except (POSKeyError, KeyError):
                    garbage.append((oid, tid))
            return garbage
        # Only objects the catalog knows can have blob records, and a
        # store's blob records are few distinct pickles (usually one):
        # remember each pickle's answer instead of unpickling every record.
        known_oids = {oid for oid, tid in known}
        answers: dict[bytes, bool] = {}
        live = set()
        transactions = iterator()
        try:
            for transaction in transactions:
                for record in transaction:
                    if record.oid not in known_oids:
                        continue
                    data = record.data
                    answer = answers.get(data)
                    if answer is None:
                        answer = self.is_blob_record(data)
                        if len(answers) < 1024:
                            answers[data] = answer
                    if answer:
                        live.add((record.oid, record.tid))
        finally:
            close = getattr(transactions, 'close', None)
            if close is not None:
                close()
        return [pair for pair in known if pair not in live]

    def _remove_blob_files(self, garbage) -> None:
        # Files first, catalog second: a crash in between leaves catalog
        # rows whose files are gone, which the next pack removes again;
        # the other order would orphan files forever.
        fshelper = self.fshelper
        directories = set()
        for oid, tid in garbage:
            remove_if_exists(fshelper.getBlobFilename(oid, tid))
            kill_point('mid_pack_removal')
            if fshelper.layout.directory_per_oid:
                directories.add(fshelper.getPathForOID(oid))
        self._shared.journal.remove(garbage)
        for directory in directories:
            try:
                os.rmdir(directory)
            except OSError:
                pass  # other revisions still live there
        if garbage:
            logger.debug('Pack removed %d blob files from %s', len(garbage),
                         fshelper.base_dir)
