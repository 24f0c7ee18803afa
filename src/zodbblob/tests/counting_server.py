"""A ZEO server that counts the blobs it sends, for the cache tests.

    python -m zodbblob.tests.counting_server DIR PORT stock|zodbblob [DELAY]

Serves ``DIR/Data.fs`` with blobs in ``DIR/blobs``: over stock
``FileStorage(blob_dir=...)`` or ``zodbblob.BlobStorage``.  Every blob the
server loads to send to a client (``sendBlob`` calls ``loadBlob``) adds a
line ``<oid hex> <tid hex>`` to ``DIR/sent``, and its start and end times
(``time.time()``) to ``DIR/loads``.  DELAY (seconds) makes every such load
slow, so that concurrent readers overlap.  Stops on SIGTERM.
"""

import os
import signal
import sys
import threading
import time

import ZEO.StorageServer
import ZODB.FileStorage

from zodbblob import BlobStorage


def counting(storage, directory, delay):
    load_blob = storage.loadBlob
    lock = threading.Lock()

    def loadBlob(oid, serial):
        start = time.time()
        with lock, open(os.path.join(directory, 'sent'), 'a') as log:
            log.write('%s %s\n' % (oid.hex(), serial.hex()))
        if delay:
            time.sleep(delay)
        try:
            return load_blob(oid, serial)
        finally:
            with lock, open(os.path.join(directory, 'loads'), 'a') as log:
                log.write('%r %r\n' % (start, time.time()))

    storage.loadBlob = loadBlob
    return storage


def main(argv):
    directory, port, kind = argv[0], int(argv[1]), argv[2]
    delay = float(argv[3]) if len(argv) > 3 else 0.0
    data = os.path.join(directory, 'Data.fs')
    blobs = os.path.join(directory, 'blobs')
    if kind == 'stock':
        storage = ZODB.FileStorage.FileStorage(data, blob_dir=blobs)
    else:
        storage = BlobStorage(blobs, ZODB.FileStorage.FileStorage(data))
    serve_until_terminated(counting(storage, directory, delay), port)


def serve_until_terminated(storage, port):
    """Serve `storage` as storage '1' on 127.0.0.1:`port`; say
    ``serving`` on stdout once it listens, and stop on SIGTERM."""
    server = ZEO.StorageServer.StorageServer(
        ('127.0.0.1', port), {'1': storage})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *args: stop.set())
    server.start_thread()
    print('serving', flush=True)
    stop.wait()
    server.close()


if __name__ == '__main__':
    main(sys.argv[1:])
