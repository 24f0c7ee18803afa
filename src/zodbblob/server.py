"""The ZEO server of ``zodbblob serve``: a client's unstored uploads go.

ZEO's server writes each blob a client uploads (``storeBlobStart``,
``storeBlobChunk``, ``storeBlobEnd``) to a temporary file in the storage's
``temporaryDirectory()``, and hands it to ``storeBlob`` only at vote.  A
file that never gets there stayed on the server's disk until the process
stopped: an upload whose ``storeBlobEnd`` never came (the client went away
mid-upload, or its transaction was aborted first), and the file whose
``storeBlob`` refused it before taking it (an oid that is not 8 bytes).
A ZEO client is not trusted, and repeating that fills the disk.

So each connection's handler (`ZEOStorage`, ZEO's own subclassed) keeps the
names of the files it created, and when the transaction is aborted, its
vote fails, an upload call fails, or the connection is lost, it removes
those that are still there: a file that ``storeBlob`` took has left that
name, and is the storage's to remove at its abort.  Only names this
handler made with ``mkstemp`` in the storage's temporary directory are
removed, with ``unlink`` (a symbolic link put there is removed, never
followed).  Everything else is ZEO's ``StorageServer`` unchanged.
"""

from __future__ import annotations

import logging
import os

import ZEO.runzeo
import ZEO.StorageServer
from ZODB.POSException import StorageTransactionError

logger = logging.getLogger(__name__)


class ZEOStorage(ZEO.StorageServer.ZEOStorage):
    """ZEO's per-connection handler, which removes unstored uploads."""

    def __init__(self, server, read_only=0):
        super().__init__(server, read_only)
        self.uploads: dict[str, str] = {}   # path -> directory it is in

    def storeBlobStart(self):
        super().storeBlobStart()
        path = self.blob_tempfile[1]
        self.uploads[path] = os.path.dirname(path)

    def storeBlobChunk(self, chunk):
        if self.blob_tempfile is None:
            raise StorageTransactionError(
                'storeBlobChunk without storeBlobStart (or after its '
                'transaction ended)')
        try:
            super().storeBlobChunk(chunk)
        except BaseException:
            self.remove_uploads()
            raise

    def storeBlobEnd(self, oid, serial, data, id):
        # Refused (no such transaction, say, after an abort that came
        # first): ZEO keeps the file open, and closes the connection
        # without telling this handler when the call was asynchronous.
        try:
            super().storeBlobEnd(oid, serial, data, id)
        except BaseException:
            self.remove_uploads()
            raise

    def _clear_transaction(self):
        # The end of every transaction: tpc_finish, tpc_abort (the client's,
        # or the one for a lost connection) and a failed vote, each after
        # the storage's own abort or finish.
        try:
            super()._clear_transaction()
        finally:
            self.remove_uploads()

    def notify_disconnected(self):
        try:
            super().notify_disconnected()
        finally:
            self.remove_uploads()

    def remove_uploads(self) -> None:
        """Remove this connection's upload files that no storeBlob took,
        the one being uploaded too."""
        if self.blob_tempfile is not None:
            fd = self.blob_tempfile[0]
            self.blob_tempfile = None
            try:
                os.close(fd)
            except OSError:
                pass
        uploads, self.uploads = self.uploads, {}
        for path, directory in uploads.items():
            if os.path.dirname(path) != directory:
                continue   # never anything but the name mkstemp made
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue   # taken by storeBlob, or removed by ZEO
            except OSError as e:
                logger.warning('Could not remove the unstored upload %s: %s',
                               path, e)
                continue
            logger.debug('Removed the unstored upload %s', path)


class StorageServer(ZEO.StorageServer.StorageServer):
    """ZEO's server, with a `ZEOStorage` per connection."""

    def create_client_handler(self):
        return ZEOStorage(self, self.read_only)


def create_server(storages, options) -> StorageServer:
    """runzeo's ``create_server``, making our `StorageServer`."""
    return StorageServer(
        options.address,
        storages,
        read_only=options.read_only,
        client_conflict_resolution=options.client_conflict_resolution,
        msgpack=(options.msgpack if isinstance(options.msgpack, bool)
                 else os.environ.get('ZEO_MSGPACK')),
        invalidation_queue_size=options.invalidation_queue_size,
        invalidation_age=options.invalidation_age,
        transaction_timeout=options.transaction_timeout,
        ssl=options.ssl)
