"""A reader process for the shared-cache test on a bucket.

Usage: python -m zodbblob.tests.bucket_reader CONFIG

CONFIG is a ZODB configuration file with a ``<zodbblobclient>`` that
has an ``<s3>`` section and a ``blob-dir`` other readers share.  Reads,
until the root says ``done`` and it has read every blob the root names,
each blob it has not read yet, checking its bytes against the sha256
the root holds for it; then prints ``read N`` and exits 0 (1 on a wrong
byte).
"""

import hashlib
import sys
import time

import transaction
import ZODB.config


def main(config: str) -> int:
    db = ZODB.config.databaseFromFile(open(config))
    try:
        seen = set()
        while True:
            with db.transaction() as connection:
                root = connection.root()
                done = root.get('done', False)
                for name, digest in dict(root.get('digests', {})).items():
                    if name in seen:
                        continue
                    with root[name].open() as f:
                        if hashlib.sha256(f.read()).hexdigest() != digest:
                            print(f'wrong bytes: {name}', flush=True)
                            return 1
                    seen.add(name)
                names = len(root.get('digests', {}))
            if done and len(seen) == names:
                print(f'read {len(seen)}', flush=True)
                return 0
            time.sleep(0.05)
            transaction.abort()
    finally:
        db.close()


if __name__ == '__main__':
    sys.exit(main(sys.argv[1]))
