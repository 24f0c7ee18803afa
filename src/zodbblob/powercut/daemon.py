"""The power-cut filesystem's process: a FUSE passthrough that can die.

Run as ``python -m zodbblob.powercut.daemon ROOT GRAVEYARD MOUNTPOINT``
(``harness.py`` does).  Every operation on MOUNTPOINT is done on ROOT, and
``model.Durability`` is told first what it undoes.  One request is served
at a time (FUSE's ``-s``), so that the model sees the changes in the order
the disk would.

The control channel is the process's standard input and output, one line
each way:

``cut``
    The power goes: every later operation fails with EIO, as on a dead
    disk (names and attributes the kernel cached are still served).
    The writer is still running; the test kills it next.
``arm KIND N``
    Cut by itself at the Nth operation of KIND (``write``, ``fsync``,
    ``rename`` or ``any``) counted from now; that operation fails.
``wait SECONDS``
    Answer ``cut`` once the power is gone, or ``running`` after SECONDS.
``stats``
    The operations served, per kind, and what is not durable (JSON).
``revert [SEED]``
    After a cut, and after the writer is dead: put ROOT back to its
    durable state (with SEED, keep a random part of what was not synced).
``mount``
    After the harness unmounted: mount again, the power on.  A fresh
    mount is what drops the kernel's caches of the mount (pages, names,
    attributes); one process serves mount after mount, so a cut costs no
    new interpreter.

The process ends when its standard input does (the test process is done
or dead): unmounted by then, or detached then (``fusermount3 -u -z``).
``syncfs(2)`` never reaches a FUSE daemon (the kernel sends FUSE_SYNCFS
to virtiofs only): here, as on any FUSE mount, it makes nothing durable.
"""

import errno
import json
import os
import queue
import subprocess
import sys
import threading

import mfusepy

from .model import Durability

KINDS = ('write', 'fsync', 'rename', 'any')
# How long ``mount`` waits for the last mount's loop to end.
UNMOUNT_TIMEOUT = 60.0
# How long the kernel may keep a name or attributes without asking.
CACHE_SECONDS = 10


class PowerCutOperations(mfusepy.Operations):

    use_ns = True

    def __init__(self, root: str, graveyard: str):
        self.root = os.path.realpath(root)
        self.durability = Durability(self.root, os.path.realpath(graveyard))
        self.serving = threading.Lock()
        self.dead = threading.Event()
        self.counts = dict.fromkeys(KINDS, 0)
        self.armed: tuple[str, int] | None = None
        self.cut_at: str | None = None
        # Between mounts: set while nothing is mounted; the main thread
        # takes True (mount again) or False (end) from `next_mount`.
        self.unmounted = threading.Event()
        self.next_mount: queue.Queue[bool] = queue.Queue()

    # -- the power ---------------------------------------------------------

    def _serve(self, kind: str | None) -> None:
        """Count one operation; fail it if the power is, or now goes, off."""
        if self.dead.is_set():
            raise mfusepy.FuseOSError(errno.EIO)
        if kind is None:
            return
        for counted in (kind, 'any'):
            self.counts[counted] += 1
            if self.armed and self.armed[0] == counted \
                    and self.counts[counted] >= self.armed[1]:
                self.cut_at = '%s %d' % (counted, self.counts[counted])
                self.dead.set()
                raise mfusepy.FuseOSError(errno.EIO)

    def control(self, line: str) -> str:
        words = line.split()
        with self.serving:
            if words == ['cut']:
                self.cut_at = self.cut_at or 'cut'
                self.dead.set()
                return 'cut'
            if len(words) == 3 and words[0] == 'arm' and words[1] in KINDS:
                self.armed = (words[1], self.counts[words[1]] + int(words[2]))
                return 'armed'
            if words == ['stats']:
                return json.dumps({'counts': self.counts,
                                   'cut': self.cut_at,
                                   'unsynced': self.durability.unsynced()})
            if words and words[0] == 'revert' and len(words) <= 2:
                if not self.dead.is_set():
                    return 'error: revert before a cut'
                seed = int(words[1]) if len(words) == 2 else None
                return json.dumps(self.durability.revert(seed))
        if words == ['mount']:
            if not self.unmounted.wait(UNMOUNT_TIMEOUT):
                return 'error: still mounted'
            with self.serving:
                self.unmounted.clear()
                self.dead.clear()
                self.armed = self.cut_at = None
            self.next_mount.put(True)
            return 'mounting'
        if len(words) == 2 and words[0] == 'wait':
            return 'cut' if self.dead.wait(float(words[1])) else 'running'
        return 'error: unknown command %r' % line

    # -- names -------------------------------------------------------------

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip('/'))

    def _parent(self, path: str) -> str:
        return os.path.dirname(self._path(path).rstrip('/'))

    def getattr(self, path, fh=None):
        with self.serving:
            self._serve(None)
            info = os.fstat(fh) if fh is not None else os.lstat(
                self._path(path))
        return {key: getattr(info, key) for key in (
            'st_mode', 'st_nlink', 'st_uid', 'st_gid', 'st_size',
            'st_ino', 'st_blocks')} | {
            'st_atime': info.st_atime_ns, 'st_mtime': info.st_mtime_ns,
            'st_ctime': info.st_ctime_ns}

    def readdir(self, path, fh):
        with self.serving:
            self._serve(None)
            # With use_ino an entry needs its inode: readdir(3) skips 0.
            return ['.', '..'] + [
                (entry.name, {'st_ino': entry.inode(), 'st_mode':
                              entry.stat(follow_symlinks=False).st_mode}, 0)
                for entry in os.scandir(self._path(path))]

    def readlink(self, path):
        with self.serving:
            self._serve(None)
            return os.readlink(self._path(path))

    def access(self, path, amode):
        with self.serving:
            self._serve(None)
            if not os.access(self._path(path), amode):
                raise mfusepy.FuseOSError(errno.EACCES)
            return 0

    def statfs(self, path):
        with self.serving:
            self._serve(None)
            info = os.statvfs(self._path(path))
        return {key: getattr(info, key) for key in (
            'f_bavail', 'f_bfree', 'f_blocks', 'f_bsize', 'f_favail',
            'f_ffree', 'f_files', 'f_flag', 'f_frsize', 'f_namemax')}

    def mkdir(self, path, mode):
        with self.serving:
            self._serve('any')
            self.durability.directory_changes(self._parent(path))
            os.mkdir(self._path(path), mode)
            return 0

    def rmdir(self, path):
        with self.serving:
            self._serve('any')
            target = self._path(path)
            if os.listdir(target):
                raise mfusepy.FuseOSError(errno.ENOTEMPTY)
            self.durability.directory_changes(self._parent(path))
            self.durability.bury(target)
            return 0

    def unlink(self, path):
        with self.serving:
            self._serve('any')
            self.durability.directory_changes(self._parent(path))
            self.durability.bury(self._path(path))
            os.unlink(self._path(path))
            return 0

    def rename(self, old, new):
        with self.serving:
            self._serve('rename')
            source, target = self._path(old), self._path(new)
            self.durability.directory_changes(self._parent(old))
            self.durability.directory_changes(self._parent(new))
            if os.path.lexists(target):
                if os.path.isdir(target) and not os.path.islink(target):
                    if not os.path.isdir(source):
                        raise mfusepy.FuseOSError(errno.EISDIR)
                    if os.listdir(target):
                        raise mfusepy.FuseOSError(errno.ENOTEMPTY)
                elif os.path.isdir(source) and not os.path.islink(source):
                    raise mfusepy.FuseOSError(errno.ENOTDIR)
                if os.lstat(source).st_ino != os.lstat(target).st_ino:
                    self.durability.bury(target)
            os.rename(source, target)
            return 0

    def link(self, target, source):
        with self.serving:
            self._serve('rename')
            self.durability.directory_changes(self._parent(target))
            os.link(self._path(source), self._path(target),
                    follow_symlinks=False)
            return 0

    def symlink(self, target, source):
        with self.serving:
            self._serve('any')
            self.durability.directory_changes(self._parent(target))
            os.symlink(source, self._path(target))
            return 0

    def chmod(self, path, mode):
        with self.serving:
            self._serve('any')
            self.durability.mode_changes(self._path(path))
            os.chmod(self._path(path), mode)
            return 0

    def chown(self, path, uid, gid):
        with self.serving:
            self._serve('any')
            os.chown(self._path(path), uid, gid, follow_symlinks=False)
            return 0

    def utimens(self, path, times=None):
        with self.serving:
            self._serve('any')
            os.utime(self._path(path), ns=times, follow_symlinks=False)
            return 0

    def truncate(self, path, length, fh=None):
        with self.serving:
            self._serve('write')
            self.durability.truncates(self._path(path), length)
            if fh is not None:
                os.ftruncate(fh, length)
            else:
                os.truncate(self._path(path), length)
            return 0

    # -- open files --------------------------------------------------------

    def create(self, path, mode, flags):
        with self.serving:
            self._serve('any')
            self.durability.directory_changes(self._parent(path))
            return os.open(self._path(path), (flags & ~os.O_APPEND)
                           | os.O_CREAT, mode)

    def open(self, path, flags):
        with self.serving:
            self._serve(None)
            if flags & os.O_TRUNC:
                self._serve('write')
                self.durability.truncates(self._path(path), 0)
            return os.open(self._path(path), flags & ~os.O_APPEND)

    def read(self, path, size, offset, fh):
        with self.serving:
            self._serve(None)
            return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        with self.serving:
            self._serve('write')
            self.durability.file_changes(fh, offset, len(data))
            return os.pwrite(fh, data, offset)

    def fsync(self, path, datasync, fh):
        with self.serving:
            self._serve('fsync')
            self.durability.file_synced(fh, data_only=bool(datasync))
            return 0

    def fsyncdir(self, path, datasync, fh):
        with self.serving:
            self._serve('fsync')
            self.durability.directory_synced(self._path(path))
            return 0

    def flush(self, path, fh):
        with self.serving:
            self._serve(None)
            return 0

    def release(self, path, fh):
        # The descriptor is closed even after a cut: a dead disk leaks
        # nothing of the daemon's.
        with self.serving:
            os.close(fh)
        return 0

    def opendir(self, path):
        with self.serving:
            self._serve(None)
            return 0

    def releasedir(self, path, fh):
        return 0


def serve_control(operations: PowerCutOperations, mountpoint: str) -> None:
    try:
        for line in sys.stdin:
            try:
                answer = operations.control(line.strip())
            except Exception as error:  # noqa: BLE001 (the test reads it)
                answer = 'error: %s' % error
            sys.stdout.write(answer + '\n')
            sys.stdout.flush()
    except OSError:
        pass  # the test process is gone
    finally:
        # No more orders: end, and leave no mount behind (the test
        # process died without unmounting, or it has unmounted already).
        if not operations.unmounted.is_set():
            subprocess.run(['fusermount3', '-u', '-z', mountpoint],
                           capture_output=True, check=False)
        operations.next_mount.put(False)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not all(map(os.path.isdir, argv[:2])):
        sys.stderr.write('usage: python -m zodbblob.powercut.daemon ROOT '
                         'GRAVEYARD MOUNTPOINT (ROOT and GRAVEYARD: '
                         'directories of one filesystem)\n')
        return 2
    root, graveyard, mountpoint = argv
    operations = PowerCutOperations(root, graveyard)
    threading.Thread(target=serve_control, args=(operations, mountpoint),
                     daemon=True).start()
    while True:
        # The kernel caches names and attributes for a while, as over any
        # disk: every change passes through it, so what it caches is what
        # the daemon did, and a cut's revert is followed by a new mount,
        # which starts with nothing cached.  After a cut, what it still
        # caches is served, as a kernel with a dead disk serves it.
        mfusepy.FUSE(operations, mountpoint, foreground=True, nothreads=True,
                     fsname='powercut', attr_timeout=CACHE_SECONDS,
                     entry_timeout=CACHE_SECONDS, negative_timeout=0,
                     use_ino=True)
        operations.unmounted.set()
        if not operations.next_mount.get():
            return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
