"""Small objects beside the blobs: a prefix's marker and writer, dedup's
pointers, and the check of a content downloaded (a part of
`bucket.Bucket`)."""

from __future__ import annotations

import email.utils
import json

from zodbblob.objectstore.errors import (
    NotAPointer,
    ObjectMissing,
    ObjectStoreError,
)
from zodbblob.objectstore.keys import (
    POINTER_METADATA,
    parse_content_key,
    pointer_body,
    pointer_target,
)

# The most bytes `get_bytes` reads (a prefix's marker is tens of bytes).
SMALL_OBJECT = 64 << 10


def _age(response) -> float | None:
    """Seconds from an answer's object's Last-Modified to its Date."""
    modified = response.get('LastModified')
    date = response.get('ResponseMetadata', {}).get('HTTPHeaders', {}).get(
        'date')
    if modified is None or date is None:
        return None
    try:
        return (email.utils.parsedate_to_datetime(date)
                - modified).total_seconds()
    except (TypeError, ValueError):
        return None


class SmallObjects:
    """Reads and writes of objects small enough to hold in memory; the
    requests, errors and names are `Bucket`'s."""

    def _pointed(self, key: str, path: str, pointer: str,
                 follow: bool) -> str:
        """The content key the pointer `key` names, checked."""
        try:
            if not follow:
                raise ValueError('a pointer to a pointer')
            return pointer_target(self.settings.prefix, pointer)
        except ValueError as error:
            raise ObjectStoreError(
                f'download to {path}', self.name, self.endpoint,
                f'a pointer naming no content ({error})', key) from None

    def _check_content(self, key: str, path: str, f) -> None:
        """A content key's bytes hash to its digest (`check_content`,
        where the caller gave one): else the object is damaged or was
        replaced, and is not handed on."""
        digest = parse_content_key(self.settings.prefix, key)
        if digest is None or self.check_content is None:
            return
        f.flush()
        if not self.check_content(path, digest):
            raise ObjectStoreError(
                f'download to {path}', self.name, self.endpoint,
                'its bytes do not hash to the digest its key names '
                '(damaged, or replaced)', key)

    def put_pointer(self, key: str, digest: bytes) -> None:
        """Store at `key` a pointer to the content `digest` (dedup)."""
        body = pointer_body(digest)
        try:
            self.client.put_object(
                Bucket=self.name, Key=key, Body=body,
                Metadata={POINTER_METADATA: body.decode('ascii').strip()})
        except Exception as error:
            raise self.error('write', error, key) from error

    def head_response(self, key: str) -> dict | None:
        """The HeadObject answer for `key`, or None if there is no
        object (``head``'s size, a pointer's metadata)."""
        try:
            return self.client.head_object(Bucket=self.name, Key=key)
        except Exception as error:
            raised = self.error('look up', error, key, ObjectMissing)
            if isinstance(raised, ObjectMissing):
                return None
            raise raised from error

    def read_pointer(self, key: str) -> bytes | None:
        """The digest the pointer at `key` names; None if there is no
        object at `key`; NotAPointer for an object that is no pointer
        (one HeadObject: its metadata)."""
        response = self.head_response(key)
        if response is None:
            return None
        pointer = response.get('Metadata', {}).get(POINTER_METADATA)
        try:
            if pointer is None:
                raise ValueError('no pointer metadata')
            target = pointer_target('', pointer)
        except ValueError as error:
            raise NotAPointer('read the pointer', self.name,
                              self.endpoint, str(error), key) from None
        return bytes.fromhex(target.rsplit('/', 1)[1])

    def get_bytes(self, key: str, limit: int = SMALL_OBJECT) -> bytes | None:
        """The bytes of the small object `key`, or None if there is none
        (the marker that says whose a prefix is); one larger than
        `limit` bytes is refused, not read into memory."""
        return self._get_small(key, limit)[0]

    def _get_small(self, key: str, limit: int = SMALL_OBJECT):
        """``(bytes, response)`` of `get_bytes`; ``(None, None)``."""
        try:
            response = self.client.get_object(Bucket=self.name, Key=key)
            body = response['Body']
            try:
                data = body.read(limit + 1)
            finally:
                body.close()
        except Exception as error:
            raised = self.error('read', error, key, ObjectMissing)
            if isinstance(raised, ObjectMissing):
                return None, None
            raise raised from error
        if len(data) > limit:
            raise ObjectStoreError('read', self.name, self.endpoint,
                                   f'larger than {limit} bytes: not an '
                                   f'object zodbblob wrote', key)
        return data, response

    def get_record(self, key: str, field: str) -> dict | None:
        """The small JSON object `key` (a marker, a writer record), if
        it is an object whose `field` is a string; ``{field: None}`` for
        anything else there (not one zodbblob wrote); None if there is
        nothing.  Its ``age`` is how long ago it was written, in seconds
        by the server's own clock (its Date and the object's
        Last-Modified: no clock of this machine), or None."""
        data, response = self._get_small(key)
        if data is None:
            return None
        try:
            record = json.loads(data)
            if not (isinstance(record, dict)
                    and isinstance(record.get(field), str)):
                record = {field: None}
        except ValueError:
            record = {field: None}
        record['age'] = _age(response)
        return record

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store the small object `key` with `data`."""
        try:
            self.client.put_object(Bucket=self.name, Key=key, Body=data)
        except Exception as error:
            raise self.error('write', error, key) from error
