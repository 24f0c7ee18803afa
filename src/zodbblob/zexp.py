"""Export and import of ZEXP files, with their blobs, old files included.

The format is ZODB's (``Connection.exportFile``): ``ZEXP``, then one entry
per object, then 16 bytes of ``0xff``.  An entry is the object's oid (8
bytes), the length of its record (8 bytes, big-endian) and the record as
the storage holds it (two pickles: class, then state).  A blob's record is
followed by ``\\0BLOBSTART``, the size of its file (8 bytes) and the
file's bytes.  Files written by ours and by stock ZODB are the same, byte
for byte.

Files without the blob blocks exist: ZODB writes blob records without
them when its storage does not support blobs (a FileStorage opened
without its ``blob-dir``, a wrapper that hides ``IBlobStorage``), and
stock ZODB refuses to import them.  Here the blob's bytes come from a copy
of the old blob directory (`source_blob_dir`, any layout), found by the
oid the file gives; without one, the blob is imported empty and reported.

Importing reads the file twice.  The first pass checks all of it (every
length, every pickle, every class, every reference) and changes nothing,
so a truncated or corrupt file is refused with its byte offset before the
caller's transaction holds a single imported object.  The second pass
makes the objects: new ones, added to the caller's connection, whose
states are the file's with every reference turned to the new objects.
A ZEXP file is pickles: import only files you trust, as with ZODB.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import os
import secrets
import shutil
import sys
from collections.abc import Callable

import transaction
import ZODB
import ZODB.blob
import ZODB.interfaces
import zodbpickle.pickle
from persistent.wref import WeakRef
from ZODB.broken import Broken
from ZODB.POSException import ExportError
from ZODB.POSException import POSKeyError
from ZODB.serialize import referencesf
from ZODB.TimeStamp import TimeStamp
from ZODB.utils import oid_repr
from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64

from zodbblob.cli.arguments import add_storage_arguments
from zodbblob.cli.arguments import open_storage
from zodbblob.cache import BUCKETS as ZEOCACHE_BUCKETS
from zodbblob.cache import LAYOUT as ZEOCACHE_LAYOUT
from zodbblob.layout import BLOB_SUFFIX
from zodbblob.layout import BlobTree
from zodbblob.layout import NotABlobFile
from zodbblob.layout import auto_layout_select
from zodbblob.layout import get_layout
from zodbblob.layout import open_blob_file
from zodbblob.layout import read_marker
from zodbblob.tools.progress import Progress


logger = logging.getLogger(__name__)

MAGIC = b'ZEXP'
BLOB_MARKER = b'\0BLOBSTART'
END_MARKER = b'\xff' * 16
HEADER_SIZE = 16
CHUNK = 1 << 20

ProgressCallback = Callable[[int, int], None]


class ZexpError(ExportError):
    """A ZEXP file that cannot be imported, and where it goes wrong."""

    def __init__(self, path: str, offset: int, problem: str):
        super().__init__(f'Cannot import {path}: {problem} (at byte '
                         f'{offset})')
        self.path = path
        self.offset = offset
        self.problem = problem


# export

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


def _copy(source, target, size: int, progress=None) -> int:
    copied = 0
    while copied < size:
        chunk = source.read(min(CHUNK, size - copied))
        if not chunk:
            break
        target.write(chunk)
        copied += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return copied


# import

@dataclasses.dataclass
class ImportReport:
    """What `import_file` did; oids are ``(in the file, new)`` pairs."""

    path: str = ''
    records: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    # blob records without data in the file, imported as empty blobs
    empty_blobs: list = dataclasses.field(default_factory=list)
    # (old oid, new oid, file): blob bytes taken from the source directory
    source_blobs: list = dataclasses.field(default_factory=list)
    # the same, where the source held several revisions of the oid
    guessed_blobs: list = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        result = []
        for old, new in self.empty_blobs:
            result.append(f'empty blob: oid {oid_repr(new)} (oid '
                          f'{oid_repr(old)} in the file) has no data in '
                          f'{self.path}, nor in a source blob directory')
        for old, new, source in self.guessed_blobs:
            result.append(f'guessed blob: oid {oid_repr(new)} (oid '
                          f'{oid_repr(old)} in the file) took {source}, of '
                          f'several revisions')
        return result


@dataclasses.dataclass(slots=True)
class _Entry:
    oid: bytes              # the oid in the file
    offset: int             # of the entry's header
    length: int             # of the record
    klass: type
    args: tuple
    is_blob: bool = False
    blob_offset: int = 0    # of the blob's bytes in the file
    blob_size: int | None = None   # None: the file has no bytes for it


class _Reference:
    """What a reference unpickles to while the file is checked."""

    __slots__ = ()


class _RecordUnpickler(zodbpickle.pickle.Unpickler):
    """Reads a record as ZODB does, classes from the database's factory."""

    def __init__(self, data: bytes, connection, persistent_load):
        self.source = io.BytesIO(data)
        super().__init__(self.source)
        self._connection = connection
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str):
        found = self._connection.db().classFactory(
            self._connection, module, name)
        if isinstance(found, type) and issubclass(found, Broken):
            raise _Unimportable(f'{module}.{name}')
        return found

    def persistent_load(self, reference):
        return self._persistent_load(reference)


class _Unimportable(Exception):
    """A class the importing process cannot import."""


def _parse_reference(reference):
    """``(kind, oid, database name)`` of a persistent reference.

    kind is ``'oid'`` (a reference within the file's database), ``'weak'``
    or ``'other'`` (an object of another database).
    """
    if isinstance(reference, tuple):
        return 'oid', _oid(reference[0]), None
    if isinstance(reference, (bytes, str)):
        return 'oid', _oid(reference), None
    if isinstance(reference, list) and len(reference) == 1:
        return 'weak', _oid(reference[0]), None        # the legacy form
    if isinstance(reference, list) and len(reference) == 2:
        kind, args = reference
        if kind == 'w':
            return 'weak', _oid(args[0]), args[1] if len(args) > 1 else None
        if kind in ('m', 'n'):
            return 'other', _oid(args[1]), args[0]
    raise ValueError(f'unknown kind of persistent reference {reference!r}')


def _oid(value) -> bytes:
    # Pickles written by Python 2 hold oids of ASCII bytes as str.
    oid = value.encode('ascii') if isinstance(value, str) else value
    if not isinstance(oid, bytes) or len(oid) != 8:
        raise ValueError(f'{value!r} is not an oid')
    return oid


class _File:
    """The ZEXP file, read with the offset at hand for errors."""

    def __init__(self, path: str):
        self.path = path
        self.f = open(path, 'rb')
        self.size = os.fstat(self.f.fileno()).st_size

    def close(self):
        self.f.close()

    def tell(self) -> int:
        return self.f.tell()

    def error(self, problem: str, offset: int | None = None) -> ZexpError:
        return ZexpError(self.path, self.tell() if offset is None else offset,
                         problem)

    def read(self, size: int, what: str) -> bytes:
        offset = self.tell()
        data = self.f.read(size)
        if len(data) != size:
            raise self.error(f'truncated: {what} needs {size} bytes, the '
                             f'file has {len(data)} left', offset)
        return data

    def peek(self, size: int) -> bytes:
        offset = self.tell()
        data = self.f.read(size)
        self.f.seek(offset)
        return data


def import_file(connection, path: str, source_blob_dir: str | None = None,
                report: ImportReport | None = None,
                progress: ProgressCallback | None = None):
    """Import the ZEXP file `path` into `connection`; return its root object.

    Like ``Connection.importFile``: every object of the file becomes a new
    object of the connection's current transaction, and the caller puts
    the returned one where it belongs and commits (or aborts: nothing
    stays).  A file that cannot be imported raises `ZexpError`, naming
    the file and the byte offset, before anything is added.

    Blob records without data (old files) take their bytes from the blob
    directory `source_blob_dir` when given (any layout, a ZEO client cache
    too), found by the blob's oid in the file; where it holds several
    revisions, the newest one not newer than the file (its mtime) is taken,
    and noted in `report.guessed_blobs`.  A blob with no bytes anywhere is
    imported empty and noted in `report.empty_blobs`.

    `progress(done, total)` is called as the file is read (twice).
    """
    report = report if report is not None else ImportReport()
    report.path = path
    source = None
    if source_blob_dir is not None:
        source = SourceBlobDirectory(source_blob_dir)
    zexp = _File(path)
    try:
        entries = _check(zexp, connection, progress)
        # Objects are only added from here on.  Should making them fail
        # (a read error, a class refusing its state), rolling back to this
        # savepoint leaves the caller's transaction as it was.
        savepoint = connection.transaction_manager.savepoint(optimistic=True)
        try:
            root = _import(zexp, connection, entries, source, report,
                           progress)
        except BaseException:
            try:
                savepoint.rollback()
            except Exception:
                logger.exception('Could not roll back the failed import of '
                                 '%s; abort the transaction', path)
            raise
    finally:
        zexp.close()
        if source is not None:
            source.tree.close()
    if report.empty_blobs or report.guessed_blobs:
        logger.warning('Import of %s: %d blobs imported empty (no data in '
                       'the file or the source), %d chosen of several '
                       'revisions in the source', path,
                       len(report.empty_blobs), len(report.guessed_blobs))
    return root


def _check(zexp: _File, connection, progress) -> list[_Entry]:
    """Every entry of the file, checked; raises ZexpError at the first flaw."""
    start = zexp.peek(len(MAGIC))
    if start != MAGIC:
        if len(start) < len(MAGIC) and MAGIC.startswith(start):
            raise zexp.error(f'truncated: the file has {len(start)} bytes',
                             len(start))
        raise zexp.error('not a ZEXP file: it does not start with '
                         f'{MAGIC!r}', 0)
    zexp.read(len(MAGIC), 'the magic')
    # First referrer of every referenced oid or other database, checked
    # once the whole file is known.
    entries, by_oid, references = [], {}, {}
    while True:
        offset = zexp.tell()
        header = zexp.read(HEADER_SIZE, 'an entry header or the end marker')
        if header == END_MARKER:
            break
        if header.startswith(BLOB_MARKER):
            raise zexp.error('blob data follows a record that is not a '
                             'blob', offset)
        oid, length = header[:8], u64(header[8:])
        if length > zexp.size - zexp.tell():
            raise zexp.error(f'truncated or corrupt: the record of oid '
                             f'{oid_repr(oid)} claims {length} bytes, the '
                             f'file has {zexp.size - zexp.tell()} left',
                             offset)
        if oid in by_oid:
            raise zexp.error(f'corrupt: a second record of oid '
                             f'{oid_repr(oid)}', offset)
        data = zexp.read(length, f'the record of oid {oid_repr(oid)}')
        entry = _read_entry(zexp, connection, oid, offset, data, references)
        if entry.is_blob and zexp.peek(len(BLOB_MARKER)) == BLOB_MARKER:
            zexp.read(len(BLOB_MARKER), 'the blob marker')
            entry.blob_size = u64(zexp.read(8, 'the size of a blob'))
            entry.blob_offset = zexp.tell()
            if entry.blob_size > zexp.size - entry.blob_offset:
                raise zexp.error(
                    f'truncated: the blob of oid {oid_repr(oid)} needs '
                    f'{entry.blob_size} bytes, the file has '
                    f'{zexp.size - entry.blob_offset} left', offset)
            zexp.f.seek(entry.blob_size, os.SEEK_CUR)
        entries.append(entry)
        by_oid[oid] = entry
        if progress is not None:
            progress(zexp.tell(), 2 * zexp.size)
    if not entries:
        raise zexp.error('the file holds no object', len(MAGIC))
    if zexp.tell() != zexp.size:
        raise zexp.error(f'corrupt: {zexp.size - zexp.tell()} bytes after '
                         f'the end marker')
    for (kind, oid, database_name), offset in references.items():
        if kind == 'oid' and oid not in by_oid:
            raise zexp.error(f'the record refers to oid {oid_repr(oid)}, '
                             f'which the file does not hold', offset)
        if kind == 'other':
            try:
                connection.get_connection(database_name)
            except KeyError:
                raise zexp.error(
                    f'the record refers to database {database_name!r}, '
                    f'which this database does not know', offset) from None
    return entries


def _read_entry(zexp: _File, connection, oid: bytes, offset: int,
                data: bytes, references: dict) -> _Entry:
    def collect(reference):
        kind, target, database_name = _parse_reference(reference)
        if kind == 'oid':
            references.setdefault((kind, target, None), offset)
        elif kind == 'other':
            references.setdefault((kind, None, database_name), offset)
        return _Reference()

    unpickler = _RecordUnpickler(data, connection, collect)
    name = f'the record of oid {oid_repr(oid)}'
    try:
        klass, args = _class_of(unpickler.load(), connection)
        unpickler.load()
    except _Unimportable as e:
        raise zexp.error(f'{name} is an instance of {e}, or holds one, '
                         f'which cannot be imported here', offset) from None
    except Exception as e:
        raise zexp.error(f'corrupt: {name} cannot be read: '
                         f'{type(e).__name__}: {e}', offset) from None
    left = len(data) - unpickler.source.tell()
    if left:
        raise zexp.error(f'corrupt: {name} has {left} bytes after its '
                         f'state', offset)
    return _Entry(oid, offset, len(data), klass, args,
                  is_blob=issubclass(klass, ZODB.blob.Blob))


def _class_of(meta, connection) -> tuple[type, tuple]:
    """The class and ``__new__`` arguments a record's class pickle names."""
    args = ()
    if isinstance(meta, tuple):
        klass, args = meta
        if isinstance(klass, tuple):
            # ZODB's older form: (module name, class name)
            module, name = klass
            klass = connection.db().classFactory(connection, module, name)
            if isinstance(klass, type) and issubclass(klass, Broken):
                raise _Unimportable(f'{module}.{name}')
        args = tuple(args or ())
    else:
        klass = meta
    if not isinstance(klass, type):
        raise ValueError(f'{klass!r} is not a class')
    return klass, args


def _import(zexp: _File, connection, entries: list[_Entry], source,
            report: ImportReport, progress):
    by_oid = {entry.oid: entry for entry in entries}
    made = {}
    written_at = os.fstat(zexp.f.fileno()).st_mtime
    database = connection.db()

    def obtain(oid: bytes):
        obj = made.get(oid)
        if obj is None:
            entry = by_oid[oid]
            obj = made[oid] = entry.klass.__new__(entry.klass, *entry.args)
            connection.add(obj)
        return obj

    def resolve(reference):
        kind, oid, database_name = _parse_reference(reference)
        if kind == 'oid':
            return obtain(oid)
        if kind == 'other':
            return connection.get_connection(database_name).get(oid)
        if database_name is None and oid in by_oid:
            return WeakRef(obtain(oid))
        # A weak reference to an object outside the file points nowhere
        # (ZODB exports follow only strong references): keep it pointing
        # nowhere, not at whatever has that oid here.
        weak = WeakRef.__new__(WeakRef)
        if database_name is None:
            weak.oid = database.storage.new_oid()
            weak.dm = connection
            weak.database_name = database.database_name
        else:
            weak.oid = oid
            weak.database_name = database_name
            try:
                weak.dm = connection.get_connection(database_name)
            except KeyError:
                pass
        return weak

    done = zexp.size
    for entry in entries:
        obj = obtain(entry.oid)
        zexp.f.seek(entry.offset + HEADER_SIZE)
        unpickler = _RecordUnpickler(zexp.f.read(entry.length), connection,
                                     resolve)
        unpickler.load()
        obj.__setstate__(unpickler.load())
        report.records += 1
        if entry.is_blob:
            report.blobs += 1
            report.blob_bytes += _fill_blob(
                zexp, obj, entry, source, written_at, report, progress)
        if progress is not None:
            progress(done + zexp.tell(), 2 * zexp.size)
    if progress is not None:
        progress(2 * zexp.size, 2 * zexp.size)
    return made[entries[0].oid]


def _fill_blob(zexp: _File, blob, entry: _Entry, source, written_at,
               report: ImportReport, progress) -> int:
    # A new blob needs a file, even an empty one: ZODB cannot commit a
    # new blob that has none.
    with blob.open('w') as target:
        if entry.blob_size is not None:
            zexp.f.seek(entry.blob_offset)

            def advance(_):
                progress(zexp.size + zexp.tell(), 2 * zexp.size)
            copied = _copy(zexp.f, target, entry.blob_size,
                           advance if progress is not None else None)
            if copied != entry.blob_size:
                raise zexp.error(f'truncated while importing: the blob of '
                                 f'oid {oid_repr(entry.oid)}',
                                 entry.blob_offset)
            return copied
        found = None
        if source is not None:
            found = source.choose(entry.oid, written_at)
        if found is None:
            report.empty_blobs.append((entry.oid, blob._p_oid))
            return 0
        path, revisions = found
        with open(source.tree.open(path), 'rb') as data:
            shutil.copyfileobj(data, target, CHUNK)
            size = data.tell()
        report.source_blobs.append((entry.oid, blob._p_oid, path))
        if revisions > 1:
            report.guessed_blobs.append((entry.oid, blob._p_oid, path))
        return size


class SourceBlobDirectory:
    """The committed blob files of another blob directory, by oid; read-only.

    Its layout is read from its marker, or guessed as ZODB does
    (`zodbblob.layout.auto_layout_select`); a ZEO client cache (layout
    ``zeocache``) will do too.
    """

    def __init__(self, base_dir: str):
        if not os.path.isdir(base_dir):
            raise ValueError(f'Source blob directory {base_dir} is not a '
                             f'directory')
        self.base_dir = os.path.abspath(base_dir)
        self.tree = BlobTree(self.base_dir)
        if read_marker(base_dir) == ZEOCACHE_LAYOUT:
            self.layout_name, self.layout = ZEOCACHE_LAYOUT, None
        else:
            self.layout_name = auto_layout_select(base_dir)
            self.layout = get_layout(self.layout_name, base_dir)
        # Directories shared by many oids (chunky, flat, zeocache) are
        # listed once, not once per blob.
        self._listings: dict[str, dict[bytes, list]] = {}

    def __repr__(self):
        return f'<SourceBlobDirectory {self.base_dir} ({self.layout_name})>'

    def revisions(self, oid: bytes) -> list[tuple[bytes, str]]:
        """``(tid, path)`` of every file of `oid`, oldest first."""
        if self.layout is None:
            directory = str(u64(oid) % ZEOCACHE_BUCKETS)
        else:
            directory = self.layout.oid_directory(oid)
        listing = self._listings.get(directory)
        if listing is None:
            listing = self._list(directory)
            if self.layout is None or not self.layout.directory_per_oid:
                self._listings[directory] = listing
        return sorted(listing.get(oid, ()))

    def choose(self, oid: bytes, written_at: float):
        """``(path, number of revisions)`` of the file meant, or None.

        A ZEXP file holds the revision that was current when it was
        written: the newest one no newer than the file, if the file's time
        says so, else the newest.
        """
        revisions = self.revisions(oid)
        if not revisions:
            return None
        older = [(tid, path) for tid, path in revisions
                 if TimeStamp(tid).timeTime() <= written_at]
        return (older or revisions)[-1][1], len(revisions)

    def _list(self, directory: str) -> dict[bytes, list]:
        listing: dict[bytes, list] = {}
        try:
            names = os.listdir(os.path.join(self.base_dir, directory))
        except (FileNotFoundError, NotADirectoryError):
            return listing
        for name in names:
            relative = os.path.join(directory, name)
            try:
                oid, tid = self._split(directory, name, relative)
            except ValueError:
                continue
            listing.setdefault(oid, []).append(
                (tid, os.path.join(self.base_dir, relative)))
        return listing

    def _split(self, directory: str, name: str, relative: str):
        if self.layout is not None:
            return self.layout.blob_path_to_oid_tid(relative)
        # zeocache: <oid % 997>/<oid // 997>.<tid hex>.blob
        quotient, dot, rest = name.partition('.')
        tid_hex = rest[:-len(BLOB_SUFFIX)]
        if not (dot and quotient.isdigit() and rest.endswith(BLOB_SUFFIX)
                and len(tid_hex) == 16):
            raise ValueError(name)
        number = int(quotient) * ZEOCACHE_BUCKETS + int(directory)
        return p64(number), bytes.fromhex(tid_hex)


# the command

def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Write the object at --path, and every object it references, to a '
        'ZEXP file that Zope and ZODB (Connection.importFile) import, '
        'blobs included.  Opens the storage read-only and takes no lock: '
        'safe while a server serves and commits; the file holds the '
        'database as of the last transaction committed when it started.')
    add_storage_arguments(parser)
    parser.add_argument('--path', default='/', metavar='/A/B',
                        help='keys from the root to the object, split on '
                             '/ (default: the root)')
    parser.add_argument('file', metavar='FILE.zexp',
                        help='the file to write (replaced if it exists)')


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Import a ZEXP file (written by zodbblob or ZODB, old ones without '
        'blob data included) and store its object in the container at '
        '--path under --name, in one transaction.  Refuses to run while '
        'a storage holds the blob directory.')
    add_storage_arguments(parser)
    parser.add_argument('--path', default='/', metavar='/A/B',
                        help='keys from the root to the container, split '
                             'on / (default: the root)')
    parser.add_argument('--name', help="the key in the container (default: "
                                       "the file's name without .zexp)")
    parser.add_argument('--source-blob-dir', metavar='DIR',
                        help='for a file without blob data: a copy of the '
                             'blob directory it was exported from (any '
                             'layout, or a ZEO client blob cache)')
    parser.add_argument('file', metavar='FILE.zexp')


def _error(args, message: str, status: int = 2) -> int:
    print(f'{args.parser.prog}: error: {message}', file=sys.stderr)
    return status


def _traverse(root, path: str):
    """The object at `path`, keys from `root`; LookupError naming the key."""
    obj, walked = root, ''
    for key in (step for step in path.split('/') if step):
        try:
            obj = obj[key]
        except (KeyError, TypeError, AttributeError):
            raise LookupError(f'no object at {walked or "/"} has a key '
                              f'{key!r} (path {path})') from None
        walked += '/' + key
    return obj


def _open_for_import(args):
    """The storage, held against live storages; or a str saying why not."""
    from zc.lockfile import LockError

    from zodbblob.storage import BlobStorageError
    try:
        return open_storage(args, read_only=False)
    except (BlobStorageError, LockError) as e:
        return (f'the storage is in use by another process (a running '
                f'server?); stop it first: {e}')


class _NamedByTheCommand(logging.Handler):
    """Held on this module's logger while a command runs, which names
    itself what `export_file` and `import_file` log at WARNING: where no
    logging is configured, Python would print those too (its
    ``lastResort``).  Anything worse still reaches stderr."""

    def emit(self, record):
        if (record.levelno > logging.WARNING and logging.lastResort
                and not logging.getLogger().handlers):
            logging.lastResort.handle(record)


def _load_root(storage) -> bool:
    try:
        storage.load(z64)
    except POSKeyError:
        return False
    return True


def _file_identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def export_command(args: argparse.Namespace) -> int:
    # Read-only, as verify and backup open it: no lock, so a server may
    # go on serving and committing.  The view is the database as of the
    # last transaction committed when Data.fs was opened (a read-only
    # FileStorage indexes no later one), and a committed transaction's
    # blob files are in place before its commit: what is exported is one
    # consistent state, whatever the server commits meanwhile.
    #
    # A pack replaces Data.fs.  What was opened goes on being read (the
    # index, and the reading handle FileStorage opens by name at the
    # first load, which DB() makes), unless the pack renamed its file
    # into place in between; and the blob files of revisions it packed
    # away go.  Both are told from a damaged store by Data.fs's inode.
    opened = _file_identity(args.data) if args.data else None
    storage = open_storage(args, read_only=True)
    data_fs = storage.base.getName()
    if opened is None:
        opened = _file_identity(data_fs)
    packed = (f'{data_fs} was replaced (packed?) while export read it: '
              f'{args.file} not written; run the export again')
    try:
        has_root = _load_root(storage)
        db = ZODB.DB(storage) if has_root else None
    except BaseException:
        storage.close()
        if _file_identity(data_fs) != opened:
            return _error(args, packed)
        raise
    if db is None:
        # DB() would store a root, and fail on a read-only storage.
        storage.close()
        if _file_identity(data_fs) != opened:
            return _error(args, packed)
        return _error(args, f'{data_fs} holds no root object (no client '
                            f'has opened the database yet): nothing to '
                            f'export')
    try:
        if _file_identity(data_fs) != opened:
            return _error(args, packed)
        connection = db.open(
            transaction_manager=transaction.TransactionManager())
        try:
            obj = _traverse(connection.root(), args.path)
        except LookupError as e:
            return _error(args, str(e))
        if getattr(obj, '_p_oid', None) is None:
            return _error(args, f'the object at {args.path} is not a '
                                f'persistent object of its own')
        progress = Progress('export', quiet=args.quiet)
        said_below = _NamedByTheCommand()
        logger.addHandler(said_below)
        try:
            report = export_file(connection, obj._p_oid, args.file, progress)
        except (NotABlobFile, ExportError) as e:
            if _file_identity(data_fs) != opened:
                return _error(args, packed)
            # A blob file missing, or something else under its name: a
            # problem of the blob directory, found and named (status 1).
            return _error(args, f'{args.file} not written: {e}', 1)
        except (OSError, POSKeyError) as e:
            return _error(args, f'{args.file}: {e}')
        except KeyboardInterrupt:
            # export_file removed its partial file.
            return _error(args, f'interrupted: {args.file} not written', 130)
        finally:
            logger.removeHandler(said_below)
    finally:
        db.close()
    print(f'{args.file}: exported {args.path}: {report.records} objects, '
          f'{report.blobs} blobs ({report.blob_bytes} bytes)')
    for oid in report.missing:
        print(f'skipped: oid {oid_repr(oid)} is referenced but not in the '
              f'database', file=sys.stderr)
    if report.without_data:
        print(f'{len(report.without_data)} blob records were written without '
              f'data: the storage has no blob support', file=sys.stderr)
    # Written, but what is named above is not in it: problems found.
    return 1 if report.missing or report.without_data else 0


def import_command(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.file):
        return _error(args, f'{args.file}: no such file')
    if args.source_blob_dir and not os.path.isdir(args.source_blob_dir):
        return _error(args, f'--source-blob-dir {args.source_blob_dir}: no '
                            f'such directory')
    name = args.name or os.path.splitext(os.path.basename(args.file))[0]
    storage = _open_for_import(args)
    if isinstance(storage, str):
        return _error(args, storage)
    db = ZODB.DB(storage)
    manager = transaction.TransactionManager()
    report = ImportReport()
    try:
        connection = db.open(transaction_manager=manager)
        try:
            container = _traverse(connection.root(), args.path)
            try:
                taken = name in container
            except TypeError:
                return _error(args, f'the object at {args.path} is not a '
                                    f'container')
            if taken:
                return _error(args, f'{args.path} already holds {name!r}; '
                                    f'give another --name')
            said_below = _NamedByTheCommand()
            logger.addHandler(said_below)
            try:
                obj = import_file(
                    connection, args.file, args.source_blob_dir, report,
                    Progress('import', quiet=args.quiet))
            finally:
                logger.removeHandler(said_below)
            container[name] = obj
            manager.commit()
        except NotABlobFile as e:
            # Something else under a blob name of the source blob
            # directory: a problem of that directory, found and named.
            return _error(args, f'nothing of {args.file} imported: {e}', 1)
        except (LookupError, ExportError, OSError) as e:
            return _error(args, str(e))
        except KeyboardInterrupt:
            return _error(args, f'interrupted: nothing of {args.file} was '
                                f'imported', 130)
        finally:
            manager.abort()
            connection.close()
    finally:
        db.close()
    target = args.path.rstrip('/') + '/' + name
    print(f'{args.file}: imported as {target}: {report.records} objects, '
          f'{report.blobs} blobs ({report.blob_bytes} bytes)')
    for line in report.lines():
        print(line, file=sys.stderr)
    # Imported, but a blob without its bytes is a problem found (status 1);
    # a guessed revision is named, not counted.
    return 1 if report.empty_blobs else 0
