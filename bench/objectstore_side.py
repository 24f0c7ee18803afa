"""One side of bench/objectstore.py: one step, in one process.

Run by ``bench/objectstore.py``, never by hand: with our interpreter for
zodbblob (``ours``), with the zodb-s3blobs venv's for the peer
(``peer``).  It imports nothing of zodbblob at the top, so the peer's
venv (ZODB, boto3, zodb-s3blobs; no zodbblob) can run it.

Each side is opened as its documentation shows:

- ours: ``zodbblob.open_filestorage(path, blob_dir,
  object_store=ObjectStoreSettings(...), cache_size=N)``;
- peer: ``S3BlobStorage(FileStorage(path), S3Client(...),
  S3BlobCache(cache_dir, max_size=N))``, what its ``<s3blobstorage>``
  section builds.

Talking to the driver: a line ``mark NAME`` on stdout, then a wait for
one line on stdin (the driver notes its proxy's counts in between, so
the requests and bytes between two marks are the step's); at the end one
line ``result JSON``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

import transaction
import ZODB
import ZODB.FileStorage
from BTrees.IOBTree import IOBTree
from ZODB.blob import Blob

KiB = 1024
MiB = 1024 * KiB
REGION = 'us-east-1'
KEY_ID = SECRET = 'testing'  # moto takes any keys
CACHE_SIZE = 4 * 1024 * MiB  # nothing evicted during a run
SMALL = 300                  # bytes of each blob of the pack step
PER_TRANSACTION = 100        # blobs per transaction filling the pack step


def mark(name: str) -> None:
    print(f'mark {name}', flush=True)
    if not sys.stdin.readline():
        raise SystemExit('the driver went away')


class Side:
    """Opens the storage of one side in `run_dir`, on `bucket`."""

    def __init__(self, name: str, endpoint: str, bucket: str, run_dir: str):
        self.name = name
        self.endpoint = endpoint
        self.bucket = bucket
        self.path = os.path.join(run_dir, 'Data.fs')
        self.blob_dir = os.path.join(run_dir, 'blobs')
        self.peer_cache = os.path.join(run_dir, 'cache')
        self.peer_staging = os.path.join(run_dir, 'staging')

    def open(self) -> ZODB.DB:
        if self.name == 'ours':
            import zodbblob
            from zodbblob.objectstore import ObjectStoreSettings
            settings = ObjectStoreSettings(
                self.bucket, prefix='zodb', endpoint_url=self.endpoint,
                region=REGION, access_key_id=KEY_ID, secret_access_key=SECRET)
            storage = zodbblob.open_filestorage(
                self.path, self.blob_dir, object_store=settings,
                cache_size=CACHE_SIZE)
        else:
            from zodb_s3blobs.cache import S3BlobCache
            from zodb_s3blobs.s3client import S3Client
            from zodb_s3blobs.storage import S3BlobStorage
            client = S3Client(
                bucket_name=self.bucket, prefix='zodb',
                endpoint_url=self.endpoint, region_name=REGION,
                aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                use_ssl=False)
            cache = S3BlobCache(self.peer_cache, max_size=CACHE_SIZE)
            # Its staging next to the blobs' temporary files: a rename.
            storage = S3BlobStorage(ZODB.FileStorage.FileStorage(self.path),
                                    client, cache,
                                    temp_dir=self.peer_staging)
        return ZODB.DB(storage)

    def empty_cache(self) -> None:
        """Remove every local copy (the database closed)."""
        if self.name == 'ours':
            from zodbblob.storage.objects import cache_directory
            shutil.rmtree(cache_directory(self.blob_dir))
        else:
            shutil.rmtree(self.peer_cache)


def read_blob(db: ZODB.DB, key) -> bytes:
    with db.transaction() as conn:
        with conn.root()['blobs'][key].open() as f:
            return f.read()


def outcome(db: ZODB.DB, key, expected: bytes) -> str:
    """'right bytes', 'WRONG bytes' or the error reading them, in a line."""
    try:
        data = read_blob(db, key)
    except Exception as e:
        return f'{type(e).__name__}: {str(e).splitlines()[0][:120]}'
    return 'right bytes' if data == expected else 'WRONG bytes'


def commit(side: Side, args) -> dict:
    """Blobs/s committing `transactions` of `per_transaction` blobs."""
    data = [os.urandom(args.size) for _ in range(4)]
    db = side.open()
    with db.transaction() as conn:
        conn.root()['blobs'] = IOBTree()
    mark('start')
    start = time.perf_counter()
    key = 0
    for number in range(args.transactions):
        with db.transaction() as conn:
            tree = conn.root()['blobs']
            for index in range(args.per_transaction):
                tree[key] = Blob(data[(number + index) % len(data)])
                key += 1
    db.close()
    seconds = time.perf_counter() - start
    mark('end')
    # Untimed: every blob read back, from the bucket (the cache emptied).
    side.empty_cache()
    db = side.open()
    wrong = 0
    key = 0
    with db.transaction() as conn:
        tree = conn.root()['blobs']
        for number in range(args.transactions):
            for index in range(args.per_transaction):
                with tree[key].open() as f:
                    if f.read() != data[(number + index) % len(data)]:
                        wrong += 1
                key += 1
    db.close()
    return {'seconds': seconds, 'blobs': key, 'wrong': wrong}


def cold_read(side: Side, args) -> dict:
    """Seconds reading one blob whose local copy is gone."""
    data = os.urandom(args.size)
    db = side.open()
    with db.transaction() as conn:
        conn.root()['blobs'] = IOBTree({0: Blob(data)})
    db.close()
    side.empty_cache()
    db = side.open()
    with db.transaction() as conn:
        conn.root()['blobs']  # the tree loaded: only the blob is timed
        mark('start')
        start = time.perf_counter()
        with conn.root()['blobs'][0].open() as f:
            read = f.read()
        seconds = time.perf_counter() - start
        mark('end')
    db.close()
    return {'seconds': seconds, 'wrong': int(read != data)}


def pack(side: Side, args) -> dict:
    """Seconds of a pack that finds `garbage` garbage blobs in `blobs`."""
    content = {}
    db = side.open()
    with db.transaction() as conn:
        conn.root()['blobs'] = IOBTree()
    for first in range(0, args.blobs, PER_TRANSACTION):
        with db.transaction() as conn:
            tree = conn.root()['blobs']
            for key in range(first, min(first + PER_TRANSACTION, args.blobs)):
                content[key] = b'%06d' % key + os.urandom(SMALL - 6)
                tree[key] = Blob(content[key])
    # Half the garbage superseded revisions, half blobs nobody reaches.
    changed = range(0, args.garbage // 2)
    removed = range(args.blobs - (args.garbage - args.garbage // 2),
                    args.blobs)
    with db.transaction() as conn:
        tree = conn.root()['blobs']
        for key in changed:
            content[key] = b'%06d' % key + os.urandom(SMALL - 6)
            tree[key] = Blob(content[key])
        for key in removed:
            del tree[key], content[key]
    mark('start')
    start = time.perf_counter()
    db.pack(time.time() + 1)
    seconds = time.perf_counter() - start
    mark('end')
    # Untimed: what the bucket holds, and every live blob from it.
    keys = count_keys(side)
    db.close()
    side.empty_cache()
    db = side.open()
    wrong = 0
    with db.transaction() as conn:
        tree = conn.root()['blobs']
        for key, expected in content.items():
            try:
                with tree[key].open() as f:
                    wrong += f.read() != expected
            except Exception:
                wrong += 1
    db.close()
    return {'seconds': seconds, 'keys': keys, 'expected_keys': len(content),
            'wrong': wrong}


# zodbblob's marker saying whose a prefix is: not a blob.
MARKER = '.zodbblob.json'


def count_keys(side: Side) -> int:
    """The blob objects in the side's bucket."""
    import boto3
    client = boto3.client('s3', endpoint_url=side.endpoint,
                          region_name=REGION, aws_access_key_id=KEY_ID,
                          aws_secret_access_key=SECRET)
    pages = client.get_paginator('list_objects_v2').paginate(
        Bucket=side.bucket)
    return sum(1 for page in pages for item in page.get('Contents', ())
               if not item['Key'].endswith(MARKER))


def undo(side: Side, args) -> dict:
    """Undo the change of a big blob; read it after the undo and a pack."""
    first, second = os.urandom(args.size), os.urandom(args.size)
    db = side.open()
    with db.transaction() as conn:
        conn.root()['blobs'] = IOBTree({0: Blob(first)})
    with db.transaction() as conn:
        with conn.root()['blobs'][0].open('w') as f:
            f.write(second)
    undone = db.undoLog(0, 1)[0]['id']
    mark('undo')
    start = time.perf_counter()
    try:
        db.undo(undone)
        transaction.commit()
        undo_error = None
    except Exception as e:
        transaction.abort()
        undo_error = f'{type(e).__name__}: {str(e).splitlines()[0][:120]}'
    seconds = time.perf_counter() - start
    mark('undone')
    after_undo = undo_error or outcome(db, 0, first)
    mark('read')
    try:
        db.pack(time.time() + 1)
        pack_error = None
    except Exception as e:
        pack_error = f'{type(e).__name__}: {str(e).splitlines()[0][:120]}'
    db.close()
    side.empty_cache()
    db = side.open()
    after_pack = pack_error or outcome(db, 0, first)
    db.close()
    mark('packed')
    return {'seconds': seconds, 'after_undo': after_undo,
            'after_pack': after_pack, 'keys_after_pack': count_keys(side)}


STEPS = {'commit': commit, 'read': cold_read, 'pack': pack, 'undo': undo}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('side', choices=('ours', 'peer'))
    parser.add_argument('step', choices=sorted(STEPS))
    parser.add_argument('--endpoint', required=True)
    parser.add_argument('--bucket', required=True)
    parser.add_argument('--dir', required=True)
    parser.add_argument('--size', type=int, default=KiB)
    parser.add_argument('--per-transaction', type=int, default=1)
    parser.add_argument('--transactions', type=int, default=1)
    parser.add_argument('--blobs', type=int, default=2000)
    parser.add_argument('--garbage', type=int, default=200)
    args = parser.parse_args(argv)
    os.makedirs(args.dir)
    # Blob(data) writes its file here: on the blob directory's
    # filesystem, so that a commit renames it.
    tempfile.tempdir = os.path.join(args.dir, 'tmp')
    os.makedirs(tempfile.tempdir)
    side = Side(args.side, args.endpoint, args.bucket, args.dir)
    try:
        result = STEPS[args.step](side, args)
    except Exception as e:
        traceback.print_exc()
        result = {'error': f'{type(e).__name__}: '
                           f'{str(e).splitlines()[0][:200] if str(e) else ""}'}
    print('result ' + json.dumps(result), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
