"""The background scrubber: the digests commit does not compute.

With dedup off, a commit hashes only what it holds in memory anyway (an
inline transaction's bytes); the rows of larger files are added with
digest NULL, and commit never waits for hashing.  One daemon thread per
writable storage (`Scrubber`) has them hashed later by a process of its
own (`CHILD`) at the lowest CPU priority there is (``SCHED_IDLE``, else
nice 19), so the hashing only uses a core nobody else wants.  Not in
the thread itself: a thread at ``SCHED_IDLE`` still takes the GIL, and
descheduled while holding it, it stopped every commit (``bench/commit.py``
with two CPU hogs: 10 MiB rows 0.23x stock; ``doc/design.rst``).  The
thread stays at normal priority and spends its time blocked on the
process's pipe.

Its queue is the catalog itself: the rows whose digest is NULL, read in
batches oldest first (the partial index ``blob_undigested``), so a crash
loses nothing, and rows adopted from a stock directory or rebuilt by a
scan are hashed too.  The process opens each file as verify opens it (a
regular file only: no FIFO opened, no symbolic link followed) and hashes
it 1 MiB at a time; the thread records the digests where the rows still
have none (``UPDATE ... WHERE digest IS NULL``).  A file gone (a pack
removed it) is skipped.  With no NULL rows left the thread sleeps until
a commit adds one (`wake`).  `stop` (at close) kills the process and
does not finish the backlog: the next open resumes.  Its errors are
logged at WARNING once per kind and never reach a committer.

There is no I/O priority in the standard library (``ioprio_set`` has no
``os`` wrapper), so its reads keep the default I/O class; they come from
the page cache when the scrubber keeps up.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

from zodbblob.storage.digest import CHUNK
from zodbblob.storage.killpoints import SPAWNING

logger = logging.getLogger(__name__)

# Rows read from the catalog at a time, and digests recorded at a time.
BATCH = 64

# The hashing process: given a blob path a line, it answers a line per
# path: ``ok <hex digest>``, ``gone`` (no such file: a pack removed it)
# or ``skip <why>`` (no regular file, or unreadable).  It opens a path
# as ``zodbblob.layout.open_blob_file`` does (no link followed, no FIFO
# waited on, a regular file only), and imports only what it needs: it
# starts in 11 ms, where importing those two from zodbblob (whose package
# imports ZODB) would take 180 ms of every start.
CHILD = r"""
import errno, json, os, stat, sys
# The parent's sys.path: its eggs may not be in this interpreter's own
# site-packages (a buildout's scripts put them on sys.path themselves).
sys.path[:0] = [p for p in json.loads(sys.argv[1]) if isinstance(p, str)]
policy = 'default'
try:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    policy = 'SCHED_IDLE'
except (AttributeError, OSError):
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
        policy = 'nice 19'
    except (AttributeError, OSError):
        pass
import blake3
out = sys.stdout.buffer
out.write(b'priority %s\n' % policy.encode())
out.flush()
buffer = bytearray(CHUNK)
view = memoryview(buffer)

def digest(path):
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, 'not a regular file')
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                 | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, 'not a regular file')
        h = blake3.blake3()
        while True:
            n = os.readv(fd, [buffer])
            if not n:
                return h.hexdigest()
            h.update(view[:n])
    finally:
        os.close(fd)

try:
    for line in sys.stdin.buffer:
        path = line.rstrip(b'\n')
        try:
            answer = b'ok ' + digest(path).encode()
        except FileNotFoundError:
            answer = b'gone'
        except OSError as e:
            answer = b'skip ' + (e.strerror or str(e)).encode(
                errors='replace')
        out.write(answer + b'\n')
        out.flush()
except (BrokenPipeError, KeyboardInterrupt):
    pass   # the storage went (killed, or closed): nothing to say
os._exit(0)
""".replace('CHUNK', str(CHUNK))


# After the hashing process failed to start or ended, the scrubber
# starts it again after this many seconds, doubled per failure in a row
# up to the last.
RESTART_DELAYS = (1, 2, 4, 8, 16, 32, 60)


def _end(child: subprocess.Popen, timeout: float) -> None:
    """Wait at most `timeout` seconds for the killed `child`, and close
    its pipes."""
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    for stream in (child.stdin, child.stdout, child.stderr):
        try:
            stream.close()
        except OSError:
            pass


class Stopped(Exception):
    """The scrubber was asked to stop."""


class ChildFailed(OSError):
    """The hashing process did not start, or ended."""


class Scrubber:
    """Hashes the committed files whose catalog rows have no digest."""

    def __init__(self, journal, fshelper):
        self.journal = journal
        self.fshelper = fshelper
        self._wake = threading.Event()
        self._stopping = threading.Event()
        # Set unless a test holds the hashing (before each file); `held`
        # says the thread waits on it.
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()
        self._warned: set[str] = set()
        self.priority: str | None = None   # the hashing process's
        self.child: subprocess.Popen | None = None
        self.hashed = 0    # digests recorded
        self.skipped = 0   # files not hashed: gone, or no regular file
        self.scrubbed = 0  # rows done, whatever came of them
        self.restarts = 0  # failures of the hashing process, each
        #                    followed by a new one
        self._thread = threading.Thread(
            target=self._run, name='zodbblob-scrub', daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """A commit added rows without a digest."""
        self._wake.set()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop now: the hashing process is killed, whatever file it is
        on; wait at most `timeout` seconds for the thread."""
        self._stopping.set()
        self._wake.set()
        child = self.child
        if child is not None:
            try:
                child.kill()
            except OSError:
                pass
        if self._thread.is_alive() and (
                self._thread is not threading.current_thread()):
            self._thread.join(timeout)
        # One the thread started meanwhile (it ends it too, when it sees
        # the stop in time).
        child = self.child or child
        if child is not None:
            try:
                child.kill()
            except OSError:
                pass
            _end(child, timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _warn(self, kind: str, message: str, *args) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(message, *args)

    def _start_child(self) -> None:
        """Start the hashing process: in a session of its own, so that a
        Ctrl-C at the terminal (SIGINT to the whole process group) stops
        the program, not its hashing.

        Until its exec the new process holds a copy of every descriptor,
        the locks' included (``SPAWNING`` says why that matters)."""
        try:
            with SPAWNING:
                self.child = subprocess.Popen(
                    [sys.executable, '-c', CHILD, json.dumps(sys.path)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, close_fds=True,
                    start_new_session=True)
        except OSError as e:
            raise ChildFailed('the hashing process did not start (%s: %s)'
                              % (sys.executable, e)) from e
        if self._stopping.is_set():   # a stop that did not see it
            self._drop_child()
            raise Stopped()
        line = self.child.stdout.readline()
        if not line.startswith(b'priority '):
            raise ChildFailed('the hashing process did not start (%s): %s'
                              % (sys.executable, self._child_error()))
        self.priority = line[9:].decode().strip()

    def _child_error(self) -> str:
        """How the hashing process ended: its last line on stderr, and its
        exit status."""
        child = self.child
        try:
            child.kill()
            child.wait(5)
            last = child.stderr.read().decode(errors='replace').strip()
        except (OSError, ValueError, subprocess.TimeoutExpired):
            last = ''
        last = last.splitlines()[-1] if last else 'no message'
        return '%s (exit status %s)' % (last, child.returncode)

    def _drop_child(self) -> None:
        child, self.child = self.child, None
        if child is not None:
            try:
                child.kill()
            except OSError:
                pass
            _end(child, 5)

    def _run(self) -> None:
        after = (b'', b'')   # (tid, oid) of the last row done
        failures = 0
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
                try:
                    if self.child is None:
                        self._start_child()
                    self._scrub(rows)
                except ChildFailed as e:
                    # The batch is read again: its rows recorded meanwhile
                    # have their digests, and are not.
                    if self._stopping.is_set():
                        return
                    self._drop_child()
                    delay = RESTART_DELAYS[min(failures,
                                               len(RESTART_DELAYS) - 1)]
                    failures += 1
                    self.restarts += 1
                    self._warn('child', 'Blob scrubber of %s: %s; starting '
                               'it again in %d s, and after each failure '
                               '(files wait for their digests meanwhile)',
                               self.fshelper.base_dir, e, delay)
                    self._stopping.wait(delay)
                    continue
                after = rows[-1]
                failures = 0
        except Stopped:
            pass
        except Exception as e:   # never let the thread die loudly
            if not self._stopping.is_set():
                self._warn('fail', 'Blob scrubber of %s stopped: %s',
                           self.fshelper.base_dir, e)
        finally:
            # Nobody hashes after the thread: its process is reaped and its
            # pipes closed here, also one started after a stop looked (a
            # stop that outwaited its join) or left by a failure.
            self._drop_child()

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
        """The digest of the file of row ``(oid, tid)``, from the hashing
        process; None if it is gone (removed by a pack) or no regular
        file, or cannot be read."""
        self._check()
        path = self.fshelper.getBlobFilename(oid, tid)
        try:
            self.child.stdin.write(os.fsencode(path) + b'\n')
            self.child.stdin.flush()
            answer = self.child.stdout.readline().rstrip(b'\n')
        except (OSError, ValueError):
            answer = b''
        if self._stopping.is_set():
            raise Stopped()
        if answer.startswith(b'ok '):
            return bytes.fromhex(answer[3:].decode())
        if not answer:
            raise ChildFailed('the hashing process ended: %s'
                              % self._child_error())
        self.skipped += 1
        if answer != b'gone':   # a pack removed it: nothing to say
            why = answer[5:].decode(errors='replace')
            self._warn(why, 'Blob scrubber of %s did not hash %s: %s',
                       self.fshelper.base_dir, path, why)
        return None
