"""The storage wing: blob support for any ZODB storage, as a wrapper.

``wrapper`` holds ``BlobStorage``, which defines what has to see blob
files, delegates the rest to its base, and hands the blob files to its
collaborators: ``recovery`` (opening a blob directory: the catalog, and
finishing what a crash interrupted), ``commit`` (stage, log, publish,
finish, and the checkpoint), ``pack`` (pack and undo) and ``lock`` (who
holds a blob directory).  Below them: ``catalog`` (the SQLite catalog,
class ``Journal``; its tables and migrations in ``schema``),
``commitlog`` and ``datamanager`` (a transaction's
directory for new blob files).
"""

from zodbblob.storage.commit import INLINE_LIMIT
from zodbblob.storage.filestorage import FileStorageOpener
from zodbblob.storage.lock import (
    LOCK_NAME,
    BlobDirectoryInUse,
    BlobStorageError,
    held_by_a_storage,
    hold_blob_directory,
)
from zodbblob.storage.recovery import check_state_layout
from zodbblob.storage.wrapper import BlobStorage


def open_filestorage(path: str, blob_dir: str, layout: str = 'automatic',
                     dedup: bool = False, *, object_store=None,
                     cache_size: int | None = None,
                     **options) -> BlobStorage:
    """A FileStorage at `path` with zodbblob's blobs in `blob_dir`.

    The drop-in for ``ZODB.FileStorage.FileStorage(path, blob_dir=...)``:
    `options` go to FileStorage (``read_only``, ``pack_gc``, ...).  The
    storage opens the FileStorage itself, after it locked the blob
    directory and rolled back a last transaction that a crash left torn,
    so it commits with one sync (``doc/design.rst``, "Commit").  With
    `dedup`, equal contents share one file (``storage/dedup.py``).  With
    `object_store`, committed blobs live in that bucket, their local
    copies in a cache of at most `cache_size` bytes (``storage/objects.py``).
    """
    return BlobStorage(blob_dir, FileStorageOpener(path, **options), layout,
                       dedup, object_store=object_store,
                       cache_size=cache_size)


__all__ = [
    'INLINE_LIMIT', 'LOCK_NAME', 'BlobDirectoryInUse', 'BlobStorage',
    'BlobStorageError', 'FileStorageOpener', 'check_state_layout',
    'held_by_a_storage', 'hold_blob_directory', 'open_filestorage',
]
