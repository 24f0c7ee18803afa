"""``zodbblob export`` and ``zodbblob import``: their arguments, and the
commands.

The file format and its reading and writing are `zodbblob.tools.zexp`;
this opens the storage, finds the object by its path, and says what was
done in the tools' words and exit statuses.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import transaction
import ZODB
from ZODB.POSException import ExportError, POSKeyError
from ZODB.utils import oid_repr, z64

from zodbblob.cli.arguments import add_storage_arguments, not_a, open_storage
from zodbblob.layout import NotABlobFile
from zodbblob.tools.progress import Progress
from zodbblob.tools.zexp import ImportReport, export_file, import_file

# export_file and import_file log on the loggers of the modules of
# zodbblob.tools.zexp, whose records reach this one's handlers.
zexp_logger = logging.getLogger('zodbblob.tools.zexp')


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Write the object at --path, and every object it references, to a '
        'ZEXP file that Zope and ZODB (Connection.importFile) import, '
        'blobs included.  Opens the storage read-only and takes no lock: '
        'safe while a server serves and commits; the file holds the '
        'database as of the last transaction committed when it started.')
    add_storage_arguments(parser)
    parser.add_argument('--path', default='/', metavar='/A/B',
                        help='keys from the root to the object, split on '
                             '/ (default: the root)')
    parser.add_argument('file', metavar='FILE.zexp',
                        help='the file to write (replaced if it exists)')


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Import a ZEXP file (written by zodbblob or ZODB, old ones without '
        'blob data included) and store its object in the container at '
        '--path under --name, in one transaction.  Refuses to run while '
        'a storage holds the blob directory.')
    add_storage_arguments(parser)
    parser.add_argument('--path', default='/', metavar='/A/B',
                        help='keys from the root to the container, split '
                             'on / (default: the root)')
    parser.add_argument('--name', help="the key in the container (default: "
                                       "the file's name without .zexp)")
    parser.add_argument('--source-blob-dir', metavar='DIR',
                        help='for a file without blob data: a copy of the '
                             'blob directory it was exported from (any '
                             'layout, or a ZEO client blob cache)')
    parser.add_argument('--dedup', action='store_true',
                        help='with --data and --blob-dir: a blob whose '
                             'content the store holds already becomes a '
                             'link to it (with --config, dedup on in its '
                             '<zodbblob> section says it)')
    parser.add_argument('file', metavar='FILE.zexp')


def _error(args, message: str, status: int = 2) -> int:
    print(f'{args.parser.prog}: error: {message}', file=sys.stderr)
    return status


def _traverse(root, path: str):
    """The object at `path`, keys from `root`; LookupError naming the key."""
    obj, walked = root, ''
    for key in (step for step in path.split('/') if step):
        try:
            obj = obj[key]
        except (KeyError, TypeError, AttributeError):
            raise LookupError(f'no object at {walked or "/"} has a key '
                              f'{key!r} (path {path})') from None
        walked += '/' + key
    return obj


def _open_for_import(args):
    """The storage, held against live storages; or a str saying why not."""
    from zc.lockfile import LockError

    from zodbblob.storage import BlobStorageError
    if args.dedup and args.config:
        args.parser.error('--dedup goes with --data and --blob-dir; with '
                          '--config, the file says it (dedup on in its '
                          '<zodbblob> section)')
    try:
        return open_storage(args, read_only=False, dedup=args.dedup)
    except (BlobStorageError, LockError) as e:
        return (f'the storage is in use by another process (a running '
                f'server?); stop it first: {e}')


class _NamedByTheCommand(logging.Handler):
    """Held on the zexp tools' logger while a command runs, which names
    itself what `export_file` and `import_file` log at WARNING: where no
    logging is configured, Python would print those too (its
    ``lastResort``).  Anything worse still reaches stderr."""

    def emit(self, record):
        if (record.levelno > logging.WARNING and logging.lastResort
                and not logging.getLogger().handlers):
            logging.lastResort.handle(record)


def _load_root(storage) -> bool:
    try:
        storage.load(z64)
    except POSKeyError:
        return False
    return True


def _file_identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def export_command(args: argparse.Namespace) -> int:
    # Read-only, as verify and backup open it: no lock, so a server may
    # go on serving and committing.  The view is the database as of the
    # last transaction committed when Data.fs was opened (a read-only
    # FileStorage indexes no later one), and a committed transaction's
    # blob files are in place before its commit: what is exported is one
    # consistent state, whatever the server commits meanwhile.
    #
    # A pack replaces Data.fs.  What was opened goes on being read (the
    # index, and the reading handle FileStorage opens by name at the
    # first load, which DB() makes), unless the pack renamed its file
    # into place in between; and the blob files of revisions it packed
    # away go.  Both are told from a damaged store by Data.fs's inode.
    opened = _file_identity(args.data) if args.data else None
    storage = open_storage(args, read_only=True)
    data_fs = storage.base.getName()
    if opened is None:
        opened = _file_identity(data_fs)
    packed = (f'{data_fs} was replaced (packed?) while export read it: '
              f'{args.file} not written; run the export again')
    try:
        has_root = _load_root(storage)
        db = ZODB.DB(storage) if has_root else None
    except BaseException:
        storage.close()
        if _file_identity(data_fs) != opened:
            return _error(args, packed)
        raise
    if db is None:
        # DB() would store a root, and fail on a read-only storage.
        storage.close()
        if _file_identity(data_fs) != opened:
            return _error(args, packed)
        return _error(args, f'{data_fs} holds no root object (no client '
                            f'has opened the database yet): nothing to '
                            f'export')
    try:
        if _file_identity(data_fs) != opened:
            return _error(args, packed)
        connection = db.open(
            transaction_manager=transaction.TransactionManager())
        try:
            obj = _traverse(connection.root(), args.path)
        except LookupError as e:
            return _error(args, str(e))
        if getattr(obj, '_p_oid', None) is None:
            return _error(args, f'the object at {args.path} is not a '
                                f'persistent object of its own')
        progress = Progress('export', quiet=args.quiet)
        said_below = _NamedByTheCommand()
        zexp_logger.addHandler(said_below)
        try:
            report = export_file(connection, obj._p_oid, args.file, progress)
        except (NotABlobFile, ExportError) as e:
            if _file_identity(data_fs) != opened:
                return _error(args, packed)
            # A blob file missing, or something else under its name: a
            # problem of the blob directory, found and named (status 1).
            return _error(args, f'{args.file} not written: {e}', 1)
        except (OSError, POSKeyError) as e:
            return _error(args, f'{args.file}: {e}')
        except KeyboardInterrupt:
            # export_file removed its partial file.
            return _error(args, f'interrupted: {args.file} not written', 130)
        finally:
            zexp_logger.removeHandler(said_below)
    finally:
        db.close()
    print(f'{args.file}: exported {args.path}: {report.records} objects, '
          f'{report.blobs} blobs ({report.blob_bytes} bytes)')
    for oid in report.missing:
        print(f'skipped: oid {oid_repr(oid)} is referenced but not in the '
              f'database', file=sys.stderr)
    if report.without_data:
        print(f'{len(report.without_data)} blob records were written without '
              f'data: the storage has no blob support', file=sys.stderr)
    # Written, but what is named above is not in it: problems found.
    return 1 if report.missing or report.without_data else 0


def import_command(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.file):
        return _error(args, f'{args.file}: {not_a(args.file, "file")}')
    if args.source_blob_dir and not os.path.isdir(args.source_blob_dir):
        return _error(args, f'--source-blob-dir {args.source_blob_dir}: '
                            f'{not_a(args.source_blob_dir, "directory")}')
    name = args.name or os.path.splitext(os.path.basename(args.file))[0]
    storage = _open_for_import(args)
    if isinstance(storage, str):
        return _error(args, storage)
    db = ZODB.DB(storage)
    manager = transaction.TransactionManager()
    report = ImportReport()
    try:
        connection = db.open(transaction_manager=manager)
        try:
            container = _traverse(connection.root(), args.path)
            try:
                taken = name in container
            except TypeError:
                return _error(args, f'the object at {args.path} is not a '
                                    f'container')
            if taken:
                return _error(args, f'{args.path} already holds {name!r}; '
                                    f'give another --name')
            said_below = _NamedByTheCommand()
            zexp_logger.addHandler(said_below)
            try:
                obj = import_file(
                    connection, args.file, args.source_blob_dir, report,
                    Progress('import', quiet=args.quiet))
            finally:
                zexp_logger.removeHandler(said_below)
            container[name] = obj
            manager.commit()
        except NotABlobFile as e:
            # Something else under a blob name of the source blob
            # directory: a problem of that directory, found and named.
            return _error(args, f'nothing of {args.file} imported: {e}', 1)
        except (LookupError, ExportError, OSError) as e:
            return _error(args, str(e))
        except KeyboardInterrupt:
            return _error(args, f'interrupted: nothing of {args.file} was '
                                f'imported', 130)
        finally:
            manager.abort()
            connection.close()
    finally:
        db.close()
    target = args.path.rstrip('/') + '/' + name
    print(f'{args.file}: imported as {target}: {report.records} objects, '
          f'{report.blobs} blobs ({report.blob_bytes} bytes)')
    for line in report.lines():
        print(line, file=sys.stderr)
    # Imported, but a blob without its bytes is a problem found (status 1);
    # a guessed revision is named, not counted.
    return 1 if report.empty_blobs else 0
