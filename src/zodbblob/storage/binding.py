"""Which bucket a blob directory keeps its blobs in, and whose it is.

Two halves that must agree.  The catalog's meta says ``object_store``
(``s3://bucket/prefix``) and ``object_store_id`` (a database id made at
the first binding); the bucket holds, beside the blobs, a marker object
``PREFIX.zodbblob.json`` naming that id.  So a prefix belongs to one
database:

- a first binding needs an empty prefix (or one whose marker already
  names this directory's id: a binding a crash interrupted), writes the
  marker, then the catalog's binding (the commit point);
- every open of a bound directory, read-only too, reads the marker and
  refuses a prefix whose marker is missing (another endpoint, another
  bucket of that name) or names another database;
- a catalog lost from a directory that was in use is rebuilt from a
  listing only under the marker, whose id it takes over; a new
  directory never adopts a used prefix.

The keys are bound too: a prefix bound with dedup on keeps each content
once under its digest (``object_store_keys`` = ``content`` in the
catalog, ``"keys": "content"`` in the marker), one bound without it by
oid and tid; a writable open must say the same (``dedup``).  And its
writer: the blob directory, not a copy of it (``writer.py``).
"""

from __future__ import annotations

import json
import logging
import os
import uuid

from zodbblob.storage.lock import BlobStorageError
from zodbblob.storage.writer import claim_writer

logger = logging.getLogger(__name__)

META_NAME = 'object_store'
ID_NAME = 'object_store_id'
KEYS_NAME = 'object_store_keys'
CONTENT_KEYS = 'content'
MARKER = '.zodbblob.json'


def describe(settings) -> str:
    """``s3://bucket/prefix`` (what the catalog remembers)."""
    return f's3://{settings.bucket}/{settings.prefix}'


def marker_key(bucket) -> str:
    return bucket.settings.prefix + MARKER


def own_keys(bucket) -> set[str]:
    """The keys of the prefix's own objects (the marker, the writer),
    which are no blobs."""
    from zodbblob.storage.writer import writer_key
    return {marker_key(bucket), writer_key(bucket)}


def read_marker(bucket) -> dict | None:
    return bucket.get_record(marker_key(bucket), 'database')


def _refuse(blob_dir: str, bucket, why: str):
    raise BlobStorageError(f'Blob directory {blob_dir}: '
                           f'{describe(bucket.settings)} at '
                           f'{bucket.endpoint} {why}')


def check(bucket, journal, blob_dir: str) -> None:
    """Refuse a bucket the catalog is not bound to, or whose marker does
    not name the catalog's id."""
    known = journal.get_meta(META_NAME)
    name = describe(bucket.settings)
    if known != name:
        raise BlobStorageError(
            f'Blob directory {blob_dir} keeps its blobs '
            f'{"in its own files" if known is None else "in " + known}, '
            f'not in {name}')
    identity = journal.get_meta(ID_NAME)
    marker = read_marker(bucket)
    if marker is None:
        _refuse(blob_dir, bucket, f'has no marker {marker_key(bucket)}: '
                f'is this the server and bucket the blob directory was put '
                f'on?')
    if marker['database'] != identity:
        _refuse_another(blob_dir, bucket, marker,
                        f', this catalog {identity}): a copy of a site '
                        f'needs a prefix of its own')


def _refuse_another(blob_dir: str, bucket, marker: dict, rest: str):
    """Refuse a prefix whose marker names another database (or is no
    marker zodbblob wrote: its database reads None)."""
    _refuse(blob_dir, bucket, f'belongs to another database (its marker '
            f'{marker_key(bucket)} names {marker["database"]}{rest}')


def claim(bucket, journal, blob_dir: str, contents: bool = False) -> None:
    """Make the prefix this catalog's: give the catalog its id, and the
    prefix a marker naming it (an empty prefix), or find the marker
    naming it already (a binding or a move a crash interrupted).  With
    `contents`, blobs are kept by content (dedup)."""
    identity = journal.get_meta(ID_NAME)
    if identity is None:
        identity = uuid.uuid4().hex
        journal.set_meta(**{ID_NAME: identity})
    if _free_or_ours(bucket, blob_dir, identity) is None:
        marker = {'database': identity}
        if contents:
            marker['keys'] = CONTENT_KEYS
        bucket.put_bytes(marker_key(bucket), json.dumps(marker).encode())


def by_content(journal) -> bool:
    """Whether the bound prefix keeps each content once (dedup)."""
    return journal.get_meta(KEYS_NAME) == CONTENT_KEYS


def check_keys(bucket, journal, blob_dir: str, dedup: bool) -> None:
    """Refuse a writable open whose `dedup` is not what the prefix was
    bound with: its keys would be of the other kind."""
    if by_content(journal) == bool(dedup):
        return
    if dedup:
        raise BlobStorageError(
            f'Blob directory {blob_dir} keeps its blobs in '
            f'{describe(bucket.settings)} by oid and tid: dedup on a '
            f'bucket needs a prefix bound with dedup on from the start '
            f'(open it without dedup, or move it home with zodbblob '
            f'migrate s3://BUCKET/PREFIX DIR, then into a new prefix with '
            f'zodbblob migrate DIR s3://BUCKET/NEW --dedup)')
    raise BlobStorageError(
        f'Blob directory {blob_dir} keeps its blobs in '
        f'{describe(bucket.settings)} by content: open it with dedup on '
        f'(dedup on in <zodbblob>, dedup=True, serve --dedup)')


def _free_or_ours(bucket, blob_dir: str, identity: str | None):
    """The prefix's marker if it names `identity`, or None if the prefix
    is empty; refused otherwise (another database's)."""
    marker = read_marker(bucket)
    if marker is not None:
        # One zodbblob did not write (its database None) is nobody's.
        if marker['database'] is None or marker['database'] != identity:
            _refuse_another(blob_dir, bucket, marker, '): give this '
                            'storage a prefix of its own')
        return marker
    listed = next(iter(bucket.iter_keys(bucket.settings.prefix,
                                        page_size=1)), None)
    if listed is not None:
        _refuse(blob_dir, bucket, f'holds objects already ({listed[0]}): '
                f'another database\'s?  Give this storage a prefix of its '
                f'own')
    return None


def bind(bucket, journal, fshelper, dedup: bool = False) -> str:
    """Bind a blob directory to its bucket (a first open on it), by
    content with `dedup`; or check the binding.  The writer's session
    (``writer.py``)."""
    blob_dir = fshelper.base_dir
    if journal.get_meta(META_NAME) is not None:
        check(bucket, journal, blob_dir)
        check_keys(bucket, journal, blob_dir, dedup)
        return claim_writer(bucket, blob_dir, describe(bucket.settings))
    if (journal.total_size() or any(True for _ in journal.committed())
            or any(True for _ in fshelper.iter_blobs())):
        raise BlobStorageError(
            f'Blob directory {blob_dir} holds blob files of its own: it '
            f'cannot keep its blobs in {describe(bucket.settings)} (start '
            f'from an empty blob directory, or move them with zodbblob '
            f'migrate)')
    claim(bucket, journal, blob_dir, dedup)
    journal.set_meta(**{KEYS_NAME: CONTENT_KEYS if dedup else None,
                        META_NAME: describe(bucket.settings)})
    return claim_writer(bucket, blob_dir, describe(bucket.settings))


def adopt(bucket, journal, blob_dir: str) -> None:
    """Before a catalog is rebuilt from a listing: check the binding it
    kept, or take over the marker's id for one that lost it (a damaged
    catalog); refuse a prefix without a marker."""
    if journal.get_meta(ID_NAME) is not None:
        check(bucket, journal, blob_dir)
        return
    marker = read_marker(bucket)
    if marker is None or marker['database'] is None:
        _refuse(blob_dir, bucket, f'has no marker {marker_key(bucket)} '
                f'to rebuild the catalog under')
    journal.set_meta(**{META_NAME: describe(bucket.settings),
                        ID_NAME: marker['database'],
                        KEYS_NAME: CONTENT_KEYS if marker.get('keys')
                        == CONTENT_KEYS else None})


def check_unbound(journal, blob_dir: str) -> None:
    """Refuse to open a blob directory bound to a bucket without it."""
    known = journal.get_meta(META_NAME) if journal is not None else None
    if known is not None:
        raise BlobStorageError(
            f'Blob directory {blob_dir} keeps its blobs in {known}: open it '
            f'with that object store (an <s3> section)')


def was_in_use(blob_dir: str) -> bool:
    """Whether a storage used `blob_dir` before (its commit log is
    there): a catalog missing there was lost, not never made."""
    from zodbblob.storage.commitlog import commit_log_path
    return os.path.exists(commit_log_path(blob_dir))


def refuse_a_used_prefix(bucket, blob_dir: str) -> None:
    """Before a new blob directory is made (nothing on disk yet): refuse
    a prefix that holds objects already (another database's)."""
    from zodbblob.storage.catalog import journal_path
    if os.path.exists(journal_path(blob_dir)) or was_in_use(blob_dir):
        return   # not new: its open checks the binding
    blob_dir = os.path.abspath(blob_dir) + os.sep   # as the open says it
    _free_or_ours(bucket, blob_dir, None)
