"""A ZEO ClientStorage whose blob cache is zodbblob's.

``zodbblob.zeo.ClientStorage`` takes every argument ZEO's ``ClientStorage``
takes, plus:

``read_only_blob_dir``
    A read-only mount of the server's blob directory.  Committed blobs are
    read straight from it; writes travel over ZEO; nothing is ever written
    into it.  A blob not (yet) visible there is downloaded into the local
    cache (``blob_dir``) instead of raising ``POSKeyError``.

``blob_download_timeout``
    Seconds after which another process's unfinished download of a blob
    is taken over (default 300).

``object_store``
    The bucket the server's storage keeps committed blobs in (an
    ``ObjectStoreSettings``, or a ``Bucket``; ``<s3>`` in a
    ``<zodbblobclient>`` section).  A blob missing from the cache is
    downloaded from the bucket into the cache, not sent by the server;
    one the bucket does not have is sent by the server, as without it.
    Writes still go through ZEO.  The bucket is checked when the client
    opens.  Needs ``blob_dir``; not with ``shared_blob_dir``.

With ``blob_dir`` (and no ``shared_blob_dir``) the cache is a
``zodbblob.cache.BlobCache``: an index of the cached files, eviction of the
least recently used ones under ``blob_cache_size`` without walking the
directory, and each blob downloaded once across threads and processes.
With ``shared_blob_dir`` the client behaves exactly as ZEO's.

What ZEO's client does and this one changes, method by method:

- ``loadBlob`` / ``openCommittedBlobFile``: the cache's download protocol
  instead of a lock file per 1/997 of all oids held for the whole
  transfer; a file evicted between lookup and open is fetched again.
  A read counts one hit or one miss in the cache's stats, although ZODB
  looks the blob up twice (``loadBlob`` when the connection loads the
  object, then again when the reader opens it or asks for ``committed()``).
- ``receiveBlobStart/Chunk/Stop`` (called by ZEO's I/O thread while the
  server streams a blob): written to the downloader's fresh temporary
  file, never appended to an old partial one.
- ``storeBlob`` takes the file into this process's temporary directory;
  ``tpc_abort`` removes it (ZEO leaves a ``.tmp-`` file per aborted
  commit); ``tpc_finish`` admits it into the cache, counted in its size.
  The object's pickle is sent once, with ``storeBlobEnd`` (ZEO sends it
  with a ``store`` too, and the server writes two data records).
- ``loadBlob``, ``storeBlob`` and ``receiveBlob*`` refuse an oid or serial
  that is not 8 bytes (``zodbblob.layout.check_id``) before any file is
  touched.
- ``temporaryDirectory()``: one directory per transaction, as with
  ``zodbblob.BlobStorage``, so aborted and conflicting transactions leave
  nothing.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import shutil
import threading

import ZEO.ClientStorage
import ZODB.blob
from ZODB.POSException import POSKeyError, StorageError

from zodbblob.cache import BlobCache
from zodbblob.storage.datamanager import TransactionDirectories
from zodbblob.storage.digest import has_digest
from zodbblob.layout import FilesystemHelper
from zodbblob.layout import check_id
from zodbblob.layout import read_marker
from zodbblob.layout import remove_if_exists
from zodbblob.objectstore import blob_key


logger = logging.getLogger(__name__)

_ZEO_PARAMETERS = inspect.signature(ZEO.ClientStorage.ClientStorage.__init__)
_names = itertools.count()


class ClientStorageError(ValueError):
    """The client storage's arguments are wrong, as the message says."""


class _Download:
    """One blob this process is receiving from the server."""

    def __init__(self, path: str):
        self.path = path
        self.file = None
        self.received = False


class BucketReader:
    """Committed blobs read from the bucket of the server's storage."""

    def __init__(self, object_store):
        # boto3 is an extra: imported only by a client given a bucket.
        from zodbblob.objectstore import (Bucket, ObjectStoreError,
                                          ObjectStoreSettings)
        if isinstance(object_store, Bucket):
            self.bucket, self.owned = object_store, False
        elif isinstance(object_store, ObjectStoreSettings):
            self.bucket, self.owned = Bucket(object_store), True
        else:
            raise ClientStorageError(
                'object_store %r: expected ObjectStoreSettings or a Bucket'
                % (object_store,))
        # A content a pointer leads to (dedup) is checked against its
        # digest: damaged or replaced bytes are not handed on.
        self.bucket.check_content = has_digest
        self.prefix = self.bucket.settings.prefix
        self.missing_logged = False
        try:
            self.bucket.check()
        except ObjectStoreError as e:
            self.close()
            raise StorageError(f'ZEO client object store: {e}') from None

    def fetch(self, oid: bytes, serial: bytes, temp_path: str,
              scratch_dir: str) -> bool:
        """Download the blob into `temp_path`; False if the bucket does
        not have it.  Any other failure is one line of StorageError."""
        from zodbblob.objectstore import ObjectMissing, ObjectStoreError
        key = blob_key(self.prefix, oid, serial)
        # Downloaded beside, then renamed over the cache's claim file:
        # that file must exist while the claim holds (a claim without it
        # is taken over), and a download that fails removes its file.  A
        # crash leaves it in the process directory, swept at next open.
        part = os.path.join(scratch_dir, 'bucket-%d.blob' % next(_names))
        try:
            self.bucket.download(key, part)
        except ObjectMissing:
            if not self.missing_logged:
                self.missing_logged = True
                logger.warning(
                    'Blob key %r is not in bucket %r: blobs the bucket does '
                    'not have are sent by the ZEO server (a wrong prefix '
                    'shows as this; logged once)', key, self.bucket.name)
            return False
        except ObjectStoreError as e:
            raise StorageError(
                f'Cannot read blob oid {oid.hex()} serial {serial.hex()}: '
                f'key {key!r} in bucket {e.bucket!r} at {e.endpoint}: '
                f'{e.cause}') from None
        os.replace(part, temp_path)
        return True

    def close(self):
        if self.owned:
            self.bucket.client.close()


class ClientStorage(ZEO.ClientStorage.ClientStorage):
    """ZEO's ClientStorage with zodbblob's blob cache."""

    def __init__(self, addr, *args, read_only_blob_dir: str | None = None,
                 blob_download_timeout: float = 300.0, object_store=None,
                 **kw):
        bound = _ZEO_PARAMETERS.bind(self, addr, *args, **kw)
        bound.apply_defaults()
        options = bound.arguments
        blob_dir = options['blob_dir']
        shared = options['shared_blob_dir']
        check = options['blob_cache_size_check']
        if not 0 <= check < 100:
            raise ClientStorageError(
                'blob_cache_size_check %r is a percent of blob_cache_size '
                'and must be from 0 to 99' % (check,))
        if not blob_download_timeout > 0:
            raise ClientStorageError(
                'blob_download_timeout %r must be a number of seconds '
                'above 0' % (blob_download_timeout,))
        if read_only_blob_dir is not None:
            if shared:
                raise ClientStorageError(
                    'read-only-blob-dir %s and shared-blob-dir cannot be '
                    'used together: with a shared blob directory the '
                    'client writes into it' % read_only_blob_dir)
            if blob_dir is None:
                raise ClientStorageError(
                    'read-only-blob-dir %s needs a blob-dir too: blobs '
                    'not yet visible there are downloaded into it'
                    % read_only_blob_dir)
            read_only_blob_dir = self._check_read_only_dir(read_only_blob_dir)
        if object_store is not None and (blob_dir is None or shared):
            raise ClientStorageError(
                'object_store %r needs a blob_dir with shared_blob_dir off: '
                'blobs read from the bucket are kept in the blob cache'
                % (object_store,))
        # Checked before anything is made: a bucket that cannot be read
        # leaves no blob directory behind.
        self._bucket_reader = (BucketReader(object_store)
                               if object_store is not None else None)
        self.object_store = (self._bucket_reader.bucket
                             if self._bucket_reader is not None else None)
        self._blob_cache = self.blob_cache = None
        self._downloads: dict[tuple[bytes, bytes], _Download] = {}
        self._downloads_lock = threading.Lock()
        # Per thread (a ZODB connection reads in one thread): the oid of
        # the object just loaded, and the blob its load downloaded.
        self._reading = threading.local()
        self._read_only_fshelper = None
        created = blob_dir is not None and not os.path.exists(blob_dir)
        if blob_dir is not None and not shared:
            # Our cache replaces ZEO's: no checker thread walking the
            # directory (ZEO starts one when it is given a size).
            self._blob_cache = self.blob_cache = BlobCache(
                blob_dir, size_limit=options['blob_cache_size'],
                check_percent=check,
                download_timeout=blob_download_timeout)
            options['blob_cache_size'] = None
            self._directories = TransactionDirectories(
                os.path.join(self._blob_cache.directory, 'tmp'))
            for path in self._directories.sweep():
                logger.warning('Removed %s: uncommitted blob files of a '
                               'process that ended', path)
            if read_only_blob_dir is not None:
                self._read_only_fshelper = FilesystemHelper(
                    read_only_blob_dir)
        self.read_only_blob_dir = read_only_blob_dir
        arguments = dict(options)
        arguments.pop('self')
        extra = arguments.pop('kw', None) or {}
        try:
            super().__init__(**arguments, **extra)
        except BaseException:
            if self._bucket_reader is not None:
                self._bucket_reader.close()
            if self._blob_cache is not None:
                self._blob_cache.close()
                self._directories.remove()
            if created:
                # Could not connect: leave no trace of this attempt.
                shutil.rmtree(blob_dir, ignore_errors=True)
            raise
        if self._blob_cache is not None:
            # What ZEO's client shows of its size, as configured (ZEO was
            # given None, so that it starts no thread walking the cache).
            size = self._blob_cache.size_limit
            self._blob_cache_size = size
            if size is not None:
                self._blob_cache_size_check = size * check // 100

    def _check_blob_size(self, bytes=None):
        if self._blob_cache is None:
            return super()._check_blob_size(bytes)
        # Our cache checks its size itself, after each download and
        # commit and on hits while it is over: never ZEO's directory walk.

    @staticmethod
    def _check_read_only_dir(path: str) -> str:
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            raise ClientStorageError(
                'read-only-blob-dir %s is not a directory' % path)
        if read_marker(path) is None and os.listdir(path):
            # ZODB's rule would call it lawn; a mount of a server's blob
            # directory always has its marker.
            raise ClientStorageError(
                'read-only-blob-dir %s has no .layout marker: is it the '
                "server's blob directory?" % path)
        return path

    # reading

    def _check_ids(self, oid, serial) -> tuple[bytes, bytes]:
        where = getattr(self, 'blob_dir', None)
        return check_id(oid, 'oid', where), check_id(serial, 'serial', where)

    def loadBefore(self, oid, tid):
        result = super().loadBefore(oid, tid)
        if self._blob_cache is not None:
            self._reading.loaded_oid = oid
        return result

    def loadBlob(self, oid, serial):
        oid, serial = self._check_ids(oid, serial)
        if self._blob_cache is None:
            return super().loadBlob(oid, serial)
        reading = self._reading
        object_load = getattr(reading, 'loaded_oid', None) == oid
        reading.loaded_oid = None
        if not object_load:
            return self._read_blob(oid, serial)
        # ZODB's connection loads a blob's file with the object, and the
        # reader looks it up again to open it: the reader's lookup is
        # the one counted, or, when this load downloaded the file, this
        # miss is that read's count.
        path = self._read_only_path(oid, serial)
        if path is None:
            path = self._blob_cache.lookup(oid, serial, counted=False)
        if path is None:
            path = self._load(oid, serial, counted=True)
            reading.missed = (oid, serial)
        return path

    def _read_blob(self, oid: bytes, serial: bytes) -> str:
        """The path of a blob a reader reads, counted once per read."""
        path = self._read_only_path(oid, serial)
        if path is not None:
            return path
        reading = self._reading
        counted = getattr(reading, 'missed', None) != (oid, serial)
        reading.missed = None
        return self._load(oid, serial, counted)

    def _read_only_path(self, oid: bytes, serial: bytes) -> str | None:
        if self._read_only_fshelper is not None:
            path = self._read_only_fshelper.getBlobFilename(oid, serial)
            if os.path.exists(path):
                return path
        return None

    def _load(self, oid: bytes, serial: bytes, counted: bool) -> str:
        return self._blob_cache.load(
            oid, serial, lambda temp_path: self._fetch(oid, serial, temp_path),
            counted)

    def _fetch(self, oid: bytes, serial: bytes, temp_path: str) -> None:
        """Download the blob into `temp_path`: from the bucket if there
        is one and it has the blob, else sent by the server."""
        if self._bucket_reader is not None and self._bucket_reader.fetch(
                oid, serial, temp_path,
                self._directories.process_directory()):
            return
        key = (oid, serial)
        download = _Download(temp_path)
        with self._downloads_lock:
            self._downloads[key] = download
        try:
            self._call('sendBlob', oid, serial)
        finally:
            with self._downloads_lock:
                self._downloads.pop(key, None)
            if download.file is not None:
                download.file.close()
        if not download.received:
            raise POSKeyError('No blob file', oid, serial)

    def openCommittedBlobFile(self, oid, serial, blob=None):
        if self._blob_cache is None:
            return super().openCommittedBlobFile(oid, serial, blob)
        oid, serial = self._check_ids(oid, serial)
        self._reading.loaded_oid = None
        path = self._read_blob(oid, serial)
        for attempt in range(3):
            if attempt:
                path = self._read_only_path(oid, serial) or self._load(
                    oid, serial, counted=False)
            try:
                if blob is None:
                    return open(path, 'rb')
                return ZODB.blob.BlobFile(path, 'r', blob)
            except FileNotFoundError:
                # Evicted (by another process) between lookup and open:
                # fetch it again.
                logger.debug('Blob file %s went away before it was opened; '
                             'fetching it again', path)
        raise POSKeyError('Blob file keeps going away', oid, serial)

    # called by ZEO's I/O thread while the server streams a blob; the ids
    # are the server's word, checked before ZEO's own code (a shared blob
    # directory) builds a path from them

    def receiveBlobStart(self, oid, serial):
        oid, serial = self._check_ids(oid, serial)
        if self._blob_cache is None:
            return super().receiveBlobStart(oid, serial)
        download = self._downloads.get((oid, serial))
        if download is None:
            logger.warning('Received blob %r %r that nobody asked for; '
                           'ignored', oid, serial)
            return
        download.file = open(download.path, 'wb')

    def receiveBlobChunk(self, oid, serial, chunk):
        oid, serial = self._check_ids(oid, serial)
        if self._blob_cache is None:
            return super().receiveBlobChunk(oid, serial, chunk)
        download = self._downloads.get((oid, serial))
        if download is not None and download.file is not None:
            download.file.write(chunk)

    def receiveBlobStop(self, oid, serial):
        oid, serial = self._check_ids(oid, serial)
        if self._blob_cache is None:
            return super().receiveBlobStop(oid, serial)
        download = self._downloads.get((oid, serial))
        if download is not None and download.file is not None:
            download.file.close()
            download.file = None
            download.received = True

    # writing

    def temporaryDirectory(self):
        if self._blob_cache is None:
            return super().temporaryDirectory()
        return self._directories.directory()

    def storeBlob(self, oid, serial, data, blobfilename, version, txn):
        oid = check_id(oid, 'oid', self.blob_dir)
        if self._blob_cache is None:
            return super().storeBlob(oid, serial, data, blobfilename,
                                     version, txn)
        tbuf = self._check_trans(txn, 'storeBlob')
        # Own the file from here on, in this process's directory: an
        # abort or a crash leaves it where the next open finds it.
        target = os.path.join(self._directories.process_directory(),
                              'store-%d.blob' % next(_names))
        ZODB.blob.rename_or_copy_blob(blobfilename, target)
        # The pickle travels once, with storeBlobEnd.  ZEO's client also
        # sends it with a store() first, and the server stores both: two
        # data records of the object in the transaction.  Only store()'s
        # local half is kept: the buffer that updates the client's object
        # cache at tpc_finish.
        tbuf.store(oid, data)

        def messages():
            yield ('storeBlobStart', ())
            with open(target, 'rb') as f:
                while True:
                    chunk = f.read(59000)
                    if not chunk:
                        break
                    yield ('storeBlobChunk', (chunk, ))
            yield ('storeBlobEnd', (oid, serial, data, id(txn)))

        self._async_iter(messages())
        tbuf.storeBlob(oid, target)

    def _transaction_blobs(self, txn) -> list[tuple[bytes, str]]:
        try:
            tbuf = txn.data(self)
        except KeyError:
            return []
        return list(getattr(tbuf, 'blobs', None) or ())

    def tpc_finish(self, txn, f=lambda tid: None):
        if self._blob_cache is None:
            return super().tpc_finish(txn, f)
        blobs = self._transaction_blobs(txn)
        if blobs:
            # Taken from ZEO's buffer, so that ZEO does not move them into
            # the cache behind the index's back; we admit them below.
            del txn.data(self).blobs[:]
        try:
            tid = super().tpc_finish(txn, f)
        except BaseException:
            for oid, path in blobs:
                remove_if_exists(path)
            raise
        try:
            for oid, path in blobs:
                self._blob_cache.admit(oid, tid, path)
        finally:
            for oid, path in blobs:
                remove_if_exists(path)   # those admit() did not take
        return tid

    def tpc_abort(self, txn, timeout=None):
        if self._blob_cache is None:
            return super().tpc_abort(txn, timeout)
        blobs = self._transaction_blobs(txn)
        try:
            return super().tpc_abort(txn, timeout)
        finally:
            # The server has seen the abort, so ZEO's I/O thread has sent
            # whatever it was sending from these files.
            for oid, path in blobs:
                remove_if_exists(path)

    def close(self):
        try:
            super().close()
        finally:
            if self._bucket_reader is not None:
                self._bucket_reader.close()
            if self._blob_cache is not None:
                self._blob_cache.close()
                self._directories.remove()
