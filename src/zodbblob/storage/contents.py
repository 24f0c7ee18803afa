"""Dedup on a bucket: each content once, under its digest (issue 16).

A storage bound to its prefix by content (``binding.py``) keeps a
revision's bytes under ``content_key(prefix, digest)`` and, at the
revision's own key, a pointer naming the digest (``keys.py``), which is
how a ZEO client reading the bucket, or a listing rebuilding a lost
catalog, finds the content.  A commit hashes its files before it writes
its record, so that the record names every key it may create, pointers
and contents; it uploads a content only when no revision the catalog
holds has it, and a pointer for every blob.

A content is deleted when no revision needs it: no catalog row without a
garbage mark has its digest, and no transaction between its vote and
its end counts on it.  That decision and vote's ("the bucket has it,
no upload") are taken under one lock, so that a pack never deletes a
content a vote has just decided to rely on; pack removes its garbage
rows before it lets the lock go.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading

from zodbblob.objectstore import content_key
from zodbblob.storage.catalog import kill_point
from zodbblob.storage.digest import digest_file


class Contents:
    """The contents of one storage on a bucket with dedup."""

    def __init__(self, objects):
        self.objects = objects
        self.journal = None   # the catalog, once open
        self.lock = threading.Lock()
        # Digests that transactions between vote and end count on.
        self.pending: collections.Counter = collections.Counter()

    def key(self, digest: bytes) -> str:
        return content_key(self.objects.settings.prefix, digest)

    def hash(self, files) -> dict:
        """The digests of `files` (``(oid, path)``), by oid, hashed
        several at once."""
        futures = [(oid, self.objects.pool.submit(digest_file, path))
                   for oid, path in files]
        return {oid: future.result() for oid, future in futures}

    def claim(self, digests) -> set:
        """Count on the contents `digests` until `release`; those the
        bucket must be given (no revision has them yet)."""
        digests = set(digests)
        with self.lock:
            new = {digest for digest in digests
                   if not self.journal.has_live_rows(digest)}
            self.pending.update(digests)
        return new

    def release(self, digests) -> None:
        """A transaction's end: it counts on `digests` no more."""
        with self.lock:
            for digest in set(digests):
                self.pending[digest] -= 1
                if self.pending[digest] <= 0:
                    del self.pending[digest]

    def upload(self, files, copies, tid: bytes, digests: dict, new: set,
               after) -> None:
        """Once the future `after` (the record's sync) has returned:
        upload the contents `new` (from the first of `files`, ``(oid,
        path)``, that has each) and a pointer for each oid of `files`
        and `copies` under `tid`; every request has ended when this
        returns or raises."""
        after.result()
        kill_point('after_upload_record')
        objects = self.objects
        sources = {}
        for oid, path in files:
            sources.setdefault(digests[oid], path)
        for oid in copies:
            if digests[oid] in new and digests[oid] not in sources:
                # An undo of a revision whose content a pack took since.
                raise objects.failure(
                    f'copy revision of oid {oid.hex()} to', objects.bucket.name,
                    objects.bucket.endpoint, 'its content is gone',
                    objects.key(oid, tid))
        futures = [objects.pool.submit(self._upload, path, digest)
                   for digest, path in sources.items() if digest in new]
        futures += [objects.pool.submit(objects.bucket.put_pointer,
                                        objects.key(oid, tid), digests[oid])
                    for oid in [*(oid for oid, path in files), *copies]]
        concurrent.futures.wait(futures)
        for future in futures:
            future.result()   # the first failure, raised
        kill_point('after_uploads')

    def _upload(self, path: str, digest: bytes) -> None:
        self.objects.bucket.upload(path, self.key(digest))
        kill_point('mid_upload')

    def collect(self, digests, then=None, uncommitted=False) -> None:
        """Delete the contents of `digests` that no revision needs and
        no transaction counts on (with `uncommitted`, an abort's or a
        recovery's, their cut multipart uploads too); then call `then`
        (pack's removal of its garbage rows), under the lock that vote's
        `claim` takes."""
        digests = {digest for digest in digests if digest is not None}
        with self.lock:
            doomed = [self.key(digest) for digest in sorted(digests)
                      if not self.pending.get(digest)
                      and not self.journal.has_live_rows(digest)]
            if doomed:
                self.objects.still_writer()
                self.objects.bucket.delete(doomed)
                if uncommitted:
                    self.objects.bucket.abort_uploads(doomed)
                kill_point('after_object_delete')
            if then is not None:
                then()
