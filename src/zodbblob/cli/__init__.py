"""The ``zodbblob`` command.

One subcommand per job.  Each is a pair in `COMMANDS`: a function that adds
its arguments to a subparser, and the function that runs it and returns
the exit status: ``serve``, ``verify``, ``recover``, ``cache``,
``migrate``, ``export``, ``import``, ``backup`` and ``restore``.

Every command exits 0 when it did its job (and found nothing wrong), 1
when it ran and found problems, which it names, and 2 when it could not
run: bad arguments, the wrong kind of directory, damaged state.  A
command that cannot run says why in one line on stderr, never with a
traceback.  Interrupted (Ctrl-C), a command exits 130, saying what it
left undone where that is more than nothing.

Each command family's arguments and command are a module of this
package: `serve`, `verify` (and recover), `cache`, `migrate`, `zexp`
(export and import), `backup` (and restore); the libraries they call
are `zodbblob.tools`, and take plain arguments.
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
from collections.abc import Sequence

import zc.lockfile
import ZConfig

from zodbblob.cli.arguments import ToolError
from zodbblob.cli.backup import (
    add_backup_arguments,
    add_restore_arguments,
    backup_command,
    restore_command,
)
from zodbblob.cli.cache import add_cache_arguments, cache_command
from zodbblob.cli.messages import one_line
from zodbblob.cli.migrate import add_migrate_arguments, migrate_command
from zodbblob.cli.serve import (
    BLOB_DIR,
    DATA_FS,
    add_serve_arguments,
    format_address,
    serve_command,
)
from zodbblob.cli.takeover import add_takeover_arguments, takeover_command
from zodbblob.cli.verify import (
    add_recover_arguments,
    add_verify_arguments,
    recover_command,
    verify_command,
)
from zodbblob.cli.zexp import (
    add_export_arguments,
    add_import_arguments,
    export_command,
    import_command,
)
from zodbblob.storage import BlobStorageError
from zodbblob.storage.catalog import JournalError
from zodbblob.storage.commitlog import CommitLogError

# What zodbblob.testing and other callers take from here, as before the
# commands had modules of their own.
__all__ = ['BLOB_DIR', 'COMMANDS', 'DATA_FS', 'format_address', 'main',
           'make_parser', 'one_line']

logger = logging.getLogger(__name__)


COMMANDS = {
    'serve': (add_serve_arguments, serve_command,
              'run a ZEO server for a zodbblob storage'),
    'verify': (add_verify_arguments, verify_command,
               'check blob files against their records'),
    'recover': (add_recover_arguments, recover_command,
                'finish what a crash interrupted, without serving'),
    'cache': (add_cache_arguments, cache_command,
              'show or prune a ZEO client blob cache'),
    'migrate': (add_migrate_arguments, migrate_command,
                'copy a blob directory into another layout'),
    'backup': (add_backup_arguments, backup_command,
               'snapshot a storage, incrementally, beside a live server'),
    'restore': (add_restore_arguments, restore_command,
                'restore or check a snapshot taken by backup'),
    'takeover': (add_takeover_arguments, takeover_command,
                 'make a moved or restored site the writer of its bucket'),
    'export': (add_export_arguments, export_command,
               'write an object and its blobs to a ZEXP file'),
    'import': (add_import_arguments, import_command,
               'import a ZEXP file, old ones without blob data too'),
}


class ToolArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line: the usage is --help's."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} '
                     f'--help)\n')


# What a command raises when the storage or a directory it names cannot be
# used: said in one line, status 2.  Anything else is a bug, shown as one.
CANNOT_RUN = (ToolError, ValueError, OSError, ZConfig.ConfigurationError,
              BlobStorageError, zc.lockfile.LockError, CommitLogError,
              JournalError, sqlite3.DatabaseError)


def make_parser() -> argparse.ArgumentParser:
    parser = ToolArgumentParser(
        prog='zodbblob',
        description='Safe, fast and manageable blobs for ZODB and ZEO.  '
                    'Exit status: 0 done (clean), 1 problems found, 2 could '
                    'not run.')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND',
                                     required=True)
    for name, (add_arguments, run, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary)
        add_arguments(sub)
        sub.set_defaults(run=run, parser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.run(args)
    except CANNOT_RUN as e:
        logger.debug('%s could not run', args.parser.prog, exc_info=True)
        print(f'{args.parser.prog}: error: {one_line(e)}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The commands that leave something to finish say so themselves;
        # the others (verify, recover, cache) read, or are done again by
        # running them again.
        newline = '\n' if sys.stderr.isatty() else ''   # below a progress bar
        print(f'{newline}{args.parser.prog}: interrupted', file=sys.stderr)
        return 130
