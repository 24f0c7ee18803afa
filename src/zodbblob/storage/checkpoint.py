"""Shared, what all MVCC instances of one storage share; the checkpoint.

A checkpoint (every CHECKPOINT_RECORDS transactions, when the commit log
is full, around a pack and at close) makes every file, name and catalog
row the commit log's records describe durable with one filesystem sync,
and starts the log afresh.  The same sync makes durable the removals of
the files pack removed since the last one, whose garbage marks can then
go.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading

from zodbblob.layout import fsync_directory, fsync_path, remove_if_exists
from zodbblob.storage.catalog import (
    JournalError,
    kill_point,
    sync_filesystem,
    syncfs_works,
)
from zodbblob.storage.commitlog import CommitLog
from zodbblob.storage.digest import HASHING_THREADS
from zodbblob.storage.datamanager import TransactionDirectories
from zodbblob.storage.scrub import Scrubber

logger = logging.getLogger(__name__)


class Shared:
    """What all MVCC instances of one storage share."""

    def __init__(self, fshelper, journal, lock, read_only):
        self.fshelper = fshelper
        # Whether one syncfs makes the blob directory durable: its
        # filesystem does not change while the storage is open, so it is
        # asked once, not at every commit.
        self.syncfs_works = syncfs_works(fshelper.base_dir)
        self.journal = journal
        self.lock = lock
        self.read_only = read_only
        # Whether commits link a file whose content is committed already
        # to that file (``dedup.py``); the storage's option.
        self.dedup = False
        # The background scrubber (``scrub.py``) of a writable storage:
        # it hashes the files commit did not (with dedup off, those that
        # are not inline).
        self.scrubber = None
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
        # Bytes of the staged files in `linked` that dedup published as
        # links to other files: held by their staged names alone.
        self.held = 0
        # One sync: a committed transaction whose files could not be
        # given their names (its record durable).  Only its record and
        # staged names say them: no checkpoint lets them go, the next
        # open publishes them.
        self.unpublished: str | None = None
        # Since the last checkpoint: the files pack removed, ``(oid,
        # tid)`` and path, whose removal no sync has made durable yet;
        # their garbage marks stay until one has (a power cut brings
        # them back, and the next open removes them again).
        self.removed: list[tuple[tuple[bytes, bytes], str]] = []
        self._syncer: concurrent.futures.ThreadPoolExecutor | None = None
        self._hasher: concurrent.futures.ThreadPoolExecutor | None = None
        # One sync: set at open for a base the storage opened itself.
        self.one_sync = False
        # One sync: the transaction between tpc_begin and the end of its
        # finish or abort holds `committing`; nothing else commits to the
        # base meanwhile.
        self.committing = threading.Lock()
        self.committer = None
        # One sync: while a transaction's base has finished and its files
        # are not yet published, lastTransaction() says `visible_tid` and
        # loadBlob of `publishing` waits on `published`.
        self.published = threading.Condition()
        self.publishing: bytes | None = None
        self.visible_tid: bytes | None = None
        # One sync: why commits are refused, once a transaction the base
        # committed could not be made durable (the next open rolls it
        # back; a checkpoint or a commit after it must not happen).
        self.failed: str | None = None
        # On a bucket (``objects.py``): its `ObjectStore`, and the
        # ``(oid, tid, digest)`` of objects an abort could not delete
        # (their records stay until a checkpoint has deleted them; the
        # digest, by content, or None).
        self.objects = None
        self.undeleted: list[tuple[bytes, bytes, bytes | None]] = []

    def syncer(self) -> concurrent.futures.ThreadPoolExecutor:
        """The thread that fdatasyncs commit log records."""
        if self._syncer is None:
            self._syncer = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix='zodbblob-commit-log')
        return self._syncer

    def hasher(self) -> concurrent.futures.ThreadPoolExecutor:
        """The threads that hash the files of large transactions while
        they are made durable (``digest.TransactionDigests``)."""
        if self._hasher is None:
            self._hasher = concurrent.futures.ThreadPoolExecutor(
                HASHING_THREADS, thread_name_prefix='zodbblob-digest')
        return self._hasher

    def start_scrubber(self) -> None:
        # On a bucket, uploads hash the files they read.
        if (self.scrubber is None and not self.read_only
                and self.journal is not None and self.objects is None):
            self.scrubber = Scrubber(self.journal, self.fshelper)
            self.scrubber.start()

    def stop_scrubber(self) -> None:
        """Stop the scrubber between two chunks, waiting a second at
        most: its backlog is the catalog's, the next open resumes it."""
        if self.scrubber is not None:
            self.scrubber.stop()
            self.scrubber = None

    def close(self) -> None:
        self.stop_scrubber()
        if self._syncer is not None:
            self._syncer.shutdown()
            self._syncer = None
        if self._hasher is not None:
            self._hasher.shutdown()
            self._hasher = None
        if self.objects is not None:
            self.objects.close()
            self.objects = None



def existing_parent(path: str) -> str:
    """The nearest directory above `path` that exists: a removed file's
    own, or where pack removed that too (its oid had no file left), the
    one whose sync makes that removal durable."""
    directory = os.path.dirname(path)
    while not os.path.isdir(directory) and os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)
    return directory


def fsync_removals(paths: list[str]) -> None:
    """Make the removals of `paths` durable, a directory sync each.

    Each file's nearest directory is found when it is synced, not
    before: a pack may remove an oid's directory meanwhile (its last
    file went in a later batch), and then the parent holds the removal.
    """
    done = set()
    for path in paths:
        while True:
            directory = existing_parent(path)
            if directory in done:
                break
            try:
                fsync_directory(directory)
            except FileNotFoundError:
                continue  # removed meanwhile: its parent, then
            done.add(directory)
            break


def checkpoint(shared: Shared, removals: bool = False) -> None:
    """Make every logged transaction durable; start the log afresh.

    Waits until no logged transaction is still finishing, and holds
    off new ones meanwhile.  One syncfs covers the files, their names
    and the catalog; without syncfs, each file and directory is
    fsynced.  Then the staged names kept for files that were not
    inline can go.  Pack's removals since the last checkpoint are made
    durable too, and their garbage marks dropped; with `removals` (at
    close, after recovery, and when many are pending), a checkpoint
    syncs for them alone.
    """
    with shared.logging:
        while shared.in_flight:
            shared.logging.wait()
        if shared.unpublished is not None:
            return
        if (not len(shared.commit_log) and not shared.linked
                and not (removals and shared.removed)):
            return
        if shared.syncfs_works:
            shared.journal.flush()
            sync_filesystem(shared.fshelper.base_dir)
        else:
            for path in shared.unsynced:
                if os.path.exists(path):
                    fsync_path(path)
            for directory in {os.path.dirname(path)
                              for path in shared.unsynced}:
                if os.path.isdir(directory):
                    fsync_directory(directory)
            fsync_removals([path for _, path in shared.removed])
            shared.journal.sync()
        kill_point('mid_checkpoint')
        if shared.undeleted:
            # Before the records that name them go (raises if the bucket
            # still refuses: the records stay).
            shared.objects.delete_unless_committed(shared.undeleted)
            shared.undeleted = []
        shared.commit_log.checkpoint()
        linked, shared.linked, shared.unsynced = shared.linked, [], []
        shared.held = 0
        removed, shared.removed = shared.removed, []
    if removed:
        try:
            shared.journal.forget_garbage(pair for pair, _ in removed)
        except JournalError as e:
            # The removals are durable: a mark left behind costs the next
            # open a look, and must not fail the commit or pack here.
            logger.warning('%s; the next open forgets them', e)
    for path in linked:
        remove_if_exists(path)
