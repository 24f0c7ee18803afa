"""One bucket, reached through one boto3 client: `Bucket`.

A thin layer: each method is one S3 request, or one boto3 transfer,
and every failure becomes one `ObjectStoreError` whose one line says
what failed, in which bucket, for which key, at which endpoint, and why
in a few words.  Retries and timeouts are botocore's own (``standard``
mode: exponential backoff with jitter), bounded by the settings, so a
store that is down gives an error after ``attempts`` tries, never a
hang.  boto3 clients are thread-safe: one `Bucket` serves every thread.

boto3 is an extra (``pip install zodbblob[s3]``): it is imported here
and nowhere else, so ``import zodbblob`` works without it.
"""

from __future__ import annotations

import collections
import http.client
import logging
import os
import threading
from collections.abc import Iterable, Iterator

from zodbblob.objectstore.errors import ObjectMissing, ObjectStoreError
from zodbblob.objectstore.keys import POINTER_METADATA
from zodbblob.objectstore.small import SmallObjects
from zodbblob.objectstore.settings import ObjectStoreSettings

try:
    import boto3.session
    import botocore.config
    import botocore.exceptions
    import urllib3.exceptions
    from boto3.s3.transfer import TransferConfig
except ImportError as error:  # pragma: no cover - exercised without boto3
    raise ImportError(
        f'The object store needs boto3, which is not installed '
        f'({error}): pip install zodbblob[s3]') from error

logger = logging.getLogger(__name__)

# Files larger than this go up in parts of PART_SIZE, several at once
# (boto3's TransferConfig); smaller ones in one PutObject.  A PutObject
# is one request where parts are at least three (create, the parts,
# complete): 10 MiB went up in 4 requests with 8 MiB parts, against the
# one of a single PutObject (``bench/README.md``).  16 MiB parts keep a
# 5 GiB blob at 320 parts, far under S3's 10,000.
MULTIPART_THRESHOLD = 64 << 20
PART_SIZE = 16 << 20
# The most keys one DeleteObjects request may name (the S3 API's limit).
DELETE_BATCH = 1000
# The error codes that say the credentials were refused.  A HeadBucket
# answer has no body: a refusal is a bare 403.
ACCESS_DENIED = frozenset({
    'AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch',
    'InvalidToken', 'ExpiredToken', '403'})
NO_SUCH_BUCKET = frozenset({'NoSuchBucket'})
NO_SUCH_KEY = frozenset({'NoSuchKey', '404', 'NotFound'})
# What an If-Match that no longer holds is answered with: the object
# was replaced between two tries of one download.
CHANGED = frozenset({'PreconditionFailed', '412'})
# A download reads the body in pieces of this size.
READ_SIZE = 1 << 20
# What reading a GetObject body raises when the body breaks: botocore's
# wrappings of urllib3's (a reset, a read timeout, a body shorter than
# its Content-Length), and urllib3's or http.client's own where botocore
# lets them through.
BODY_CUTS = (
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.IncompleteReadError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
)


class Bucket(SmallObjects):
    """The bucket of `settings`, through one boto3 client.

    Keys are whole keys (`zodbblob.objectstore.keys` makes them, the
    settings' prefix included).  `multipart_threshold` and `part_size`
    say which files go up in parts, and in parts of what size (tests
    of multipart uploads lower them, to use small files).
    """

    def __init__(self, settings: ObjectStoreSettings,
                 multipart_threshold: int = MULTIPART_THRESHOLD,
                 part_size: int = PART_SIZE):
        self.settings = settings
        # ``(path, digest) -> bool``: whether a downloaded content's
        # bytes hash to the digest of its key (dedup's contents).  The
        # storage and the ZEO client give theirs; None checks nothing.
        self.check_content = None
        self.name = settings.bucket
        config = botocore.config.Config(
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            retries={'total_max_attempts': settings.attempts,
                     'mode': 'standard'},
            s3={'addressing_style': settings.effective_addressing_style},
            # Checksums only where the API requires one: the default
            # since botocore 1.36 (a CRC32 trailer on every upload) is
            # refused by many S3-API servers that are not AWS.
            request_checksum_calculation='when_required',
            response_checksum_validation='when_required',
        )
        # A session of its own: boto3's default session is shared state,
        # and creating clients from one session is not thread-safe.
        session = boto3.session.Session()
        self.client = session.client(
            's3', endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            config=config)
        self.endpoint = self.client.meta.endpoint_url
        self.multipart_threshold = multipart_threshold
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=part_size)
        # Requests by operation name, every try counted: botocore emits
        # before-send once per try (its retries included), where
        # before-call comes once per call however often it is tried.
        # ``transferred`` counts bytes: ``'up'`` the bodies sent (each
        # try), ``'down'`` the GetObject bodies `download` read.
        self.requests = collections.Counter()
        self.transferred = collections.Counter()
        self._counting = threading.Lock()
        self.client.meta.events.register(
            'before-send.s3', self._count_request,
            unique_id=f'zodbblob-count-{id(self)}')

    def __repr__(self):
        return f'<Bucket {self.name!r} at {self.endpoint}>'

    def _count_request(self, request, event_name: str, **kwargs):
        operation = event_name.rsplit('.', 1)[-1]
        length = int(request.headers.get('Content-Length') or 0)
        # Counter's += is a read and a write: the lock keeps the threads
        # of a multipart upload (and of the storage's vote) from losing
        # counts.
        with self._counting:
            self.requests[operation] += 1
            self.transferred['up'] += length

    def _count_down(self, length: int):
        with self._counting:
            self.transferred['down'] += length

    def error(self, what: str, error: Exception, key: str | None = None,
              missing: type[ObjectStoreError] = ObjectStoreError
              ) -> ObjectStoreError:
        """The `ObjectStoreError` for `error`, raised by boto3 while
        doing `what` (a verb phrase: ``'upload'``)."""
        cause, error_class = self.describe(error, key)
        if error_class is None:
            error_class = ObjectStoreError
        elif error_class is ObjectMissing:
            error_class = missing
        return error_class(what, self.name, self.endpoint, cause, key)

    def describe(self, error: Exception, key: str | None):
        """``(cause in a few words, ObjectMissing or None)``."""
        # boto3's transfers may wrap the botocore error they met.
        while (not isinstance(error, (botocore.exceptions.ClientError,
                                      botocore.exceptions.BotoCoreError))
               and error.__cause__ is not None):
            error = error.__cause__
        settings = self.settings
        tries = (f'{settings.attempts} tries' if settings.attempts > 1
                 else '1 try')
        if isinstance(error, botocore.exceptions.ClientError):
            code = str(error.response.get('Error', {}).get('Code', ''))
            if code in ACCESS_DENIED:
                return 'access denied (wrong credentials?)', None
            if code in NO_SUCH_BUCKET or (key is None and code == '404'):
                return 'no such bucket', None
            if code in NO_SUCH_KEY:
                return 'no such key', ObjectMissing
            message = error.response.get('Error', {}).get('Message', '')
            return f'{code} {message}'.strip(), None
        if isinstance(error, (botocore.exceptions.ConnectTimeoutError,
                              botocore.exceptions.ReadTimeoutError)):
            limit = (settings.connect_timeout if isinstance(
                error, botocore.exceptions.ConnectTimeoutError)
                else settings.read_timeout)
            return f'timed out after {tries} of {limit} s each', None
        if isinstance(error, botocore.exceptions.ConnectionClosedError):
            return f'connection closed before an answer, after {tries}', None
        if isinstance(error, botocore.exceptions.EndpointConnectionError):
            return f'cannot connect to {self.endpoint} after {tries}', None
        if isinstance(error, botocore.exceptions.NoCredentialsError):
            return ('no credentials (give access_key_id and '
                    'secret_access_key, or set up boto3\'s chain)'), None
        first_line = (str(error).splitlines() or [''])[0]
        return f'{type(error).__name__}: {first_line}', None

    def check(self) -> None:
        """Raise `ObjectStoreError` unless the bucket is there and the
        credentials may use it (one HeadBucket; called at open)."""
        try:
            self.client.head_bucket(Bucket=self.name)
        except Exception as error:
            raise self.error('reach', error) from error

    def upload(self, path: str, key: str) -> int:
        """Store the file `path` under `key`; return its size.

        A file of the bucket's multipart threshold or more goes up in
        parts, several at once; the object appears whole or not at all (S3 makes an
        object visible only when its upload completes).
        """
        # The file is opened apart from the transfer: botocore's timeouts
        # are OSErrors too (through requests' exceptions), and must not
        # read as the file's.
        try:
            f = open(path, 'rb')
        except OSError as error:
            raise ObjectStoreError(
                f'upload {path} to', self.name, self.endpoint,
                error.strerror or str(error), key) from error
        with f:
            size = os.fstat(f.fileno()).st_size
            try:
                if size < self.multipart_threshold:
                    # The PutObject boto3's transfer would make, without
                    # its manager and threads (0.9 ms of CPU less per
                    # upload here).  botocore rewinds the file to try
                    # again.
                    self.client.put_object(Bucket=self.name, Key=key,
                                           Body=f)
                else:
                    self.client.upload_fileobj(
                        f, self.name, key, Config=self.transfer_config)
            except Exception as error:
                raise self.error(f'upload {path} to', error, key) from error
        return size

    def download(self, key: str, path: str, check: bool = True) -> int:
        """Write the object `key` to the new file `path`, and nothing
        else; return its size.  The caller gives a temporary name and
        renames it when this returns (readers never see partial bytes).
        On failure `path` is removed.  A missing key raises
        `ObjectMissing`.

        A body that breaks (a reset, a read timeout, a server gone, a
        body shorter than its Content-Length) is asked for again, up to
        ``attempts`` GetObjects in all, from the bytes already written
        (a Range request) if the object is the one begun (If-Match its
        ETag), else from the start; botocore retries each GetObject
        that gets no answer, as any request.

        A pointer (dedup's: ``keys.py``) is followed once, to the
        content it names under this bucket's prefix: the file gets the
        content's bytes.
        """
        try:
            with open(path, 'wb') as f:
                try:
                    return self._fetch(key, path, f, follow=True,
                                       check=check)
                except BaseException:
                    os.unlink(path)
                    raise
        except OSError as error:
            raise ObjectStoreError(
                f'download to {path}', self.name, self.endpoint,
                error.strerror or str(error), key) from error

    def _fetch(self, key: str, path: str, f, follow: bool,
               check: bool = True) -> int:
        """The GetObjects of `download`, into the open file `f`."""
        written = 0
        size = etag = None
        tries = 0
        cut_at = None  # (bytes written, size) at the last cut
        while True:
            tries += 1
            request = {'Bucket': self.name, 'Key': key}
            if etag is not None:
                request['IfMatch'] = etag
                if written:
                    request['Range'] = f'bytes={written}-'
            try:
                response = self.client.get_object(**request)
            except Exception as error:
                if etag is not None and self.code(error) in CHANGED:
                    # Replaced since the first try: what is written is
                    # of another object.  Start over, on the new one.
                    logger.debug('download of %r: the object changed; '
                                 'starting over', key)
                    f.seek(0)
                    f.truncate()
                    written = 0
                    size = etag = None
                    if tries < self.settings.attempts:
                        continue
                cause, error_class = self.describe(error, key)
                if cut_at is not None:
                    cause = (f'{cause}, on try {tries} after a cut at '
                             f'{cut_at[0]} of {cut_at[1]} bytes')
                raise (error_class or ObjectStoreError)(
                    f'download to {path}', self.name, self.endpoint,
                    cause, key) from error
            if etag is None:
                pointer = response.get('Metadata', {}).get(POINTER_METADATA)
                if pointer is not None:
                    response['Body'].close()
                    return self._fetch(self._pointed(key, path, pointer,
                                                     follow),
                                       path, f, follow=False, check=check)
                etag, size = response['ETag'], response['ContentLength']
            elif written and not response.get('ContentRange', '').startswith(
                    f'bytes {written}-'):
                # The Range was not honoured: the body is the whole
                # object again.
                f.seek(0)
                f.truncate()
                written = 0
            cut = None
            body = response['Body']
            try:
                while True:
                    try:
                        data = body.read(READ_SIZE)
                    except BODY_CUTS as error:
                        cut = error
                        break
                    if not data:
                        break
                    f.write(data)
                    written += len(data)
                    self._count_down(len(data))
            finally:
                body.close()
            if written == size:
                # A break after the last byte cuts nothing.
                if check:
                    self._check_content(key, path, f)
                return size
            cut_at = (written, size)
            logger.debug('download of %r: cut after %d of %d bytes '
                         '(try %d): %r', key, written, size, tries, cut)
            if written > size or tries >= self.settings.attempts:
                raise ObjectStoreError(
                    f'download to {path}', self.name, self.endpoint,
                    f'cut after {written} of {size} bytes, {tries} tries',
                    key) from cut

    @staticmethod
    def code(error: Exception) -> str:
        """The S3 error code of a ClientError, else ``''``."""
        if isinstance(error, botocore.exceptions.ClientError):
            return str(error.response.get('Error', {}).get('Code', ''))
        return ''

    def head(self, key: str) -> int | None:
        """The size of the object `key`, or None if there is none."""
        response = self.head_response(key)
        return None if response is None else response['ContentLength']

    def copy(self, source_key: str, target_key: str) -> None:
        """Copy the object `source_key` to `target_key` inside the
        server (one CopyObject: the bytes do not come here).

        CopyObject takes objects of up to 5 GiB; a larger one would need
        a multipart copy (UploadPartCopy), which is not needed now: blobs
        that large are not expected.  A missing source raises
        `ObjectMissing`.
        """
        try:
            self.client.copy_object(
                Bucket=self.name, Key=target_key,
                CopySource={'Bucket': self.name, 'Key': source_key})
        except Exception as error:
            raise self.error(f'copy {source_key!r} to', error, target_key,
                             ObjectMissing) from error

    def delete(self, keys: Iterable[str]) -> int:
        """Delete `keys` in DeleteObjects requests of at most
        `DELETE_BATCH` keys; return how many requests were made.

        A key that is not there is not an error (S3 says it deleted
        it).  Keys the server refuses are counted over all the batches,
        the others deleted meanwhile; then one `ObjectStoreError` names
        the first refused key and how many were refused.
        """
        requests = 0
        refused = []
        batch = []
        for key in keys:
            batch.append(key)
            if len(batch) == DELETE_BATCH:
                refused.extend(self._delete_batch(batch))
                requests += 1
                batch = []
        if batch:
            refused.extend(self._delete_batch(batch))
            requests += 1
        if refused:
            first = refused[0]
            raise ObjectStoreError(
                'delete', self.name, self.endpoint,
                f'{len(refused)} keys refused, the first with '
                f'{first.get("Code")} {first.get("Message", "")}'.strip(),
                first.get('Key'))
        return requests

    def _delete_batch(self, keys: list[str]) -> list[dict]:
        try:
            response = self.client.delete_objects(
                Bucket=self.name,
                Delete={'Objects': [{'Key': key} for key in keys],
                        'Quiet': True})
        except Exception as error:
            raise self.error(f'delete {len(keys)} keys from', error,
                             None) from error
        return response.get('Errors', [])

    def iter_keys(self, prefix: str | None = None,
                  page_size: int = 1000) -> Iterator[tuple[str, int]]:
        """``(key, size)`` of every object whose key starts with
        `prefix` (the settings' prefix when None), in key order.

        One ListObjectsV2 page of at most `page_size` keys is held at a
        time: a bucket of millions of keys is never one list here.
        """
        if prefix is None:
            prefix = self.settings.prefix
        pages = self.client.get_paginator('list_objects_v2').paginate(
            Bucket=self.name, Prefix=prefix,
            PaginationConfig={'PageSize': page_size})
        try:
            for page in pages:
                for item in page.get('Contents', ()):
                    yield item['Key'], item['Size']
        except Exception as error:
            raise self.error('list', error) from error

    def abort_uploads(self, keys: Iterable[str] | None) -> int:
        """Abort the unfinished multipart uploads to `keys` (None: every
        one under the settings' prefix); return how many.

        A process killed while it uploaded a large file in parts leaves
        the parts in the bucket (not an object: no listing shows them,
        but they are stored) until someone aborts the upload.  One paged
        listing of the unfinished uploads under the settings' prefix
        (there are few: each is a killed upload), then an abort each.
        """
        if keys is not None:
            keys = set(keys)
            if not keys:
                return 0
        aborted = 0
        pages = self.client.get_paginator('list_multipart_uploads').paginate(
            Bucket=self.name, Prefix=self.settings.prefix)
        try:
            for page in pages:
                for upload in page.get('Uploads', ()):
                    if keys is None or upload['Key'] in keys:
                        self.client.abort_multipart_upload(
                            Bucket=self.name, Key=upload['Key'],
                            UploadId=upload['UploadId'])
                        aborted += 1
        except Exception as error:
            raise self.error('abort the unfinished uploads in', error) from error
        return aborted
