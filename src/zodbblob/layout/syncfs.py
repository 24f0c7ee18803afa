"""One syncfs(2) for many fsyncs, where it flushes.

A checkpoint, a commit of many large files, a backup and a migrate make
everything they wrote durable with one ``syncfs`` where the filesystem
honours it, and with an fsync of each file and directory where it does
not (FUSE, NFS, CIFS: there syncfs returns 0 and flushes nothing; the
power-cut tests in ``zodbblob.powercut`` showed what that lost).
"""

from __future__ import annotations

import ctypes
import os


def _load_syncfs():
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    syncfs.argtypes = [ctypes.c_int]
    return syncfs


_syncfs = _load_syncfs()
SYNCFS_AVAILABLE = _syncfs is not None

# The filesystems (statfs f_type) whose syncfs(2) writes out their own
# dirty data and metadata: the kernel's sync_filesystem reaches them.  On
# FUSE (sshfs, ...) it reaches the daemon only for virtiofs, and NFS and
# CIFS flush no metadata with it: there syncfs returns 0 and makes
# nothing durable, so the callers fsync each file and directory instead.
SYNCFS_FILESYSTEMS = {
    0xEF53: 'ext2/3/4',
    0x58465342: 'xfs',
    0x9123683E: 'btrfs',
    0x01021994: 'tmpfs',
    0xF2F52010: 'f2fs',
    0x2FC12FC1: 'zfs',
    0x794C7630: 'overlayfs',  # syncs its upper filesystem
}


def _load_statfs():
    try:
        statfs = ctypes.CDLL(None, use_errno=True).statfs
    except (OSError, AttributeError):
        return None
    statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    return statfs


_statfs = _load_statfs()


def filesystem_type(path: str) -> int | None:
    """statfs(2)'s f_type of `path`'s filesystem, None if unknown."""
    if _statfs is None:
        return None
    # struct statfs begins with f_type, a word, on every Linux; 256 bytes
    # hold the whole struct.
    buffer = ctypes.create_string_buffer(256)
    if _statfs(os.fsencode(path), buffer) != 0:
        return None
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


def syncfs_works(path: str) -> bool:
    """Whether one syncfs(2) makes what was written under `path` durable.

    A path not made yet is judged by its nearest existing parent.
    """
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return SYNCFS_AVAILABLE and filesystem_type(path) in SYNCFS_FILESYSTEMS


def sync_filesystem(path: str) -> None:
    """Flush every dirty file and directory entry of `path`'s filesystem.

    One ``syncfs(2)`` makes a whole transaction durable (its staged files,
    their names and the journal's WAL) for the price of one fsync; per
    file and per directory fsyncs cost that many times over.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        if _syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, 'syncfs failed: %s' % os.strerror(error),
                          path)
    finally:
        os.close(fd)
