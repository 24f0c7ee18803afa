"""Pack and undo: the blob files a base storage's pack or undo changes.

A pack removes the files of the revisions the packed base no longer has,
found from the catalog, never by walking the directory, and in time
proportional to the garbage: the revisions a later revision superseded
before the pack time come from the catalog's ``superseded`` index, and
each is confirmed with the base's ``loadSerial``; objects the base's
garbage collection removed are looked for only when the base says some
were (a FileStorage's ``len()``), or always, streamed, for a base that
cannot say.  Its intent is in the catalog first, so that the next open
finishes a pack that was killed.  An undo links the restored revisions'
files under the undo's tid.
"""

from __future__ import annotations

import base64
import logging
import os
import time

import ZODB.FileStorage
from ZODB.POSException import POSKeyError, ReadOnlyError, StorageError
from ZODB.TimeStamp import TimeStamp
from ZODB.utils import p64, u64

from zodbblob.layout import fsync_directory, fsync_path, remove_if_exists
from zodbblob.storage.catalog import JournalError, kill_point
from zodbblob.storage.checkpoint import Shared, checkpoint
from zodbblob.storage.commit import CommitProtocol
from zodbblob.storage.lock import BlobStorageError

logger = logging.getLogger(__name__)


# Pack's removals wait for a checkpoint's sync to become durable; past
# this many, pack syncs for them itself (so that the list stays small).
REMOVALS_PER_SYNC = 10000


def remove_blob_files(shared: Shared, garbage) -> None:
    """Remove the files `garbage` (``(oid, tid)`` pairs), then their rows.

    Per file, its unlink and nothing else: the rows go in one catalog
    transaction, and only the directories of oids left without files are
    removed (an ``rmdir`` per file, failing where a newer revision lives,
    cost as much as the unlink).  No sync: the files' garbage marks,
    durable before any file went, stay until the next checkpoint's sync
    has made the removals durable.  A power cut before it may bring back
    files and rows, and the next open removes them again: it never leaves
    a file the catalog does not list.
    """
    if shared.objects is not None:
        remove_blob_objects(shared, garbage)
        return
    fshelper = shared.fshelper
    paths = [fshelper.getBlobFilename(oid, tid) for oid, tid in garbage]
    for path in paths:
        remove_if_exists(path)
        kill_point('mid_pack_removal')
    emptied = shared.journal.remove(garbage, marks=False)
    if fshelper.layout.directory_per_oid:
        for oid in emptied:
            try:
                os.rmdir(fshelper.getPathForOID(oid))
            except OSError:
                pass  # a file the catalog does not know, or gone already
    with shared.logging:
        shared.removed.extend(zip(garbage, paths))
        many = len(shared.removed) >= REMOVALS_PER_SYNC
    if many:
        checkpoint(shared, removals=True)
    if paths:
        logger.debug('Pack removed %d blob files from %s', len(paths),
                     fshelper.base_dir)


def remove_blob_objects(shared: Shared, garbage) -> None:
    """On a bucket: delete the objects `garbage`, in batches of up to
    1,000 keys a request, then their rows and garbage marks.

    The marks were durable before the first delete; a delete the bucket
    acknowledged is durable, so they go at once.  A kill in between
    leaves marks whose objects are gone: the next open deletes them
    again, which S3 takes as done.

    By content, the objects are the revisions' pointers, and then the
    contents no other revision needs (``contents.py``); the rows go
    before vote may decide again whether the bucket has a content.
    """
    garbage = list(garbage)
    if not garbage:
        return
    objects = shared.objects
    journal = shared.journal
    try:
        if objects.contents is None:
            objects.delete(garbage)
            journal.remove(garbage, marks=False)
        else:
            digests = [journal.digest(oid, tid) for oid, tid in garbage]
            objects.delete(garbage)
            objects.contents.collect(
                digests, then=lambda: journal.remove(garbage, marks=False))
    except objects.failure as e:
        # The marks stay: the next pack, or the next open, deletes them.
        raise StorageError(f'Pack could not delete {len(garbage)} blob '
                           f'objects from {objects.name}: {e}') from None
    journal.forget_garbage(garbage)
    logger.debug('Pack deleted %d blob objects from %s', len(garbage),
                 shared.objects.name)


def pack_tid(packtime: float) -> bytes:
    """The highest tid a pack to `packtime` may drop a revision for.

    A revision superseded at or before it may be gone from the packed
    base.  A second later than the base's own reckoning (FileStorage
    rounds `packtime` to a tid): a candidate too many costs a
    ``loadSerial``, one too few would stay on disk.
    """
    later = packtime + 1
    return TimeStamp(*time.gmtime(later)[:5] + (later % 60,)).raw()


def base_has(base, oid: bytes, tid: bytes) -> bool:
    """Whether `base` still holds revision `tid` of `oid`."""
    try:
        base.loadSerial(oid, tid)
    except (POSKeyError, KeyError):
        return False
    return True


def remove_unreferenced(shared: Shared, base, batches) -> int:
    """Remove the files of the catalog rows in `batches` (lists of
    ``(oid, tid, ...)``) whose revision `base` no longer has.

    Batch by batch: each batch's garbage is marked (durably) before its
    files go, so a kill leaves at most one batch for the next open, and
    nothing here grows with the catalog.  Returns the count removed.
    """
    removed = 0
    for batch in batches:
        garbage = [(row[0], row[1]) for row in batch
                   if not base_has(base, row[0], row[1])]
        if garbage:
            shared.journal.mark_garbage(garbage)
            remove_blob_files(shared, garbage)
            removed += len(garbage)
    return removed


def sync_packed_base(base) -> None:
    """Make a FileStorage's packed file, and its name, durable.

    FileStorage renames its packed file over Data.fs and syncs neither;
    the next commit's fsync covers the new file's bytes, not its name.  A
    power cut could bring back the file from before the pack: without the
    transactions committed since, and naming revisions whose blob files
    the pack then removed.
    """
    name = getattr(base, '_file_name', None)
    if isinstance(name, str) and os.path.isfile(name):
        fsync_path(name)
        fsync_directory(os.path.dirname(os.path.abspath(name)))


class Packer:
    """Pack and undo for one storage instance, through its commit."""

    def __init__(self, base, shared: Shared, commit: CommitProtocol,
                 is_blob_record):
        self.base = base
        self._shared = shared
        self._commit = commit
        self._is_blob_record = is_blob_record

    def pack(self, packtime, referencesf, *args, **kw):
        """Pack the base, then remove the blob files it no longer needs.

        The files to remove are those of the catalog's rows superseded
        at or before the pack time that the packed base no longer has,
        and, when the base's GC removed objects, those of the rows the
        base no longer has at all; the directory is never walked, nor the
        whole catalog read when nothing was collected.  The pack's intent
        is recorded first, so that a kill after the base packed and before
        the files are removed is finished by the next open.
        """
        shared = self._shared
        if shared.read_only:
            raise ReadOnlyError()
        if not shared.pack_lock.acquire(blocking=False):
            raise BlobStorageError('Already packing blob directory %s'
                                   % shared.fshelper.base_dir)
        try:
            if shared.objects is not None:
                with shared.objects.as_writer():
                    return self._pack(packtime, referencesf, *args, **kw)
            return self._pack(packtime, referencesf, *args, **kw)
        finally:
            shared.pack_lock.release()

    def _pack(self, packtime, referencesf, *args, **kw):
        shared = self._shared
        if shared.objects is not None:
            # A copy of the site that took the prefix over since this
            # storage opened: its blobs are not this catalog's to drop
            # (one check for all of this pack's deletes).
            shared.objects.confirm_writer()
            # Objects an earlier pack marked and the bucket refused
            # to delete (a store that was down).
            remove_blob_objects(shared, [
                pair for pair in shared.journal.garbage()
                if not base_has(self.base, *pair)])
        shared.journal.begin_pack(packtime)
        # No record from before the pack may be replayed after it: a
        # kill before the files are removed would have recovery take
        # the packed revisions for interrupted transactions.  After
        # this checkpoint the next open's _finish_pack removes them.
        checkpoint(shared)
        # The last tid before the object count: a commit between the
        # two is counted as new twice over, which only sends the pack
        # to the full check (see `_objects_removed`).
        last = self.base.lastTransaction()
        count = self._object_count()
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
        sync_packed_base(self.base)
        # Rows committed from now on are revisions the base has:
        # `remove_unreferenced` asks the base about each row.
        stop = pack_tid(packtime)
        removed = remove_unreferenced(
            shared, self.base, shared.journal.superseded(stop))
        if count is None or self._objects_removed(count, last):
            removed += remove_unreferenced(
                shared, self.base, shared.journal.rows(stop))
        if removed:
            # No record from before the pack outlives it: recovery
            # would find their removed revisions missing from the
            # base, and call them interrupted.
            checkpoint(shared)
        shared.journal.end_pack()
        return result

    def _object_count(self) -> int | None:
        """The base's number of objects, where ``len()`` is exact.

        FileStorage's is (its index has one entry per oid); other bases'
        may be an estimate (RelStorage's), and for them every pack takes
        the streamed check of every current row.
        """
        if isinstance(self.base, ZODB.FileStorage.FileStorage):
            return len(self.base)
        return None

    def _objects_removed(self, before: int, last: bytes) -> bool:
        """Whether the base's pack removed objects (or may have).

        After the pack, the base holds the objects it held before, minus
        those its GC removed, plus those created by transactions after
        `last` (committed while it packed).  An oid of such a transaction
        is counted new unless the base has a revision of it from before
        them, so the count of new ones is never too low, and equal counts
        prove that nothing was removed.
        """
        after = len(self.base)
        start = p64(u64(last) + 1)
        written = set()
        transactions = self.base.iterator(start)
        try:
            for transaction in transactions:
                written.update(record.oid for record in transaction)
        finally:
            close = getattr(transactions, 'close', None)
            if close is not None:
                close()
        new = 0
        for oid in written:
            try:
                older = self.base.loadBefore(oid, start)
            except (POSKeyError, KeyError):
                older = None
            if older is None:
                new += 1
        return after != before + new

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
            if before is None or not self._is_blob_record(before[0]):
                # The oid's blob revision (if it had one) is superseded
                # by no file: the catalog marks it, so that a pack finds
                # it.  Marked before the undo commits: a mark of an undo
                # that aborts makes a pack ask the base once too often.
                self._shared.journal.add([(oid, undo_tid, None)])
                continue
            objects = self._shared.objects
            if objects is not None:
                # A server-side copy at vote: no download, no upload.
                size = objects.size(oid, before[1])
                if size is not None:
                    self._commit.take_copy(oid, before[1], size, transaction)
                continue
            source = self._shared.fshelper.getBlobFilename(oid, before[1])
            if not os.path.exists(source):
                continue  # packed away; the base's undo would have failed
            self._commit.take(oid, source, transaction, link=True)
        return undo_tid, oids
