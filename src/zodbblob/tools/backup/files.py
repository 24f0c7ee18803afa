"""Writing the backup's files durably, and the tests' crash points.

A file is copied to a ``.partial`` name and renamed when complete, so a
name without the suffix always holds a whole file.  With ``syncfs`` one
call at the end makes every file, name and directory durable; without
it each is fsynced.  `_Kill` lets the tests kill a backup, a collection
or a restore at a chosen point (environment variables, ``N[:SIGNAL]``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal

from zodbblob.layout import (
    BlobTree,
    fsync_directory,
    makedirs_durable,
    remove_if_exists,
)
from zodbblob.storage.catalog import (
    sync_filesystem,
    syncfs_works,
)
from zodbblob.tools.backup.manifest import (
    CHUNK,
    PARTIAL_SUFFIX,
)

# The tests' crash points, N[:SIGNAL].  ZODBBLOB_BACKUP_KILL_AFTER: after
# N files copied, the process sends itself SIGNAL (default KILL) while
# the next copy is half written.  ZODBBLOB_BACKUP_KILL_COLLECT_AFTER:
# after N pool files removed by `collect`.
# ZODBBLOB_RESTORE_KILL_AFTER: after N of restore's final renames.
# ZODBBLOB_BACKUP_KILL_PLACING_AFTER: after N contents placed in the pool
# by content, the next one is copied (or linked) into ``.incoming`` and
# the process killed before it has its name.
KILL_VARIABLE = 'ZODBBLOB_BACKUP_KILL_AFTER'
PLACING_KILL_VARIABLE = 'ZODBBLOB_BACKUP_KILL_PLACING_AFTER'
COLLECT_KILL_VARIABLE = 'ZODBBLOB_BACKUP_KILL_COLLECT_AFTER'
RESTORE_KILL_VARIABLE = 'ZODBBLOB_RESTORE_KILL_AFTER'


def _kill_setting(variable: str) -> tuple[int | None, int]:
    count, _, name = os.environ.get(variable, '').partition(':')
    return (int(count) if count else None,
            getattr(signal, 'SIG' + (name or 'KILL').upper()))


class _Kill:
    """A crash point for the tests: `KILL_VARIABLE` by default."""

    def __init__(self, variable: str = KILL_VARIABLE):
        self.after, self.signal = _kill_setting(variable)
        self.copied = 0
        self.place_after, self.place_signal = (
            _kill_setting(PLACING_KILL_VARIABLE) if variable == KILL_VARIABLE
            else (None, None))
        self.placed = 0

    def placing(self) -> None:
        if self.place_after is not None and self.placed >= self.place_after:
            self.place_after = None
            os.kill(os.getpid(), self.place_signal)
        self.placed += 1

    def mid_copy(self) -> None:
        if self.after is not None and self.copied >= self.after:
            self.after = None
            os.kill(os.getpid(), self.signal)

    def after_one(self) -> None:
        self.copied += 1
        self.mid_copy()


class _Files:
    """Writes files under one directory tree; `sync` makes them durable.

    With syncfs, the one call at the end covers the files, their names and
    their directories.  Without it, every file is fsynced as it is written,
    every new directory as it is made, and the directories that got new
    names at `sync`.
    """

    def __init__(self, root: str, kill: _Kill | None = None):
        self.root = root
        self.kill = kill
        self.made: set[str] = set()
        # The directories that did not exist before: a snapshot dropped
        # for a pack leaves none of them behind.
        self.created: list[str] = []
        self.touched: set[str] = set()
        # Decided by the filesystem that holds the destination: syncfs
        # makes nothing durable on some (FUSE, NFS).
        self.syncfs = syncfs_works(root)

    def makedirs(self, directory: str) -> None:
        if directory in self.made:
            return
        missing = directory
        while not os.path.isdir(missing) and missing != self.root:
            self.created.append(missing)
            missing = os.path.dirname(missing)
        if self.syncfs:
            try:
                os.mkdir(directory)  # the parent usually exists
            except FileExistsError:
                pass
            except FileNotFoundError:
                os.makedirs(directory, exist_ok=True)
        else:
            makedirs_durable(directory)
        self.made.add(directory)

    def copy(self, fd: int, target: str, mode: int, offset: int,
             length: int) -> tuple[int, bytes]:
        """Copy `length` bytes at `offset` of `fd` to `target`.

        Returns (size, sha256) of what was written: fewer bytes than
        `length` when the file ended early.  The bytes go to a
        ``.partial`` name, renamed when complete; whatever happens before,
        the partial file is removed.
        """
        directory = os.path.dirname(target)
        self.makedirs(directory)
        partial = target + PARTIAL_SUFFIX
        digest = hashlib.sha256()
        size = 0
        try:
            # Created with its final mode, which may be read-only: a
            # partial file an earlier run left must go first.
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            try:
                out = os.open(partial, flags, mode)
            except FileExistsError:
                os.remove(partial)
                out = os.open(partial, flags, mode)
            try:
                while size < length:
                    chunk = os.pread(fd, min(CHUNK, length - size),
                                     offset + size)
                    if not chunk:
                        break
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view):]
                    size += len(chunk)
                    if self.kill is not None:
                        self.kill.mid_copy()
                if not self.syncfs:
                    os.fsync(out)
            finally:
                os.close(out)
            os.replace(partial, target)
        except BaseException:
            remove_if_exists(partial)
            raise
        if not self.syncfs:
            self.touched.add(directory)
        if self.kill is not None:
            self.kill.copied += 1
        return size, digest.digest()

    def link(self, existing: str, target: str,
             tree: BlobTree | None = None) -> bool:
        """Hard-link `existing` as `target`; False where links fail.

        With the `tree` that holds `existing`, no link is followed on
        the way to it (`BlobTree.link`).
        """
        directory = os.path.dirname(target)
        self.makedirs(directory)
        link = os.link if tree is None else tree.link
        try:
            link(existing, target)
        except FileExistsError:
            os.remove(target)
            link(existing, target)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK,
                               errno.ENOTSUP, errno.ENOENT):
                raise
            return False
        if not self.syncfs:
            self.touched.add(directory)
        return True

    def sync(self) -> None:
        if self.syncfs:
            sync_filesystem(self.root)
        else:
            for directory in self.touched:
                fsync_directory(directory)
        self.touched.clear()


def _boot_id() -> str | None:
    """This boot of the machine, or None where the kernel does not say."""
    try:
        with open('/proc/sys/kernel/random/boot_id') as f:
            return f.read().strip()
    except OSError:
        return None


def _write_marker(directory: str, name: str, text: str) -> None:
    """Write `name` in `directory` whole or not at all, durably."""
    path = os.path.join(directory, name)
    staged = path + PARTIAL_SUFFIX
    with open(staged, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, path)
    fsync_directory(directory)
