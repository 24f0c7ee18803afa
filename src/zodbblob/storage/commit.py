"""The commit protocol: stage, log, publish, finish; and the checkpoint.

Commit, in short (``doc/design.rst`` has the long form): ``storeBlob``
moves the file into the storage's staging directory; ``tpc_vote`` writes
the transaction's record to the commit log (with the blobs' bytes in it
when they are small; larger files are fdatasynced themselves first) and
starts its fdatasync (S1) in a worker thread while the base votes.

Two protocols follow, chosen per storage at open:

*serial*, for any base the storage did not open itself: vote waits for S1
and gives the files their final names; ``tpc_finish`` finishes the base
(its own sync, S2, is the commit point).  Two syncs, one after the other.

*one sync*, for a FileStorage the storage opened itself
(``filestorage.py``): vote does not wait; ``tpc_finish`` finishes the
base (S2 runs while S1 still may), then waits for S1, publishes the
files, and only then calls the caller's callback (ZODB's and ZEO's
invalidations) and lets ``lastTransaction`` show the new tid.  A wrapper
lock, held from ``tpc_begin`` to the end of ``tpc_finish`` or
``tpc_abort``, keeps every other commit out of the base meanwhile, so the
only transaction a power cut can leave torn (S2 durable, S1 not) is the
base's last one, whose files were never published and whose
``tpc_finish`` never returned: the next open rolls it back.

``tpc_abort`` removes whatever the transaction staged or published.  A
checkpoint (``checkpoint.py``) makes files, names and catalog durable
with one filesystem sync and starts the log afresh.

``CommitProtocol`` runs it for one storage instance (one transaction at a
time); ``checkpoint.Shared`` is what all MVCC instances of one storage
share.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import stat
import time

from ZODB.POSException import ReadOnlyError, StorageTransactionError
from ZODB.TimeStamp import TimeStamp
from ZODB.utils import oid_repr

from zodbblob.layout import (
    fsync_directory,
    fsync_path,
    makedirs_durable,
    remove_if_exists,
)
from zodbblob.storage.catalog import JournalError, kill_point, sync_filesystem
from zodbblob.storage.checkpoint import Shared, checkpoint
from zodbblob.storage.commitlog import Entry
from zodbblob.storage.dedup import Deduplicator
from zodbblob.storage.digest import TransactionDigests
from zodbblob.storage.bucketcommit import BucketCommit
from zodbblob.storage.onesync import OneSyncFinish

logger = logging.getLogger(__name__)

STAGING_PREFIX = 'staged-'
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
# Dedup publishes a file that is not inline as a link to a committed file
# of the same bytes; the new copy is then held by its staged name alone,
# until a checkpoint makes the link durable and lets the name go.  A
# commit after which such copies hold this many bytes or more checkpoints
# at once: a pasted folder's copies are freed by its commit, not 1,000
# transactions later (``bench/dedup.py``).
HELD_LIMIT = 1 << 20

# How far ahead of this machine's clock a chosen tid may be: a tid is a
# time, and one beyond it would be the storage's last tid until then.
MAX_TID_AHEAD = 24 * 60 * 60

_staging_counter = itertools.count()


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


def read_bytes(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read()


def committed_digest(shared: Shared, filename: str) -> bytes | None:
    """The catalog's digest of the committed blob file `filename`."""
    try:
        return shared.journal.digest(
            *shared.fshelper.splitBlobFilename(filename))
    except (ValueError, JournalError):
        return None   # the commit hashes it with the others, then


def check_tid(base, tid) -> None:
    """Refuse a tid a ZEO client chose that is not 8 bytes, not after the
    last transaction, or more than a day ahead: StorageTransactionError."""
    name = base.getName()
    if not isinstance(tid, bytes) or len(tid) != 8:
        raise StorageTransactionError(
            'Refused tid %s for storage %s: expected exactly 8 bytes'
            % (repr(tid)[:60], name))
    last = base.lastTransaction()
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


class _Staged:
    """The blob files of the transaction being committed."""

    def __init__(self, transaction):
        self.transaction = transaction
        self.files: dict[bytes, str] = {}      # oid -> staged path
        self.tid: bytes | None = None          # set once logged
        self.stats: list = []                  # (oid, path, stat), logged
        self.inline = False                    # bytes in the log record
        self.published: list[str] = []         # final paths, once voted
        self.directories: dict[str, int] = {}  # of the final names: mode
        self.syncing = None                    # one sync: S1's future
        self.digests = TransactionDigests()    # of the files' contents
        self.held = 0   # bytes of copies dedup linked away (not inline)
        # On a bucket (``objects.py``): undo's server-side copies, oid ->
        # (source tid, size); whether uploads started (an abort deletes
        # their keys); the digests the uploads computed.  By content
        # (``contents.py``): every blob's digest, known before the
        # record, and those `Contents.claim` counts on until the end.
        self.copies: dict[bytes, tuple[bytes, int]] = {}
        self.uploading = False
        self.uploaded: dict[bytes, bytes | None] = {}
        self.claimed: set[bytes] | None = None


class CommitProtocol(OneSyncFinish, BucketCommit):
    """The two-phase commit of blob files, for one storage instance."""

    def __init__(self, base, shared: Shared):
        self.base = base
        self.fshelper = shared.fshelper
        self._shared = shared
        self._staged: _Staged | None = None

    def begin(self, transaction, tid=None, status=' '):
        shared = self._shared
        if shared.failed:
            raise StorageTransactionError(
                f'Refused to commit to blob directory '
                f'{self.fshelper.base_dir}: {shared.failed}')
        if not shared.one_sync or shared.committer is transaction:
            # A second tpc_begin of one transaction: the base refuses it.
            return self._begin(transaction, tid, status)
        shared.committing.acquire()
        shared.committer = transaction
        try:
            return self._begin(transaction, tid, status)
        except BaseException:
            self._release(transaction)
            raise

    def _release(self, transaction) -> None:
        """One sync: let the next transaction commit."""
        shared = self._shared
        if shared.one_sync and shared.committer is transaction:
            shared.committer = None
            shared.committing.release()

    def _begin(self, transaction, tid, status):
        if tid is None:
            return self.base.tpc_begin(transaction)
        # A ZEO client may choose its tid.  One that is not after the last
        # transaction would name the blob files of a committed one (and
        # FileStorage only warns); one far in the future would stay the
        # last tid for good (b'\xff' * 8 breaks every later DB open).
        check_tid(self.base, tid)
        if status == ' ':
            # MappingStorage takes no status.
            self.base.tpc_begin(transaction, tid)
        else:
            self.base.tpc_begin(transaction, tid, status)
        # Again under the base's commit lock: another transaction may have
        # committed since the check above.
        try:
            check_tid(self.base, tid)
        except StorageTransactionError:
            self.base.tpc_abort(transaction)
            raise

    def _stage(self, transaction) -> _Staged:
        staged = self._staged
        if staged is None or staged.transaction is not transaction:
            if self._shared.read_only:
                raise ReadOnlyError()
            staged = self._staged = _Staged(transaction)
        return staged

    def staging_path(self) -> str:
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

    def take(self, oid: bytes, filename: str, transaction, link=False):
        """Own `filename` as the blob of `oid` in `transaction`."""
        staged = self._stage(transaction)
        target = self.staging_path()
        if link:
            link_or_copy(filename, target)
        else:
            rename_or_copy(filename, target)
        staged.digests.known[oid] = (  # undo links: the source's digest
            committed_digest(self._shared, filename) if link else None)
        staged.files[oid] = target
        staged.copies.pop(oid, None)

    def vote(self, transaction):
        staged = self._staged
        if staged is None or staged.transaction is not transaction:
            return self.base.tpc_vote(transaction)
        if self._shared.objects is not None:
            return self._vote_uploading(staged, transaction)
        syncing = self._log(staged)
        try:
            result = self.base.tpc_vote(transaction)
            kill_point('after_base_vote')
            self._make_directories(staged)
        except BaseException:
            syncing.result()
            raise
        if self._shared.one_sync:
            # Published at finish, once S1 has returned: a file with its
            # final name before its record is durable could outlive a
            # power cut that took the record, an orphan nobody finds.
            staged.syncing = syncing
            return result
        syncing.result()
        kill_point('after_journal_begin')
        self._publish(staged)
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
        staged.inline = shared.objects is None and sum(
            info.st_size for oid, path, info in files) <= INLINE_LIMIT
        if shared.objects is not None:
            # The bucket keeps the bytes: the record only names the keys
            # (from oid and tid) for a recovery to delete, and the staged
            # files need not be durable.
            # By content, each entry names its digest (its content key).
            entries = [Entry(oid, info.st_size,
                             staged=os.path.relpath(path, temp_dir),
                             digest=staged.uploaded.get(oid))
                       for oid, path, info in files]
            entries += [Entry(oid, size, staged='copy-of-' + source.hex(),
                              digest=staged.uploaded.get(oid))
                        for oid, (source, size) in staged.copies.items()]
        elif staged.inline:
            entries = [Entry(oid, info.st_size, data=read_bytes(path))
                       for oid, path, info in files]
            staged.digests.of_entries(entries)   # hashed from these bytes
        else:
            if shared.dedup:
                # Dedup needs them at publish: hashed in threads while
                # they are made durable.  Without dedup, the scrubber
                # hashes them later (``scrub.py``); commit never waits.
                staged.digests.start(self._shared.hasher(), [
                    (oid, (path, self.fshelper.getBlobFilename(oid, tid)))
                    for oid, path, info in files])
            self._make_durable([path for oid, path, info in files])
            kill_point('after_staging_fsync')
            entries = [Entry(oid, info.st_size,
                             staged=os.path.relpath(path, temp_dir))
                       for oid, path, info in files]
        if not shared.commit_log.fits(entries):
            checkpoint(shared)
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

    def _make_directories(self, staged: _Staged) -> None:
        """Create the directories of the files' final names, and clear
        those names of what an earlier, aborted try left there.

        At vote, before the base finishes: only a tid after the base's
        last transaction may find a file at a final name; one that is not
        would have the publish replace a committed blob.
        """
        directories = staged.directories
        last = None
        # The checkpoint's syncfs makes new directories durable; where it
        # would not, each is made durable now.
        syncfs = self._shared.syncfs_works
        for oid, path, info in staged.stats:
            final = self.fshelper.getBlobFilename(oid, staged.tid)
            directory = os.path.dirname(final)
            if directory not in directories:
                if syncfs:
                    os.makedirs(directory, exist_ok=True)
                else:
                    makedirs_durable(directory)
                directories[directory] = os.stat(directory).st_mode
            if os.path.lexists(final):
                if last is None:
                    last = self.base.lastTransaction()
                if staged.tid <= last:
                    raise StorageTransactionError(
                        'Refused to replace committed blob file %s: '
                        'expected a tid after the last transaction %s'
                        % (final, last.hex()))
                os.unlink(final)

    def _publish(self, staged: _Staged) -> None:
        """Give the logged transaction's files their final names.

        Runs once the record is durable, and before anyone can learn the
        tid: in the serial protocol after the base voted, with one sync
        after the base finished but before the caller's callback.
        """
        directories = staged.directories
        dedup = (Deduplicator(self._shared, staged) if self._shared.dedup
                 else None)
        for oid, path, info in staged.stats:
            final = self.fshelper.getBlobFilename(oid, staged.tid)
            mode = directories[os.path.dirname(final)]
            # As in ZODB: committed files are not writable, and readable by
            # whoever may read their directory.
            os.chmod(path, (stat.S_IMODE(info.st_mode) & ~0o222)
                     | (mode & 0o444))
            if dedup is not None and dedup.publish(oid, path, final):
                # A link to a committed file of the same bytes.  A staged
                # name of a file that is not inline stays until the
                # checkpoint: recovery checks the final name against it.
                if staged.inline:
                    os.remove(path)
                else:
                    staged.held += info.st_size
            else:
                if staged.inline:
                    os.replace(path, final)
                else:
                    os.link(path, final)
                if dedup is not None:
                    dedup.published(oid, final)
            staged.published.append(final)
            kill_point('mid_publish')

    def _make_durable(self, paths: list[str]) -> None:
        """Make the bytes of staged files and their staged names durable."""
        if len(paths) >= SYNCFS_THRESHOLD and self._shared.syncfs_works:
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

    def finish(self, transaction, f=None):
        if self._shared.one_sync:
            try:
                return self._finish_one_sync(transaction, f)
            finally:
                self._release(transaction)
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
            if shared.objects is not None:
                self._finished_on_bucket(staged)
            else:
                self._finished_locally(staged)
        finally:
            self._done_logging()
        if (len(shared.commit_log) >= CHECKPOINT_RECORDS
                or shared.held >= HELD_LIMIT):
            try:
                checkpoint(shared)
            except Exception as e:
                # Whatever failed, the transaction has committed, and must
                # not be reported as failed.  The log keeps its records (a
                # checkpoint first syncs, then lets them go), and the next
                # commit, or the first whose record does not fit, tries
                # again.
                logger.warning('Could not checkpoint blob directory %s '
                               'after a commit (%s); its commit log keeps '
                               'the transactions', self.fshelper.base_dir, e)


    def _finished_locally(self, staged: _Staged) -> None:
        """The rows of a committed transaction; its files for the next
        checkpoint to make durable (and its staged names to let go)."""
        shared = self._shared
        digests = staged.digests.result()
        shared.journal.add([(oid, staged.tid, info.st_size,
                             digests.get(oid))
                            for oid, path, info in staged.stats])
        kill_point('after_journal_commit')
        if shared.scrubber is not None and any(
                digests.get(oid) is None for oid, p, i in staged.stats):
            shared.scrubber.wake()
        with shared.logging:
            shared.unsynced.extend(staged.published)
            if not staged.inline:
                shared.linked.extend(staged.files.values())
                shared.held += staged.held

    def abort(self, transaction):
        try:
            self.base.tpc_abort(transaction)
        finally:
            try:
                self._abort_staged(transaction)
            finally:
                self._release(transaction)

    def _abort_staged(self, transaction) -> None:
        staged = self._staged
        if staged is not None and staged.transaction is transaction:
            self._staged = None
            staged.digests.cancel()
            if staged.syncing is not None:
                try:
                    staged.syncing.result()
                except OSError:
                    pass   # the abort record says it all the same
            for final in staged.published:
                remove_if_exists(final)
            for path in staged.files.values():
                remove_if_exists(path)
            if staged.tid is not None:
                try:
                    if self._deleted_uploads(staged):
                        self._shared.commit_log.abort(staged.tid)
                finally:
                    self._done_logging()
