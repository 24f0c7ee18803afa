"""A ZEO server whose pack waits, for the backup tests.

    python -m zodbblob.tests.held_pack_server DIR PORT

Serves ``DIR/Data.fs`` with blobs in ``DIR/blobs`` over
``zodbblob.BlobStorage``.  A pack records its intent in the catalog, as
always, and then its FileStorage waits for ``DIR/release`` to exist before
it packs: a test holds a pack under way, at a known point, for as long as
it needs, without timing anything.  Stops on SIGTERM.
"""

import os
import sys
import time

import ZODB.FileStorage

from zodbblob import BlobStorage
from zodbblob.tests.counting_server import serve_until_terminated


class HeldFileStorage(ZODB.FileStorage.FileStorage):

    release = None

    def pack(self, *args, **kw):
        while not os.path.exists(self.release):
            time.sleep(0.05)
        return super().pack(*args, **kw)


def main(argv):
    directory, port = argv[0], int(argv[1])
    base = HeldFileStorage(os.path.join(directory, 'Data.fs'))
    base.release = os.path.join(directory, 'release')
    serve_until_terminated(
        BlobStorage(os.path.join(directory, 'blobs'), base), port)


if __name__ == '__main__':
    main(sys.argv[1:])
