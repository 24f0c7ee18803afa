"""What a request to the object store raises (no boto3 needed here)."""

from __future__ import annotations


class ObjectStoreError(Exception):
    """A request to the object store failed; the message is one line.

    ``bucket``, ``key`` (None for a request about the bucket),
    ``endpoint`` and ``cause`` (a few words) are kept as attributes.
    """

    def __init__(self, what: str, bucket: str, endpoint: str, cause: str,
                 key: str | None = None):
        self.what = what
        self.bucket = bucket
        self.endpoint = endpoint
        self.cause = cause
        self.key = key
        where = f'bucket {bucket!r}'
        if key is not None:
            where = f'key {key!r} in {where}'
        super().__init__(f'cannot {what} {where} at {endpoint}: {cause}')

    def __reduce__(self):
        # Pickled whole (a ZEO server sends a client the error of its
        # vote): Exception's own pickle passes only the message.
        return type(self), (self.what, self.bucket, self.endpoint,
                            self.cause, self.key)


class ObjectMissing(ObjectStoreError):
    """The key asked for is not in the bucket."""


class NotAPointer(ObjectStoreError):
    """The object at a revision's key is no pointer to a content."""
