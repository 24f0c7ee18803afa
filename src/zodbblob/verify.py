"""Check a blob directory against its base storage.

Every blob record of the base (every revision the base still holds) must
have its file; every blob file must belong to a record; every file must
have the size the journal recorded, and be readable.  This is the one
place that walks the whole blob directory on purpose: it is an operator's
check, not a hot path, and it opens nothing for writing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from ZODB.utils import oid_repr

from zodbblob.commitlog import commit_log_path
from zodbblob.commitlog import unfinished_records


@dataclasses.dataclass
class Report:
    """What `verify` found; empty lists mean a clean blob directory."""

    blob_dir: str
    records: int = 0
    files: int = 0
    missing: list = dataclasses.field(default_factory=list)
    orphans: list = dataclasses.field(default_factory=list)
    size_mismatches: list = dataclasses.field(default_factory=list)
    unreadable: list = dataclasses.field(default_factory=list)
    unfinished: list = dataclasses.field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.orphans or self.size_mismatches
                    or self.unreadable or self.unfinished)

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
        for path, error in self.unreadable:
            result.append('unreadable: %s: %s' % (path, error))
        result.extend(self.unfinished)
        result.append('%s: %d blob records, %d blob files, %s' % (
            self.blob_dir, self.records, self.files,
            'clean' if self.clean else '%d problems' % (len(result))))
        return result


def _read_all(path: str) -> None:
    with open(path, 'rb') as f:
        while f.read(1 << 20):
            pass


def verify(storage, checksum: bool = False,
           progress: Callable[[int, int], None] | None = None) -> Report:
    """Check the blob files of `storage` (a zodbblob.BlobStorage).

    With `checksum`, every byte of every file is read; otherwise each file
    is opened.  `progress(done, total)` is called as files are checked.
    """
    fshelper = storage.fshelper
    report = Report(fshelper.base_dir.rstrip(os.sep))
    records = set()
    for transaction in storage.base.iterator():
        for record in transaction:
            if storage.is_blob_record(record.data):
                records.add((record.oid, record.tid))
    report.records = len(records)

    journal = storage._shared.journal
    # A storage open for writing replayed its commit log at open, and the
    # records since are its own; read-only, nothing replayed it.
    unfinished = storage._shared.read_only and unfinished_records(
        commit_log_path(fshelper.base_dir))
    if unfinished:
        report.unfinished.append(
            'unfinished: the commit log holds %d transactions a crash '
            'interrupted or left unsynced; run `zodbblob recover`'
            % unfinished)
    sizes = {}
    if journal is not None:
        sizes = {(oid, tid): size for oid, tid, size in journal.committed()}
        if journal.garbage():
            report.unfinished.append(
                'unfinished: a pack was interrupted while removing %d blob '
                'files; run `zodbblob recover`' % len(journal.garbage()))

    files = list(fshelper.iter_blobs())
    report.files = len(files)
    seen = set()
    for done, (oid, tid, path) in enumerate(files, 1):
        seen.add((oid, tid))
        if (oid, tid) not in records:
            report.orphans.append(path)
        try:
            size = os.stat(path).st_size
            if checksum:
                _read_all(path)
            else:
                os.close(os.open(path, os.O_RDONLY))
        except OSError as e:
            report.unreadable.append((path, e.strerror or str(e)))
        else:
            expected = sizes.get((oid, tid))
            if expected is not None and expected != size:
                report.size_mismatches.append((path, expected, size))
        if progress is not None:
            progress(done, len(files))
    for oid, tid in sorted(records - seen):
        report.missing.append((oid, tid, fshelper.getBlobFilename(oid, tid)))
    return report
