"""The names of blobs in the bucket, and back.

A revision's key is readable and keeps every revision of an oid under
one key prefix: ``PREFIX + oid hex + '/' + tid hex + '.blob'``
(``zodb/00000000000000a1/03f1c2d4e5f60718.blob``).  With dedup on, a
content's key is its digest: ``PREFIX + 'contents/' + hex[:2] + '/' +
hex``, the first two digits spreading keys over as many key prefixes as
a server partitions by.  An oid or tid is exactly 8 bytes, checked here:
it may come from a ZEO client.
"""

from __future__ import annotations

import re

# BLAKE3-256, the digest the catalog keeps (zodbblob.storage.digest).
DIGEST_SIZE = 32
CONTENTS = 'contents/'
BLOB_SUFFIX = '.blob'
# The user metadata that makes an object a pointer to a content.
POINTER_METADATA = 'zodbblob-content'
BLOB_KEY = re.compile(r'([0-9a-f]{16})/([0-9a-f]{16})\.blob')
CONTENT_KEY = re.compile(r'contents/([0-9a-f]{2})/([0-9a-f]{64})')


def _hex8(name: str, value: bytes) -> str:
    if not isinstance(value, bytes) or len(value) != 8:
        raise ValueError(f'{name} must be exactly 8 bytes, not {value!r}')
    return value.hex()


def blob_key(prefix: str, oid: bytes, tid: bytes) -> str:
    """The key of the revision `tid` of the blob `oid`."""
    return prefix + _hex8('oid', oid) + '/' + _hex8('tid', tid) + BLOB_SUFFIX


def parse_blob_key(prefix: str, key: str) -> tuple[bytes, bytes] | None:
    """``(oid, tid)`` of a key that `blob_key` makes under `prefix`, or
    None for any other key."""
    if not key.startswith(prefix):
        return None
    match = BLOB_KEY.fullmatch(key[len(prefix):])
    if match is None:
        return None
    return bytes.fromhex(match[1]), bytes.fromhex(match[2])


def content_key(prefix: str, digest: bytes) -> str:
    """The key of the content whose digest is `digest` (dedup on)."""
    if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
        raise ValueError(
            f'digest must be exactly {DIGEST_SIZE} bytes, not {digest!r}')
    hex_digest = digest.hex()
    return prefix + CONTENTS + hex_digest[:2] + '/' + hex_digest


def parse_content_key(prefix: str, key: str) -> bytes | None:
    """The digest of a key that `content_key` makes under `prefix`, or
    None for any other key."""
    if not key.startswith(prefix):
        return None
    match = CONTENT_KEY.fullmatch(key[len(prefix):])
    if match is None or match[2][:2] != match[1]:
        return None
    return bytes.fromhex(match[2])


def pointer_body(digest: bytes) -> bytes:
    """The body of a pointer to the content `digest` (its hex, a line)."""
    content_key('', digest)   # checks the digest
    return digest.hex().encode('ascii') + b'\n'


def pointer_target(prefix: str, value: str | bytes) -> str:
    """The content key a pointer's metadata or body `value` names; a
    ValueError for anything that is not a digest's hex."""
    if isinstance(value, bytes):
        value = value.decode('ascii', 'replace')
    value = value.strip()
    if not re.fullmatch(r'[0-9a-f]{%d}' % (2 * DIGEST_SIZE), value):
        raise ValueError(f'not a content digest: {value[:80]!r}')
    return content_key(prefix, bytes.fromhex(value))
