"""Who holds a blob directory: its lock, and the errors of a refused open.

One storage at a time writes a blob directory: it holds
``<blob_dir>/.zodbblob/lock`` (``zc.lockfile``) from open to close, and a
tool that changes the directory takes the same lock, so that neither runs
beside the other.
"""

from __future__ import annotations

import os

import zc.lockfile

from zodbblob.storage.catalog import STATE_DIR

LOCK_NAME = 'lock'


class BlobStorageError(Exception):
    """The blob storage cannot do what was asked, as the message says."""


class BlobDirectoryInUse(BlobStorageError):
    """A live storage holds the blob directory."""


def hold_blob_directory(blob_dir: str):
    """Take the lock a BlobStorage takes on `blob_dir`, for a tool.

    Returns the lock (close it when done), or None when the directory has
    never been used by zodbblob (nothing to hold, and nothing is created).
    Raises BlobDirectoryInUse when a live storage (a running server, an
    application) holds it: tools that change a blob directory must not run
    beside one.
    """
    state_dir = os.path.join(blob_dir, STATE_DIR)
    if not os.path.isdir(state_dir):
        return None
    lock_path = os.path.join(state_dir, LOCK_NAME)
    try:
        return zc.lockfile.LockFile(lock_path)
    except zc.lockfile.LockError:
        raise BlobDirectoryInUse(
            'Blob directory %s is in use by a running storage (lock %s is '
            'held); stop it first' % (blob_dir, lock_path)) from None


def held_by_a_storage(blob_dir: str) -> bool:
    """Whether a storage holds `blob_dir` now (a server, an application).

    Its lock is taken and let go at once.
    """
    try:
        lock = hold_blob_directory(blob_dir)
    except BlobDirectoryInUse:
        return True
    except OSError:
        return False   # a read-only directory: no storage writes there
    if lock is not None:
        lock.close()
    return False


def lock_blob_directory(fshelper, lock_path: str):
    """Take the lock of the storage opening `fshelper`'s directory."""
    try:
        return zc.lockfile.LockFile(lock_path)
    except zc.lockfile.LockError:
        raise BlobDirectoryInUse(
            'Blob directory %s is in use by another storage (lock %s is '
            'held)' % (fshelper.base_dir, lock_path)) from None
