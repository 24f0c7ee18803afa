"""``zodbblob migrate``: its arguments, and the command.

The migration itself is `zodbblob.tools.migrate.migrate`; this says what
it did, or why it could not, in the tools' words and exit statuses.
"""

from __future__ import annotations

import argparse
import os
import sys

from zodbblob.cli.arguments import add_layout_argument
from zodbblob.layout import LAYOUT_MARKER
from zodbblob.storage import BlobStorageError
from zodbblob.tools.migrate import MigrationError, migrate
from zodbblob.tools.progress import Progress


def add_migrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Copy blob directory SRC into DST, a new blob directory of another '
        'layout: hard links where both are on one filesystem, copies '
        'otherwise.  SRC is a blob directory of any layout, or a ZEO client '
        'blob cache (zeocache); it is only read.  DST gets its .layout '
        'marker last, after a check that it holds every blob file of SRC '
        'with its size.  Running an interrupted migration again resumes '
        'it.  Refuses to run while a storage uses SRC or DST.')
    parser.add_argument('source', metavar='SRC',
                        help='the blob directory to migrate')
    parser.add_argument('destination', metavar='DST',
                        help='the new blob directory (new or empty, or an '
                             'unfinished migration of SRC)')
    add_layout_argument(parser, 'layout of DST', required=True)
    parser.add_argument('--quiet', action='store_true',
                        help='no progress, only the result')


def migrate_command(args: argparse.Namespace) -> int:
    progress = Progress('migrate', quiet=args.quiet)
    prog = args.parser.prog
    try:
        report = migrate(args.source, args.destination, args.layout,
                         progress=progress)
    except KeyboardInterrupt:
        # Below the progress bar's line, not on it.
        newline = '\n' if progress.enabled else ''
        print(f'{newline}{prog}: interrupted: '
              f'{os.path.abspath(args.destination)} is not finished (no '
              f'{LAYOUT_MARKER} marker); run the same command again to '
              f'resume', file=sys.stderr)
        return 130
    except (MigrationError, BlobStorageError, OSError) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    print(report.summary())
    for line in report.problems():
        print(line)
    return 1 if report.not_files else 0
