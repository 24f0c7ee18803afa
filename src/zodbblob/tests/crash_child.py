"""A child process for the crash tests: commits blobs until it is killed.

Usage: python -m zodbblob.tests.crash_child DIR [TRANSACTIONS] [--pack]
           [--many] [--not-inline] [--checkpoint-every N] [--log-mib N]
           [--config] [--dedup] [--seed N]

Opens ``DIR/Data.fs`` with blobs in ``DIR/blobs`` through
zodbblob.BlobStorage (with ``--config``, through a ``<zodbblob>``
section around ``<filestorage>``: the storage opens its base itself and
commits with one sync) and commits blob transactions of every shape (new and
changed blobs, several per transaction, empty and multi-MiB ones).  With
``--dedup``, the storage has dedup on and the blobs' contents are drawn
from a few, so that most files are linked to an equal one.  After
each commit returns, it appends what it committed to ``DIR/committed``
and fsyncs it: the parent checks exactly those bytes after the crash.
The parent kills it with SIGKILL, or sets ZODBBLOB_KILL_POINT so that it
kills itself at a named point of the protocol.
"""

import hashlib
import json
import os
import random
import sys
import time

import transaction
import ZODB
import ZODB.config
import ZODB.FileStorage
from ZODB.blob import Blob

import zodbblob.storage.catalog
import zodbblob.storage.commit
import zodbblob.storage.commitlog
from zodbblob import BlobStorage


def payload(rng: random.Random, shape: int) -> bytes:
    if shape == 0:
        return b''
    if shape == 1:
        return rng.randbytes(3 * 1024 * 1024 + rng.randrange(1000))
    return rng.randbytes(rng.randrange(1, 20000))


def pooled_payload(rng: random.Random, shape: int) -> bytes:
    """One of a few contents of each shape, the same in every run."""
    shape = min(shape, 2)
    return payload(random.Random(shape * 4 + rng.randrange(3)), shape)


def open_configured(directory: str, dedup: bool = False):
    """The storage of a ``<zodbblob>`` section around ``<filestorage>``,
    as zope.conf and ``zodbblob serve`` open it: with one sync."""
    return ZODB.config.storageFromString(f"""
        %import zodbblob
        <zodbblob>
          blob-dir {os.path.join(directory, 'blobs')}
          dedup {'on' if dedup else 'off'}
          <filestorage>
            path {os.path.join(directory, 'Data.fs')}
          </filestorage>
        </zodbblob>
        """)


def main(argv):
    directory = argv[0]
    count = int(argv[1]) if len(argv) > 1 and argv[1].isdigit() else 10 ** 9
    pack = '--pack' in argv
    # --many: 12 blobs in every transaction, past the storage's threshold
    # for making files durable with one syncfs.
    shapes = (12,) if '--many' in argv else (1, 1, 2, 5, 12)
    # --not-inline: no blob bytes in the commit log; every file is made
    # durable itself (the path of transactions with large blobs).
    if '--not-inline' in argv:
        zodbblob.storage.commit.INLINE_LIMIT = -1
    # --log-mib N: a commit log of up to N MiB (checkpoints when full).
    if '--log-mib' in argv:
        zodbblob.storage.commitlog.MAXIMUM_SIZE = int(
            argv[argv.index('--log-mib') + 1]) << 20
    # --checkpoint-every N: checkpoints during the run, not only at close.
    if '--checkpoint-every' in argv:
        zodbblob.storage.commit.CHECKPOINT_RECORDS = int(
            argv[argv.index('--checkpoint-every') + 1])
    # --read-batch N: pack reads the catalog N rows at a time.
    if '--read-batch' in argv:
        zodbblob.storage.catalog.READ_BATCH = int(
            argv[argv.index('--read-batch') + 1])
    # --seed N: the same transactions in every run (else each run its own).
    rng = random.Random(int(argv[argv.index('--seed') + 1])
                        if '--seed' in argv else os.getpid())
    dedup = '--dedup' in argv
    content = pooled_payload if dedup else payload
    if '--config' in argv:
        storage = open_configured(directory, dedup)
    else:
        storage = BlobStorage(os.path.join(directory, 'blobs'),
                              ZODB.FileStorage.FileStorage(
                                  os.path.join(directory, 'Data.fs')),
                              dedup=dedup)
    db = ZODB.DB(storage)
    conn = db.open()
    root = conn.root()
    log = open(os.path.join(directory, 'committed'), 'a')
    print('ready', flush=True)
    for number in range(count):
        changed = {}
        # The first transaction has one blob, so that a kill at a later
        # hit of a point always finds one transaction committed before.
        for _ in range(rng.choice(shapes) if number else 1):
            key = 'blob-%d' % rng.randrange(40)
            data = content(rng, rng.randrange(12))
            if key in root:
                with root[key].open('w') as f:
                    f.write(data)
            else:
                root[key] = Blob(data)
            changed[key] = hashlib.sha256(data).hexdigest()
        if number % 7 == 3 and root:
            key = rng.choice(sorted(root))
            del root[key]
            changed.pop(key, None)
            changed[key] = None
        transaction.commit()
        tid = db.lastTransaction().hex()
        log.write(json.dumps({'tid': tid, 'changed': changed}) + '\n')
        log.flush()
        os.fsync(log.fileno())
        if pack and number % 5 == 4:
            time.sleep(0.002)
            db.pack()
    db.close()


if __name__ == '__main__':
    main(sys.argv[1:])
