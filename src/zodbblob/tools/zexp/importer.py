"""Import: a ZEXP file, checked in full first, then made into new objects.

Named ``importer``, as ``import`` cannot name a module.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import shutil

import ZODB
import ZODB.blob
import ZODB.interfaces
import zodbpickle.pickle
from persistent.wref import WeakRef
from ZODB.broken import Broken
from ZODB.utils import oid_repr, u64

from zodbblob.tools.zexp.format import (
    BLOB_MARKER,
    CHUNK,
    END_MARKER,
    HEADER_SIZE,
    MAGIC,
    ProgressCallback,
    ZexpError,
    _copy,
)
from zodbblob.tools.zexp.source import SourceBlobDirectory

logger = logging.getLogger(__name__)


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
