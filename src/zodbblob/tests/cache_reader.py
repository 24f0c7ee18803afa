"""A ZEO client process that reads one blob through zodbblob's cache.

    python -m zodbblob.tests.cache_reader PORT CACHE_DIR OID TID [THREADS]

OID and TID in hex.  Prints one line per reading thread: the sha256 of the
bytes it read.  Used by the cache tests to have other processes share a
cache directory, and to be killed in the middle of a download.  With
ZODBBLOB_TEST_SLOW_RECEIVE=SECONDS in the environment, the client takes
that long to finish receiving each blob (a slow downloader); with
ZODBBLOB_TEST_HOLD_RECEIVE=PATH, until the file PATH exists (at most 120
s).
"""

import hashlib
import os
import sys
import threading
import time

from zodbblob.zeo import ClientStorage


class SlowClientStorage(ClientStorage):

    def receiveBlobStop(self, oid, serial):
        release = os.environ.get('ZODBBLOB_TEST_HOLD_RECEIVE')
        if release is None:
            time.sleep(float(os.environ['ZODBBLOB_TEST_SLOW_RECEIVE']))
        else:
            deadline = time.monotonic() + 120
            while (not os.path.exists(release)
                   and time.monotonic() < deadline):
                time.sleep(0.01)
        return super().receiveBlobStop(oid, serial)


def main(argv):
    port, cache_dir = int(argv[0]), argv[1]
    oid, tid = bytes.fromhex(argv[2]), bytes.fromhex(argv[3])
    threads = int(argv[4]) if len(argv) > 4 else 1
    factory = (SlowClientStorage
               if {'ZODBBLOB_TEST_SLOW_RECEIVE', 'ZODBBLOB_TEST_HOLD_RECEIVE'}
               & set(os.environ) else ClientStorage)
    storage = factory(('127.0.0.1', port), blob_dir=cache_dir,
                            wait_timeout=30)
    print('connected', flush=True)
    digests = []

    def read():
        with storage.openCommittedBlobFile(oid, tid) as f:
            digests.append(hashlib.sha256(f.read()).hexdigest())

    workers = [threading.Thread(target=read) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for digest in digests:
        print(digest, flush=True)
    storage.close()


if __name__ == '__main__':
    main(sys.argv[1:])
