"""Check a blob directory against its base storage.

Every blob record of the base (every revision the base still holds) must
have its file; every blob file must belong to a record; every file must
have the size the journal recorded, be readable, and be a regular file
(anything else under a blob name is reported, never opened: see
`zodbblob.layout.open_blob_file`).  With ``checksum``, every file is read
and hashed (``zodbblob.storage.digest``), and compared with the digest
its catalog row recorded at commit; rows without one (a stock directory
adopted, a catalog rebuilt from a scan) are counted, and given the digest
just read when the storage is open for writing (``verifybucket.py``
checks a storage on a bucket).  The commit log is judged as recovery
would judge it: only a transaction whose files or catalog rows recovery
would change is reported as unfinished; catalog rows that only the commit
log holds (a process that ended without closing its storage, as Zope does
on every SIGTERM) are a note, not a problem: every open writes them.  This
is the one
place that walks the whole blob directory on purpose: it is an operator's
check, not a hot path, and it opens nothing for writing.

Streamed, so that its memory does not grow with the store: the base's
blob records go to a temporary SQLite table on disk (not a set), each
file of the directory walk is struck off it, and what is left is
missing; the catalog's sizes are read in ``(oid, tid)`` order beside the
walk (a sorted merge, for layouts that walk in that order; a lookup per
file for those that do not).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import urllib.parse
from collections.abc import Callable

from ZODB.utils import oid_repr

from zodbblob.storage.commitlog import CommitLog
from zodbblob.storage.commitlog import commit_log_path
from zodbblob.storage.commitlog import latest_entries
from zodbblob.storage.catalog import READ_BATCH
from zodbblob.storage.catalog import journal_path
from zodbblob.storage.dedup import same_bytes
from zodbblob.storage.digest import DIGEST_NAME
from zodbblob.storage.digest import digest_fd
from zodbblob.storage.schema import has_digest
from zodbblob.storage.pack import base_has
from zodbblob.layout import LINKED_DIRECTORY
from zodbblob.layout import BlobTree
from zodbblob.layout import NotABlobFile
from zodbblob.layout import file_kind
from zodbblob.layout import open_blob_file
from zodbblob.storage import held_by_a_storage
from zodbblob.tools.contents import Contents
from zodbblob.tools.readahead import read_ahead
from zodbblob.tools.verifybucket import check_bucket, packed_meanwhile
from zodbblob.tools.verifycontents import contents_line, mismatch_lines


@dataclasses.dataclass
class Report:
    """What `verify` found; empty lists mean a clean blob directory."""

    blob_dir: str
    records: int = 0
    files: int = 0
    missing: list = dataclasses.field(default_factory=list)
    orphans: list = dataclasses.field(default_factory=list)
    size_mismatches: list = dataclasses.field(default_factory=list)
    # (oid, tid, path, recorded digest, digest read), with checksum.
    checksum_mismatches: list = dataclasses.field(default_factory=list)
    # With checksum: files whose row had no digest, and whether the
    # digests read were recorded (only a storage open for writing can).
    unrecorded: int = 0
    recorded: bool = False
    unreadable: list = dataclasses.field(default_factory=list)
    # On a bucket by content (``verifycontents.py``): (oid, tid, pointer,
    # digest it names, digest recorded); (content, digest read).
    pointer_mismatches: list = dataclasses.field(default_factory=list)
    content_mismatches: list = dataclasses.field(default_factory=list)
    unique_contents: int | None = None
    not_files: list = dataclasses.field(default_factory=list)
    unfinished: list = dataclasses.field(default_factory=list)
    # Transactions whose catalog rows are in the commit log only.
    pending_rows: list = dataclasses.field(default_factory=list)
    # A pack ran beside a live storage while this verify looked.
    packed_meanwhile: bool = False
    # Unique contents, and the bytes links save (``contents.py``).
    contents: Contents = dataclasses.field(default_factory=Contents)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.orphans or self.size_mismatches
                    or self.checksum_mismatches or self.unreadable
                    or self.pointer_mismatches or self.content_mismatches
                    or self.not_files or self.unfinished)

    def lines(self) -> list[str]:
        result = []
        for oid, tid, path in self.missing:
            result.append('missing: blob file of oid %s tid %s: %s'
                          % (oid_repr(oid), oid_repr(tid), path))
        for path in self.orphans:
            result.append('orphan: no record references %s' % path)
        for path, expected, actual in self.size_mismatches:
            result.append('size mismatch: %s is %d bytes, the journal '
                          'recorded %d' % (path, actual, expected))
        for oid, tid, path, expected, actual in self.checksum_mismatches:
            result.append('checksum mismatch: blob file of oid %s tid %s: '
                          '%s has %s %s, the catalog recorded %s'
                          % (oid_repr(oid), oid_repr(tid), path, DIGEST_NAME,
                             actual.hex(), expected.hex()))
        result.extend(mismatch_lines(self))
        for path, error in self.unreadable:
            result.append('unreadable: %s: %s' % (path, error))
        for path, kind in self.not_files:
            if kind == LINKED_DIRECTORY:
                result.append(f'not followed: {path} is {kind}')
                continue
            result.append('not a file: %s is %s under a blob name, not a '
                          'regular file' % (path, kind))
        result.extend(self.unfinished)
        problems = len(result)
        if self.unrecorded:
            result.append(
                'note: %d files have no recorded checksum yet; %s'
                % (self.unrecorded, 'recorded now: the next verify '
                   '--checksum compares them' if self.recorded else
                   'they were not recorded: the storage is open read-only '
                   '(verify --record-checksums records them)'))
        if self.pending_rows:
            result.append('note: %d committed transactions have their '
                          'catalog rows in the commit log only; the next '
                          'open of the storage writes them'
                          % len(self.pending_rows))
        if self.packed_meanwhile:
            result.append('note: a pack ran beside this verify, so missing '
                          'and orphaned files were not judged; run verify '
                          'again')
        contents = self.contents.line()
        if contents is not None:
            result.append(contents)
        if self.unique_contents is not None:
            result.append(contents_line(self))
        result.append('%s: %d blob records, %d blob files, %s' % (
            self.blob_dir, self.records, self.files,
            'clean' if self.clean else '%d problems' % problems))
        return result


def _holds(path: str, data: bytes) -> bool:
    try:
        fd = open_blob_file(path)
    except OSError:
        return False
    with open(fd, 'rb') as f:
        return f.read(len(data) + 1) == data


def _links_staged(final: str, staged: str) -> bool:
    """Whether `final` is there with its staged file's bytes: its inode,
    or (dedup linked it to an equal file) the same bytes."""
    if not os.path.lexists(final):
        return False
    try:
        return (os.path.samestat(os.lstat(final), os.lstat(staged))
                or same_bytes(final, staged))
    except OSError:
        return True   # nothing recovery would compare: left as it is


_UNFINISHED = {
    'back': 'unfinished: transaction %s was interrupted; recovery would '
            'roll its blob files back: run `zodbblob recover`',
    'forward': 'unfinished: transaction %s was interrupted; recovery would '
               'roll its blob files forward: run `zodbblob recover`',
}


class _Catalog:
    """The catalog as the next open of the storage will find it.

    The storage's read-only journal reads the database file alone; a
    process that ended without closing its storage left its last rows in
    the WAL beside it, which recovery reads.  Then (and only when no
    storage holds the directory) the WAL is read too.
    """

    def __init__(self, storage, live: bool):
        self._journal = storage._shared.journal
        self._db = None
        path = journal_path(storage.fshelper.base_dir)
        wal = path + '-wal'
        if not live and os.path.exists(wal) and os.path.getsize(wal):
            with contextlib.suppress(sqlite3.Error):
                self._db = sqlite3.connect(
                    'file:%s?mode=ro' % urllib.parse.quote(path), uri=True)
                self._query('SELECT 1 FROM blob LIMIT 1')

    def _query(self, sql: str, parameters=()) -> list:
        return self._db.execute(sql, parameters).fetchall()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    @property
    def readable(self) -> bool:
        return self._db is not None or self._journal is not None

    def known(self, pairs) -> set:
        if self._db is None:
            return self._journal.known(pairs)
        return {pair for pair in pairs if self._query(
            'SELECT 1 FROM blob WHERE oid = ? AND tid = ?', pair)}

    def _rows(self):
        """Batches of ``(oid, tid, size, digest)`` in ``(oid, tid)``
        order (digest NULL in a catalog from before digests)."""
        if self._db is None:
            yield from self._journal.rows(digests=True)
            return
        after = (b'', b'')
        digest = 'digest' if has_digest(self._db) else 'NULL'
        while True:
            batch = self._query(
                f'SELECT oid, tid, size, {digest} FROM blob '
                'WHERE (oid, tid) > (?, ?) '
                'ORDER BY oid, tid LIMIT ?',
                (*after, self._journal.read_batch
                 if self._journal is not None else READ_BATCH))
            if not batch:
                return
            after = batch[-1][:2]
            yield batch

    def sizes(self) -> _Sizes:
        return _Sizes(self)

    def row(self, oid: bytes, tid: bytes) -> tuple | None:
        """``(oid, tid, size, digest)`` of one file, or None."""
        if self._db is None:
            query, known = self._journal._query, self._journal.has_digest
        else:
            query, known = self._query, has_digest(self._db)
        rows = query('SELECT oid, tid, size, %s FROM blob WHERE oid = ? AND '
                     'tid = ?' % ('digest' if known else 'NULL'), (oid, tid))
        return rows[0] if rows else None

    def pack_started(self):
        if self._db is not None:
            rows = self._query(
                "SELECT value FROM meta WHERE name = 'pack_started'")
            return rows[0][0] if rows else None
        return self._journal.pack_started()

    def garbage(self) -> list:
        if self._db is not None:
            return self._query('SELECT oid, tid FROM garbage')
        return self._journal.garbage()


class _Sizes:
    """The catalog's row (size, digest) of each file of a directory walk.

    A merge: the catalog's rows are read in ``(oid, tid)`` order, a
    batch at a time, as far as the walk has come; a file the walk gives
    out of that order (a layout whose names do not sort as their oids
    and tids) is looked up on its own.
    """

    def __init__(self, catalog: _Catalog):
        self._catalog = catalog
        self._batches = catalog._rows() if catalog.readable else iter(())
        self._batch: list = []
        self._at = 0
        self._last = None

    def get(self, oid: bytes, tid: bytes) -> tuple | None:
        """``(oid, tid, size, digest)``, or None if there is no row."""
        if not self._catalog.readable:
            return None
        key = (oid, tid)
        if self._last is not None and key < self._last:
            return self._catalog.row(oid, tid)
        self._last = key
        while True:
            while self._at < len(self._batch):
                row = self._batch[self._at]
                if row[:2] > key:
                    return None
                if row[:2] == key:
                    return row
                self._at += 1
            self._batch = next(self._batches, None)
            self._at = 0
            if self._batch is None:
                self._batch = []
                self._batches = iter(())
                return None


class _Digests:
    """Compares what verify --checksum read with the catalog's digests;
    records those the catalog lacks, in batches, where it may write."""

    def __init__(self, storage, report: Report):
        self._report = report
        shared = storage._shared
        self._journal = None if shared.read_only else shared.journal
        report.recorded = self._journal is not None
        self._unrecorded: list[tuple[bytes, bytes, bytes]] = []

    def compare(self, row: tuple, path: str, actual: bytes,
                size: int) -> None:
        oid, tid, recorded_size, expected = row
        if expected is None:
            self._report.unrecorded += 1
            # Not a file whose size is already wrong: its digest would
            # make the damage look like the content.
            if self._journal is not None and size == recorded_size:
                self._unrecorded.append((actual, oid, tid))
                if len(self._unrecorded) >= READ_BATCH:
                    self.record()
        elif expected != actual:
            self._report.checksum_mismatches.append(
                (oid, tid, path, expected, actual))

    def record(self) -> None:
        if self._unrecorded:
            self._journal.record_digests(self._unrecorded)
            self._unrecorded = []


class _Records:
    """The base's blob records, in a temporary SQLite table on disk.

    A set of a million ``(oid, tid)`` pairs costs about 200 MiB; this
    costs SQLite's page cache.  Each file of the walk strikes its record
    off; the records left have no file.
    """

    def __init__(self):
        # '' is a private temporary database on disk, removed at close.
        self._db = sqlite3.connect('')
        self._db.execute('PRAGMA journal_mode=OFF')
        self._db.execute('PRAGMA synchronous=OFF')
        self._db.execute('CREATE TABLE record (oid BLOB, tid BLOB, '
                         'PRIMARY KEY (oid, tid)) WITHOUT ROWID')
        self.count = 0

    @property
    def database(self) -> sqlite3.Connection:
        """The temporary database, for other tables of the walk's."""
        return self._db

    def add(self, pairs) -> None:
        self._db.execute('BEGIN')
        self.count += self._db.executemany(
            'INSERT OR IGNORE INTO record VALUES (?, ?)', pairs).rowcount
        self._db.execute('COMMIT')

    def strike(self, oid: bytes, tid: bytes) -> bool:
        """Strike the record off; False if there was none."""
        return bool(self._db.execute(
            'DELETE FROM record WHERE oid = ? AND tid = ?',
            (oid, tid)).rowcount)

    def left(self):
        """The records not struck off, in ``(oid, tid)`` order."""
        return self._db.execute('SELECT oid, tid FROM record '
                                'ORDER BY oid, tid')

    def close(self) -> None:
        self._db.close()


def _blob_records(storage):
    """``(oid, tid)`` of every blob record of the base, streamed.

    A store's blob records are few distinct pickles (usually one): each
    pickle's answer is remembered (up to 1024 of them) instead of
    unpickling every record.
    """
    answers: dict[bytes, bool] = {}
    transactions = storage.base.iterator()
    try:
        for transaction in transactions:
            for record in transaction:
                data = record.data
                answer = answers.get(data)
                if answer is None:
                    answer = storage.is_blob_record(data)
                    if len(answers) < 1024:
                        answers[data] = answer
                if answer:
                    yield record.oid, record.tid
    finally:
        close = getattr(transactions, 'close', None)
        if close is not None:
            close()


def unfinished_transactions(storage, catalog) -> list[tuple[bytes, str]]:
    """``(tid, what recovery would do)`` for each transaction of the commit
    log that recovery would change, tid order: ``back`` (remove its
    files), ``forward`` (put its files in place), ``rows`` (its files are
    in place; write the catalog rows the process did not write).

    Judged as `BlobStorage._recover` decides: a revision the base holds
    must have its file (with the record's bytes, when the record holds
    them) and its catalog row; a revision the base does not hold must
    have left no file and no row.  Records of transactions that finished
    (all of them, in a store whose process ended without closing it) ask
    for nothing.
    """
    fshelper = storage.fshelper
    path = commit_log_path(fshelper.base_dir)
    if not os.path.exists(path):
        return []
    log = CommitLog(path, read_only=True)
    try:
        records = log.records
    finally:
        log.close()
    latest = latest_entries(records)
    in_catalog = catalog.known(latest) if catalog.readable else None
    found = {}
    for (oid, tid), entry in latest.items():
        final = fshelper.getBlobFilename(oid, tid)
        if base_has(storage.base, oid, tid):
            if entry is None:
                continue
            if entry.data is not None:
                present = _holds(final, entry.data)
            else:
                present = _links_staged(
                    final, os.path.join(fshelper.temp_dir, entry.staged))
            if not present:
                found[tid] = 'forward'
            elif in_catalog is not None and (oid, tid) not in in_catalog:
                found.setdefault(tid, 'rows')
        else:
            staged = (entry is not None and entry.staged
                      and os.path.lexists(os.path.join(fshelper.temp_dir,
                                                       entry.staged)))
            if (os.path.lexists(final) or staged
                    or (in_catalog is not None and (oid, tid) in in_catalog)):
                found.setdefault(tid, 'back')
    return sorted(found.items())


def _check_files(storage, report: Report, records: _Records, checksum: bool,
                 progress) -> None:
    fshelper = storage.fshelper
    seen_up_to = storage.base.lastTransaction()

    # A storage open for writing replayed its commit log at open, and the
    # records since are its own; so are those of a live storage elsewhere.
    live = (not storage._shared.read_only) or held_by_a_storage(
        fshelper.base_dir)
    catalog = _Catalog(storage, live)
    try:
        if not live:
            for tid, change in unfinished_transactions(storage, catalog):
                if change == 'rows':
                    report.pending_rows.append(tid)
                else:
                    report.unfinished.append(_UNFINISHED[change]
                                             % oid_repr(tid))
        garbage = catalog.garbage() if catalog.readable and not live else []
        # A mark whose file and row are gone is a finished pack's, whose
        # process ended before a sync let the mark go: nothing to finish.
        garbage = [pair for pair in garbage
                   if catalog.row(*pair) is not None
                   or os.path.exists(fshelper.getBlobFilename(*pair))]
        catalog_pack_started = (catalog.readable and not live
                                and catalog.pack_started() is not None)
        if not live and catalog_pack_started:
            report.unfinished.append(
                'unfinished: a pack was interrupted after the base storage '
                'packed; run `zodbblob recover`')
        if garbage:
            report.unfinished.append(
                'unfinished: a pack was interrupted while removing %d blob '
                'files; run `zodbblob recover`' % len(garbage))
        _walk(storage, report, records, catalog.sizes(), live, seen_up_to,
              checksum, progress)
    finally:
        catalog.close()


def _walk(storage, report: Report, records: _Records, sizes: _Sizes,
          live: bool, seen_up_to: bytes, checksum: bool, progress) -> None:
    fshelper = storage.fshelper
    passed_over = []
    # The walk is not counted first: the records are the progress's
    # total, which is the file count of a clean directory.
    total = report.records
    digests = _Digests(storage, report)
    with contextlib.ExitStack() as stack:
        tree = stack.enter_context(BlobTree(fshelper.base_dir))
        walk = fshelper.iter_blobs(passed_over)
        if checksum:
            # The kernel reads each file in ahead of its turn (a hint
            # only: each is opened, checked and read in its turn below).
            walk = stack.enter_context(contextlib.closing(read_ahead(
                walk, stack.enter_context(BlobTree(fshelper.base_dir)))))
        for done, (oid, tid, path) in enumerate(walk, 1):
            report.files = done
            if not records.strike(oid, tid) and not (
                    live and tid > seen_up_to):
                report.orphans.append(path)
            try:
                fd = tree.open(path)
            except NotABlobFile as e:
                report.not_files.append((e.path, e.kind))
            except OSError as e:
                report.unreadable.append((path, e.strerror or str(e)))
            else:
                try:
                    info = os.fstat(fd)
                    size = info.st_size
                    actual = digest_fd(fd) if checksum else None
                except OSError as e:
                    report.unreadable.append((path, e.strerror or str(e)))
                else:
                    report.contents.add(info, actual)
                    row = sizes.get(oid, tid)
                    if row is not None and row[2] != size:
                        report.size_mismatches.append((path, row[2], size))
                    if row is not None and actual is not None:
                        digests.compare(row, path, actual, size)
                finally:
                    os.close(fd)
            if progress is not None:
                progress(done, max(total, done))
        digests.record()
        for oid, tid in records.left():
            path = fshelper.getBlobFilename(oid, tid)
            try:
                # What a layout's walk passes over (a link to a directory, a
                # FIFO where only files are listed) is still under the name.
                kind = file_kind(tree.check(path).st_mode)
            except NotABlobFile as e:
                path, kind = e.path, e.kind
            except OSError:
                kind = None
            if kind is not None and kind != 'a regular file':
                passed_over.append((path, kind))
            else:
                report.missing.append((oid, tid, path))
    # One line per link or directory, however many records are below it.
    listed = {path for path, kind in report.not_files}
    for path, kind in passed_over:
        if path not in listed:
            listed.add(path)
            report.not_files.append((path, kind))
    if live:
        # A pack beside us removes files of records we read before it, or
        # files whose records the packed base we read no longer has.
        report.orphans = [path for path in report.orphans
                          if os.path.lexists(path)]
        if report.orphans or report.missing:
            if packed_meanwhile(storage):
                report.orphans, report.missing = [], []
                report.packed_meanwhile = True


def verify(storage, checksum: bool = False,
           progress: Callable[[int, int], None] | None = None) -> Report:
    """Check the blob files of `storage` (a zodbblob.BlobStorage).

    With `checksum`, every byte of every file is read; otherwise each file
    is opened.  `progress(done, total)` is called as files are checked.
    Beside a live storage, files and records of transactions committed
    after the base was opened here are not reported, nor missing or
    orphaned files while a pack runs (it says so: run verify again).
    """
    fshelper = storage.fshelper
    report = Report(fshelper.base_dir.rstrip(os.sep))
    records = _Records()
    report.contents.open(records.database)
    try:
        records.add(_blob_records(storage))
        report.records = records.count
        if storage.object_store is not None:
            check_bucket(storage, report, records, _Catalog(storage, True),
                         _Digests(storage, report), checksum, progress)
        else:
            _check_files(storage, report, records, checksum, progress)
    finally:
        records.close()
    return report
