"""One sync's finish: the base finishes while the record's sync may run.

``CommitProtocol`` (``commit.py``) commits with one sync for a base the
storage opened itself: ``tpc_finish`` finishes the base (its fsync of
``Data.fs``, S2) while the commit record's fdatasync (S1) may still run,
then waits for S1, publishes the files, and only then calls the caller's
callback and lets ``lastTransaction()`` show the tid.  Should S1 fail,
the files themselves are made durable; should that fail too, the commit
is reported failed and the storage refuses every later commit (the next
open rolls the transaction back).
"""

from __future__ import annotations

import logging

from ZODB.utils import oid_repr

from zodbblob.layout import remove_if_exists
from zodbblob.storage.catalog import kill_point, sync_filesystem
from zodbblob.storage.lock import BlobStorageError

logger = logging.getLogger(__name__)


class OneSyncFinish:
    """The one-sync half of ``CommitProtocol``'s finish (a mixin: it works
    on the protocol's staged transaction, base and shared state)."""

    def _finish_one_sync(self, transaction, f):
        """Finish the base while S1 may still run; then wait for S1,
        publish, and only then tell the caller (``f``) and show the tid.

        Until then nobody can learn the new tid: ``lastTransaction()``
        says the one before (ZODB's MVCC adapter and ZEO's server ask it),
        the invalidations that ZODB and ZEO send from ``f`` wait, and a
        ``loadBlob`` of the tid waits for its files.
        """
        shared = self._shared
        staged = self._staged
        if staged is None or staged.transaction is not transaction:
            staged = None
        if staged is None or staged.tid is None:
            tid = (self.base.tpc_finish(transaction) if f is None
                   else self.base.tpc_finish(transaction, f))
            if staged is not None:
                self._staged = None
                for path in staged.files.values():
                    remove_if_exists(path)  # stored, published by nobody
            return tid
        with shared.published:
            shared.visible_tid = self.base.lastTransaction()
            shared.publishing = staged.tid
        tid = None
        failure = None
        try:
            tid = self.base.tpc_finish(transaction)
            self._staged = None
            kill_point('after_base_finish_before_log_sync')
            durable = self._await_record(staged)
            kill_point('after_log_sync')
            failure = self._publish_finished(staged, tid, durable)
            kill_point('after_publish')
        finally:
            with shared.published:
                shared.publishing = None
                if tid is None:
                    shared.visible_tid = None   # the base did not commit
                shared.published.notify_all()
        if failure is not None:
            self._refuse_from_now_on(staged, tid, failure)
        try:
            if f is not None:
                f(tid)
        finally:
            # After the callback, as a base shows its tid only after it:
            # an MVCC reader that sees the tid has had its invalidations.
            shared.visible_tid = None
            self._finished(staged, tid)
        return tid

    def _publish_finished(self, staged, tid: bytes,
                          durable: bool) -> OSError | None:
        """Give a finished transaction's files their names; the error
        that leaves it neither logged nor its files durable, or None.

        With the record durable, the transaction has committed whatever
        fails here: the next open gives the files their names (until
        then, readers get POSKeyError).  Without it, the files themselves
        must become durable, or a power cut would leave the transaction
        torn, and the next open would roll back what tpc_finish had
        reported committed.
        """
        try:
            self._publish(staged)
            if not durable:
                self._make_published_durable(staged)
        except OSError as e:
            if not durable:
                return e
            # Committed and acknowledged: only its record and staged
            # names say its files now.  No checkpoint may let them go,
            # and no later commit may fill the log behind them (nor be
            # refused for a full log at its vote): every later commit is
            # refused until the storage is opened again, as FileStorage
            # closes itself when its own finish fails.
            shared = self._shared
            shared.unpublished = oid_repr(tid)
            shared.failed = (
                f'the blob files of committed transaction {oid_repr(tid)} '
                f'could not be given their names ({e}); reopen the '
                f'storage, which gives them their names from the commit '
                f'log')
            logger.critical('Blob directory %s: %s; refusing every further '
                            'commit', self.fshelper.base_dir, shared.failed)
        return None

    def _make_published_durable(self, staged) -> None:
        """Make a transaction's published files and names durable.

        Where syncfs works, the files' new directories were not made
        durable one by one (the checkpoint's syncfs would): one syncfs
        covers them, the files and their names.
        """
        if self._shared.syncfs_works:
            sync_filesystem(self.fshelper.base_dir)
            return
        self._make_durable(staged.published)

    def _refuse_from_now_on(self, staged, tid: bytes,
                            error: OSError) -> None:
        """The base committed `tid`, and neither its commit record nor its
        files could be made durable: report the commit failed, and refuse
        every later commit, as FileStorage closes itself when its own
        finish fails.

        Nobody saw `tid` (``lastTransaction()`` keeps saying the one
        before, and the caller's callback never ran), and it stays the
        base's last transaction: the next open rolls it back, which is
        what a power cut now would leave anyway.  Committing after it
        would make it a transaction no open may roll back, with files a
        cut could take.
        """
        shared = self._shared
        shared.failed = (
            f'transaction {oid_repr(tid)} committed in the base storage, '
            f'but neither its commit record nor its blob files could be '
            f'made durable ({error}); reopen the storage to roll that '
            f'transaction back')
        self._done_logging()
        logger.critical('Blob directory %s: %s; refusing every further '
                        'commit', self.fshelper.base_dir, shared.failed)
        raise BlobStorageError(
            f'Blob directory {self.fshelper.base_dir}: {shared.failed}'
        ) from error

    def _await_record(self, staged) -> bool:
        """Wait for S1; False if it failed.

        The base has committed, so the transaction must not fail now: its
        files, once published, are then made durable one by one instead,
        so that a crash cannot leave it torn (the next open rolls back
        only a last transaction whose files are not all at their names).
        """
        try:
            staged.syncing.result()
        except OSError as e:
            logger.error('Could not make the commit record of transaction '
                         '%s durable in %s (%s); making its blob files '
                         'durable one by one', oid_repr(staged.tid),
                         self._shared.commit_log.path, e)
            return False
        return True
