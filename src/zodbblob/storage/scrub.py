"""The background scrubber: the digests commit does not compute.

With dedup off, a commit hashes only what it holds in memory anyway (an
inline transaction's bytes); the rows of larger files are added with
digest NULL, and commit never waits for hashing.  One daemon thread per
writable storage (`Scrubber`) hashes them later, at the lowest CPU
priority there is (``SCHED_IDLE``, else nice 19), so it only uses a core
nobody else wants.

Its queue is the catalog itself: the rows whose digest is NULL, read in
batches oldest first (the partial index ``blob_undigested``), so a crash
loses nothing, and rows adopted from a stock directory or rebuilt by a
scan are hashed too.  Each file is opened as verify opens it (a regular
file only: no FIFO opened, no symbolic link followed), hashed 1 MiB at a
time, and its digest recorded where the row still has none (``UPDATE
... WHERE digest IS NULL``).  A file gone (a pack removed it) is
skipped.  With no NULL rows left it sleeps until a commit adds one
(`wake`).  `stop` (at close) does not finish the backlog: it is checked
between chunks, and the next open resumes.  Its errors are logged at
WARNING once per kind and never reach a committer.

There is no I/O priority in the standard library (``ioprio_set`` has no
``os`` wrapper), so its reads keep the default I/O class; they come from
the page cache when the scrubber keeps up.
"""

from __future__ import annotations

import logging
import os
import threading

from zodbblob.layout import open_blob_file
from zodbblob.storage.digest import CHUNK, new_hash

logger = logging.getLogger(__name__)

# Rows read from the catalog at a time, and digests recorded at a time.
BATCH = 64


class Stopped(Exception):
    """The scrubber was asked to stop."""


def lower_priority() -> str:
    """Give the calling thread the lowest CPU priority there is; which it
    got (Linux applies both per thread)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return 'SCHED_IDLE'
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        return 'nice 19'
    except (AttributeError, OSError):
        return 'default'


class Scrubber:
    """Hashes the committed files whose catalog rows have no digest."""

    def __init__(self, journal, fshelper):
        self.journal = journal
        self.fshelper = fshelper
        self._wake = threading.Event()
        self._stopping = threading.Event()
        # Set unless a test holds the hashing (between chunks); `held`
        # says the thread waits on it.
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()
        self._warned: set[str] = set()
        self.priority: str | None = None
        self.hashed = 0    # digests recorded
        self.skipped = 0   # files not hashed: gone, or no regular file
        self.scrubbed = 0  # rows done, whatever came of them
        self._thread = threading.Thread(
            target=self._run, name='zodbblob-scrub', daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """A commit added rows without a digest."""
        self._wake.set()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop between two chunks; wait at most `timeout` seconds."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive() and (
                self._thread is not threading.current_thread()):
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _warn(self, kind: str, message: str, *args) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(message, *args)

    def _run(self) -> None:
        self.priority = lower_priority()
        after = (b'', b'')   # (tid, oid) of the last row read
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                try:
                    rows = self.journal.without_digest(after, BATCH)
                except Exception as e:
                    if self._stopping.is_set():
                        return
                    self._warn('read', 'Blob scrubber of %s could not read '
                               'the catalog: %s', self.fshelper.base_dir, e)
                    rows = []
                if not rows:
                    self._wake.wait()
                    continue
                after = rows[-1]
                self._scrub(rows)
        except Stopped:
            pass
        except Exception as e:   # never let the thread die loudly
            self._warn('fail', 'Blob scrubber of %s stopped: %s',
                       self.fshelper.base_dir, e)

    def _scrub(self, rows: list[tuple[bytes, bytes]]) -> None:
        """Hash the files of `rows`; record their digests in one write,
        also when a stop comes between two files (what was hashed is
        kept)."""
        digests = []
        done = 0
        try:
            for tid, oid in rows:
                digest = self._digest(oid, tid)
                if digest is not None:
                    digests.append((digest, oid, tid))
                done += 1
        finally:
            if digests:
                try:
                    self.hashed += self.journal.record_digests(digests)
                except Exception as e:
                    if not self._stopping.is_set():
                        self._warn('write', 'Blob scrubber of %s could not '
                                   'record digests: %s',
                                   self.fshelper.base_dir, e)
            self.scrubbed += done

    def _check(self) -> None:
        while not self.gate.wait(0.05):
            self.held.set()
            if self._stopping.is_set():
                raise Stopped()
        self.held.clear()
        if self._stopping.is_set():
            raise Stopped()

    def _digest(self, oid: bytes, tid: bytes) -> bytes | None:
        """The digest of the file of row ``(oid, tid)``; None if it is
        gone (removed by a pack) or cannot be read."""
        self._check()
        try:
            path = self.fshelper.getBlobFilename(oid, tid)
            fd = open_blob_file(path)
        except FileNotFoundError:
            self.skipped += 1   # a pack removed it: nothing to say
            return None
        except (OSError, ValueError) as e:
            self.skipped += 1
            self._warn(type(e).__name__, 'Blob scrubber of %s did not hash '
                       'a file: %s', self.fshelper.base_dir, e)
            return None
        try:
            h = new_hash()
            buffer = bytearray(CHUNK)
            view = memoryview(buffer)
            while True:
                self._check()
                n = os.readv(fd, [buffer])
                if not n:
                    return h.digest()
                h.update(view[:n])
        except OSError as e:
            self.skipped += 1
            self._warn('read-file', 'Blob scrubber of %s could not read '
                       '%s: %s', self.fshelper.base_dir, path, e)
            return None
        finally:
            os.close(fd)
