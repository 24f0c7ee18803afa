"""Naming a storage on the command line, and opening it, for the tools.

``zodbblob verify``, ``recover``, ``export``, ``import`` and ``backup``
take the same arguments: ``--config FILE`` (a zope.conf, zeo.conf or
ZODB config with a ``<zodbblob>`` section), or ``--data DATA.FS`` and
``--blob-dir DIR``; and ``--quiet``.  The ones that name a blob directory
layout (``migrate``, ``restore``) take ``--layout`` from the same fixed
list of registered layouts.
"""

from __future__ import annotations

import argparse
import logging
import os

import ZConfig

from zodbblob.config import (check_blob_directory, marked_layout,
                             storage_from_file)
from zodbblob.layout import LAYOUT_MARKER, LAYOUTS, file_kind
from zodbblob.storage import BlobStorage, FileStorageOpener


class ToolError(Exception):
    """A tool cannot run, as the one-line message says (exit status 2)."""


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--config', metavar='FILE',
        help='a zope.conf, zeo.conf or ZODB config with a <zodbblob> '
             'section (its first one is used)')
    parser.add_argument('--data', metavar='DATA.FS',
                        help='a FileStorage file (with --blob-dir)')
    parser.add_argument('--blob-dir', metavar='DIR',
                        help='its blob directory (with --data)')
    parser.add_argument('--quiet', action='store_true',
                        help='no progress, only the result')


def add_layout_argument(parser: argparse.ArgumentParser, help: str,
                        required: bool = False) -> None:
    """``--layout``, one of the registered layouts.

    A fixed choice, so that a misspelt layout is argparse's one-line error
    naming the choices (status 2) before anything is opened.
    """
    parser.add_argument('--layout', choices=sorted(LAYOUTS),
                        required=required, help=help)


class _IndexOfALiveServer(logging.Filter):
    """Drops FileStorage's "Ignoring index" while a tool opens read-only.

    Beside a live server, ``Data.fs.index`` is the one the server wrote
    when it opened: for a new database, that of an empty file, which
    FileStorage calls insane and ignores, reading the file instead, as it
    would have anyway.  Said on every verify, backup and export beside a
    new site, it reads as damage where there is none.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != 'Ignoring index for %s'


def open_storage(args: argparse.Namespace, read_only: bool,
                 dedup: bool = False) -> BlobStorage:
    """The storage the arguments name; exits with a message if they don't.

    Nothing is created: a path that does not exist is an error here, not
    a new database.  `dedup` is for ``--data`` and ``--blob-dir`` (a
    config file says it itself).
    """
    if not read_only:
        return _open_storage(args, read_only, dedup)
    filestorage_logger = logging.getLogger('ZODB.FileStorage')
    index_of_a_live_server = _IndexOfALiveServer()
    filestorage_logger.addFilter(index_of_a_live_server)
    try:
        return _open_storage(args, read_only)
    finally:
        filestorage_logger.removeFilter(index_of_a_live_server)


def not_a(path: str, wanted: str) -> str:
    """Why `path` is not the `wanted` ``file`` or ``directory``: missing,
    or what it is instead (a device named as --data is no Data.fs)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f'no such {wanted}'
    except OSError as e:
        return e.strerror or str(e)
    if wanted == 'file':
        wanted = 'regular file'
    return f'{file_kind(mode)}, not a {wanted}'


def _open_storage(args: argparse.Namespace, read_only: bool,
                  dedup: bool = False) -> BlobStorage:
    if args.config and (args.data or args.blob_dir):
        args.parser.error('give --config, or --data and --blob-dir, not both')
    if args.config:
        if not os.path.isfile(args.config):
            args.parser.error(f'--config {args.config}: '
                              f'{not_a(args.config, "file")}')
        try:
            # As with --blob-dir: only a storage's own first open (a
            # server's, an application's) makes a new blob directory.
            return storage_from_file(args.config, read_only=read_only,
                                     existing=True, scrub=False)
        except (ZConfig.ConfigurationError, ValueError) as e:
            raise ToolError(f'--config {args.config}: {e}') from None
    if not (args.data and args.blob_dir):
        args.parser.error('name the storage: --config FILE, or --data '
                          'DATA.FS and --blob-dir DIR')
    for option, path, check in (('--data', args.data, os.path.isfile),
                                ('--blob-dir', args.blob_dir,
                                 os.path.isdir)):
        if not check(path):
            wanted = 'file' if check is os.path.isfile else 'directory'
            args.parser.error(f'{option} {path}: {not_a(path, wanted)}')
    try:
        check_blob_directory(args.blob_dir)
        marked = marked_layout(args.blob_dir)
    except ValueError as e:
        raise ToolError(str(e)) from None
    # Opening would make any directory a new blob directory: recover would
    # then find nothing to do, and verify call every blob missing.  Only a
    # storage's own first open creates one, never a tool.
    if marked is None:
        raise ToolError(f'--blob-dir {args.blob_dir} is not a blob '
                        f'directory: no {LAYOUT_MARKER} marker')
    # Opened by the storage itself: a torn last transaction is rolled back.
    # No background scrubber: a tool's run is short, and verify hashes
    # what it reads itself.
    return BlobStorage(args.blob_dir,
                       FileStorageOpener(args.data, read_only=read_only),
                       scrub=False, dedup=dedup)
