"""The commit protocol's part for a storage on a bucket (``objects.py``).

`BucketCommit` is mixed into ``commit.CommitProtocol``: undo's
server-side copies, the vote that uploads, the finish that admits the
committed files into the local cache, and the abort that deletes what
was uploaded.
"""

from __future__ import annotations

import logging

from ZODB.POSException import StorageError
from ZODB.utils import oid_repr

from zodbblob.layout import remove_if_exists
from zodbblob.storage.catalog import JournalError, kill_point

logger = logging.getLogger(__name__)


def committed_digest_of(shared, oid: bytes,
                        tid: bytes) -> bytes | None:
    try:
        return shared.journal.digest(oid, tid)
    except JournalError:
        return None


class BucketCommit:
    """What `CommitProtocol` does differently on a bucket."""

    def take_copy(self, oid: bytes, source_tid: bytes, size: int,
                  transaction) -> None:
        """On a bucket: the blob of `oid` in `transaction` is a server-side
        copy of its revision `source_tid` (undo), made at vote."""
        staged = self._stage(transaction)
        path = staged.files.pop(oid, None)
        if path is not None:
            remove_if_exists(path)
        staged.copies[oid] = (source_tid, size)
        if self._shared.objects.contents is not None:
            # By content, the copy is a pointer to the source's content.
            staged.uploaded[oid] = self._shared.objects.digest(oid,
                                                               source_tid)

    def _vote_uploading(self, staged, transaction):
        """Vote on a bucket: log, let the base vote, then upload.

        The record names every key the transaction may create, and is
        durable before the first upload starts; the base votes first, so
        that a conflict costs no upload.  Vote returns once every upload
        has ended: the base commits a transaction whose objects are all
        in the bucket.  A failed upload fails the vote; the abort deletes
        what was uploaded.
        """
        objects = self._shared.objects
        if objects.lost is not None:
            # Another copy of the site holds the prefix: this one's
            # objects would be nobody's.
            raise StorageError(
                f'Could not commit to {objects.name}: blob directory '
                f'{objects.blob_dir} no longer writes it ({objects.lost}); '
                f'stop this site')
        contents = objects.contents
        if contents is not None:
            # The record names each content key the commit may create.
            try:
                staged.uploaded.update(contents.hash(staged.files.items()))
            except OSError as e:
                raise StorageError(f'Could not read the blob file '
                                   f'{e.filename} to commit: '
                                   f'{e.strerror}') from None
        syncing = self._log(staged)
        try:
            result = self.base.tpc_vote(transaction)
            kill_point('after_base_vote')
        except BaseException:
            try:
                syncing.result()
            except OSError:
                pass   # the vote's own error says more
            raise
        staged.uploading = True
        files = [(oid, path) for oid, path, info in staged.stats]
        try:
            if contents is not None:
                staged.claimed = set(staged.uploaded.values())
                new = contents.claim(staged.claimed)
                contents.upload(files, list(staged.copies), staged.tid,
                                staged.uploaded, new, syncing)
            else:
                staged.uploaded = objects.upload(
                    files, staged.tid, [(oid, source) for oid, (source, size)
                                        in staged.copies.items()], syncing)
        except objects.failure as e:
            # One line, and an error a ZEO client can unpickle.
            raise StorageError(
                f'Could not commit transaction {oid_repr(staged.tid)} to '
                f'{objects.name}: {e}') from None
        return result

    def _finished_on_bucket(self, staged) -> None:
        """The rows of a transaction committed on a bucket; its files
        become the cache's local copies (no network call)."""
        shared = self._shared
        rows = [(oid, staged.tid, info.st_size, staged.uploaded.get(oid))
                for oid, path, info in staged.stats]
        rows += [(oid, staged.tid, size, staged.uploaded.get(oid)
                  or committed_digest_of(shared, oid, source))
                 for oid, (source, size) in staged.copies.items()]
        shared.journal.add(rows)
        if staged.claimed is not None:
            # The rows count on the contents now.
            shared.objects.contents.release(staged.claimed)
            staged.claimed = None
        kill_point('after_journal_commit')
        for oid, path, info in staged.stats:
            shared.objects.admit(oid, staged.tid, path)
        for oid, (source, size) in staged.copies.items():
            # The restored revision's bytes are the source's: a link to
            # its local copy, if the cache has one, saves the download.
            shared.objects.admit_copy(oid, source, staged.tid,
                                      self.staging_path())

    def _deleted_uploads(self, staged) -> bool:
        """On a bucket, delete what an aborted transaction uploaded;
        False if the bucket refused: its commit record then stays, so
        that the next checkpoint or open deletes them."""
        objects = self._shared.objects
        if objects is None or not staged.uploading:
            return True
        if staged.claimed is not None:
            objects.contents.release(staged.claimed)
            staged.claimed = None
        oids = [*staged.files, *staged.copies]
        digests = ([staged.uploaded.get(oid) for oid in oids]
                   if objects.contents is not None else [None] * len(oids))
        try:
            objects.delete_uncommitted([(oid, staged.tid) for oid in oids],
                                       digests)
        except objects.failure as e:
            logger.warning('Could not delete the blob objects of aborted '
                           'transaction %s (%s); the next checkpoint or '
                           'open deletes them', oid_repr(staged.tid), e)
            with self._shared.logging:
                self._shared.undeleted.extend(
                    (oid, staged.tid, digest)
                    for oid, digest in zip(oids, digests))
            return False
        return True
