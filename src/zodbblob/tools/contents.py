"""How many contents the blob files of a directory walk hold, and what
links save: ``verify``'s counts for a store with dedup.

A file is a *link* when another name of the walk was its inode already
(dedup, or an undo, linked it): its bytes are on disk once.  With
``--checksum``, every file's digest is known, and a file whose digest an
earlier file of the walk had is a *copy* of that content: links are
copies that cost nothing; the other copies are what dedup did not save
(files committed before it was on, or without it).  Without digests,
each inode counts as a content: at most that many unique contents.

Streamed as verify is: inodes with more than one name, and digests, go
to tables of verify's temporary database on disk, not to sets.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3

from zodbblob.storage.digest import DIGEST_NAME


@dataclasses.dataclass
class Contents:
    """What a walk's files hold; `add` each file as the walk reads it."""

    files: int = 0
    links: int = 0           # files whose inode an earlier name had
    link_bytes: int = 0
    copies: int | None = None  # with digests: files of an earlier content
    copy_bytes: int = 0
    _db: sqlite3.Connection | None = dataclasses.field(default=None,
                                                       repr=False)

    def open(self, db: sqlite3.Connection) -> None:
        """Keep the tables in `db` (a temporary database of verify's)."""
        self._db = db
        db.execute('CREATE TABLE inode (dev INTEGER, ino INTEGER, '
                   'PRIMARY KEY (dev, ino)) WITHOUT ROWID')
        db.execute('CREATE TABLE content (digest BLOB PRIMARY KEY) '
                   'WITHOUT ROWID')

    def _first(self, table: str, key: tuple) -> bool:
        return bool(self._db.execute(
            f'INSERT OR IGNORE INTO {table} VALUES '
            f'({", ".join("?" * len(key))})', key).rowcount)

    def add(self, info: os.stat_result, digest: bytes | None) -> None:
        """Count one file of the walk: its stat, and its digest if read."""
        self.files += 1
        # Only an inode with other names can have been seen before.
        if info.st_nlink > 1 and not self._first(
                'inode', (info.st_dev, info.st_ino)):
            self.links += 1
            self.link_bytes += info.st_size
        if digest is not None:
            if self.copies is None:
                self.copies = 0
            if not self._first('content', (digest,)):
                self.copies += 1
                self.copy_bytes += info.st_size

    def line(self) -> str | None:
        """verify's line about them; None when every file is its own
        content (nothing to say)."""
        if self.copies is None:
            if not self.links:
                return None
            return ('contents: %d blob files, at most %d unique contents '
                    '(an inode each; --checksum counts them); links save '
                    '%d bytes' % (self.files, self.files - self.links,
                                  self.link_bytes))
        if not self.copies:
            return None
        return ('contents: %d blob files, %d unique contents (by %s); links '
                'save %d bytes, %d more bytes are copies of a content '
                'another file holds' % (
                    self.files, self.files - self.copies, DIGEST_NAME,
                    self.link_bytes, self.copy_bytes - self.link_bytes))
