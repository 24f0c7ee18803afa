"""``zodbblob takeover``: this blob directory writes its bucket's prefix.

A storage on a bucket refuses to open for writing from a copy of its blob
directory (``storage/writer.py``).  A site that was moved or restored is
such a copy too; this command, run once there, makes it the writer.
"""

from __future__ import annotations

import argparse
import sys

import zc.lockfile

from zodbblob.cli.arguments import add_storage_arguments, open_storage
from zodbblob.storage import BlobDirectoryInUse, BlobStorageError
from zodbblob.storage.writer import taking_over


def add_takeover_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Make this blob directory the writer of its bucket prefix, after '
        'the site was moved to another directory or host, or restored: a '
        'storage on a bucket refuses to open for writing from a copy of '
        'the blob directory that last wrote the prefix, because a copy\'s '
        'packs would delete blobs the original still uses.  Run it on the '
        'site only, with the old one stopped for good; a copy of a site '
        'needs a prefix of its own.  It refuses to run while a server '
        'holds the storage.')
    add_storage_arguments(parser)


def takeover_command(args: argparse.Namespace) -> int:
    prog = args.parser.prog
    try:
        with taking_over():
            storage = open_storage(args, read_only=False)
    except (BlobDirectoryInUse, zc.lockfile.LockError) as e:
        print(f'{prog}: error: the storage is in use by another process (a '
              f'running server?): {e}', file=sys.stderr)
        return 2
    try:
        objects = storage.object_store
        blob_dir = storage.fshelper.base_dir
        if objects is None:
            raise BlobStorageError(
                f'Blob directory {blob_dir} keeps its blobs in its own '
                f'files: there is no prefix to take over')
        name = objects.name
    finally:
        storage.close()
    print(f'{blob_dir}: writes {name}')
    return 0
