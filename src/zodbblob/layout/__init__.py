"""The ground floor: blob directory layouts, paths and files.

Every wing stands on it: ``naming`` (the layouts: where the file of each
(oid, tid) lives, the ids paths are built from, the ``.layout`` marker),
``filesystem`` (``FilesystemHelper``, ZODB's API for one blob directory),
``files`` (fsync helpers, and opening a blob name safely), ``syncfs``
(one syncfs where it flushes), ``scan`` (the
walk every layout's scan is made of) and ``tree`` (``BlobTree``, which
reaches files without following a link).  ``zodbblob.layout`` is public:
every name it had as one module is here still.
"""

from zodbblob.layout.files import (
    LINKED_DIRECTORY,
    NotABlobFile,
    check_blob_file,
    fdatasync,
    file_kind,
    fsync_directory,
    fsync_path,
    makedirs_durable,
    open_blob_file,
    process_alive,
    remove_if_exists,
)
from zodbblob.layout.filesystem import FilesystemHelper
from zodbblob.layout.naming import (
    BLOB_SUFFIX,
    LAYOUT_MARKER,
    LAYOUTS,
    BushyLayout,
    ChunkyLayout,
    FlatLayout,
    InvalidIdError,
    LawnLayout,
    auto_layout_select,
    check_id,
    get_layout,
    read_marker,
    register_layout,
)
from zodbblob.layout.tree import BlobTree

__all__ = [
    'BLOB_SUFFIX', 'LAYOUTS', 'LAYOUT_MARKER', 'LINKED_DIRECTORY',
    'BlobTree', 'BushyLayout', 'ChunkyLayout', 'FilesystemHelper',
    'FlatLayout', 'InvalidIdError', 'LawnLayout', 'NotABlobFile',
    'auto_layout_select', 'check_blob_file', 'check_id', 'fdatasync',
    'file_kind', 'fsync_directory', 'fsync_path', 'get_layout',
    'makedirs_durable', 'open_blob_file', 'process_alive', 'read_marker',
    'register_layout', 'remove_if_exists',
]
