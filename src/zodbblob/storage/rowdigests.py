"""The catalog's content digests: a part of `catalog.Journal`.

Looked up for the files undo links and for dedup's equal contents,
recorded by ``verify --checksum`` for rows that had none (NULL: a scan's
rows, an older catalog's); on a bucket with dedup, whether a content
still has a revision that needs it (``contents.py``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable


class RowDigests:
    """The rows' content digests, beside what `Journal` does with rows:
    looked up for the files undo links and for dedup's equal contents,
    recorded by ``verify --checksum`` for rows that had none (NULL: a
    scan's rows, an older catalog's)."""

    def digest(self, oid: bytes, tid: bytes) -> bytes | None:
        """The recorded digest of revision `tid` of `oid`, or None."""
        if not self.has_digest:
            return None
        rows = self._query('SELECT digest FROM blob WHERE oid = ? AND '
                           'tid = ?', (oid, tid))
        return rows[0][0] if rows else None

    def same_content(self, keys: Iterable[tuple[bytes, int]], limit: int
                     ) -> dict[tuple[bytes, int], list[tuple[bytes, bytes]]]:
        """Up to `limit` committed ``(oid, tid)`` of each ``(digest,
        size)`` of `keys` that the catalog has rows of, latest first
        (dedup's candidates).

        One SELECT per key on the digest index, ``LIMIT`` `limit`: a
        content with many names (dedup's links) costs what one with a
        few does.  And the rows still pending in memory, without writing
        them first: a lookup per commit would write a batch per commit.
        """
        keys = set(keys)
        found: dict[tuple[bytes, int], list[tuple[bytes, bytes]]] = {}
        if not self.has_digest or not keys:
            return found
        with self._lock:
            rows = [(row[3], row[2], row[0], row[1])
                    for row in self._unsaved if len(row) > 3]
            try:
                for digest, size in sorted(keys):
                    rows += self._db.execute(
                        'SELECT digest, size, oid, tid FROM blob WHERE '
                        'digest = ? AND size = ? ORDER BY oid DESC, tid '
                        'DESC LIMIT ?', (digest, size, limit)).fetchall()
            except sqlite3.Error as e:
                raise self._failed('read', e) from e
        for digest, size, oid, tid in sorted(rows, key=lambda row: row[3],
                                             reverse=True):
            pairs = found.setdefault((digest, size), [])
            if ((digest, size) in keys and len(pairs) < limit
                    and (oid, tid) not in pairs):
                pairs.append((oid, tid))
        return {key: pairs for key, pairs in found.items() if pairs}

    def without_digest(self, after: tuple[bytes, bytes], limit: int
                       ) -> list[tuple[bytes, bytes]]:
        """Up to `limit` ``(tid, oid)`` of rows without a digest, oldest
        first, after `after` (the scrubber's queue: ``scrub.py``)."""
        return self._query(
            'SELECT tid, oid FROM blob WHERE digest IS NULL AND (tid, oid) '
            '> (?, ?) ORDER BY tid, oid LIMIT ?', (*after, limit))

    def record_digests(self, rows: list[tuple[bytes, bytes, bytes]]) -> int:
        """Record ``(digest, oid, tid)`` for the rows that have no
        digest yet (one that has one keeps it); the count recorded."""
        with self._lock:
            self._save()   # rows still pending in memory, written first
            return self._write(lambda: self._db.executemany(
                'UPDATE blob SET digest = ? WHERE oid = ? AND tid = ? '
                'AND digest IS NULL', rows).rowcount,
                'record %d digests in' % len(rows), synchronous='NORMAL')

    def has_live_rows(self, digest: bytes) -> bool:
        """Whether a row has the content `digest` and no garbage mark:
        a revision that needs it.

        Rows pending in memory are looked at there, not written first
        (a vote asks for each of its contents: it would write a batch
        every commit); none of them has a mark, as pack marks rows it
        read from the database, which writes them first.
        """
        with self._lock:
            if any(len(row) > 3 and row[3] == digest and row[2] is not None
                   for row in self._unsaved):
                return True
            try:
                return self._db.execute(
                    'SELECT 1 FROM blob WHERE digest = ? AND NOT EXISTS '
                    '(SELECT 1 FROM garbage WHERE garbage.oid = blob.oid '
                    'AND garbage.tid = blob.tid) LIMIT 1',
                    (digest,)).fetchone() is not None
            except sqlite3.Error as e:
                raise self._failed('read', e) from e
