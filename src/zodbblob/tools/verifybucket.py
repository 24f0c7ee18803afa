"""Check a storage whose blobs live in a bucket (``storage/objects.py``).

The same questions as ``verify.py`` asks of a blob directory, asked of
the bucket: every blob record of the base must have its object, every
object under the prefix must belong to a record, every object must have
the size its catalog row recorded; with ``checksum``, every object is
downloaded (into a temporary file, removed after) and hashed, and
compared with the digest its row recorded at commit (rows without one
are counted, and given it when the storage is open for writing).

Streamed as verify streams a directory: the base's records in a
temporary table on disk, struck off as the listing of the bucket goes
by, one page (ListObjectsV2, 1,000 keys) at a time; the catalog's rows
read beside it in ``(oid, tid)`` order, which is the keys' order (oid
and tid in fixed-width hex).  A key under the prefix that is not a blob
key is reported as an orphan too: nothing refers to it.
"""

from __future__ import annotations

import os
import tempfile

from zodbblob.objectstore import parse_blob_key
from zodbblob.storage import held_by_a_storage
from zodbblob.storage.binding import own_keys
from zodbblob.storage.catalog import pack_under_way
from zodbblob.storage.digest import digest_file
from zodbblob.tools.verifycontents import check_contents

# Keys a ListObjectsV2 page holds (the most the API gives).
LIST_PAGE = 1000
MAX_TID = b'\xff' * 8


def check_bucket(storage, report, records, catalog, digests, checksum: bool,
                 progress) -> None:
    """Fill `report` (a ``verify.Report``) for the storage on a bucket:
    `records` (``verify._Records``) holds the base's blob records,
    `catalog` and `digests` are verify's ``_Catalog`` (closed here) and
    ``_Digests``."""
    try:
        _check(storage, report, records, catalog, digests, checksum,
               progress)
    finally:
        catalog.close()


def _check(storage, report, records, catalog, digests, checksum,
           progress) -> None:
    objects = storage.object_store
    prefix = objects.settings.prefix
    # Beside a live storage, objects of transactions committed after the
    # records were read are not orphans; beside none, any is.
    live = (not storage._shared.read_only) or held_by_a_storage(
        storage.fshelper.base_dir)
    seen_up_to = storage.base.lastTransaction() if live else MAX_TID
    if objects.contents is not None:
        check_contents(storage, report, records, catalog, digests, checksum,
                       progress, live, seen_up_to)
        _judge_beside_a_pack(storage, report, live)
        return
    sizes = catalog.sizes()
    total = report.records
    listing = objects.bucket.iter_keys(prefix, page_size=LIST_PAGE)
    own = own_keys(objects.bucket)
    done = 0
    for key, size in listing:
        rest = key[len(prefix):]
        if key in own or rest.count('/') > 1:
            continue   # the marker, the writer; a nested prefix's
        done += 1
        report.files = done
        where = f's3://{objects.settings.bucket}/{key}'
        parsed = parse_blob_key(prefix, key)
        if parsed is None:
            report.orphans.append(where)
            continue
        oid, tid = parsed
        if not records.strike(oid, tid) and tid <= seen_up_to:
            report.orphans.append(where)
        row = sizes.get(oid, tid)
        if row is not None and row[2] != size:
            report.size_mismatches.append((where, row[2], size))
        if checksum and row is not None:
            actual = _download_digest(storage, objects, key, where, report)
            if actual is not None:
                digests.compare(row, where, actual, size)
        if progress is not None:
            progress(done, max(total, done))
    digests.record()
    for oid, tid in records.left():
        report.missing.append(
            (oid, tid, f's3://{objects.settings.bucket}/{objects.key(oid, tid)}'))
    _judge_beside_a_pack(storage, report, live)


def _judge_beside_a_pack(storage, report, live: bool) -> None:
    # A pack beside us (a live storage's) deletes objects of records we
    # read before it.
    if (report.orphans or report.missing) and live and packed_meanwhile(
            storage):
        report.orphans, report.missing = [], []
        report.packed_meanwhile = True


def packed_meanwhile(storage) -> bool:
    """Whether a pack runs or ran since the storage's base was opened:
    its intent is in the catalog, or it swapped in a new file."""
    if pack_under_way(storage.fshelper.base_dir):
        return True
    base = storage.base
    try:
        return (os.fstat(base._file.fileno()).st_ino
                != os.stat(base._file_name).st_ino)
    except (AttributeError, OSError):
        return False


def _download_digest(storage, objects, key, where, report) -> bytes | None:
    """The digest of the object `key`, read through a temporary file in
    the blob directory's ``tmp``; None (and an unreadable line) if it
    cannot be read."""
    fd, path = tempfile.mkstemp(prefix='verify-', suffix='.blob',
                                dir=storage.fshelper.temp_dir)
    os.close(fd)
    try:
        # Unchecked: verify says what a damaged content holds.
        objects.bucket.download(key, path, check=False)
        return digest_file(path)
    except (objects.failure, OSError) as e:
        report.unreadable.append((where, str(e)))
        return None
    finally:
        if os.path.exists(path):
            os.remove(path)
