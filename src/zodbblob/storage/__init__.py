"""The storage wing: blob support for any ZODB storage, as a wrapper.

``wrapper`` holds ``BlobStorage``, which defines what has to see blob
files and delegates the rest to its base.
"""

from zodbblob.storage.wrapper import INLINE_LIMIT
from zodbblob.storage.wrapper import LOCK_NAME
from zodbblob.storage.wrapper import BlobDirectoryInUse
from zodbblob.storage.wrapper import BlobStorage
from zodbblob.storage.wrapper import BlobStorageError
from zodbblob.storage.wrapper import check_state_layout
from zodbblob.storage.wrapper import held_by_a_storage
from zodbblob.storage.wrapper import hold_blob_directory
