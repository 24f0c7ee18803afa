"""THE OBJECT STORE: committed blobs in an S3-API bucket (issue 16).

`ObjectStoreSettings` (settings) says where the bucket is; keys (keys)
name blobs in it; `Bucket` (bucket) makes the requests, and raises
`ObjectStoreError` (`ObjectMissing` for a key that is not there).

boto3 is an extra (``pip install zodbblob[s3]``): the settings and the
keys work without it, and `Bucket` and its errors are imported from
``bucket`` only when first asked for, so that importing this package
(or zodbblob) never imports boto3.
"""

from zodbblob.objectstore.keys import blob_key
from zodbblob.objectstore.keys import content_key
from zodbblob.objectstore.keys import parse_blob_key
from zodbblob.objectstore.keys import parse_content_key
from zodbblob.objectstore.settings import ObjectStoreSettings

BOTO3_NAMES = ('Bucket', 'ObjectStoreError', 'ObjectMissing')

__all__ = ['ObjectStoreSettings', 'blob_key', 'content_key',
           'parse_blob_key', 'parse_content_key', *BOTO3_NAMES]


def __getattr__(name):
    if name in BOTO3_NAMES:
        from zodbblob.objectstore import bucket
        return getattr(bucket, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
