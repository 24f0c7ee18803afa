"""Dedup: a blob file whose content is committed already becomes a link.

Opt-in (``dedup on`` in ``<zodbblob>``, ``BlobStorage(..., dedup=True)``,
``zodbblob serve --dedup``).  When a transaction gives its files their
final names (``CommitProtocol._publish``), each file whose digest and
size equal those of a committed file is published as a hard link to that
file instead: committed blob files are read-only and never change in
place (recovery rewrites a file by renaming a new one over it), so two
names may share an inode, and stock ZODB reads the directory unchanged.

Never two different contents: the catalog's digest only proposes a
file; its bytes are compared with the new file's, through a link taken
first (so the inode compared is the inode published), and a difference
keeps the new copy.  The link is taken under a temporary name in the
staging directory and renamed over the final name, so a crash leaves
the final name absent (recovery gives it the logged bytes), the new
file's or the linked one; a leftover temporary name goes with the
staging directory at the next open.  A link that fails (another
filesystem, the link limit, the file gone meanwhile) keeps the copy,
logged at DEBUG only.

The lookup is one SELECT per file on the catalog's digest index, at
most `CANDIDATES` rows each (``Journal.same_content``); files of one
transaction with equal contents link to the first one published.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os

from zodbblob.layout import check_blob_file, open_blob_file, remove_if_exists
from zodbblob.storage.catalog import JournalError
from zodbblob.storage.killpoints import kill_point

logger = logging.getLogger(__name__)

DEDUP_PREFIX = 'dedup-'
# Committed files tried per new file: equal contents are usually one
# inode already, so the first that can be linked is the one.
CANDIDATES = 8
CHUNK = 1 << 20

_counter = itertools.count()


def same_bytes(first: str, second: str) -> bool:
    """Whether the regular files `first` and `second` hold the same
    bytes; OSError if either cannot be read, NotABlobFile (an OSError) if
    either is no regular file (a symbolic link is not followed, a FIFO
    not waited on)."""
    with open(open_blob_file(first), 'rb') as a, \
            open(open_blob_file(second), 'rb') as b:
        if os.fstat(a.fileno()).st_size != os.fstat(b.fileno()).st_size:
            return False
        while True:
            chunk = a.read(CHUNK)
            if chunk != b.read(CHUNK):
                return False
            if not chunk:
                return True


class Deduplicator:
    """The equal contents of one transaction's files, as it publishes them.

    Made once its files' digests are known (``staged.digests.result()``
    waits for the hashing threads of a large transaction), after the
    record is durable and before the first file gets its final name.
    """

    def __init__(self, shared, staged):
        self._fshelper = shared.fshelper
        self._staging_dir = shared.staging_dir
        self._real_base = os.path.realpath(self._fshelper.base_dir)
        digests = staged.digests.result()
        # Empty files are left alone: a link saves nothing there.
        self._keys = {oid: (digests[oid], info.st_size)
                      for oid, path, info in staged.stats
                      if digests.get(oid) is not None and info.st_size}
        try:
            found = shared.journal.same_content(self._keys.values(),
                                                CANDIDATES)
        except JournalError as e:
            logger.debug('No dedup for transaction %s: %s',
                         staged.tid.hex(), e)
            found = {}
        self._candidates = {
            key: [self._fshelper.getBlobFilename(oid, tid)
                  for oid, tid in pairs]
            for key, pairs in found.items()}

    def publish(self, oid: bytes, path: str, final: str) -> bool:
        """Give `final` the committed file of the same content as the
        staged file `path`, as a hard link; False if there is none, or no
        link could be made (the caller publishes `path` itself)."""
        key = self._keys.get(oid)
        if key is None:
            return False
        for candidate in self._candidates.get(key, ()):
            linked = self._link(candidate, path, final)
            if linked is not False:
                return bool(linked)
        return False

    def published(self, oid: bytes, final: str) -> None:
        """`final` was published with its own copy: the transaction's
        later files of the same content link to it."""
        key = self._keys.get(oid)
        if key is not None:
            candidates = self._candidates.setdefault(key, [])
            if len(candidates) < CANDIDATES:
                candidates.append(final)

    def _check_inside(self, candidate: str) -> None:
        """OSError unless `candidate`'s directory is inside the blob
        directory: a directory of it replaced by a symbolic link must not
        have a file outside linked in."""
        directory = os.path.dirname(candidate)
        inside = os.path.join(self._real_base, os.path.relpath(
            directory, self._fshelper.base_dir))
        if os.path.realpath(directory) != os.path.normpath(inside):
            raise OSError(errno.EXDEV, f'{directory} leads out of the blob '
                                       f'directory')

    def _link(self, candidate: str, path: str, final: str) -> bool | None:
        """Link `candidate` as `final` if its bytes are `path`'s: True if
        linked, False if not, None if `path` is `candidate`'s inode
        already (an undo's link: no other candidate is tried)."""
        temporary = os.path.join(self._staging_dir, '%s%d.blob' % (
            DEDUP_PREFIX, next(_counter)))
        try:
            self._check_inside(candidate)
            check_blob_file(candidate)
            os.link(candidate, temporary)
        except OSError as e:
            # EXDEV, EMLINK, ENOENT (packed meanwhile), no regular file or
            # not inside the blob directory: the copy stays.
            logger.debug('Kept blob file %s as a copy: could not link %s '
                         '(%s)', final, candidate, e.strerror or e)
            return False
        try:
            info = os.lstat(temporary)
            if os.path.samestat(info, os.lstat(path)):
                return None
            if info.st_mode & 0o222 or info.st_uid != os.geteuid():
                # Committed blob files are read-only and ours: one that is
                # writable, or someone else's, may be a name planted for a
                # file outside, whose owner could change what we link.
                logger.debug('Kept blob file %s as a copy: %s is writable '
                             'or not ours', final, candidate)
                return False
            if not same_bytes(temporary, path):
                logger.warning(
                    'Kept blob file %s as a copy: committed blob file %s '
                    'has its digest and size in the catalog but other '
                    'bytes (verify --checksum tells whether it is '
                    'damaged)', final, candidate)
                return False
            kill_point('mid_dedup_link')
            os.replace(temporary, final)
        except OSError as e:
            logger.debug('Kept blob file %s as a copy: could not link it to '
                         '%s (%s)', final, candidate, e.strerror or e)
            return False
        finally:
            remove_if_exists(temporary)
        return True
