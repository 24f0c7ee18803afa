"""Check a storage on a bucket that keeps each content once (dedup).

Such a prefix holds, at each revision's key (``PREFIX/OID/TID.blob``),
a pointer naming its content's digest, and each content once under
``PREFIX/contents/XX/DIGEST`` (``objectstore/keys.py``).  The questions
``verifybucket.py`` asks of a prefix by oid and tid become: every blob
record has its pointer and every pointer its record (else an orphan);
every catalog row's content is there with the row's size; every content
is named by a row (else an orphan: nothing needs it).  With
``checksum``, each pointer is read (one HeadObject: a pointer naming
another digest than its row's is a problem, a row without a digest
takes the pointer's where the storage is open for writing), and each
content is downloaded once and its bytes hashed to its key's digest.

Streamed as the rest of verify: the contents listed, and those the
rows name, go to tables of verify's temporary database on disk.
Beside a live storage, a content that a transaction between its vote
and its end uploaded is named by that transaction's record in the
commit log, read after the listing and before the rows: a record leaves
the log only after its rows are written.
"""

from __future__ import annotations

import os

from ZODB.utils import oid_repr

from zodbblob.objectstore import content_key, parse_blob_key
from zodbblob.objectstore.keys import CONTENTS, parse_content_key
from zodbblob.storage.binding import own_keys
from zodbblob.storage.commitlog import CommitLog, commit_log_path
from zodbblob.storage.digest import DIGEST_NAME


def check_contents(storage, report, records, catalog, digests, checksum,
                   progress, live: bool, seen_up_to: bytes) -> None:
    """Fill `report` for the storage on a bucket by content; `catalog`
    is verify's ``_Catalog`` (closed by the caller)."""
    from zodbblob.tools.verifybucket import LIST_PAGE, _download_digest
    objects = storage.object_store
    prefix = objects.settings.prefix
    bucket_url = f's3://{objects.settings.bucket}/'
    db = records.database
    db.execute('CREATE TABLE listed (digest BLOB PRIMARY KEY, size INTEGER)'
               ' WITHOUT ROWID')
    db.execute('CREATE TABLE named (digest BLOB, size INTEGER, oid BLOB, '
               'tid BLOB)')
    db.execute('CREATE TABLE logged (digest BLOB PRIMARY KEY) WITHOUT ROWID')
    sizes = catalog.sizes()
    total = report.records
    done = 0
    own = own_keys(objects.bucket)
    for key, size in objects.bucket.iter_keys(prefix, page_size=LIST_PAGE):
        where = bucket_url + key
        digest = parse_content_key(prefix, key)
        if digest is not None:
            db.execute('INSERT INTO listed VALUES (?, ?)', (digest, size))
            if checksum:
                actual = _download_digest(storage, objects, key, where,
                                          report)
                if actual is not None and actual != digest:
                    report.content_mismatches.append((where, actual))
            continue
        if key.startswith(prefix + CONTENTS):
            report.orphans.append(where)   # no content's key: nobody's
            continue
        rest = key[len(prefix):]
        if key in own or rest.count('/') > 1:
            continue   # the marker, the writer; a nested prefix's
        done += 1
        report.files = done
        parsed = parse_blob_key(prefix, key)
        if parsed is None:
            report.orphans.append(where)
            continue
        oid, tid = parsed
        if not records.strike(oid, tid) and tid <= seen_up_to:
            report.orphans.append(where)
        row = sizes.get(oid, tid)
        if checksum and row is not None:
            _check_pointer(objects, report, digests, db, row, key, where)
        if progress is not None:
            progress(done, max(total, done))
    digests.record()
    for oid, tid in records.left():
        report.missing.append((oid, tid, bucket_url + objects.key(oid, tid)))
    if live:
        _logged(storage, db)
    for batch in catalog._rows():
        db.executemany('INSERT INTO named VALUES (?, ?, ?, ?)',
                       [(digest, size, oid, tid)
                        for oid, tid, size, digest in batch
                        if digest is not None])
    _compare(db, report, prefix, bucket_url)


def _check_pointer(objects, report, digests, db, row, key, where) -> None:
    """Read the pointer `key` of the catalog row `row`: the digest it
    names must be the row's."""
    oid, tid, size, recorded = row
    try:
        named = objects.bucket.read_pointer(key)
    except objects.failure as e:
        report.unreadable.append((where, str(e)))
        return
    if named is None:
        return   # deleted since it was listed (a pack beside us)
    if recorded is None:
        # The row's content is the one its pointer names.
        digests.compare(row, where, named, size)
        db.execute('INSERT INTO named VALUES (?, ?, ?, ?)',
                   (named, size, oid, tid))
    elif named != recorded:
        report.pointer_mismatches.append((oid, tid, where, named, recorded))


def _logged(storage, db) -> None:
    """The digests the commit log's records name: contents of
    transactions between their vote and their end."""
    path = commit_log_path(storage.fshelper.base_dir)
    if not os.path.exists(path):
        return
    log = CommitLog(path, read_only=True)
    try:
        records = log.records
    finally:
        log.close()
    db.executemany('INSERT OR IGNORE INTO logged VALUES (?)',
                   [(entry.digest,) for record in records
                    for entry in record.entries
                    if entry.digest is not None])


def _compare(db, report, prefix: str, bucket_url: str) -> None:
    """The rows' contents against the listing's."""
    def where(digest):
        return bucket_url + content_key(prefix, digest)
    resized = set()
    for digest, size, oid, tid, listed in db.execute(
            'SELECT named.digest, named.size, oid, tid, listed.size '
            'FROM named LEFT JOIN listed USING (digest) '
            'WHERE listed.size IS NULL OR listed.size != named.size '
            'ORDER BY oid, tid'):
        if listed is None:
            report.missing.append((oid, tid, where(digest)))
        elif digest not in resized:   # once, however many rows name it
            resized.add(digest)
            report.size_mismatches.append((where(digest), size, listed))
    for digest, in db.execute(
            'SELECT digest FROM listed WHERE digest NOT IN '
            '(SELECT digest FROM named WHERE digest IS NOT NULL) '
            'AND digest NOT IN (SELECT digest FROM logged) ORDER BY digest'):
        report.orphans.append(where(digest))
    report.unique_contents = db.execute(
        'SELECT COUNT(*) FROM listed').fetchone()[0]


def mismatch_lines(report) -> list[str]:
    """verify's lines about pointers and contents whose bytes are not
    what they should be."""
    lines = []
    for oid, tid, path, named, recorded in report.pointer_mismatches:
        lines.append('pointer mismatch: blob of oid %s tid %s: %s names '
                     'content %s, the catalog recorded %s'
                     % (oid_repr(oid), oid_repr(tid), path, named.hex(),
                        recorded.hex()))
    for path, actual in report.content_mismatches:
        lines.append("checksum mismatch: content %s has %s %s, not its "
                     "key's digest" % (path, DIGEST_NAME, actual.hex()))
    return lines


def contents_line(report) -> str:
    return ('contents: %d blob objects point to %d unique contents in the '
            'bucket (each kept once)' % (report.files,
                                         report.unique_contents))
