"""Move a blob directory into a prefix that keeps each content once
(``zodbblob migrate SRC s3://BUCKET/PREFIX --dedup``, issue 16).

Each distinct content is uploaded once, under its digest
(``PREFIX/contents/XX/DIGEST``), and every catalog row gets a pointer
at its own key naming that digest (``objectstore/keys.py``), as a
storage with dedup on a bucket writes them.  A row whose catalog has no
digest yet (committed before zodbblob kept them, or adopted) is hashed
from its file, and the digest recorded in the catalog before the
binding: the storage finds every content by its row's digest.

Resumable: the contents already under the prefix are listed first (into
a temporary table on disk, not a set), and a row whose pointer is there
and whose content was there is not sent again.  A pointer is put beside
its content's upload, not after it: until the binding, which comes
after every request has ended, nothing reads a pointer, and a killed
move finds a pointer whose content is not listed and sends both again.
"""

from __future__ import annotations

import concurrent.futures
import os
import sqlite3

from zodbblob.objectstore import blob_key, content_key
from zodbblob.objectstore.keys import CONTENTS, parse_content_key
from zodbblob.storage.catalog import READ_BATCH, kill_point
from zodbblob.storage.digest import digest_file
from zodbblob.storage.objects import UPLOAD_THREADS


class _Listed:
    """The contents under the prefix, in a temporary database on disk."""

    def __init__(self, bucket):
        prefix = bucket.settings.prefix
        # '' is a private temporary database on disk, removed at close.
        self._db = sqlite3.connect('')
        self._db.execute('CREATE TABLE content (digest BLOB PRIMARY KEY) '
                         'WITHOUT ROWID')
        digests = (parse_content_key(prefix, key) for key, size
                   in bucket.iter_keys(prefix + CONTENTS))
        self._db.executemany('INSERT OR IGNORE INTO content VALUES (?)',
                             ((digest,) for digest in digests
                              if digest is not None))

    def has(self, digest: bytes) -> bool:
        return self._db.execute('SELECT 1 FROM content WHERE digest = ?',
                                (digest,)).fetchone() is not None

    def add(self, digest: bytes) -> None:
        """Note `digest` as there (its upload is under way)."""
        self._db.execute('INSERT OR IGNORE INTO content VALUES (?)',
                         (digest,))

    def close(self) -> None:
        self._db.close()


def upload_by_content(journal, fshelper, bucket, report, progress,
                      merged) -> None:
    """Upload each content of `journal`'s rows once and a pointer per
    row; `merged` is bucketmove's merge of the rows (with digests) and
    the listing of the blob keys."""
    prefix = bucket.settings.prefix
    listed = _Listed(bucket)
    unrecorded = []
    done = 0
    report.contents = 0
    try:
        with concurrent.futures.ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            pending = set()
            for oid, tid, size, digest, there in merged:
                path = fshelper.getBlobFilename(oid, tid)
                if digest is None:
                    if not os.path.isfile(path):
                        report.lost.append(path)
                        continue
                    digest = digest_file(path)
                    unrecorded.append((digest, oid, tid))
                    if len(unrecorded) >= READ_BATCH:
                        journal.record_digests(unrecorded)
                        unrecorded = []
                new = not listed.has(digest)
                if there is not None and not new:
                    report.already += 1
                    continue
                if new:
                    # Another row's file of the same content may give it.
                    if not os.path.isfile(path):
                        report.lost.append(path)
                        continue
                    listed.add(digest)
                    pending.add(pool.submit(
                        _upload_content, bucket, path,
                        content_key(prefix, digest)))
                pending.add(pool.submit(_put_pointer, bucket,
                                        blob_key(prefix, oid, tid), digest))
                if len(pending) >= 4 * UPLOAD_THREADS:
                    finished, pending = concurrent.futures.wait(
                        pending,
                        return_when=concurrent.futures.FIRST_COMPLETED)
                    done += _count(finished, report)
                    if progress is not None:
                        progress(done, done + len(pending))
            done += _count(concurrent.futures.wait(pending).done, report)
            if progress is not None:
                progress(done, done)
        if unrecorded:
            journal.record_digests(unrecorded)
    finally:
        listed.close()


def _upload_content(bucket, path: str, key: str) -> tuple[str, int]:
    size = bucket.upload(path, key)
    kill_point('mid_bucket_move')
    return 'content', size


def _put_pointer(bucket, key: str, digest: bytes) -> tuple[str, int]:
    bucket.put_pointer(key, digest)
    return 'pointer', 0


def _count(finished, report) -> int:
    for future in finished:
        kind, size = future.result()   # the first failure, raised
        if kind == 'content':
            report.contents += 1
            report.bytes += size
        else:
            report.transferred += 1
    return len(finished)
