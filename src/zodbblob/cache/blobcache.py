"""`BlobCache`: the cache directory of a ZEO client, shared by the threads
and processes of a host.

It keeps the public face (`load`, `lookup`, `admit`, `flush`, `prune`,
`stats`, `close`) and decides when to check the size: after each download
and admission, and, in a thread, on a hit while the total last read is
over and when a cache opens over its size.  The work is its
collaborators': the index (`Index`), the sizes remembered for hits
(`KnownSizes`), the access log (`AccessLog`), the downloads
(`Downloads`), the deferred syncs (`Syncs`) and eviction (`Evictor`).
Each takes the open directory (`CacheDirectory`: file names, settings,
the cache's lock of its in-memory state, the closing event) and the
collaborators it works with.  The cache's lock and the index's lock of
its connection (``db_lock``) are never held while taking the other.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable

import zope.interface

from zodbblob.cache.accesslog import AccessLog
from zodbblob.cache.directory import CacheDirectory, check_layout
from zodbblob.cache.downloads import Downloads
from zodbblob.cache.evictor import Evictor
from zodbblob.cache.index import OPEN_LOCK, Index, index_damaged
from zodbblob.cache.owners import Owners
from zodbblob.cache.schema import COMPLETE
from zodbblob.cache.sizes import KnownSizes
from zodbblob.cache.syncs import Syncs
from zodbblob.interfaces import IBlobCache
from zodbblob.layout import remove_if_exists

logger = logging.getLogger(__name__)

BACKGROUND_CHECK = 1.0       # s at least between two checks in a thread


def _recovering(method):
    """Run `method`; if the index turns out damaged, move it aside,
    rebuild it from the directory and run `method` again."""
    @functools.wraps(method)
    def recovering(self, *args, **kw):
        try:
            return method(self, *args, **kw)
        except sqlite3.DatabaseError as e:
            if not index_damaged(e):
                raise
            self._index.recover(e)
        return method(self, *args, **kw)
    return recovering


@zope.interface.implementer(IBlobCache)
class BlobCache:
    """A blob cache directory shared by the threads and processes of a host.

    `grace` is how many seconds a file is safe from eviction after it was
    accessed or admitted: it covers the readers in other processes whose
    accesses are still in their batch.
    """

    def __init__(self, directory: str, size_limit: int | None = None,
                 check_percent: float = 10,
                 download_timeout: float = 300.0, grace: float = 10.0):
        self._cache = CacheDirectory(directory, download_timeout, grace)
        self.directory = self._cache.directory
        self.size_limit = size_limit
        self.check_percent = check_percent
        self.download_timeout = download_timeout
        self.grace = grace
        self._owners = Owners()
        self._index = Index(self._cache)
        self._known_sizes = KnownSizes(self._cache, self._index)
        self._accesslog = AccessLog(self._cache, self._index)
        self._syncs = Syncs(self._cache, self._index)
        self._downloads = Downloads(
            self._cache, self._index, self._owners, self._syncs,
            self._known_sizes, lookup=self._lookup, installed=self._installed)
        self._evictor = Evictor(
            self._cache, self._index, self._accesslog, self._owners,
            seen=self._seen_total)
        # Bytes of the complete files as last read from the index: a hit
        # while it is over the size starts a prune in the background.
        self._total = 0
        self._reading: tuple[bytes, bytes] | None = None
        self._background_prune: threading.Thread | None = None
        self._background_started = float('-inf')
        created = check_layout(self.directory)
        # zodbblob leaves its open lock in every directory it opened.
        adopted = not os.path.exists(os.path.join(self.directory, OPEN_LOCK))
        os.makedirs(self._cache.temporary, exist_ok=True)
        with self._index.open_lock():
            self._index.open(created, adopted)
            self._downloads.remove_dead_claims()
        with self._index.db_lock:
            self._accesslog.resolution = AccessLog.resolution_in(
                self._index.db, time.time())
            self._total, = self._index.db.execute(
                'SELECT bytes FROM cache').fetchone()
        self._preloading = threading.Thread(
            target=self._known_sizes.preload, daemon=True,
            name=f'zodbblob-cache-preload {self.directory}')
        self._preloading.start()
        # A cache left over its size (a smaller size now, another client's
        # downloads) is brought down without waiting for a download.
        if self._over(self._total):
            self._prune_if_over_soon()

    def __repr__(self):
        return f'<BlobCache {self.directory}>'

    # paths

    def path(self, oid: bytes, tid: bytes) -> str:
        return self._cache.path(oid, tid)

    # reading

    @_recovering
    def lookup(self, oid: bytes, tid: bytes,
               counted: bool = True) -> str | None:
        return self._lookup(oid, tid, counted)

    def _lookup(self, oid, tid, counted):
        path = self.path(oid, tid)
        try:
            size = os.stat(path).st_size
        except (FileNotFoundError, NotADirectoryError):
            size = None
        known = self._known_sizes.vouch(oid, tid, path, size)
        if known is None:
            self._count(None, counted)
            return None
        self._count((oid, tid), counted, known)
        return path

    def _count(self, key, counted, known=None):
        """Batch an access of `key` (None: a miss) and the hit counts.

        `known` is the file's remembered ``[size, accessed]``: an access
        within the resolution of the one recorded last is not recorded.
        """
        if key is not None:
            self._reading = key
        due = self._accesslog.record(key, counted, known)
        if key is not None and self._over(self._total):
            self._prune_if_over_soon()
        if due:
            try:
                self.flush()
            except sqlite3.OperationalError as e:
                # A busy index must not fail a read; the batch is kept.
                logger.warning('Blob cache %s: accesses not recorded yet: '
                               '%s', self.directory, e)

    @_recovering
    def flush(self) -> None:
        total = self._flush()
        # The downloads of other processes are seen here.
        if self._over(total):
            self._prune_if_over_soon()

    def _flush(self) -> int | None:
        """Write the batch of accesses; the total bytes then (None if
        there was nothing to write)."""
        total = self._accesslog.flush()
        if total is not None:
            self._total = total
        return total

    def _seen_total(self, total: int) -> None:
        self._total = total

    def _installed(self, oid: bytes, tid: bytes, total: int) -> None:
        """A file was put in place (downloaded or admitted); the cache
        holds `total` bytes now."""
        self._total = total
        self._reading = (oid, tid)

    # downloading

    @_recovering
    def load(self, oid: bytes, tid: bytes,
             fetch: Callable[[str], object], counted: bool = True) -> str:
        path = self._lookup(oid, tid, counted)
        if path is not None:
            return path
        path, total = self._downloads.load(oid, tid, fetch)
        self._prune_if_over(total, keep=(oid, tid))
        return path

    # admitting

    def admit(self, oid: bytes, tid: bytes, filename: str) -> str:
        temporary = self._cache.temporary_path(self._owners.new_token())
        try:
            os.replace(filename, temporary)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            logger.warning('Copying %s to %s: not on the blob cache\'s '
                           'filesystem', filename, self.path(oid, tid))
            try:
                shutil.copyfile(filename, temporary)
            except BaseException:
                remove_if_exists(temporary)
                raise
            os.remove(filename)
        try:
            try:
                path, total = self._downloads.complete(oid, tid, temporary)
            except sqlite3.DatabaseError as e:
                if not index_damaged(e):
                    raise
                # The file is the only copy this side of the server: into
                # the rebuilt index with it (a file already put under its
                # name is found there by the rebuild).
                self._index.recover(e)
                if os.path.exists(temporary):
                    path, total = self._downloads.complete(oid, tid, temporary)
                else:
                    path, total = self.path(oid, tid), self._total
        except BaseException:
            remove_if_exists(temporary)
            raise
        self._prune_if_over(total, keep=(oid, tid))
        return path

    # checking the size

    def _over(self, total: int | None) -> bool:
        return (total is not None and self.size_limit is not None
                and total > self.size_limit)

    def _prune_if_over(self, total: int | None, keep=None) -> None:
        """Prune if `total` is over the size: the check after a download
        or an admission; `keep` is the ``(oid, tid)`` being read."""
        if self._over(total):
            try:
                self.prune(keep=keep)
            except sqlite3.OperationalError as e:
                # The blob is there for its reader; the next one prunes.
                logger.warning('Blob cache %s not pruned: %s',
                               self.directory, e)

    def _prune_if_over_soon(self) -> None:
        """Check the total in a thread of its own, unless one runs: for
        an open and a hit, which do not wait for a prune."""
        if self.size_limit is None:
            return
        now = time.monotonic()
        with self._cache.lock:
            # Not a thread per hit while another process holds the lease
            # (or a file larger than the cache is being read).
            if self._cache.closing.is_set() or (
                    now - self._background_started < BACKGROUND_CHECK) or (
                    self._background_prune is not None
                    and self._background_prune.is_alive()):
                return
            self._background_started = now
            self._background_prune = threading.Thread(
                target=self._prune_in_background, daemon=True,
                name=f'zodbblob-cache-prune {self.directory}')
            self._background_prune.start()

    def _prune_in_background(self) -> None:
        try:
            with self._index.db_lock:
                total, = self._index.db.execute(
                    'SELECT bytes FROM cache').fetchone()
            self._total = total
            # The file this process read last may be the one a reader is
            # about to open.
            self._prune_if_over(total, keep=self._reading)
        except Exception:
            logger.exception('Blob cache %s: pruning failed',
                             self.directory)

    @_recovering
    def prune(self, size_limit: int | None = None,
              keep: tuple[bytes, bytes] | None = None) -> tuple[int, int]:
        limit = self.size_limit if size_limit is None else size_limit
        if limit is None:
            return 0, 0
        target = limit - int(limit * self.check_percent / 100)
        self._flush()
        # A caller that names the size reports the outcome itself (the
        # CLI's one line); the automatic checks warn here.
        return self._evictor.prune(target, keep, warn=size_limit is None)

    # the index

    @_recovering
    def stats(self) -> dict:
        self.flush()
        with self._index.writing() as db:
            self._accesslog.fold(db)
            files, size, hits, misses = db.execute(
                'SELECT files, bytes, hits, misses FROM cache').fetchone()
            oldest, = db.execute(
                'SELECT min(accessed) FROM blobs WHERE state = ?',
                (COMPLETE,)).fetchone()
        return dict(files=files, bytes=size, oldest_access=oldest,
                    hits=hits, misses=misses)

    def close(self) -> None:
        if self._index.db is None:
            return
        self._cache.closing.set()
        self._preloading.join()
        with self._cache.lock:
            checkpointing = self._index.checkpointing
            syncing = self._syncs.stop()
            pruning = self._background_prune
        if pruning is not None:
            pruning.join()
        if syncing is not None:
            syncing.join()
        if checkpointing is not None:
            checkpointing.join()
        try:
            self.flush()
        finally:
            with self._index.db_lock:
                self._index.close()
