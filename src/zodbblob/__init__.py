"""zodbblob: safe, fast and manageable blobs for ZODB and ZEO."""

from zodbblob.storage import BlobStorage
from zodbblob.storage import BlobStorageError
from zodbblob.storage import open_filestorage


__all__ = ['BlobStorage', 'BlobStorageError', 'open_filestorage']
