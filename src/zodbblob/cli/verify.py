"""``zodbblob verify`` and ``zodbblob recover``: their arguments, and the
commands.

The check is `zodbblob.tools.verify.verify`; recovering is what opening
the storage does, so ``recover`` opens and closes it, and says what the
storage logged while it recovered.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import zc.lockfile

from zodbblob.cli.arguments import add_storage_arguments, open_storage
from zodbblob.cli.messages import Collect
from zodbblob.storage import BlobDirectoryInUse
from zodbblob.tools.progress import Progress
from zodbblob.tools.verify import verify as check_blob_files


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Check that every blob record has its file, and report files no '
        'record references (orphans), files whose size differs from the '
        'journal, unreadable files, anything under a blob name that is not '
        'a regular file (never opened), and transactions a crash left for '
        '`zodbblob recover`; with --checksum, files whose content is not '
        'what was committed.  Opens the storage read-only (safe while a '
        'server runs), except with --record-checksums.  Exit status 0 '
        'when clean, 1 when problems were found, 2 when it could not run.')
    add_storage_arguments(parser)
    parser.add_argument('--checksum', action='store_true',
                        help='read every byte of every blob file and compare '
                             'its digest with the one recorded at commit')
    parser.add_argument('--record-checksums', action='store_true',
                        help='as --checksum, and record the digests of files '
                             'that have none yet (adopted from a stock '
                             'directory, or committed before zodbblob kept '
                             'digests); opens the storage for writing, so it '
                             'refuses to run while a server holds it')


def verify_command(args: argparse.Namespace) -> int:
    record = args.record_checksums
    try:
        storage = open_storage(args, read_only=not record)
    except (BlobDirectoryInUse, zc.lockfile.LockError) as e:
        # Only for writing: a read-only open takes no lock.
        print(f'{args.parser.prog}: error: the storage is in use by another '
              f'process (a running server?), so no checksums are recorded: '
              f'{e}', file=sys.stderr)
        return 2
    try:
        report = check_blob_files(
            storage, checksum=args.checksum or record,
            progress=Progress('verify', quiet=args.quiet))
    finally:
        storage.close()
    lines = report.lines()
    for line in lines if not report.clean or not args.quiet else lines[-1:]:
        print(line)
    return 0 if report.clean else 1


def add_recover_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Replay the blob journal: finish or undo the commits and the pack '
        'that a crash interrupted, and remove the temporary files of '
        'processes that ended, then close.  This is what opening the '
        'storage does; running it twice is harmless.  It refuses to run '
        'while a server holds the storage.')
    add_storage_arguments(parser)


def recover_command(args: argparse.Namespace) -> int:
    collect = Collect()
    storage_logger = logging.getLogger('zodbblob.storage')
    storage_logger.addHandler(collect)
    level = storage_logger.level
    storage_logger.setLevel(logging.INFO)   # rows written are said too
    try:
        storage = open_storage(args, read_only=False)
    except (BlobDirectoryInUse, zc.lockfile.LockError) as e:
        print(f'{args.parser.prog}: error: the storage is in use by another '
              f'process (a running server?), so it is not recovered: {e}',
              file=sys.stderr)
        return 2
    finally:
        storage_logger.removeHandler(collect)
        storage_logger.setLevel(level)
    blob_dir = storage.fshelper.base_dir.rstrip(os.sep)
    storage.close()
    if not args.quiet:
        for message in collect.messages:
            print(message)
    if collect.messages:
        print(f'{blob_dir}: recovered ({len(collect.messages)} actions)')
    else:
        print(f'{blob_dir}: nothing left to recover')
    return 0
