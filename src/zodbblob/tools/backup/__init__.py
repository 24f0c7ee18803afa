"""Snapshots of a FileStorage and its blob directory, consistent at one tid.

``backup(storage, destination)`` reads a storage that a ZEO server may be
serving and committing to: it opens nothing for writing and takes no lock
of the storage's.  The snapshot holds the database as of one transaction
*T*, the last one committed when the backup started: ``Data.fs`` up to the
end of *T* (a valid ``Data.fs``; FileStorage only appends, so those bytes
no longer change), and the file of every blob record in those bytes.

A destination holds the snapshots of one database, in format 3::

    DEST/.zodbblob-backup    {"format": 3}: what the directory is
    DEST/.contents/          the pool: each content once, named by its
                             sha256 (<2 hex digits>/<64 hex digits>)
    DEST/.manifests/         <tid>.sqlite: a hard link to each snapshot's
                             manifest, for `collect`
    DEST/03f0c4a1b2c3d4e5/   a snapshot, named for its tid:
      Data.fs.0000000000000000-00000000000a3f20  Data.fs bytes 0 to 0xa3f20
      Data.fs.00000000000a3f20-00000000000b0010  the bytes appended since
      manifest.sqlite                            every file, its sha256
      COMPLETE                                   written last

A destination of format 2 (``.blobs``: a file per oid and tid) is read
as it is, and becomes format 3 by its next backup (``destination``).

The ``Data.fs.*`` parts, concatenated in name order, are the ``Data.fs``
of the snapshot (``cat Data.fs.* > Data.fs`` would do).  ``restore``
concatenates them and builds a blob directory of the source's layout
from the pool, checking every byte against the manifest; the files of
one content are hard links to one restored file (``links=False``:
copies).

The package has one module per idea; imports point down the list:

``snapshot``
    `backup`: finishes what an interrupted run left, refuses another
    database's destination, plans the next snapshot (its manifest) and
    has it written; drops it when a pack ran meanwhile.
``writer``
    `_SnapshotWriter`: fills one planned snapshot and the pool, resumable;
    `BackupResult`.
``pruning``
    `prune` and `collect`: removing snapshots, then the contents (and
    format-2 pool files) no remaining manifest lists.
``restoring``
    `restore`: a Data.fs with its index and a blob directory, renamed into
    place at the end; finishing a restore interrupted among its renames.
``checking``
    `check`: every byte of a snapshot against its manifest.
``source``
    `_Source`: the live Data.fs and blob directory, read without a lock,
    and whether a pack ran.
``contents``
    `_Contents`: the pool by content, as a snapshot fills it;
    `repair_pool`, which ``--full`` runs when nothing was committed.
``destination``
    The marker, the lock, the snapshots, the manifests' links, removal.
``files``
    Copies and links made durable (``syncfs`` or fsyncs), the markers
    written whole, the tests' crash points.
``manifest``
    The destination's names, the states, `Manifest` (``manifest.sqlite``).
``errors``
    `BackupError` and its kinds, `BackupInterrupted`.

The modules that hold `check`, `prune` and `restore` are named
``checking``, ``pruning`` and ``restoring`` so that these functions,
exported here, never hide a module of the same name.  The command line
(``zodbblob backup``, ``zodbblob restore``) is `zodbblob.cli.backup`.
"""

from zodbblob.tools.backup.checking import CheckReport, check
from zodbblob.tools.backup.destination import Snapshot, snapshots
from zodbblob.tools.backup.errors import (
    BackupError,
    BackupInterrupted,
    SourceChanged,
    SourcePacked,
)
from zodbblob.tools.backup.files import (
    COLLECT_KILL_VARIABLE,
    KILL_VARIABLE,
    PLACING_KILL_VARIABLE,
    RESTORE_KILL_VARIABLE,
)
from zodbblob.tools.backup.manifest import (
    COMPLETE_NAME,
    DESTINATION_MARKER,
    DONE,
    FORMAT,
    FORMATS,
    IN_PROGRESS,
    LOCK_NAME,
    MANIFEST_NAME,
    MANIFESTS_NAME,
    MISSING,
    POOL_LAYOUT,
    POOL_NAME,
    CONTENTS_NAME,
    Manifest,
    content_path,
    part_name,
    pool_path,
    tid_time,
)
from zodbblob.tools.backup.pruning import (
    CollectResult,
    PruneResult,
    collect,
    prune,
)
from zodbblob.tools.backup.restoring import (
    RESTORING_NAME,
    RestoreResult,
    restore,
)
from zodbblob.tools.backup.snapshot import backup
from zodbblob.tools.backup.writer import BackupResult

__all__ = [
    'COLLECT_KILL_VARIABLE',
    'COMPLETE_NAME',
    'CONTENTS_NAME',
    'DESTINATION_MARKER',
    'DONE',
    'FORMAT',
    'FORMATS',
    'IN_PROGRESS',
    'KILL_VARIABLE',
    'LOCK_NAME',
    'MANIFESTS_NAME',
    'MANIFEST_NAME',
    'MISSING',
    'PLACING_KILL_VARIABLE',
    'POOL_LAYOUT',
    'POOL_NAME',
    'RESTORE_KILL_VARIABLE',
    'RESTORING_NAME',
    'BackupError',
    'BackupInterrupted',
    'BackupResult',
    'CheckReport',
    'CollectResult',
    'Manifest',
    'PruneResult',
    'RestoreResult',
    'Snapshot',
    'SourceChanged',
    'SourcePacked',
    'backup',
    'check',
    'collect',
    'content_path',
    'part_name',
    'pool_path',
    'prune',
    'restore',
    'snapshots',
    'tid_time',
]
