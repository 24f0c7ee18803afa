"""Export: an object and everything it references, blobs too, to a ZEXP
file that ZODB's ``Connection.importFile`` reads."""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets

import ZODB
import ZODB.blob
import ZODB.interfaces
from ZODB.POSException import ExportError, POSKeyError
from ZODB.serialize import referencesf
from ZODB.utils import oid_repr, p64, u64

from zodbblob.layout import BlobTree, open_blob_file
from zodbblob.tools.zexp.format import (
    BLOB_MARKER,
    END_MARKER,
    MAGIC,
    ProgressCallback,
    _copy,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ExportReport:
    """What `export_file` wrote."""

    path: str
    records: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    # oids referenced but not loadable: skipped, as ZODB skips them
    missing: list = dataclasses.field(default_factory=list)
    # blob records written without data: the storage has no blob support
    without_data: list = dataclasses.field(default_factory=list)


def export_file(connection, oid: bytes, path: str,
                progress: ProgressCallback | None = None) -> ExportReport:
    """Write the object `oid` and everything it references to `path`.

    The records are the database's as of the connection's view (its
    ``before`` for a historical connection, the last transaction
    otherwise), in the order ZODB writes them.  The file appears under
    `path` only when complete.  `progress(done, known)` is called per
    object, `known` growing as references are found.
    """
    storage = connection.db().storage
    before = connection.before or p64(u64(storage.lastTransaction()) + 1)
    has_blobs = ZODB.interfaces.IBlobStorage.providedBy(storage)
    blob_dir = getattr(getattr(storage, 'fshelper', None), 'base_dir', None)
    tree = BlobTree(blob_dir) if blob_dir else None
    report = ExportReport(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, written = _create_beside(directory, os.path.basename(path))
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(MAGIC)
            queue, seen = [oid], {oid}
            while queue:
                current = queue.pop(0)
                record = _load_before(storage, current, before)
                if record is None:
                    if current == oid:
                        raise POSKeyError(current)
                    logger.warning('Export to %s: skipped oid %s, referenced '
                                   'but not in the database', path,
                                   oid_repr(current))
                    report.missing.append(current)
                    continue
                data, serial = record
                for reference in referencesf(data):
                    if reference not in seen:
                        seen.add(reference)
                        queue.append(reference)
                f.write(current + p64(len(data)) + data)
                report.records += 1
                if ZODB.blob.is_blob_record(data):
                    if has_blobs:
                        report.blob_bytes += _write_blob(
                            f, storage, current, serial, tree)
                        report.blobs += 1
                    else:
                        report.without_data.append(current)
                if progress is not None:
                    progress(report.records, report.records + len(queue))
            f.write(END_MARKER)
            f.flush()
            os.fsync(f.fileno())
        os.replace(written, path)
    except BaseException:
        os.remove(written)
        raise
    finally:
        if tree is not None:
            tree.close()
    if report.without_data:
        logger.warning('Export to %s: %d blob records written without their '
                       'data: storage %s has no blob support', path,
                       len(report.without_data), storage.getName())
    return report


def _create_beside(directory: str, name: str) -> tuple[int, str]:
    """A new file in `directory` for writing `name` before its rename.

    Created with mode 0666 less the umask, as stock ZODB's ``exportFile``
    creates its file (``mkstemp`` would make it 0600 whatever the umask).
    """
    while True:
        written = os.path.join(
            directory, f'{name}.{secrets.token_hex(4)}.tmp')
        try:
            return os.open(written, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                           0o666), written
        except FileExistsError:
            continue


def _is_below(path: str, root: str) -> bool:
    return os.path.abspath(path).startswith(root.rstrip(os.sep) + os.sep)


def _load_before(storage, oid: bytes, before: bytes):
    """``(record, serial)`` of `oid` in the snapshot; None if it has none."""
    try:
        loaded = storage.loadBefore(oid, before)
    except POSKeyError:
        return None
    if loaded is None:
        return None
    return loaded[0], loaded[1]


def _write_blob(f, storage, oid: bytes, serial: bytes,
                tree: BlobTree | None) -> int:
    try:
        filename = storage.loadBlob(oid, serial)
    except POSKeyError:
        # An export without a blob's bytes would import as an empty blob:
        # losing data quietly is worse than not exporting.
        raise ExportError(f'The blob file of oid {oid_repr(oid)}, '
                          f'revision {oid_repr(serial)}, is missing from '
                          f'the blob directory') from None
    # Never a link followed nor a FIFO waited on (NotABlobFile instead);
    # nor a link to a directory below the storage's blob directory.
    if tree is not None and _is_below(filename, tree.root):
        fd = tree.open(filename)
    else:
        fd = open_blob_file(filename)
    with open(fd, 'rb') as blob:
        size = os.fstat(blob.fileno()).st_size
        f.write(BLOB_MARKER + p64(size))
        copied = _copy(blob, f, size)
    if copied != size:
        raise ExportError(f'Blob file {filename} changed size while it was '
                          f'exported')
    return size
