"""zodbblob: safe, fast and manageable blobs for ZODB and ZEO."""

from zodbblob.storage import BlobStorage
from zodbblob.storage import BlobStorageError


__all__ = ['BlobStorage', 'BlobStorageError']
