"""``zodbblob backup`` and ``zodbblob restore``: arguments, output, status.

The work is `zodbblob.tools.backup`'s, whose functions take plain
arguments; here are the command lines that call them: the argparse code,
the lines printed, and the exit status (0 done, 1 blob files missing
from the source or a check that found problems, 2 could not run, with
one line on stderr, 130 interrupted, saying what is left to finish).
"""

from __future__ import annotations

import argparse
import os
import sys

from zodbblob.cli.arguments import (
    add_layout_argument,
    add_storage_arguments,
    open_storage,
)
from zodbblob.tools.backup import (
    COMPLETE_NAME,
    DESTINATION_MARKER,
    MANIFEST_NAME,
    BackupError,
    BackupInterrupted,
    backup,
    check,
    prune,
    restore,
)
from zodbblob.tools.progress import Progress


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number of '
                                         f'snapshots (1 or more)')
    return value


def add_backup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Take a snapshot of a FileStorage and its blob directory, '
        'consistent at its last committed transaction, into DEST/<tid>.  '
        'Reads the storage without locking it: safe while a server serves '
        'and commits.  Each content is kept once per destination, in '
        'DEST/.contents, whichever oids and tids had it: a new snapshot '
        'copies only the contents the pool lacks.  An interrupted backup '
        'is resumed by running it again.  Exit status 0 when complete, 1 '
        'when blob files were missing from the source (or not regular '
        'files: never copied), 2 when it could not run, 130 when '
        'interrupted.')
    add_storage_arguments(parser)
    parser.add_argument('destination', metavar='DEST',
                        help='directory of the snapshots of this database, '
                             'created if missing')
    parser.add_argument('--full', action='store_true',
                        help='copy Data.fs whole, and read every blob file '
                             'DEST has again, copying from the source those '
                             'missing or damaged')
    parser.add_argument('--keep', metavar='N', type=_positive,
                        help='after the backup, remove all but the newest N '
                             'snapshots, and the blob files only they had')


def _interrupted_line(progress) -> str:
    # After a progress bar, start on a new line.
    return '\n' if progress.enabled and progress.shown >= 0 else ''


def backup_command(args: argparse.Namespace) -> int:
    prog = args.parser.prog
    progress = Progress('backup', quiet=args.quiet)
    storage = None
    try:
        storage = open_storage(args, read_only=True)
        results = backup(storage, args.destination, full=args.full,
                         progress=progress)
    except BackupInterrupted as e:
        print(f'{_interrupted_line(progress)}{prog}: interrupted; snapshot '
              f'{e.snapshot} is unfinished: run the same command again to '
              f'finish it', file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f'{_interrupted_line(progress)}{prog}: interrupted before a '
              f'snapshot was planned; no snapshot was written',
              file=sys.stderr)
        return 130
    except (BackupError, OSError) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    finally:
        if storage is not None:
            storage.close()
    for result in results:
        lines = result.lines()
        for line in lines if not args.quiet else lines[:1] + [
                line for line in lines if 'missing:' in line
                or 'not a file:' in line or 'not followed:' in line
                or 'damaged:' in line]:
            print(line)
    status = 1 if any(result.missing or result.not_files or result.unrepaired
                      for result in results) else 0
    if args.keep is not None:
        try:
            pruned = prune(args.destination, args.keep)
        except KeyboardInterrupt:
            print(f'{prog}: interrupted while removing old snapshots; run '
                  f'the same command again to finish', file=sys.stderr)
            return 130
        except (BackupError, OSError) as e:
            print(f'{prog}: error: {e}', file=sys.stderr)
            return 2
        for line in pruned.lines():
            print(line)
    return status


def add_restore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Restore a snapshot that `zodbblob backup` took, as cp copies: '
        'SNAPSHOT first, then where to.  Writes DEST_DIR/Data.fs, its '
        'index, and DEST_DIR/blobs, checking every byte against the '
        'manifest.  Refuses a DEST_DIR that has a Data.fs or a non-empty '
        'blobs directory.  With --check, first re-hash every file of '
        'SNAPSHOT and report mismatches (exit status 1); without DEST_DIR, '
        'only check.')
    parser.add_argument('snapshot', metavar='SNAPSHOT',
                        help='a snapshot directory, DEST/<tid>, as backup '
                             'named it')
    parser.add_argument('directory', metavar='DEST_DIR', nargs='?',
                        help='where to write Data.fs and blobs/')
    parser.add_argument('--check', action='store_true',
                        help='re-hash every file of the snapshot against '
                             'its manifest')
    parser.add_argument('--link', action='store_true',
                        help='hard-link the blob files to the backup\'s '
                             'where one filesystem holds both (fast, but '
                             'the restored files are the backup\'s: see '
                             'doc/backup.rst); copies by default')
    parser.add_argument('--no-links', dest='links', action='store_false',
                        help='copy every blob file; by default the files '
                             'of one content are hard links to one restored '
                             'file, as a deduplicated store has them')
    add_layout_argument(parser, "layout of the restored blob directory "
                                "(default: the source's)")
    parser.add_argument('--quiet', action='store_true',
                        help='no progress, only problems and the result')


def _looks_like_a_snapshot(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name))
               for name in (MANIFEST_NAME, COMPLETE_NAME))


def _refuse_not_a_snapshot(snapshot: str, directory: str | None) -> None:
    """BackupError when `snapshot` is no snapshot at all, before anything
    is opened or created; a hint when the arguments look swapped."""
    if os.path.isdir(snapshot):
        if (os.path.exists(os.path.join(snapshot, DESTINATION_MARKER))
                or os.path.exists(os.path.join(snapshot, MANIFEST_NAME))):
            return   # a destination, or a snapshot: _open_snapshot says
        problem = f'no {MANIFEST_NAME}'
    elif os.path.lexists(snapshot):
        problem = 'not a directory'
    else:
        problem = 'no such directory'
    hint = ''
    if directory is not None and _looks_like_a_snapshot(directory):
        hint = (f'; {directory} is one: the snapshot comes first, as in '
                f'restore SNAPSHOT DEST_DIR')
    raise BackupError(f'{snapshot} is not a backup snapshot: {problem}'
                      f'{hint}')


def restore_command(args: argparse.Namespace) -> int:
    prog = args.parser.prog
    if args.directory is None and not args.check:
        args.parser.error('name the directory to restore into: SNAPSHOT '
                          'DEST_DIR (or --check SNAPSHOT to only check it)')
    if args.link and not args.links:
        args.parser.error('--link and --no-links contradict each other: '
                          '--link makes every blob file a hard link to the '
                          'backup\'s, --no-links a copy of its own')
    try:
        _refuse_not_a_snapshot(args.snapshot, args.directory)
        if args.check:
            report = check(args.snapshot,
                           progress=Progress('check', quiet=args.quiet))
            for line in report.lines():
                print(line)
            if not report.clean or args.directory is None:
                return 0 if report.clean else 1
        result = restore(args.snapshot, args.directory, link=args.link,
                         layout=args.layout, links=args.links,
                         progress=Progress('restore', quiet=args.quiet))
    except KeyboardInterrupt:
        newline = '\n' if sys.stderr.isatty() and not args.quiet else ''
        print(f'{newline}{prog}: interrupted; nothing was restored',
              file=sys.stderr)
        return 130
    except (BackupError, OSError) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    for line in result.lines():
        print(line)
    return 0
