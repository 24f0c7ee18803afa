"""Move a blob directory's files into a bucket, and back (issue 16).

``to_bucket(blob_dir, settings)`` uploads the file of every catalog row
to its key (``PREFIX/OID/TID.blob``; with ``dedup``, each content once
and a pointer per row: ``bucketcontents.py``), then binds the blob directory to
the bucket (the catalog's ``object_store``: the commit point), then
removes the local files.  ``from_bucket(blob_dir, settings)`` downloads
every row's object to its file in the directory's layout, makes them
durable (from a prefix by content: its content, by the row's digest),
unbinds, and removes the local cache.  The blob directory keeps
its catalog, commit log and layout either way, so the storage opens it
with or without the ``<s3>`` section as the binding says.

Both run beside no storage (they hold the blob directory's lock), on a
directory whose storage closed cleanly, and resume: a key the bucket
already holds with the row's size is not uploaded again, a file already
in place with its size is not downloaded again.  The catalog's rows and
the bucket's listing are both in ``(oid, tid)`` order (the keys spell
oid and tid in fixed-width hex), so what is there is found by a merge
of the two, a page at a time: nothing here holds the whole store.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import shutil
from collections.abc import Callable

from zodbblob.layout import (
    FilesystemHelper,
    fsync_directory,
    makedirs_durable,
    read_marker,
    remove_if_exists,
)
from zodbblob.objectstore import blob_key, content_key, parse_blob_key
from zodbblob.storage import hold_blob_directory
from zodbblob.storage.catalog import (
    Journal,
    journal_path,
    kill_point,
    sync_filesystem,
    syncfs_works,
)
from zodbblob.storage.commitlog import commit_log_path, unfinished_records
from zodbblob.storage import binding
from zodbblob.storage.binding import (
    CONTENT_KEYS,
    KEYS_NAME,
    META_NAME,
    describe,
)
from zodbblob.storage.objects import (
    UPLOAD_THREADS,
    cache_directory,
    open_bucket,
)
from zodbblob.tools.bucketcontents import upload_by_content

logger = logging.getLogger(__name__)

DOWNLOADING = 'moving-'


class BucketMoveError(Exception):
    """The move cannot start; nothing was changed."""


@dataclasses.dataclass
class MoveReport:
    blob_dir: str
    bucket: str
    rows: int = 0
    transferred: int = 0     # files uploaded or downloaded now
    bytes: int = 0
    already: int = 0         # found in place (a resumed move)
    removed: int = 0         # local files removed after binding
    lost: list = dataclasses.field(default_factory=list)
    contents: int | None = None   # by content: contents uploaded now

    def summary(self, direction: str) -> str:
        if self.contents is not None:
            return (f'{self.blob_dir}: {self.rows} blobs {direction} '
                    f'{self.bucket} by content: {self.contents} contents '
                    f'uploaded ({self.bytes} bytes), {self.transferred} '
                    f'pointers, {self.already} there already')
        return (f'{self.blob_dir}: {self.rows} blobs {direction} '
                f'{self.bucket}: {self.transferred} '
                f'{"uploaded" if direction == "moved into" else "downloaded"}'
                f' ({self.bytes} bytes), {self.already} there already')


def _open(blob_dir: str, settings):
    """``(lock, journal, fshelper, bucket)`` of a blob directory whose
    storage closed cleanly; BucketMoveError (nothing changed) if not."""
    blob_dir = os.path.abspath(blob_dir)
    layout = read_marker(blob_dir)
    if layout is None:
        raise BucketMoveError(f'{blob_dir} is not a blob directory: no '
                              f'.layout marker')
    if not os.path.exists(journal_path(blob_dir)):
        raise BucketMoveError(
            f'{blob_dir} has no blob catalog yet: open it once with '
            f'zodbblob (its catalog is made then), then move it')
    bucket = open_bucket(settings)
    unfinished = unfinished_records(commit_log_path(blob_dir))
    lock = hold_blob_directory(blob_dir)
    try:
        journal = Journal(blob_dir)
        try:
            if unfinished or journal.get_meta('state') != 'closed':
                raise BucketMoveError(
                    f'{blob_dir} was not closed cleanly by its storage: '
                    f'open and close it (or run `zodbblob recover`) first')
            return lock, journal, FilesystemHelper(blob_dir, layout), bucket
        except BaseException:
            journal.close()
            raise
    except BaseException:
        if lock is not None:
            lock.close()
        raise


def _merged(journal, bucket, digests: bool = False):
    """``(oid, tid, size, size in the bucket or None)`` of every row
    (with `digests`, ``(oid, tid, size, digest, size in the bucket or
    None)``), the listing read beside the rows, page by page."""
    prefix = bucket.settings.prefix
    listing = (
        (parsed, size) for key, size in bucket.iter_keys(prefix)
        for parsed in [parse_blob_key(prefix, key)] if parsed is not None)
    current = next(listing, None)
    for batch in journal.rows(digests=digests):
        for row in batch:
            oid, tid = row[:2]
            while current is not None and current[0] < (oid, tid):
                current = next(listing, None)
            there = (current[1] if current is not None
                     and current[0] == (oid, tid) else None)
            yield *row, there


def to_bucket(blob_dir: str, settings,
              progress: Callable[[int, int], None] | None = None,
              dedup: bool = False) -> MoveReport:
    """Move the blob files of `blob_dir` into the bucket of `settings`;
    with `dedup`, each content once (``bucketcontents.py``)."""
    lock, journal, fshelper, bucket = _open(blob_dir, settings)
    name = describe(bucket.settings)
    report = MoveReport(fshelper.base_dir.rstrip(os.sep), name)
    try:
        bound = journal.get_meta(META_NAME)
        if bound is not None:
            binding.check(bucket, journal, fshelper.base_dir)
            binding.check_keys(bucket, journal, fshelper.base_dir, dedup)
        else:
            # The prefix becomes this catalog's (its marker) before any
            # upload: never into another database's prefix.
            binding.claim(bucket, journal, fshelper.base_dir, dedup)
            _check_marker_keys(bucket, fshelper.base_dir, dedup)
            # The parts of a large file whose upload a kill cut.
            bucket.abort_uploads(None)
            if dedup:
                upload_by_content(journal, fshelper, bucket, report,
                                  progress, _merged(journal, bucket, True))
                _refuse_lost(report)
            else:
                _upload(journal, fshelper, bucket, report, progress)
            # The commit point: from here on the storage reads the bucket.
            journal.set_meta(**{KEYS_NAME: CONTENT_KEYS if dedup else None,
                                META_NAME: name})
            kill_point('after_bucket_bind')
        report.rows = 0
        for batch in journal.rows():
            report.rows += len(batch)
            for oid, tid, size in batch:
                path = fshelper.getBlobFilename(oid, tid)
                if os.path.lexists(path):
                    os.remove(path)
                    report.removed += 1
            for oid in {row[0] for row in batch}:
                with contextlib.suppress(OSError):
                    os.rmdir(fshelper.getPathForOID(oid))
    finally:
        journal.close()
        if lock is not None:
            lock.close()
    return report


def _upload(journal, fshelper, bucket, report, progress) -> None:
    done = 0
    with concurrent.futures.ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        pending = set()
        for oid, tid, size, there in _merged(journal, bucket):
            if there == size:
                report.already += 1
                continue
            path = fshelper.getBlobFilename(oid, tid)
            if not os.path.isfile(path):
                report.lost.append(path)
                continue
            pending.add(pool.submit(_upload_one, bucket, oid, tid, path))
            if len(pending) >= 4 * UPLOAD_THREADS:
                finished, pending = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED)
                done += _count(finished, report)
                if progress is not None:
                    progress(done, report.rows)
        done += _count(concurrent.futures.wait(pending).done, report)
        if progress is not None:
            progress(done, report.rows)
    _refuse_lost(report)


def _check_marker_keys(bucket, blob_dir: str, dedup: bool) -> None:
    """Refuse to go on with a move a kill interrupted the other way
    (with or without --dedup): the marker says how it began."""
    marker = binding.read_marker(bucket) or {}
    if (marker.get('keys') == CONTENT_KEYS) != bool(dedup):
        raise BucketMoveError(
            f'{blob_dir}: the move into {describe(bucket.settings)} was '
            f'begun {"without" if dedup else "with"} --dedup (its marker '
            f'{binding.marker_key(bucket)}): run it the same way to finish '
            f'it')


def _refuse_lost(report) -> None:
    if report.lost:
        raise BucketMoveError(
            f'{report.blob_dir}: {len(report.lost)} blob files of its '
            f'catalog are missing (the first {report.lost[0]}): run '
            f'`zodbblob verify` first; the files found were uploaded')


def _upload_one(bucket, oid, tid, path) -> int:
    size = bucket.upload(path, blob_key(bucket.settings.prefix, oid, tid))
    kill_point('mid_bucket_move')
    return size


def _count(finished, report) -> int:
    for future in finished:
        report.bytes += future.result()   # the first failure, raised
        report.transferred += 1
    return len(finished)


def from_bucket(blob_dir: str, settings,
                progress: Callable[[int, int], None] | None = None
                ) -> MoveReport:
    """Move the blobs of `blob_dir` back from the bucket of `settings`
    into files in its layout.  The objects stay in the bucket."""
    lock, journal, fshelper, bucket = _open(blob_dir, settings)
    name = describe(bucket.settings)
    report = MoveReport(fshelper.base_dir.rstrip(os.sep), name)
    try:
        bound = journal.get_meta(META_NAME)
        if bound is None and _all_in_place(journal, fshelper):
            # A move back killed after its commit point: only the cache
            # was left to remove.
            shutil.rmtree(cache_directory(fshelper.base_dir),
                          ignore_errors=True)
            report.rows = report.already = sum(
                len(batch) for batch in journal.rows())
            return report
        binding.check(bucket, journal, fshelper.base_dir)
        makedirs_durable(fshelper.temp_dir)
        for left in os.listdir(fshelper.temp_dir):
            if left.startswith(DOWNLOADING):   # of a move that was killed
                remove_if_exists(os.path.join(fshelper.temp_dir, left))
        done = 0
        # By content, a row's digest names its content's key: no pointer
        # to follow (a row without one: its pointer is followed).
        contents = binding.by_content(journal)
        for batch in journal.rows(digests=True):
            report.rows += len(batch)
            for oid, tid, size, digest in batch:
                path = fshelper.getBlobFilename(oid, tid)
                if os.path.isfile(path) and os.path.getsize(path) == size:
                    report.already += 1
                else:
                    key = (content_key(bucket.settings.prefix, digest)
                           if contents and digest is not None
                           else blob_key(bucket.settings.prefix, oid, tid))
                    _download_one(bucket, fshelper, key, path, size)
                    report.transferred += 1
                    report.bytes += size
                done += 1
                if progress is not None:
                    progress(done, done)
        if syncfs_works(fshelper.base_dir):
            sync_filesystem(fshelper.base_dir)
        else:
            _fsync_tree(fshelper.base_dir)
        # The commit point: from here on the storage reads the files.
        journal.set_meta(**{META_NAME: None, KEYS_NAME: None})
        kill_point('after_bucket_bind')
        shutil.rmtree(cache_directory(fshelper.base_dir), ignore_errors=True)
    finally:
        journal.close()
        if lock is not None:
            lock.close()
    return report


def _all_in_place(journal, fshelper) -> bool:
    """Whether every row's file is in place with its size (and the
    cache directory of a move back is there to remove)."""
    if not os.path.isdir(cache_directory(fshelper.base_dir)):
        return False
    for batch in journal.rows():
        for oid, tid, size in batch:
            path = fshelper.getBlobFilename(oid, tid)
            if not (os.path.isfile(path) and os.path.getsize(path) == size):
                return False
    return True


def _download_one(bucket, fshelper, key, path, size) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = os.path.join(fshelper.temp_dir,
                             f'{DOWNLOADING}{os.getpid()}.blob')
    remove_if_exists(temporary)
    got = bucket.download(key, temporary)
    if got != size:
        os.remove(temporary)
        raise BucketMoveError(
            f'object {key} in bucket {bucket.name} is {got} bytes, its '
            f'catalog row says {size}: run `zodbblob verify` on the storage')
    os.chmod(temporary, 0o444)
    os.replace(temporary, path)
    kill_point('mid_bucket_move')


def _fsync_tree(directory: str) -> None:
    from zodbblob.layout import fsync_path
    for parent, dirs, names in os.walk(directory):
        for name in names:
            fsync_path(os.path.join(parent, name), data_only=True)
        fsync_directory(parent)
