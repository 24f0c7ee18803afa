"""Deferred syncs: a reader does not wait for the disk.

A file put in place is written to disk (``fdatasync``) by a thread, and
until then has a row in ``unsynced`` with the token of its process and the
``boot`` of the machine: a cache opened after the machine restarted removes
such a file (a power loss may have left it with its size but not its
bytes); one opened after its process ended syncs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
import threading

from zodbblob.cache.directory import CacheDirectory
from zodbblob.cache.index import Index, count_out
from zodbblob.cache.owners import INCARNATION
from zodbblob.cache.schema import COMPLETE
from zodbblob.layout import fsync_directory, fsync_path, remove_if_exists

logger = logging.getLogger(__name__)

SYNC_IDLE = 1.0             # the syncing thread ends after so long idle


def _boot_id() -> str:
    """This boot of the machine: a file written since is in the page
    cache or on disk.  Where the kernel does not say, a value no later
    process has, so that every file not synced counts as lost."""
    try:
        with open('/proc/sys/kernel/random/boot_id') as f:
            return f.read().strip()
    except OSError:
        return f'unknown-{INCARNATION}'


BOOT = _boot_id()


def _sync_file(path: str) -> None:
    """Write the file `path` to disk, if it is still there."""
    with contextlib.suppress(FileNotFoundError):
        fsync_path(path, data_only=True)


def _sync_names(paths) -> None:
    """Write the directories of `paths` to disk: a power cut would
    otherwise take the synced files whose index rows say they are here."""
    for directory in {os.path.dirname(path) for path in paths}:
        with contextlib.suppress(FileNotFoundError):
            fsync_directory(directory)


class Syncs:
    """The files of the open cache directory `cache` (indexed by `index`)
    this process put in place and has not synced yet; the cache's lock
    guards the syncing thread."""

    def __init__(self, cache: CacheDirectory, index: Index):
        self.cache = cache
        self._index = index
        self._to_sync: queue.SimpleQueue = queue.SimpleQueue()
        self._syncing: threading.Thread | None = None

    def sync_later(self, oid, tid, token) -> None:
        """Have the file of ``(oid, tid)`` written to disk by the syncing
        thread, which then drops its row in ``unsynced`` (if `token` is
        still that row's).

        Its reader does not wait for the disk (a 10 MiB file takes ~20 ms
        to sync here, as long as its download).  Until then the row says
        that a power loss may have left the file with its size but not its
        bytes: a cache opened after the machine restarted drops such files
        (`Downloads.remove_dead_claims`).
        """
        with self.cache.lock:
            self._to_sync.put((oid, tid, token))
            if self._syncing is None:
                self._syncing = threading.Thread(
                    target=self._sync_files, daemon=True,
                    name=f'zodbblob-cache-sync {self.cache.directory}')
                self._syncing.start()

    def _sync_files(self) -> None:
        # Ends when idle (and is started again by the next file): a
        # client's threads end with the work they were started for.
        while True:
            try:
                items = [self._to_sync.get(timeout=SYNC_IDLE)]
            except queue.Empty:
                with self.cache.lock:
                    if self._to_sync.empty():
                        self._syncing = None
                        return
                continue
            while True:
                try:
                    items.append(self._to_sync.get_nowait())
                except queue.Empty:
                    break
            done = [item for item in items if item is not None]
            for oid, tid, _ in done:
                _sync_file(self.cache.path(oid, tid))
            _sync_names(self.cache.path(oid, tid) for oid, tid, _ in done)
            if done:
                try:
                    with self._index.writing() as db:
                        db.executemany(
                            'DELETE FROM unsynced WHERE oid = ? AND tid = ? '
                            'AND token = ?', done)
                except sqlite3.Error as e:
                    # Synced all the same; the next open drops the rows.
                    logger.warning('Blob cache %s: could not record files '
                                   'as synced: %s', self.cache.directory, e)
            if None in items:
                return

    def stop(self) -> threading.Thread | None:
        """Have the syncing thread end once it synced what it has; that
        thread, if one runs.  The caller holds the lock."""
        syncing = self._syncing
        self._to_sync.put(None)
        return syncing

    def finish(self, unsynced) -> int:
        """Settle the `unsynced` rows of processes that ended: a file
        written since this boot is in the page cache or on disk, so it is
        synced now; one written before is removed with its row (a power
        loss may have left it with its size but not its bytes).  How many
        were removed."""
        lost = 0
        if not unsynced:
            return lost
        with self._index.writing() as db:
            for oid, tid, token, boot in unsynced:
                path = self.cache.path(oid, tid)
                if boot == BOOT:
                    _sync_file(path)
                    _sync_names([path])
                else:
                    row = db.execute(
                        'SELECT size FROM blobs WHERE oid = ? AND tid = ? '
                        'AND state = ?', (oid, tid, COMPLETE)).fetchone()
                    if row is not None:
                        db.execute('DELETE FROM blobs WHERE oid = ? '
                                   'AND tid = ?', (oid, tid))
                        count_out(db, 1, row[0])
                    remove_if_exists(path)
                    lost += 1
                db.execute('DELETE FROM unsynced WHERE oid = ? AND tid = ? '
                           'AND token = ?', (oid, tid, token))
        return lost
