"""Pack and undo: the blob files a base storage's pack or undo changes.

A pack removes the files of the revisions the packed base no longer has,
found from the catalog, never by walking the directory; its intent is in
the catalog first, so that the next open finishes a pack that was killed.
An undo links the restored revisions' files under the undo's tid.
"""

from __future__ import annotations

import base64
import logging
import os

from ZODB.POSException import POSKeyError, ReadOnlyError

from zodbblob.layout import fsync_directory, fsync_path, remove_if_exists
from zodbblob.storage.catalog import (
    JournalError,
    kill_point,
    sync_filesystem,
    syncfs_works,
)
from zodbblob.storage.commit import CommitProtocol, Shared, checkpoint
from zodbblob.storage.lock import BlobStorageError

logger = logging.getLogger(__name__)


def remove_blob_files(shared: Shared, garbage) -> None:
    # Files first, catalog second: a crash in between leaves catalog
    # rows whose files are gone, which the next pack removes again;
    # the other order would orphan files forever.
    fshelper = shared.fshelper
    directories = set()
    parents = set()
    for oid, tid in garbage:
        path = fshelper.getBlobFilename(oid, tid)
        remove_if_exists(path)
        parents.add(os.path.dirname(path))
        kill_point('mid_pack_removal')
        if fshelper.layout.directory_per_oid:
            directories.add(fshelper.getPathForOID(oid))
    # The removals durable before the rows go: a power cut must not bring
    # back files that the catalog no longer lists.
    if garbage and syncfs_works(fshelper.base_dir):
        sync_filesystem(fshelper.base_dir)
    else:
        for directory in parents:
            if os.path.isdir(directory):
                fsync_directory(directory)
    shared.journal.remove(garbage)
    for directory in directories:
        try:
            os.rmdir(directory)
        except OSError:
            pass  # other revisions still live there
    if garbage:
        logger.debug('Pack removed %d blob files from %s', len(garbage),
                     fshelper.base_dir)


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
                                   % shared.fshelper.base_dir)
        try:
            shared.journal.begin_pack(packtime)
            # No record from before the pack may be replayed after it: a
            # kill before the files are removed would have recovery take
            # the packed revisions for interrupted transactions.  After
            # this checkpoint the next open's _finish_pack removes them.
            checkpoint(shared)
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
            # Read the catalog before the base: a file committed after this
            # read is not in `known`, so a pack never removes it.
            known = [(oid, tid) for oid, tid, size
                     in shared.journal.committed()]
            garbage = self._unreferenced(known)
            if garbage:
                shared.journal.mark_garbage(garbage)
                remove_blob_files(shared, garbage)
                # No record from before the pack outlives it: recovery
                # would find their removed revisions missing from the
                # base, and call them interrupted.
                checkpoint(shared)
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
                        answer = self._is_blob_record(data)
                        if len(answers) < 1024:
                            answers[data] = answer
                    if answer:
                        live.add((record.oid, record.tid))
        finally:
            close = getattr(transactions, 'close', None)
            if close is not None:
                close()
        return [pair for pair in known if pair not in live]

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
                continue
            source = self._shared.fshelper.getBlobFilename(oid, before[1])
            if not os.path.exists(source):
                continue  # packed away; the base's undo would have failed
            self._commit.take(oid, source, transaction, link=True)
        return undo_tid, oids
