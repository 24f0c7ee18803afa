"""The ZEO client blob cache: files, their index, and one download per blob.

A cache directory holds the blob files where stock ZEO puts them, and
beside them an SQLite index that knows every file, so nothing after the
first open walks the directory.  The package has one module per idea;
imports point down the list:

``blobcache``
    `BlobCache`, the public face (``load``, ``lookup``, ``admit``,
    ``flush``, ``prune``, ``stats``, ``close``): when to check the size,
    and its collaborators below, each of which takes the open directory
    (`CacheDirectory`) and the collaborators it works with.
``downloads``
    Claims, tokens, waiting on threads and processes, takeover, install,
    cancel; what processes that ended left behind.
``evictor``
    Choosing victims, the prune lease, chunks, the removal threads.
``syncs``
    Deferred ``fdatasync`` and the ``unsynced`` table; the boot id.
``accesslog``
    The in-memory batch of accesses, the log, its fold.
``sizes``
    The sizes remembered for the one-stat hit; a file changed by hand
    forgotten.
``index``
    The SQLite index: the writer lock, open, ``quick_check``, migration,
    move aside and rebuild, building from a scan.
``schema``
    The tables, the schema version and the migrations.
``owners``
    Tokens and whether their owners are alive.
``directory``
    The ``zeocache`` layout, its marker, ``.tmp``; `CacheDirectory`, the
    open directory: its file names, the settings, the lock of the
    in-memory state, the closing event.

The processes sharing a directory must run on one host: WAL mode needs
shared memory, and a claim's owner is judged alive by its pid.  POSIX only
(``flock``, ``kill(pid, 0)``).  Open a cache after forking, not before.
"""

from zodbblob.cache.accesslog import (
    ACCESS_BATCH,
    ACCESS_BATCH_AGE,
    ACCESS_LOG_LIMIT,
    ACCESS_RECORD,
    ACCESS_RESOLUTION,
    ACCESS_RESOLUTION_MAX,
)
from zodbblob.cache.blobcache import BACKGROUND_CHECK, BlobCache
from zodbblob.cache.directory import (
    BUCKETS,
    LAYOUT,
    STOCK_TEMPORARY,
    TEMPORARY,
)
from zodbblob.cache.downloads import POLL_FIRST, POLL_LAST
from zodbblob.cache.evictor import (
    PRUNE_CHUNK,
    PRUNE_CHUNK_MAX,
    PRUNE_LEASE,
    PRUNE_THREADS,
    REMOVAL_BATCH,
    REMOVAL_THREADS,
    removal_threads,
)
from zodbblob.cache.index import (
    BUILD_CACHE_KIB,
    BUSY_TIMEOUT,
    FOLD_CACHE_KIB,
    INDEX,
    OPEN_LOCK,
    TRANSIENT,
    TRANSIENT_MESSAGES,
)
from zodbblob.cache.schema import (
    COMPLETE,
    DERIVED,
    IN_PROGRESS,
    MIGRATIONS,
    SCHEMA_VERSION,
    TABLES,
)
from zodbblob.cache.sizes import KNOWN_SIZES
from zodbblob.cache.syncs import SYNC_IDLE

__all__ = [
    'ACCESS_BATCH',
    'ACCESS_BATCH_AGE',
    'ACCESS_LOG_LIMIT',
    'ACCESS_RECORD',
    'ACCESS_RESOLUTION',
    'ACCESS_RESOLUTION_MAX',
    'BACKGROUND_CHECK',
    'BUCKETS',
    'BUILD_CACHE_KIB',
    'BUSY_TIMEOUT',
    'COMPLETE',
    'DERIVED',
    'FOLD_CACHE_KIB',
    'INDEX',
    'IN_PROGRESS',
    'KNOWN_SIZES',
    'LAYOUT',
    'MIGRATIONS',
    'OPEN_LOCK',
    'POLL_FIRST',
    'POLL_LAST',
    'PRUNE_CHUNK',
    'PRUNE_CHUNK_MAX',
    'PRUNE_LEASE',
    'PRUNE_THREADS',
    'REMOVAL_BATCH',
    'REMOVAL_THREADS',
    'SCHEMA_VERSION',
    'STOCK_TEMPORARY',
    'SYNC_IDLE',
    'TABLES',
    'TEMPORARY',
    'TRANSIENT',
    'TRANSIENT_MESSAGES',
    'BlobCache',
    'removal_threads',
]
