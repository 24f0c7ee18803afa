"""BlobStorage: blob support for any ZODB storage, as a wrapper.

A drop-in for ``ZODB.blob.BlobStorage(blob_dir, base, layout)``.  The
wrapper defines every method that has to see blob files and delegates the
rest explicitly: the base's methods are bound onto the wrapper at
construction (``copied_methods``) and ``__getattr__`` covers anything else,
so there is no proxy whose methods rebind to the base behind our back.

Commit, in short (``doc/design.rst`` has the long form): ``storeBlob``
moves the file into the storage's staging directory; ``tpc_vote`` writes
the transaction's record to the commit log (with the blobs' bytes in it
when they are small; larger files are fdatasynced themselves first) and
fdatasyncs it in a worker thread while the base votes, then gives the
files their final names; ``tpc_finish`` finishes the base (the commit
point) and adds the files to the catalog; ``tpc_abort`` removes whatever
the transaction staged or published.  A checkpoint (every
CHECKPOINT_RECORDS transactions, when the log is full, around a pack and
at close) makes files, names and catalog durable with one filesystem sync
and starts the log afresh.
Opening the storage replays the log's records since the last checkpoint.
"""

from __future__ import annotations

import base64
import concurrent.futures
import errno
import itertools
import logging
import os
import shutil
import stat
import threading
import time

import zc.lockfile
import zope.interface
import ZODB.blob
import ZODB.interfaces
from ZODB.POSException import POSKeyError
from ZODB.POSException import ReadOnlyError
from ZODB.POSException import StorageTransactionError
from ZODB.TimeStamp import TimeStamp
from ZODB.utils import oid_repr
from ZODB.utils import z64

from zodbblob.storage.commitlog import CommitLog
from zodbblob.storage.commitlog import CommitLogError
from zodbblob.storage.commitlog import Entry
from zodbblob.storage.commitlog import commit_log_path
from zodbblob.storage.commitlog import latest_entries
from zodbblob.storage.datamanager import TransactionDirectories
from zodbblob.storage.catalog import STATE_DIR
from zodbblob.storage.catalog import SYNCFS_AVAILABLE
from zodbblob.storage.catalog import Journal
from zodbblob.storage.catalog import JournalError
from zodbblob.storage.catalog import journal_path
from zodbblob.storage.catalog import kill_point
from zodbblob.storage.catalog import sync_filesystem
from zodbblob.layout import LAYOUT_MARKER
from zodbblob.layout import FilesystemHelper
from zodbblob.layout import check_id
from zodbblob.layout import file_kind
from zodbblob.layout import fsync_directory
from zodbblob.layout import fsync_path
from zodbblob.layout import makedirs_durable
from zodbblob.layout import remove_if_exists


logger = logging.getLogger(__name__)

STAGING_PREFIX = 'staged-'
LOCK_NAME = 'lock'
# A transaction whose blobs add up to at most this many bytes writes them
# into its commit log record: one fdatasync makes them durable, and their
# files reach the disk at the next checkpoint.  Larger transactions make
# their files durable themselves, and log only their names.
INLINE_LIMIT = 8 * 1024 * 1024
# A transaction with this many files that are not inline makes them
# durable with one syncfs (1000 files: 18 ms against 173 ms for an fsync
# each here); below it, fdatasyncs win, and do not pay for other programs'
# dirty data the way syncfs does.
SYNCFS_THRESHOLD = 8
# A checkpoint after this many logged transactions bounds what recovery
# reads and what the staging directory holds.
CHECKPOINT_RECORDS = 1000

# How far ahead of this machine's clock a chosen tid may be: a tid is a
# time, and one beyond it would be the storage's last tid until then.
MAX_TID_AHEAD = 24 * 60 * 60

_staging_counter = itertools.count()


class BlobStorageError(Exception):
    """The blob storage cannot do what was asked, as the message says."""


class BlobDirectoryInUse(BlobStorageError):
    """A live storage holds the blob directory."""


def check_state_layout(blob_dir: str) -> None:
    """Refuse a blob directory whose state has the wrong kind of file.

    ``.zodbblob`` a regular file, ``journal.sqlite`` or ``commit.log`` a
    directory: opening would fail deep in SQLite or ``os.makedirs`` with
    an error that names no path, or (read-only) go on without the
    catalog.  ValueError, one line naming the path and what it is;
    nothing is read, created or moved aside.  A missing name is fine: a
    new or stock blob directory has none of these.
    """
    blob_dir = os.path.normpath(blob_dir)
    if not os.path.isdir(blob_dir):
        return   # the layout's own check names a blob_dir that is a file
    state_dir = os.path.join(blob_dir, STATE_DIR)
    journal = journal_path(blob_dir)
    expected = [(os.path.join(blob_dir, LAYOUT_MARKER), False),
                (os.path.join(blob_dir, 'tmp'), True),
                (state_dir, True)]
    for path in (journal, journal + '-wal', journal + '-shm',
                 commit_log_path(blob_dir),
                 os.path.join(state_dir, LOCK_NAME)):
        expected.append((path, False))
    for path, directory in expected:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            if os.path.lexists(path):
                raise ValueError(f'{path} is a symbolic link to '
                                 f'{os.readlink(path)}, which does not '
                                 f'exist') from None
            continue
        except NotADirectoryError:
            continue   # below .zodbblob, refused already
        if directory and not stat.S_ISDIR(mode):
            raise ValueError(f'{path} is {file_kind(mode)}, not a '
                             f'directory')
        if not directory and not stat.S_ISREG(mode):
            raise ValueError(f'{path} is {file_kind(mode)}, not a regular '
                             f'file')


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


def held_by_a_storage(blob_dir: str) -> bool:
    """Whether a storage holds `blob_dir` now (a server, an application).

    Its lock is taken and let go at once.
    """
    try:
        lock = hold_blob_directory(blob_dir)
    except BlobDirectoryInUse:
        return True
    except OSError:
        return False   # a read-only directory: no storage writes there
    if lock is not None:
        lock.close()
    return False


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


def _read(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read()


def _holds(path: str, data: bytes) -> bool:
    """Whether the file at `path` holds exactly `data`."""
    try:
        if os.stat(path).st_size != len(data):
            return False
        return _read(path) == data
    except FileNotFoundError:
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
        self.commit_log: CommitLog | None = None
        # Logged transactions not yet finished or aborted; a checkpoint
        # waits for none, and holds `logging` so that none starts.
        self.logging = threading.Condition()
        self.in_flight = 0
        # Since the last checkpoint: the final names of committed files
        # (without syncfs, the checkpoint fsyncs them one by one), and the
        # staged names of files that were not inline, kept until the
        # checkpoint makes their final names durable.
        self.unsynced: list[str] = []
        self.linked: list[str] = []
        self._syncer: concurrent.futures.ThreadPoolExecutor | None = None

    def syncer(self) -> concurrent.futures.ThreadPoolExecutor:
        """The thread that fdatasyncs commit log records."""
        if self._syncer is None:
            self._syncer = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix='zodbblob-commit-log')
        return self._syncer

    def close(self) -> None:
        if self._syncer is not None:
            self._syncer.shutdown()
            self._syncer = None


class _Staged:
    """The blob files of the transaction being committed."""

    def __init__(self, transaction):
        self.transaction = transaction
        self.files: dict[bytes, str] = {}      # oid -> staged path
        self.tid: bytes | None = None          # set once logged
        self.stats: list = []                  # (oid, path, stat), logged
        self.inline = False                    # bytes in the log record
        self.published: list[str] = []         # final paths, once voted


@zope.interface.implementer(ZODB.interfaces.IBlobStorage,
                            ZODB.interfaces.IStorageWrapper)
class BlobStorage:
    """Blob support for `base`, with blob files under `blob_dir`."""

    # Bound from the base at construction: these need no blob handling.
    copied_methods = (
        'getName', 'getTid', 'history', 'isReadOnly', 'lastTransaction',
        'load', 'loadBefore', 'loadSerial', 'new_oid', 'prefetch',
        'release', 'sortKey', 'supportsUndo',
        'undoInfo', 'undoLog', 'checkCurrentSerialInTransaction',
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
        # Only where the base has it: copyTransactionsFrom asks whether a
        # storage can restore.
        if getattr(base, 'restore', None) is not None:
            self.restore = self._restore
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
        check_state_layout(blob_dir)
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
            try:
                shared.commit_log = CommitLog(
                    commit_log_path(fshelper.base_dir))
            except CommitLogError:
                journal.close()
                raise
            self._shared, self.fshelper = shared, fshelper
            try:
                self._recover(journal, fshelper)
                journal.set_meta(state='open')
            except BaseException:
                shared.commit_log.close()
                journal.close()
                raise
        except BaseException:
            lock.close()
            raise
        return shared

    def _open_journal(self, fshelper) -> Journal:
        path = journal_path(fshelper.base_dir)
        try:
            journal = Journal(fshelper.base_dir)
        except JournalError as e:
            damage = str(e)
        else:
            damage = journal.check()
            if damage is not None:
                journal.close()
        if damage is not None:
            # Moved aside, never deleted: the rows are rebuilt from a scan
            # (and the commit log, which recovery replays next), but the
            # file may be wanted to see what happened.
            aside = path + '.corrupt'
            os.replace(path, aside)
            remove_if_exists(aside + '-wal')
            if os.path.exists(path + '-wal'):
                os.replace(path + '-wal', aside + '-wal')
            remove_if_exists(path + '-shm')
            journal = Journal(fshelper.base_dir)
            self._rebuild(journal, fshelper, 'the catalog %s was damaged (%s) '
                          'and was moved to %s' % (path, damage, aside),
                          level=logging.WARNING)
            return journal
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

    def _rebuild(self, journal, fshelper, reason: str,
                 level: int | None = None) -> None:
        blobs = [(oid, tid, os.stat(path).st_size)
                 for oid, tid, path in fshelper.iter_blobs()]
        if level is None:
            level = logging.WARNING if blobs else logging.DEBUG
        logger.log(level, 'Rebuilt the blob catalog of %s from a scan (%s): '
                   '%d blob files', fshelper.base_dir, reason, len(blobs))
        journal.rebuild(blobs)

    def _recover(self, journal, fshelper) -> None:
        """Finish or undo what a crash interrupted, then clear staging.

        Each blob file a record of the commit log names since the last
        checkpoint is decided on its own: if the base storage has that
        revision, the file gets its final name and exact bytes (rewritten
        from the record, or linked from its staged name) and its catalog
        row; if not, the file and row are removed.  A file whose revision
        the base has is never removed.  Replaying twice is harmless.
        """
        shared = self._shared
        latest = latest_entries(shared.commit_log.records)
        in_catalog = journal.known(latest)
        forward, back, rows, gone = set(), set(), [], []
        for (oid, tid), entry in sorted(latest.items(),
                                        key=lambda item: item[0][::-1]):
            final = fshelper.getBlobFilename(oid, tid)
            if self._base_has(oid, tid):
                if entry is None:
                    continue  # aborted; the revision is someone else's
                if self._roll_forward(entry, final, tid):
                    forward.add(tid)
                if (oid, tid) not in in_catalog:
                    rows.append((oid, tid, entry.size))
                shared.unsynced.append(final)
            else:
                if entry is not None:
                    back.add(tid)
                remove_if_exists(final)
                if entry is not None and entry.staged:
                    remove_if_exists(os.path.join(fshelper.temp_dir,
                                                  entry.staged))
                if (oid, tid) in in_catalog:
                    gone.append((oid, tid))
            kill_point('mid_recovery')
        journal.add(rows)
        journal.remove(gone)
        self._checkpoint()
        for tid in sorted(forward | back):
            logger.warning(
                'Recovered blob directory %s: rolled %s the blob files '
                'of interrupted transaction %s', fshelper.base_dir,
                'back' if tid in back else 'forward', oid_repr(tid))
        # A process that ended without closing its storage (Zope does, on
        # every SIGTERM) leaves its last rows to the log: routine, no alarm.
        rows_only = {tid for _, tid, _ in rows} - forward - back
        if rows_only:
            logger.info('Recovered blob directory %s: wrote the catalog rows '
                        'of %d committed transactions from the commit log',
                        fshelper.base_dir, len(rows_only))
        garbage = journal.garbage()
        if garbage:
            logger.warning('Recovered blob directory %s: finished removing '
                           'the %d blob files of an interrupted pack',
                           fshelper.base_dir, len(garbage))
            self._remove_blob_files(garbage)
        if journal.pack_started() is not None:
            self._finish_pack(journal, fshelper, quiet=bool(garbage))
        # Staging belongs to the storage holding the blob directory's lock,
        # and that is the one opening now: what is there is left over.
        if os.path.isdir(fshelper.temp_dir):
            for name in os.listdir(fshelper.temp_dir):
                path = os.path.join(fshelper.temp_dir, name)
                if name.startswith(STAGING_PREFIX) and os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
        # Uncommitted files of processes that died: nobody can commit them
        # any more.
        shared.directories = TransactionDirectories(fshelper.temp_dir)
        for path in shared.directories.sweep():
            logger.warning('Removed %s: uncommitted blob files of a process '
                           'that ended', path)

    def _finish_pack(self, journal, fshelper, quiet: bool) -> None:
        """Remove the files of a pack killed before it marked its garbage.

        The base may have packed: every catalog row whose revision the
        base no longer has is garbage.  Asked with ``loadSerial``, not by
        unpickling records: there is no database yet to untransform them,
        and a revision the base still has is never removed.
        """
        garbage = [(oid, tid) for oid, tid, size in journal.committed()
                   if not self._base_has(oid, tid)]
        if garbage:
            journal.mark_garbage(garbage)
            self._remove_blob_files(garbage)
        if garbage or not quiet:
            logger.warning('Recovered blob directory %s: finished a pack '
                           'interrupted after its base storage packed (%d '
                           'blob files removed)', fshelper.base_dir,
                           len(garbage))
        journal.end_pack()

    def _roll_forward(self, entry: Entry, final: str, tid: bytes) -> bool:
        """Give a committed file its final name and bytes; True if needed."""
        if entry.data is not None:
            if _holds(final, entry.data):
                return False
            self._rewrite(final, entry.data)
            return True
        if os.path.exists(final):
            return False
        staged = os.path.join(self.fshelper.temp_dir, entry.staged)
        if os.path.exists(staged):
            makedirs_durable(os.path.dirname(final))
            os.link(staged, final)
        else:
            logger.error('Blob file %s of oid %s tid %s is lost: neither it '
                         'nor %s exists', final, oid_repr(entry.oid),
                         oid_repr(tid), staged)
        return True

    def _rewrite(self, final: str, data: bytes) -> None:
        """Write `final` afresh from the commit log's copy of its bytes."""
        directory = os.path.dirname(final)
        makedirs_durable(directory)
        temporary = os.path.join(self.fshelper.temp_dir,
                                 'recovered-%d.blob' % os.getpid())
        with open(temporary, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, os.stat(directory).st_mode & 0o444)
        os.replace(temporary, final)

    def _base_has(self, oid: bytes, tid: bytes) -> bool:
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
                try:
                    self._checkpoint()
                    shared.journal.set_meta(
                        state='closed', last_tid=self.base.lastTransaction())
                except (JournalError, OSError) as e:
                    # Nothing committed is lost: the commit log keeps the
                    # transactions whose rows could not be written, and
                    # the next open replays them.
                    logger.warning('Closed blob directory %s without a '
                                   'checkpoint (%s); the next open replays '
                                   'its commit log', self.fshelper.base_dir,
                                   e)
        finally:
            self.base.close()
            if shared.staging_dir is not None:
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
        filename = self.fshelper.getBlobFilename(
            self._check_id(oid, 'oid'), self._check_id(serial, 'serial'))
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
        if tid is None:
            return self.base.tpc_begin(transaction)
        # A ZEO client may choose its tid.  One that is not after the last
        # transaction would name the blob files of a committed one (and
        # FileStorage only warns); one far in the future would stay the
        # last tid for good (b'\xff' * 8 breaks every later DB open).
        self._check_tid(tid)
        if status == ' ':
            # MappingStorage takes no status.
            self.base.tpc_begin(transaction, tid)
        else:
            self.base.tpc_begin(transaction, tid, status)
        # Again under the base's commit lock: another transaction may have
        # committed since the check above.
        try:
            self._check_tid(tid)
        except StorageTransactionError:
            self.base.tpc_abort(transaction)
            raise

    def _check_tid(self, tid) -> None:
        name = self.base.getName()
        if not isinstance(tid, bytes) or len(tid) != 8:
            raise StorageTransactionError(
                'Refused tid %s for storage %s: expected exactly 8 bytes'
                % (repr(tid)[:60], name))
        last = self.base.lastTransaction()
        if tid <= last:
            raise StorageTransactionError(
                'Refused tid %s for storage %s: expected a tid after its '
                'last transaction %s' % (tid.hex(), name, last.hex()))
        now = time.time()
        limit = TimeStamp(*time.gmtime(now + MAX_TID_AHEAD)[:5],
                          (now + MAX_TID_AHEAD) % 60).raw()
        if tid > limit:
            raise StorageTransactionError(
                'Refused tid %s for storage %s: expected a time no more than '
                'a day ahead, this is %s' % (tid.hex(), name,
                                              TimeStamp(tid)))

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
            # Durable once: files that are not inline are found by their
            # staged names after a crash.
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
        self._take(oid, blobfilename, transaction)
        result = self.base.store(oid, oldserial, data, '', transaction)
        kill_point('after_store_blob')
        return result

    def restoreBlob(self, oid, serial, data, blobfilename, prev_txn,
                    transaction):
        oid = self._check_id(oid, 'oid')
        serial = self._check_id(serial, 'serial')
        self._take(oid, blobfilename, transaction)
        self.base.restore(oid, serial, data, '', prev_txn, transaction)

    def undo(self, transaction_id, transaction):
        undo_tid, oids = self.base.undo(transaction_id, transaction)
        undone_tid = base64.decodebytes(transaction_id + b'\n')
        # Only the oids the undo touched, not a walk of the directory; and
        # the restored revision is linked, not copied: blob files never
        # change once committed, so two names for one file are safe.
        # Undo gives each oid its state from before the undone
        # transaction: a file only where that state is a blob record.  An
        # oid the undone transaction created (a Blob that replaced
        # another) gets none: its undo record says it does not exist.
        for oid in oids:
            try:
                before = self.base.loadBefore(oid, undone_tid)
            except (POSKeyError, KeyError):
                before = None
            if before is None or not self.is_blob_record(before[0]):
                continue
            source = self.fshelper.getBlobFilename(oid, before[1])
            if not os.path.exists(source):
                continue  # packed away; the base's undo would have failed
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
        staged = self._staged
        if staged is None or staged.transaction is not transaction:
            return self.base.tpc_vote(transaction)
        syncing = self._log(staged)
        try:
            result = self.base.tpc_vote(transaction)
            kill_point('after_base_vote')
            directories = self._make_directories(staged)
        finally:
            syncing.result()
        kill_point('after_journal_begin')
        self._publish(staged, directories)
        kill_point('after_publish')
        return result

    def _log(self, staged: _Staged):
        """Write the transaction's record; return its fdatasync's future.

        Runs before the base votes, and the record's fdatasync runs in a
        worker thread meanwhile: the base's vote and the mkdirs of the
        files' directories overlap it, and only then do the files get
        their final names.  A crash before the sync returned leaves at
        most empty directories and a record that recovery checks against
        the base.

        Small transactions put their blobs' bytes in the record, so its
        one fdatasync is the only sync before the base commits; their
        files reach the disk at the next checkpoint.  Larger ones make
        their files and staged names durable first (an fdatasync per file
        and one fsync of the staging directory, or one syncfs for many
        files), and log only the names; the staged names stay until the
        next checkpoint.
        """
        shared = self._shared
        tid = self.base._tid
        temp_dir = self.fshelper.temp_dir
        files = [(oid, path, os.stat(path))
                 for oid, path in staged.files.items()]
        staged.inline = sum(info.st_size
                            for oid, path, info in files) <= INLINE_LIMIT
        if staged.inline:
            entries = [Entry(oid, info.st_size, data=_read(path))
                       for oid, path, info in files]
        else:
            self._make_durable([path for oid, path, info in files])
            kill_point('after_staging_fsync')
            entries = [Entry(oid, info.st_size,
                             staged=os.path.relpath(path, temp_dir))
                       for oid, path, info in files]
        if not shared.commit_log.fits(entries):
            self._checkpoint()
        with shared.logging:
            shared.in_flight += 1
        try:
            shared.commit_log.append(tid, entries, durable=False)
        except BaseException:
            self._done_logging()
            raise
        staged.tid = tid
        staged.stats = files
        return shared.syncer().submit(shared.commit_log.sync)

    def _make_directories(self, staged: _Staged) -> dict[str, int]:
        """Create the directories of the files' final names: {dir: mode}."""
        directories: dict[str, int] = {}
        for oid, path, info in staged.stats:
            directory = os.path.dirname(
                self.fshelper.getBlobFilename(oid, staged.tid))
            if directory not in directories:
                if SYNCFS_AVAILABLE:
                    os.makedirs(directory, exist_ok=True)
                else:
                    makedirs_durable(directory)
                directories[directory] = os.stat(directory).st_mode
        return directories

    def _publish(self, staged: _Staged, directories: dict[str, int]) -> None:
        """Give the logged transaction's files their final names.

        Runs after the base voted and before it finishes: the files are in
        place before anyone can learn the tid.
        """
        last = None
        for oid, path, info in staged.stats:
            final = self.fshelper.getBlobFilename(oid, staged.tid)
            if os.path.lexists(final):
                # Only a tid after the base's last transaction may find a
                # file here (left by an earlier, aborted try); one that is
                # not would have the rename replace a committed blob.
                if last is None:
                    last = self.base.lastTransaction()
                if staged.tid <= last:
                    raise StorageTransactionError(
                        'Refused to replace committed blob file %s: '
                        'expected a tid after the last transaction %s'
                        % (final, last.hex()))
                os.unlink(final)
            mode = directories[os.path.dirname(final)]
            # As in ZODB: committed files are not writable, and readable by
            # whoever may read their directory.
            os.chmod(path, (stat.S_IMODE(info.st_mode) & ~0o222)
                     | (mode & 0o444))
            if staged.inline:
                os.replace(path, final)
            else:
                os.link(path, final)
            staged.published.append(final)
            kill_point('mid_publish')

    def _make_durable(self, paths: list[str]) -> None:
        """Make the bytes of staged files and their staged names durable."""
        if SYNCFS_AVAILABLE and len(paths) >= SYNCFS_THRESHOLD:
            sync_filesystem(self.fshelper.base_dir)
            return
        for path in paths:
            fsync_path(path, data_only=True)
        for directory in {os.path.dirname(path) for path in paths}:
            fsync_directory(directory)

    def _done_logging(self) -> None:
        shared = self._shared
        with shared.logging:
            shared.in_flight -= 1
            shared.logging.notify_all()

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
                self._finished(staged, tid)
        return tid

    def _finished(self, staged: _Staged, tid: bytes) -> None:
        shared = self._shared
        try:
            if staged.tid != tid:
                logger.critical(
                    'Base storage %r committed tid %s, but its blob '
                    'files were published for tid %s', self.base,
                    oid_repr(tid), oid_repr(staged.tid))
            kill_point('after_base_finish')
            shared.journal.add([(oid, staged.tid, info.st_size)
                                for oid, path, info in staged.stats])
            kill_point('after_journal_commit')
            with shared.logging:
                shared.unsynced.extend(staged.published)
                if not staged.inline:
                    shared.linked.extend(staged.files.values())
        finally:
            self._done_logging()
        if len(shared.commit_log) >= CHECKPOINT_RECORDS:
            try:
                self._checkpoint()
            except Exception as e:
                # Whatever failed, the transaction has committed, and must
                # not be reported as failed.  The log keeps its records (a
                # checkpoint first syncs, then lets them go), and the next
                # commit, or the first whose record does not fit, tries
                # again.
                logger.warning('Could not checkpoint blob directory %s '
                               'after a commit (%s); its commit log keeps '
                               'the transactions', self.fshelper.base_dir, e)

    def _checkpoint(self) -> None:
        """Make every logged transaction durable; start the log afresh.

        Waits until no logged transaction is still finishing, and holds
        off new ones meanwhile.  One syncfs covers the files, their names
        and the catalog; without syncfs, each file and directory is
        fsynced.  Then the staged names kept for files that were not
        inline can go.
        """
        shared = self._shared
        with shared.logging:
            while shared.in_flight:
                shared.logging.wait()
            if not len(shared.commit_log) and not shared.linked:
                return
            if SYNCFS_AVAILABLE:
                shared.journal.flush()
                sync_filesystem(self.fshelper.base_dir)
            else:
                for path in shared.unsynced:
                    if os.path.exists(path):
                        fsync_path(path)
                for directory in {os.path.dirname(path)
                                  for path in shared.unsynced}:
                    if os.path.isdir(directory):
                        fsync_directory(directory)
                shared.journal.sync()
            kill_point('mid_checkpoint')
            shared.commit_log.checkpoint()
            linked, shared.linked, shared.unsynced = shared.linked, [], []
        for path in linked:
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
                    try:
                        self._shared.commit_log.abort(staged.tid)
                    finally:
                        self._done_logging()

    # pack

    def pack(self, packtime, referencesf, *args, **kw):
        """Pack the base, then remove the blob files it no longer needs.

        The files to remove are the catalog's committed files minus the
        blob records the packed base still holds; the directory is never
        walked.  The pack's intent is recorded first, so that a kill after
        the base packed and before the files are marked is finished by the
        next open.
        """
        shared = self._shared
        if shared.read_only:
            raise ReadOnlyError()
        if not shared.pack_lock.acquire(blocking=False):
            raise BlobStorageError('Already packing blob directory %s'
                                   % self.fshelper.base_dir)
        try:
            shared.journal.begin_pack(packtime)
            # No record from before the pack may be replayed after it: a
            # kill before the files are removed would have recovery take
            # the packed revisions for interrupted transactions.  After
            # this checkpoint the next open's _finish_pack removes them.
            self._checkpoint()
            try:
                result = self.base.pack(packtime, referencesf, *args, **kw)
            except BaseException:
                # The base did not pack (FileStorage swaps in the packed
                # file last): there is nothing for the next open to finish.
                try:
                    shared.journal.end_pack()
                except JournalError:
                    pass  # the next open finds the intent, and finishes
                raise
            kill_point('after_base_pack')
            # Read the catalog before the base: a file committed after this
            # read is not in `known`, so a pack never removes it.
            known = [(oid, tid) for oid, tid, size
                     in shared.journal.committed()]
            garbage = self._unreferenced(known)
            if garbage:
                shared.journal.mark_garbage(garbage)
                self._remove_blob_files(garbage)
                # No record from before the pack outlives it: recovery
                # would find their removed revisions missing from the
                # base, and call them interrupted.
                self._checkpoint()
            shared.journal.end_pack()
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
