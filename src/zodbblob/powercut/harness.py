"""Mount the power-cut filesystem, cut its power, and mount it again.

``mount(backing, mountpoint)`` starts the daemon (``daemon.py``, its own
process) serving the directory `backing` at `mountpoint`, and returns a
``PowerCutMount``: ``cut()`` (the power goes now), ``arm(kind, n)`` (it
goes at the nth write, fsync or rename from now), ``wait_cut()``,
``stats()``, ``remount()`` (the backing directory put back to what a disk
that lost power would hold, unmounted, mounted afresh: the kernel's page
cache must not keep what was discarded) and ``unmount()``.  Used as a
context manager, it always unmounts, lazily if the mount is busy, and
ends its daemon, even when the test fails.

The graveyard the daemon keeps removed files in is a sibling of `backing`
(``<backing>.graveyard``): it must be on the same filesystem.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

MOUNT_TIMEOUT = 60.0


class PowerCutError(Exception):
    """The power-cut filesystem could not do what the test asked."""


class PowerCutMount:

    def __init__(self, backing: str, mountpoint: str,
                 seed: int | None = None):
        self.backing = os.path.abspath(backing)
        self.mountpoint = os.path.abspath(mountpoint)
        self.graveyard = self.backing.rstrip(os.sep) + '.graveyard'
        # With a seed, a cut keeps a random part of what was not synced.
        self.seed = seed
        self.cuts = 0
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> 'PowerCutMount':  # noqa: PYI034 (3.10)
        return self

    def __exit__(self, *exc_info) -> None:
        self.unmount()

    def start(self) -> None:
        if not os.path.isdir(self.backing):
            raise PowerCutError('Backing directory %s: not a directory'
                                % self.backing)
        if os.stat(os.path.dirname(self.graveyard)).st_dev \
                != os.stat(self.backing).st_dev:
            raise PowerCutError('Backing directory %s: a mount point (its '
                                'graveyard %s must be on its filesystem)'
                                % (self.backing, self.graveyard))
        os.makedirs(self.graveyard, exist_ok=True)
        os.makedirs(self.mountpoint, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'zodbblob.powercut.daemon',
             self.backing, self.graveyard, self.mountpoint],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self._wait_mounted()

    def _wait_mounted(self) -> None:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not mounted_at(self.mountpoint):
            if self.process.poll() is not None:
                error = self.process.stderr.read().strip().splitlines()
                self.process = None
                raise PowerCutError('Power-cut filesystem at %s: the daemon '
                                    'ended: %s' % (self.mountpoint,
                                                   error[-1:] or '?'))
            if time.monotonic() > deadline:
                self._end_daemon()
                raise PowerCutError('Power-cut filesystem at %s: not mounted'
                                    ' after %d s' % (self.mountpoint,
                                                     MOUNT_TIMEOUT))
            time.sleep(0.02)

    def _ask(self, line: str) -> str:
        if self.process is None:
            raise PowerCutError('Power-cut filesystem at %s: not mounted'
                                % self.mountpoint)
        self.process.stdin.write(line + '\n')
        self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        if not answer or answer.startswith('error'):
            raise PowerCutError('Power-cut filesystem at %s: %r answered %s'
                                % (self.mountpoint, line,
                                   answer or 'nothing (the daemon died)'))
        return answer

    def cut(self) -> None:
        """The power goes now: every later operation fails with EIO."""
        self._ask('cut')

    def arm(self, kind: str, count: int) -> None:
        """The power goes at the `count`th operation of `kind` from now.

        `kind` is ``write``, ``fsync``, ``rename`` (and link) or ``any``.
        """
        self._ask('arm %s %d' % (kind, count))

    def wait_cut(self, timeout: float) -> bool:
        return self._ask('wait %s' % timeout) == 'cut'

    def stats(self) -> dict:
        return json.loads(self._ask('stats'))

    def remount(self) -> dict:
        """Cut (if not yet), revert, unmount, mount again: what was undone.

        The processes that wrote through the mount must be dead by now.
        """
        self.cut()
        seed = '' if self.seed is None else ' %d' % (self.seed + self.cuts)
        undone = json.loads(self._ask('revert' + seed))
        self.cuts += 1
        if self._detach():
            # The same daemon mounts again: no new interpreter per cut.
            self._ask('mount')
            self._wait_mounted()
        else:
            self.start()
        return undone

    def unmount(self) -> None:
        if self.process is not None and self._detach():
            self._end_daemon()

    def _detach(self) -> bool:
        """Unmount; whether the daemon lives on, ready to mount again."""
        if mounted_at(self.mountpoint):
            try:
                done = subprocess.run(['fusermount3', '-u', self.mountpoint],
                                      capture_output=True, check=False)
            except OSError:
                # No fusermount3 to run: the daemon's libfuse unmounts
                # when it is told to end.
                self.process.terminate()
                self._end_daemon()
                return False
            if done.returncode:
                # Busy (a process still has something open there): detach
                # it now, and end the daemon rather than wait for the last
                # user to let go; what it still has open fails with
                # ENOTCONN.
                subprocess.run(['fusermount3', '-u', '-z', self.mountpoint],
                               capture_output=True, check=False)
                self.process.kill()
                self._end_daemon()
                return False
        return True

    def _end_daemon(self) -> None:
        process, self.process = self.process, None
        try:
            process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def mounted_at(path: str) -> bool:
    """Whether a filesystem is mounted at `path`.

    Read from the mount table: a dead FUSE mount fails ``stat`` (EIO, or
    ENOTCONN once its daemon is gone), so ``os.path.ismount`` says no.
    """
    with open('/proc/self/mountinfo') as f:
        for line in f:
            point = line.split()[4].encode().decode('unicode_escape')
            if point == path:
                return True
    return False


def mount(backing: str, mountpoint: str,
          seed: int | None = None) -> PowerCutMount:
    """Serve `backing` at `mountpoint` through the power-cut filesystem."""
    mounted = PowerCutMount(backing, mountpoint, seed)
    mounted.start()
    return mounted


_unavailable: list[str | None] = []


def unavailable() -> str | None:
    """Why this machine cannot mount the filesystem, or None if it can.

    Tried once per process, with a real mount.
    """
    if _unavailable:
        return _unavailable[0]
    reason = None
    if not os.path.exists('/dev/fuse'):
        reason = 'no /dev/fuse'
    elif os.geteuid() != 0:
        reason = 'not root'
    elif shutil.which('fusermount3') is None:
        reason = 'no fusermount3 (the fuse3 package)'
    else:
        try:
            import mfusepy  # noqa: F401
        except ImportError:
            reason = 'no mfusepy'
        except OSError:
            reason = 'no libfuse3'
    if reason is None:
        top = tempfile.mkdtemp(prefix='powercut-probe-')
        try:
            os.mkdir(os.path.join(top, 'backing'))
            with mount(os.path.join(top, 'backing'),
                       os.path.join(top, 'mnt')):
                pass
        except (PowerCutError, OSError) as error:
            reason = 'cannot mount FUSE: %s' % error
        finally:
            shutil.rmtree(top, ignore_errors=True)
    _unavailable.append(reason)
    return reason
