"""A storage whose committed blobs live in an object store (issue 16).

`ObjectStore` is what a `BlobStorage` given ``object_store=`` does with
its bucket: the uploads of a transaction at vote, the reads through the
local cache, the deletes of pack and recovery, the server-side copies of
undo.  The blob directory keeps the catalog, the commit log and the
staging directory as always; the committed files themselves are objects
under ``blob_key(prefix, oid, tid)``, and their local copies live in a
`zodbblob.cache.BlobCache` (the ZEO client's cache: one index, LRU
eviction under ``cache_size``, one download per blob across threads and
processes) in ``<blob_dir>/.zodbblob/cache``.

The protocol (``doc/design.rst``, "Blobs on an object store"): a
transaction's commit record, which names every key it may create (keys
derive from oid and tid), is durable before the first upload starts;
vote waits for every upload; the base commits at ``tpc_finish``, which
makes no network call.  So a crash leaves either a committed transaction
whose objects are all in the bucket, or a record whose tid the base
lacks, whose keys the next open deletes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading

from ZODB.POSException import POSKeyError, StorageError
from ZODB.utils import oid_repr

from zodbblob.objectstore import ObjectStoreSettings, blob_key, parse_blob_key
from zodbblob.objectstore.errors import NotAPointer
from zodbblob.storage import binding
from zodbblob.storage.binding import describe
from zodbblob.storage.catalog import STATE_DIR, kill_point
from zodbblob.storage.contents import Contents
from zodbblob.storage.digest import digest_file, has_digest
from zodbblob.storage.lock import BlobStorageError
from zodbblob.storage.writer import (
    LEASE_RENEWAL,
    NotTheWriter,
    claim_writer,
    confirm_writer,
    renew,
)

logger = logging.getLogger(__name__)

# Uploads of one transaction at once (boto3's multipart uploads of large
# files use threads of their own besides): as many as botocore's pool
# keeps connections (10).  Where each request waits on a network (20 ms
# held by a proxy, ``bench/README.md``), 50 small blobs a transaction
# went up 1.6-1.9x as fast as with 4; on a CPU-bound local server, as
# fast.
UPLOAD_THREADS = 10
CACHE_DIR = 'cache'


def cache_directory(blob_dir: str) -> str:
    return os.path.join(blob_dir, STATE_DIR, CACHE_DIR)


def check_cache_size(cache_size, blob_dir: str) -> int | None:
    """`cache_size` if it is a whole number of bytes above 0, or None
    (unbounded); BlobStorageError in one line otherwise."""
    if cache_size is None or (isinstance(cache_size, int)
                              and not isinstance(cache_size, bool)
                              and cache_size > 0):
        return cache_size
    raise BlobStorageError(
        f'Blob directory {blob_dir}: cache_size {cache_size!r} is not a '
        f'number of bytes above 0 (None: unbounded)')


def open_bucket(object_store):
    """A checked `Bucket` for `object_store` (settings or a Bucket)."""
    from zodbblob.objectstore.bucket import Bucket, ObjectStoreError
    if isinstance(object_store, ObjectStoreSettings):
        bucket = Bucket(object_store)
    elif isinstance(object_store, Bucket):
        bucket = object_store
    else:
        raise BlobStorageError(
            f'object_store {object_store!r:.80}: expected an '
            f'ObjectStoreSettings or a Bucket')
    try:
        bucket.check()
    except ObjectStoreError as e:
        raise BlobStorageError(f'Cannot open the object store: {e}') from e
    return bucket


def open_objects(object_store, journal, fshelper, read_only: bool):
    """The `ObjectStore` of ``object_store = (bucket, cache_size,
    dedup)``, bound to the catalog `journal` (``binding.py``); None
    without one, after refusing a blob directory that is bound to a
    bucket."""
    blob_dir = fshelper.base_dir
    if object_store is None:
        binding.check_unbound(journal, blob_dir)
        return None
    bucket, cache_size, dedup = object_store
    if read_only:
        if journal is None:
            raise BlobStorageError(
                f'Blob directory {blob_dir} has no catalog to read its '
                f'blobs from {describe(bucket.settings)} by')
        binding.check(bucket, journal, blob_dir)
        return ObjectStore(bucket, blob_dir, cache_size, journal)
    session = binding.bind(bucket, journal, fshelper, dedup)
    objects = ObjectStore(bucket, blob_dir, cache_size, journal)
    objects.start_lease(session)
    return objects


def rebuild_from_bucket(object_store, journal, blob_dir: str,
                        reason: str):
    """Rebuild the catalog `journal` of a blob directory on a bucket from
    a listing of its prefix, page by page, under the prefix's marker
    (``binding.adopt``); its `ObjectStore`."""
    bucket, cache_size, dedup = object_store
    binding.adopt(bucket, journal, blob_dir)
    binding.check_keys(bucket, journal, blob_dir, dedup)
    # A writable open like any other: a copy is refused, takeover claims.
    session = claim_writer(bucket, blob_dir, describe(bucket.settings))
    objects = ObjectStore(bucket, blob_dir, cache_size, journal)
    objects.start_lease(session)
    counted = []

    def listed():
        for row in objects.listed():
            counted.append(None)
            yield row
    try:
        journal.rebuild(listed())
    except BaseException:
        objects.close()
        raise
    logger.log(logging.WARNING if counted else logging.DEBUG,
               'Rebuilt the blob catalog of %s from a listing of %s (%s): '
               '%d blob objects', blob_dir, objects.name, reason,
               len(counted))
    return objects


class ObjectStore:
    """The bucket of one storage, its upload threads and its local cache."""

    def __init__(self, bucket, blob_dir: str, cache_size: int | None,
                 journal):
        from zodbblob.cache import BlobCache
        from zodbblob.objectstore.bucket import ObjectMissing, ObjectStoreError
        self.bucket = bucket
        # A content downloaded is checked against its digest.
        bucket.check_content = has_digest
        self.settings = bucket.settings
        self.name = describe(self.settings)
        self.missing = ObjectMissing
        self.failure = ObjectStoreError
        try:
            self.cache = BlobCache(cache_directory(blob_dir), cache_size)
        except (OSError, ValueError) as e:
            # A blob directory on a read-only mount, say: reading needs a
            # place for the downloads.
            raise BlobStorageError(
                f'Cannot open the blob cache {cache_directory(blob_dir)} of '
                f'{self.name}: {getattr(e, "strerror", None) or e}') from None
        self.base = None   # the storage's base, once open
        self.blob_dir = blob_dir
        self._writer = threading.local()   # `as_writer`'s state
        # The writer's lease (``writer.py``), for a writable storage.
        self.session: str | None = None
        self.lost: str | None = None
        self._closing = threading.Event()
        self.journal = journal
        self.pool = concurrent.futures.ThreadPoolExecutor(
            UPLOAD_THREADS, thread_name_prefix='zodbblob-upload')
        # Bound by content (dedup): each content once (``contents.py``).
        self.contents = None
        if binding.by_content(journal):
            self.contents = Contents(self)
            self.contents.journal = journal

    def __repr__(self):
        return f'<ObjectStore {self.name}>'

    def key(self, oid: bytes, tid: bytes) -> str:
        """The key of revision `tid` of `oid` (by content: its pointer)."""
        return blob_key(self.settings.prefix, oid, tid)

    def object_key(self, oid: bytes, tid: bytes) -> str:
        """The key of the bytes of revision `tid` of `oid`: by content,
        its content's, where the catalog knows its digest (else its
        pointer, which a download follows)."""
        if self.contents is not None:
            digest = self.digest(oid, tid)
            if digest is not None:
                return self.contents.key(digest)
        return self.key(oid, tid)

    def digest(self, oid: bytes, tid: bytes) -> bytes | None:
        """By content: the digest of revision `tid` of `oid`, from the
        catalog, else from its pointer; None if there is neither."""
        digest = self.journal.digest(oid, tid)
        if digest is None:
            try:
                digest = self.bucket.read_pointer(self.key(oid, tid))
            except self.failure as e:
                raise StorageError(str(e)) from e
        return digest

    def start_lease(self, session: str) -> None:
        """Renew the writer's record of `session` every LEASE_RENEWAL
        seconds until `close` releases it (``writer.py``)."""
        self.session = session
        self._renewing = threading.Thread(
            target=self._renew_until_closed, name='zodbblob-writer-lease',
            daemon=True)
        self._renewing.start()

    def _renew_until_closed(self) -> None:
        while not self._closing.wait(LEASE_RENEWAL):
            self.renew_lease()

    def renew_lease(self) -> None:
        """Renew the writer's record; once another holds the prefix,
        `lost` says who, and commits are refused (``bucketcommit``)."""
        try:
            lost = renew(self.bucket, self.blob_dir, self.session)
        except Exception as e:
            # A store that is down: the next renewal tries again.
            logger.warning('Could not renew the writer record of %s in %s: '
                           '%s', self.blob_dir, self.name, e)
            return
        if lost is not None and self.lost is None:
            self.lost = lost
            logger.error('Blob directory %s no longer writes %s (%s): stop '
                         'this site; its commits are refused', self.blob_dir,
                         self.name, lost)

    def close(self) -> None:
        self._closing.set()
        if self.session is not None and self.lost is None:
            try:
                # Given up: the next open, anywhere, need not wait.
                renew(self.bucket, self.blob_dir, self.session,
                      released=True)
            except Exception as e:
                logger.warning('Could not release the writer record of %s '
                               'in %s: %s', self.blob_dir, self.name, e)
        self.pool.shutdown()
        try:
            self.cache.close()
        except Exception as e:
            # Closing the storage goes on: its catalog and locks matter.
            logger.warning('Could not close the blob cache %s: %s',
                           self.cache.directory, e)

    def confirm_writer(self) -> None:
        """BlobStorageError (a pack refused) unless this blob directory
        still writes the prefix: a copy of the site may have taken it
        over; StorageError if the bucket cannot say."""
        try:
            confirm_writer(self.bucket, self.blob_dir, self.name)
        except self.failure as e:
            raise StorageError(str(e)) from e
        if getattr(self._writer, 'state', None) == 'unchecked':
            self._writer.state = 'checked'

    def still_writer(self) -> None:
        """Before any delete: ObjectStoreError, as for a bucket that
        refuses the delete (an abort keeps its objects for later),
        unless this blob directory still writes the prefix.  Once for
        all the deletes inside `as_writer`, at the first."""
        state = getattr(self._writer, 'state', None)
        if state == 'checked':
            return
        try:
            confirm_writer(self.bucket, self.blob_dir, self.name)
        except NotTheWriter as e:
            raise self.failure(
                'delete objects in', self.bucket.name, self.bucket.endpoint,
                f'blob directory {self.blob_dir} no longer writes '
                f'{self.settings.prefix or "the bucket"} ({e.said}): stop '
                f'this site') from None
        if state == 'unchecked':
            self._writer.state = 'checked'

    @contextlib.contextmanager
    def as_writer(self):
        """One writer check for the deletes of this thread inside (a
        pack's, a recovery's), made at the first."""
        outer = getattr(self._writer, 'state', None)
        if outer is None:
            self._writer.state = 'unchecked'
        try:
            yield
        finally:
            if outer is None:
                self._writer.state = None

    # commit

    def upload(self, files, tid: bytes, copies, after) -> dict:
        """Upload `files` (``(oid, path)``) and copy `copies` (``(oid,
        source tid)``) to their keys under `tid`, several at once, once
        the future `after` (the commit record's sync) has returned;
        the digests of the uploaded files, by oid.

        Every upload and copy has ended when this returns or raises: an
        abort then deletes whatever they made.
        """
        after.result()
        kill_point('after_upload_record')
        work = [(self._upload, oid, path) for oid, path in files]
        work += [(self._copy, oid, source) for oid, source in copies]
        if len(work) == 1:
            # One upload is made in this thread: a pool's hand-off and
            # wake-up cost more than it saves (``bench/README.md``).
            function, oid, what = work[0]
            digests = dict([function(oid, what, tid)])
            kill_point('after_uploads')
            return digests
        futures = [self.pool.submit(function, oid, what, tid)
                   for function, oid, what in work]
        concurrent.futures.wait(futures)
        digests = {}
        for future in futures:
            oid, digest = future.result()   # the first failure, raised
            digests[oid] = digest
        kill_point('after_uploads')
        return digests

    def _upload(self, oid: bytes, path: str, tid: bytes):
        # Hashed here, where the file is read anyway: the scrubber has no
        # local file to hash later.
        try:
            digest = digest_file(path)
        except OSError:
            digest = None
        self.bucket.upload(path, self.key(oid, tid))
        kill_point('mid_upload')
        return oid, digest

    def _copy(self, oid: bytes, source: bytes, tid: bytes):
        self.bucket.copy(self.key(oid, source), self.key(oid, tid))
        return oid, None

    def admit(self, oid: bytes, tid: bytes, path: str) -> None:
        """Keep a committed file as the cache's local copy (best effort:
        the bucket has it)."""
        try:
            self.cache.admit(oid, tid, path)
        except Exception as e:
            logger.warning('Could not keep blob %s of oid %s in the cache '
                           '%s (%s); it is read from %s', oid_repr(tid),
                           oid_repr(oid), self.cache.directory, e, self.name)

    def admit_copy(self, oid: bytes, source: bytes, tid: bytes,
                   temporary: str) -> None:
        """Keep the cache's copy of revision `source` of `oid`, if it has
        one, as the copy of revision `tid` too (undo's server-side copy:
        the same bytes), through a link at `temporary`."""
        path = self.cache.lookup(oid, source, counted=False)
        if path is None:
            return
        try:
            os.link(path, temporary)
        except OSError:
            return   # evicted meanwhile: the first read downloads it
        self.admit(oid, tid, temporary)

    # reading

    def load(self, oid: bytes, tid: bytes) -> str:
        """The local copy of revision `tid` of `oid`, downloaded at most
        once: POSKeyError if the bucket has none, StorageError (one
        line) if the bucket cannot be reached."""
        keys = []

        def fetch(temporary: str) -> int:
            # Only on a miss: by content, the key asks the catalog.
            keys.append(self.object_key(oid, tid))
            return self.bucket.download(keys[-1], temporary)
        try:
            return self.cache.load(oid, tid, fetch)
        except self.missing:
            key = keys[-1] if keys else self.key(oid, tid)
            raise POSKeyError(f'No blob object {key} in {self.name}',
                              oid, tid) from None
        except self.failure as e:
            raise StorageError(str(e)) from e

    def size(self, oid: bytes, tid: bytes) -> int | None:
        """The size of the object of `tid` of `oid`, None if there is
        none (undo asks, before it copies it)."""
        try:
            return self.bucket.head(self.object_key(oid, tid))
        except self.failure as e:
            raise StorageError(str(e)) from e

    # removing

    def delete(self, pairs) -> None:
        """Delete the objects of `pairs` (``(oid, tid)``), in batches;
        ObjectStoreError if the bucket refused."""
        pairs = list(pairs)
        if pairs:
            self.still_writer()
            self.bucket.delete(self.key(oid, tid) for oid, tid in pairs)
            kill_point('after_object_delete')

    def delete_unless_committed(self, entries) -> None:
        """Delete the objects of `entries` (``(oid, tid, digest)``) an
        abort left, but for a revision the base has: a ZEO client may
        have chosen the aborted tid again, and committed it since."""
        from zodbblob.storage.pack import base_has
        self.delete_uncommitted(
            [(oid, tid) for oid, tid, digest in entries
             if not base_has(self.base, oid, tid)],
            [digest for oid, tid, digest in entries])

    def delete_uncommitted(self, pairs, digests=()) -> None:
        """Delete what uploads of revisions that were never committed
        left (`pairs`): their objects (by content: their pointers, and
        the contents of `digests` no revision needs), and the parts of a
        large file's upload that a failure or a kill cut (not objects:
        no listing shows them, but they are stored)."""
        pairs = list(pairs)
        self.delete(pairs)
        if self.contents is not None:
            self.contents.collect(digests, uncommitted=True)
            return
        self.bucket.abort_uploads(self.key(oid, tid) for oid, tid in pairs)

    def listed(self):
        """``(oid, tid, size)`` of every blob object under the prefix
        (by content: ``(oid, tid, size, digest)``, each pointer read,
        and its content's size asked), page by page (rebuilding a lost
        catalog)."""
        for key, size in self.bucket.iter_keys(self.settings.prefix):
            parsed = parse_blob_key(self.settings.prefix, key)
            if parsed is None:
                continue
            if self.contents is None:
                yield parsed[0], parsed[1], size
                continue
            try:
                digest = self.bucket.read_pointer(key)
            except NotAPointer as e:
                logger.warning('%s; not in the rebuilt catalog', e)
                continue
            size = None if digest is None else self.bucket.head(
                self.contents.key(digest))
            if size is None:
                logger.warning('Blob object %s of %s: its content is gone; '
                               'not in the rebuilt catalog', key, self.name)
                continue
            yield parsed[0], parsed[1], size, digest


def recover_objects(shared, base, latest, in_catalog) -> None:
    """Finish what a crash interrupted on a bucket (``recovery.py`` for
    a blob directory whose blobs are objects).

    `latest` holds the commit log's latest entry of each ``(oid, tid)``
    since the last checkpoint.  A revision the base has was uploaded
    before the base committed (vote waited): its row is written.  One
    the base lacks had its record durable before any upload started, so
    its key is all that can be left: deleted, in batches, before the
    record goes (by content: its pointer, and its content if no row
    needs it).  An aborted revision (None) whose keys an abort deleted
    needs nothing.
    """
    from zodbblob.storage.checkpoint import checkpoint
    from zodbblob.storage.pack import base_has
    objects = shared.objects
    fshelper = shared.fshelper
    rows, doomed, digests, gone, back = [], [], [], [], set()
    for (oid, tid), entry in sorted(latest.items(),
                                    key=lambda item: item[0][::-1]):
        if entry is None:
            continue
        if base_has(base, oid, tid):
            if (oid, tid) not in in_catalog:
                rows.append((oid, tid, entry.size, entry.digest))
            continue
        back.add(tid)
        doomed.append((oid, tid))
        digests.append(entry.digest)
        if entry.staged:
            path = os.path.join(fshelper.temp_dir, entry.staged)
            if os.path.isfile(path):
                os.remove(path)
        if (oid, tid) in in_catalog:
            gone.append((oid, tid))
        kill_point('mid_recovery')
    # The rows first: by content, a content goes only if no row needs
    # it.  Then the deletes, before the records go.
    shared.journal.add(rows)
    shared.journal.remove(gone)
    with objects.as_writer():
        objects.delete_uncommitted(doomed, digests)
    checkpoint(shared)
    for tid in sorted(back):
        logger.warning('Recovered blob directory %s: deleted the blob '
                       'objects of interrupted transaction %s from %s',
                       fshelper.base_dir, oid_repr(tid), objects.name)
    if rows:
        logger.info('Recovered blob directory %s: wrote the catalog rows '
                    'of %d committed blobs from the commit log',
                    fshelper.base_dir, len(rows))
