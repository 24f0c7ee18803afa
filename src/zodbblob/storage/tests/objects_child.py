"""A child process for the object-store crash tests.

Usage: python -m zodbblob.storage.tests.objects_child DIR SETTINGS_JSON
           [TRANSACTIONS] [--pack] [--undo] [--dedup]

Opens ``DIR/Data.fs`` with its blobs in the bucket the JSON settings
name (``DIR/blobs`` keeps the catalog, the commit log and the cache) and
commits blob transactions (one and several blobs, empty, small, and one
over the multipart threshold); after each commit returns, it appends
``{"tid": ..., "changed": {"oid:tid": sha256}}`` to ``DIR/committed``
and fsyncs it.  With ``--pack`` it packs after each commit; with
``--undo`` it undoes each other transaction.  With ``--dedup`` the
storage keeps each content once, and the blobs' bytes are drawn from a
few contents, so that most are stored already.  The parent sets
ZODBBLOB_KILL_POINT so that it kills itself at a named point.
"""

import hashlib
import json
import os
import random
import sys
import time

import transaction
import ZODB
from ZODB.blob import Blob

from zodbblob.objectstore import ObjectStoreSettings
from zodbblob.storage import open_filestorage


def open_storage(directory: str, settings: ObjectStoreSettings,
                 dedup: bool = False):
    return open_filestorage(os.path.join(directory, 'Data.fs'),
                            os.path.join(directory, 'blobs'),
                            object_store=settings, cache_size=16 << 20,
                            dedup=dedup)


def log(directory, tid, changed):
    with open(os.path.join(directory, 'committed'), 'a') as f:
        f.write(json.dumps({'tid': tid.hex(), 'changed': changed}) + '\n')
        f.flush()
        os.fsync(f.fileno())


def main(argv):
    directory, settings = argv[0], ObjectStoreSettings(**json.loads(argv[1]))
    count = int(argv[2]) if len(argv) > 2 and argv[2].isdigit() else 6
    rng = random.Random(7)
    dedup = '--dedup' in argv
    db = ZODB.DB(open_storage(directory, settings, dedup))
    connection = db.open()
    root = connection.root()
    for number in range(count):
        changed = {}
        for index in range(1 + number % 3):
            size = [0, 100, 5000, 9 << 20][(number + index) % 4]
            data = rng.randbytes(size)
            if dedup:   # a few contents, most committed already
                data = bytes([rng.randrange(3)]) * size
            name = f'blob{number % 4}-{index}'
            root[name] = Blob(data)
            changed[name] = hashlib.sha256(data).hexdigest()
        transaction.commit()
        tid = connection._storage.lastTransaction()
        log(directory, tid, {
            f'{root[name]._p_oid.hex()}:{tid.hex()}': digest
            for name, digest in changed.items()})
        if '--undo' in argv and number % 2:
            info = db.undoInfo(0, 1)[0]
            db.undo(info['id'])
            transaction.commit()
        if '--pack' in argv:
            db.pack(time.time() + 1)
    connection.close()
    db.close()


if __name__ == '__main__':
    main(sys.argv[1:])
