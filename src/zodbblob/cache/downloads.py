"""Downloads: one per blob across the threads and processes of a host.

A download is claimed by inserting an in-progress row with a fresh token
(`zodbblob.cache.owners`), fetched into ``.tmp/<token>``, and completed by
renaming that file to its final name.  Threads of one process wait for
each other on an event per ``(oid, tid)``; processes poll the row.  A row
whose owner process ended, or whose token is older than the download
timeout, is taken over with a fresh file.

A claim's temporary file exists before its row: a claim without it was
given up (its install failed, and the index could not record the
cancel), and the next reader takes it over at once.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable

from zodbblob.cache.directory import CacheDirectory, size_of
from zodbblob.cache.index import Index, index_damaged
from zodbblob.cache.owners import Owners, parse_token
from zodbblob.cache.schema import COMPLETE, IN_PROGRESS
from zodbblob.cache.sizes import KnownSizes
from zodbblob.cache.syncs import BOOT, Syncs
from zodbblob.layout import makedirs_durable, remove_if_exists

logger = logging.getLogger(__name__)

POLL_FIRST = 0.01            # waiting for another process's download
POLL_LAST = 0.2


def _committed_mode(path: str, directory: str) -> int:
    """The mode of a committed file `path` in `directory`, as stock ZODB
    and ZEO give it (``ZODB.blob.set_not_writable``): not writable, and
    readable as `directory` is (0444 under 0755)."""
    readable = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
    writable = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    return ((stat.S_IMODE(os.lstat(path).st_mode) & ~writable)
            | (stat.S_IMODE(os.lstat(directory).st_mode) & readable))


class Downloads:
    """The downloads into the open cache directory `cache` (indexed by
    `index`), and what processes that ended left of theirs.

    `lookup(oid, tid, counted)` is the cache's lookup (a path or None);
    `installed(oid, tid, total)` is told of each file put in place, with
    the total bytes of the cache then.  The cache's lock guards the
    downloads of this process.
    """

    def __init__(self, cache: CacheDirectory, index: Index, owners: Owners,
                 syncs: Syncs, sizes: KnownSizes,
                 lookup: Callable[..., str | None],
                 installed: Callable[[bytes, bytes, int], None]):
        self.cache = cache
        self._index = index
        self._owners = owners
        self._syncs = syncs
        self._sizes = sizes
        self._lookup = lookup
        self._installed = installed
        self._downloads: dict[tuple[bytes, bytes], threading.Event] = {}

    def load(self, oid: bytes, tid: bytes, fetch: Callable[[str], object]
             ) -> tuple[str, int | None]:
        """``(path, total bytes or None)`` of ``(oid, tid)``, after one
        download at most (None: no download of this thread put it there).
        """
        key = (oid, tid)
        while True:
            with self.cache.lock:
                downloading = self._downloads.get(key)
                if downloading is None:
                    downloading = self._downloads[key] = threading.Event()
                    break
            # Another thread of this process has it: wait, then look again
            # (and claim it ourselves if that download failed).
            downloading.wait()
            path = self._lookup(oid, tid, counted=False)
            if path is not None:
                return path, None
        try:
            return self._download(oid, tid, fetch)
        finally:
            with self.cache.lock:
                del self._downloads[key]
            downloading.set()

    def _download(self, oid, tid, fetch):
        """``(path, total bytes or None)``, after one download at most."""
        delay = POLL_FIRST
        while True:
            with self._index.db_lock:
                row = self._index.db.execute(
                    'SELECT state, token, started FROM blobs '
                    'WHERE oid = ? AND tid = ?', (oid, tid)).fetchone()
            if row is not None and row[0] == COMPLETE:
                path = self._lookup(oid, tid, counted=False)
                if path is not None:
                    return path, None
                continue  # forgotten: missing now
            if row is not None and self._owner_alive(*row[1:]):
                # Another download of this file is under way.
                time.sleep(delay)
                delay = min(delay * 2, POLL_LAST)
                continue
            token = self._claim(oid, tid, row and row[1])
            if token is not None:
                return self._fetch(oid, tid, token, fetch)

    def _claim(self, oid, tid, previous: str | None) -> str | None:
        """A fresh token owning the download of ``(oid, tid)``, or None.

        `previous` is the token of a claim seen dead or too old, None if
        there was no row.  None is returned when another caller got there
        first.
        """
        token = self._owners.new_token()
        # The claim's file exists before its row and goes before the row
        # is dropped: a claim without its file was given up (an install
        # that failed, a cancel the index could not record), and anyone
        # may take it over at once.
        temporary = self.cache.temporary_path(token)
        open(temporary, 'xb').close()
        now = time.time()
        try:
            with self._index.writing() as db:
                claimed = self._claim_row(db, oid, tid, previous, token, now)
        except BaseException:
            remove_if_exists(temporary)
            raise
        if not claimed:
            remove_if_exists(temporary)
            return None
        if previous is not None:
            dead = self._owners.dead(previous)
            if dead:
                # Never appended to: its partial file goes, ours is fresh.
                remove_if_exists(self.cache.temporary_path(previous))
            logger.warning(
                'Blob cache file %s: taking over its download from %s, '
                'which %s', self.cache.path(oid, tid), previous,
                'ended' if dead else
                'gave it up' if not os.path.exists(
                    self.cache.temporary_path(previous)) else
                f'has not finished in {self.cache.download_timeout:g} s')
        return token

    @staticmethod
    def _claim_row(db, oid, tid, previous, token, now) -> bool:
        """Write the claim of `token` (see `_claim`); whether it holds."""
        if previous is None:
            return bool(db.execute(
                'INSERT OR IGNORE INTO blobs '
                '(oid, tid, size, accessed, state, token, started) '
                'VALUES (?, ?, 0, ?, ?, ?, ?)',
                (oid, tid, now, IN_PROGRESS, token, now)).rowcount)
        return bool(db.execute(
            'UPDATE blobs SET token = ?, started = ? '
            'WHERE oid = ? AND tid = ? AND state = ? AND token = ?',
            (token, now, oid, tid, IN_PROGRESS, previous)).rowcount)

    def _fetch(self, oid, tid, token, fetch):
        temporary = self.cache.temporary_path(token)
        try:
            fetch(temporary)
            return self.complete(oid, tid, temporary)
        except BaseException:
            self._cancel(oid, tid, token, temporary)
            raise

    def complete(self, oid, tid, temporary):
        """Give `temporary` its final name; ``(path, total bytes)``.

        The claim is not checked: the bytes of a revision are the same
        whoever fetched them, so the first complete file wins even if its
        claim was taken over, and the row says complete exactly when the
        file is there.  A later finisher finds it and drops its own file.
        """
        size = os.stat(temporary).st_size
        path = self.cache.path(oid, tid)
        # A bucket is made once: durably, or a power cut takes the files
        # in it, however well they were synced.
        makedirs_durable(os.path.dirname(path))
        os.chmod(temporary, _committed_mode(temporary, os.path.dirname(path)))
        delay = POLL_FIRST
        placed = []
        try:
            while True:
                installed = self._install_unless_evicting(
                    oid, tid, temporary, path, size, placed)
                if installed is not None:
                    break
                # Its pruner removes the file under this name, then drops
                # the row: a file put there before would be removed with it.
                time.sleep(delay)
                delay = min(delay * 2, POLL_LAST)
        except BaseException as e:
            # A file the index does not know would never be evicted (its
            # row was not committed: a full disk); but a damaged index is
            # rebuilt from the files there.
            if placed and not (isinstance(e, sqlite3.DatabaseError)
                               and index_damaged(e)):
                remove_if_exists(path)
            raise
        size, unsynced, total = installed
        self._installed(oid, tid, total)
        if unsynced is not None:
            self._syncs.sync_later(oid, tid, unsynced)
        self._sizes.remember(oid, tid, size, time.time())
        return path, total

    def _install_unless_evicting(self, oid, tid, temporary, path, size,
                                 placed) -> tuple | None:
        """`_install` in a write transaction, unless a live pruner is
        removing the file of that name: ``(size, unsynced token, total
        bytes)``, or None."""
        with self._index.writing() as db:
            evicting = db.execute(
                'SELECT token FROM evicting WHERE oid = ? AND tid = ?',
                (oid, tid)).fetchone()
            if evicting is not None and self._owners.dead(evicting[0]):
                # Whatever its pruner left under this name is replaced.
                db.execute('DELETE FROM evicting WHERE oid = ? '
                           'AND tid = ?', (oid, tid))
                logger.warning('Blob cache file %s: replacing it; its '
                               'pruner %s ended before removing it',
                               path, evicting[0])
                evicting = None
            if evicting is not None:
                return None
            row = db.execute(
                'SELECT state, size FROM blobs '
                'WHERE oid = ? AND tid = ?', (oid, tid)).fetchone()
            size, unsynced = self._install(
                db, oid, tid, temporary, path, size, row, placed)
            total, = db.execute('SELECT bytes FROM cache').fetchone()
        return size, unsynced, total

    def _install(self, db, oid, tid, temporary, path, size, row, placed):
        """Put `temporary` under `path` unless a complete file is there;
        the size of the file there now, and the token of its row in
        ``unsynced`` if it is the one put there (then `path` is appended
        to `placed`: the caller removes it if the transaction fails)."""
        now = time.time()
        if row is not None and row[0] == COMPLETE and size_of(path) == row[1]:
            os.remove(temporary)
            db.execute('UPDATE blobs SET accessed = ? '
                       'WHERE oid = ? AND tid = ?', (now, oid, tid))
            return row[1], None
        token = self._owners.new_token()
        os.replace(temporary, path)
        placed.append(path)
        db.execute(
            'INSERT INTO blobs (oid, tid, size, accessed, state) '
            'VALUES (?, ?, ?, ?, ?) ON CONFLICT (oid, tid) '
            'DO UPDATE SET size = excluded.size, '
            'accessed = excluded.accessed, '
            'state = excluded.state, token = NULL, started = NULL',
            (oid, tid, size, now, COMPLETE))
        db.execute('INSERT OR REPLACE INTO unsynced '
                   '(oid, tid, token, boot) VALUES (?, ?, ?, ?)',
                   (oid, tid, token, BOOT))
        return size, token

    def _cancel(self, oid, tid, token, temporary):
        remove_if_exists(temporary)
        try:
            with self._index.writing() as db:
                db.execute('DELETE FROM blobs WHERE oid = ? AND tid = ? '
                           'AND state = ? AND token = ?',
                           (oid, tid, IN_PROGRESS, token))
        except sqlite3.Error as e:
            # The caller sees the fetch's error; without its file, the
            # claim is taken over by the next reader.
            logger.warning('Blob cache %s: could not drop the claim %s: %s',
                           self.cache.path(oid, tid), token, e)

    def _owner_alive(self, token, started) -> bool:
        """Whether the download of an in-progress row is still its
        owner's: not too old, its owner running, and its file there (see
        `_claim`)."""
        return (time.time() - started < self.cache.download_timeout
                and not self._owners.dead(token)
                and os.path.exists(self.cache.temporary_path(token)))

    def remove_dead_claims(self) -> None:
        """Drop the claims and temporary files of processes that ended,
        and finish their evictions.

        Looks only at rows with a token, at ``evicting``, ``unsynced``
        and in ``.tmp``.
        """
        with self._index.db_lock:
            claims = self._index.db.execute(
                'SELECT oid, tid, token FROM blobs '
                'WHERE token IS NOT NULL').fetchall()
            evicting = self._index.db.execute(
                'SELECT oid, tid, token FROM evicting').fetchall()
            unsynced = self._index.db.execute(
                'SELECT oid, tid, token, boot FROM unsynced').fetchall()
        dead = [claim for claim in claims if self._owners.dead(claim[2])]
        evictions = [row for row in evicting if self._owners.dead(row[2])]
        unsynced = [row for row in unsynced
                    if row[3] != BOOT or self._owners.dead(row[2])]
        lost = self._syncs.finish(unsynced)
        now = time.time()
        if dead or evictions:
            with self._index.writing() as db:
                for oid, tid, token in evictions:
                    # Its pruner ended between moving the row here and
                    # dropping it; the file was counted out already.  A
                    # row of that name in ``blobs`` is a download since.
                    if db.execute(
                            'DELETE FROM evicting WHERE oid = ? AND tid = ? '
                            'AND token = ?', (oid, tid, token)).rowcount \
                            and db.execute(
                                'SELECT 1 FROM blobs WHERE oid = ? '
                                'AND tid = ?', (oid, tid)).fetchone() is None:
                        remove_if_exists(self.cache.path(oid, tid))
                for oid, tid, token in dead:
                    # Only a complete file gets its final name: one found
                    # there is its owner's download, killed before it could
                    # commit the row.  Dropping the row would hide it from
                    # eviction for good.
                    size = size_of(self.cache.path(oid, tid))
                    if size is None:
                        db.execute('DELETE FROM blobs WHERE oid = ? '
                                   'AND tid = ? AND state = ? AND token = ?',
                                   (oid, tid, IN_PROGRESS, token))
                    else:
                        db.execute('UPDATE blobs SET state = ?, size = ?, '
                                   'accessed = ?, token = NULL, '
                                   'started = NULL WHERE oid = ? AND tid = ? '
                                   'AND state = ? AND token = ?',
                                   (COMPLETE, size, now, oid, tid,
                                    IN_PROGRESS, token))
        removed = []
        with os.scandir(self.cache.temporary) as entries:
            for entry in entries:
                owner = parse_token(entry.name)
                if self._owners.dead(entry.name) or (
                        (owner is None or owner[0] != self._owners.host)
                        and now - entry.stat().st_mtime
                        > self.cache.download_timeout):
                    remove_if_exists(entry.path)
                    removed.append(entry.name)
        if dead or removed or evictions:
            logger.warning(
                'Blob cache %s: dropped %d downloads and %d temporary files '
                'of processes that ended, and finished %d of their '
                'evictions', self.cache.directory, len(dead), len(removed),
                len(evictions))
        if lost:
            logger.warning(
                'Blob cache %s: removed %d files written before the machine '
                'restarted and not synced to disk then', self.cache.directory,
                lost)
