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

``zodbblob serve`` is ZEO's own ``runzeo`` with a default configuration:
the same options object, the same signal handling and shutdown, and
ZEO's server with one change: a client's uploads that are never stored
are removed (``zodbblob.server``).  With no arguments it runs this zeo.conf (see
`serve_config`)::

    %import zodbblob
    <zeo>
      address 127.0.0.1:8100
    </zeo>
    <zodbblob 1>
      blob-dir ./var/blobstorage
      layout automatic
      <filestorage>
        path ./var/filestorage/Data.fs
      </filestorage>
    </zodbblob>

The places under ``var/`` are Plone's (and the buildout recipe's), so a
database moves between them without a word of configuration.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence

import zc.lockfile
import ZConfig
import ZConfig.datatypes
import ZConfig.loader
import ZEO.runzeo
import ZODB.config

from zodbblob.cli.arguments import ToolError, add_storage_arguments, open_storage
from zodbblob.backup import (add_backup_arguments, add_restore_arguments,
                              backup_command, restore_command)
from zodbblob.commitlog import CommitLogError
from zodbblob.journal import JournalError
from zodbblob.layout import LAYOUTS
from zodbblob.cli.migrate import add_migrate_arguments, migrate_command
from zodbblob.tools.progress import Progress
from zodbblob.server import create_server
from zodbblob.storage import BlobStorage, BlobStorageError
from zodbblob.tools.verify import verify as check_blob_files
from zodbblob.cli.zexp import (add_export_arguments, add_import_arguments,
                               export_command, import_command)

logger = logging.getLogger(__name__)

DEFAULT_HOST = '127.0.0.1'
DEFAULT_PORT = 8100
DEFAULT_VAR = 'var'
AUTOMATIC = 'automatic'

# Where serve keeps its database under --var: Plone's places, which the
# buildout recipe uses too.
DATA_FS = os.path.join('filestorage', 'Data.fs')
BLOB_DIR = 'blobstorage'
# Where serve kept it before: a --var that still has these holds a
# database that serve would no longer see.
OLD_PLACES = ('Data.fs', 'blobs')


# serve

def parse_address(text: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT``, ``[IPV6]:PORT`` or ``PORT``.

    A bare port means 127.0.0.1, never every interface: a ZEO server has
    no authentication, so serving beyond this machine must be asked for.
    """
    host, colon, port = text.rpartition(':')
    if not colon:
        host = DEFAULT_HOST
    elif host.startswith('[') and host.endswith(']'):
        host = host[1:-1]
    elif not host or ':' in host:
        raise argparse.ArgumentTypeError(
            f'address {text!r}: expected HOST:PORT, [IPV6]:PORT or PORT')
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(
            f'address {text!r}: port {port!r} is not a number from 0 to '
            f'65535')
    return host, number


def format_address(address: tuple[str, int]) -> str:
    host, port = address[:2]
    return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


def is_loopback(host: str) -> bool:
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _zconfig_value(text: str) -> str:
    # ZConfig substitutes $NAME in values; a path holding a $ must
    # reach the storage as written.
    if '\n' in text:
        raise ValueError(f'{text!r} cannot be written in a ZConfig value')
    return text.replace('$', '$$')


def serve_config(address: tuple[str, int] = (DEFAULT_HOST, DEFAULT_PORT),
                 var: str = DEFAULT_VAR, layout: str = AUTOMATIC) -> str:
    """The zeo.conf that ``zodbblob serve`` runs when given no --config."""
    var = os.path.abspath(var)
    blob_dir = _zconfig_value(os.path.join(var, BLOB_DIR))
    data_fs = _zconfig_value(os.path.join(var, DATA_FS))
    return (
        '%import zodbblob\n'
        '\n'
        '<zeo>\n'
        f'  address {format_address(address)}\n'
        '</zeo>\n'
        '\n'
        '<zodbblob 1>\n'
        f'  blob-dir {blob_dir}\n'
        f'  layout {layout}\n'
        '  <filestorage>\n'
        f'    path {data_fs}\n'
        '  </filestorage>\n'
        '</zodbblob>\n')


class ServeOptions(ZEO.runzeo.ZEOOptions):
    """runzeo's options, whose errors are one line, as every tool's."""

    def usage(self, msg):
        sys.stderr.write(f'{self.progname}: error: {" ".join(msg.split())}\n')
        sys.exit(2)


class ConfigTextOptions(ServeOptions):
    """ZEO server options read from zeo.conf text instead of ``-C FILE``.

    Only where the configuration comes from differs; everything after
    loading (defaults, checks, logging) is runzeo's.
    """

    def __init__(self, text: str, name: str):
        super().__init__()
        self.config_text = text
        self.config_name = name

    def default_configfile(self):
        # Without a config file name, ZDOptions would not load one at all.
        return self.config_name

    def load_configfile(self):
        self.configroot, self.confighandlers = ZConfig.loadConfigFile(
            self.schema, io.StringIO(self.config_text), self.config_name,
            self.zconfig_options)


class ZEOServer(ZEO.runzeo.ZEOServer):
    """runzeo's server, which says where it serves and cleans up earlier."""

    def open_storages(self):
        # runzeo sets up its handlers only after opening the storages; a
        # SIGTERM during a long FileStorage index rebuild would kill the
        # process without closing what was already open.
        self.storages = {}
        self.setup_signals()
        super().open_storages()

    def create_server(self):
        # runzeo's server, whose connections remove the uploads no
        # storeBlob took (see zodbblob.server).
        self.server = create_server(self.storages, self.options)
        logger.info('Serving ZEO on %s',
                    format_address(self.server.acceptor.addr))
        for name, storage in sorted(self.storages.items()):
            logger.info('Storage %r: %s', name, describe_storage(storage))
        host = self.server.acceptor.addr[0]
        if not is_loopback(host):
            logger.warning(
                'Serving on %s, not on loopback: ZEO has no authentication, '
                'so anyone who reaches this port can read and change the '
                'database', host)

    def close_server(self):
        if self.server is None:
            # Stopped before serving: the storages are not the server's to
            # close yet, so nothing else would close them.
            for storage in self.storages.values():
                storage.close()
        super().close_server()
        # A server that could not open its first storage (another server
        # holds it) closed nothing: its error says why it stopped.
        if self.storages:
            logger.info(
                'Stopped; closed storages %s',
                ', '.join(repr(name) for name in sorted(self.storages)))


def describe_storage(storage) -> str:
    if isinstance(storage, BlobStorage):
        return (f'{storage.base.getName()}, blobs in '
                f'{storage.fshelper.base_dir.rstrip(os.sep)} '
                f'(layout {storage.fshelper.layout_name})')
    return storage.getName()


def storage_places(opener) -> tuple[list[str], list[str]]:
    """The FileStorage paths and blob directories that a storage section
    of zeo.conf names, in the sections it wraps too (``base``)."""
    config = getattr(opener, 'config', None)
    data_files, blob_dirs = [], []
    if config is None:
        return data_files, blob_dirs
    if isinstance(opener, ZODB.config.FileStorage):
        data_files.append(os.path.abspath(config.path))
    blob_dir = getattr(config, 'blob_dir', None)
    if blob_dir:
        blob_dirs.append(os.path.abspath(blob_dir))
    base = getattr(config, 'base', None)
    if base is not None:
        inner_files, inner_dirs = storage_places(base)
        data_files += inner_files
        blob_dirs += inner_dirs
    return data_files, blob_dirs


def make_storage_directories(config_path: str) -> list[str]:
    """Make the directory of every FileStorage that the zeo.conf at
    `config_path` names, as serve does for its own; return their paths.

    ZODB's schema refuses a FileStorage path whose directory is missing
    while loading, so the paths are found in a first load that takes the
    paths as written.  A file that does not load is left to runzeo's
    loading, which reports it.
    """
    stock = dict(ZConfig.datatypes.stock_datatypes)
    stock['existing-dirpath'] = os.path.abspath
    options = ZEO.runzeo.ZEOOptions()
    try:
        schema = ZConfig.loader.SchemaLoader(
            ZConfig.datatypes.Registry(stock)).loadURL(
            os.path.join(options.schemadir, options.schemafile))
        root, _ = ZConfig.loadConfig(schema, config_path)
    except (ZConfig.ConfigurationError, OSError):
        return []
    made = []
    for opener in root.storages:
        for path in storage_places(opener)[0]:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            made.append(os.path.dirname(path))
    return made


def old_places(var: str) -> list[str]:
    """What a --var holds where serve no longer looks."""
    return [os.path.join(var, name) for name in OLD_PLACES
            if os.path.lexists(os.path.join(var, name))]


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        f'Run a ZEO server.  Without --config it serves a FileStorage at '
        f'VAR/{DATA_FS} with blobs in VAR/{BLOB_DIR} (the places Plone '
        f'uses), on 127.0.0.1:8100.')
    parser.add_argument(
        '--address', type=parse_address, metavar='HOST:PORT',
        help=f'where to listen (default {DEFAULT_HOST}:{DEFAULT_PORT}; a '
             f'bare PORT means {DEFAULT_HOST})')
    parser.add_argument(
        '--var', metavar='DIR',
        help=f'directory for {DATA_FS} and {BLOB_DIR}/, created if '
             f'missing (default ./{DEFAULT_VAR})')
    parser.add_argument(
        '--layout', choices=sorted(LAYOUTS) + [AUTOMATIC],
        help='blob directory layout (default automatic: the existing '
             "directory's, bushy for a new one)")
    parser.add_argument(
        '--config', metavar='ZEO.CONF',
        help='run this ZEO server configuration instead (use %%import '
             'zodbblob in it for <zodbblob> sections); --address overrides '
             'its address')


def serve(args: argparse.Namespace) -> int:
    if args.config is not None:
        if args.var is not None or args.layout is not None:
            args.parser.error('--var and --layout configure the default '
                              'storage; with --config, the file does')
        try:
            make_storage_directories(args.config)
        except OSError as e:
            print(f'{args.parser.prog}: error: {args.config}: cannot make '
                  f'the directory of a FileStorage: {e}', file=sys.stderr)
            return 2
        argv = ['-C', args.config]
        if args.address is not None:
            argv += ['-a', format_address(args.address)]
        options = ServeOptions()
    else:
        var = os.path.abspath(
            args.var if args.var is not None else DEFAULT_VAR)
        if os.path.exists(var) and not os.path.isdir(var):
            args.parser.error(f'--var {var}: not a directory')
        found = old_places(var)
        if found:
            # Serving would start an empty database beside the real one,
            # and clients would commit into it: refuse, changing nothing.
            print(f'{args.parser.prog}: error: --var {var} holds a database '
                  f'where serve no longer looks ({", ".join(found)}); it '
                  f'serves {os.path.join(var, DATA_FS)} and '
                  f'{os.path.join(var, BLOB_DIR)}: move Data.fs (with its '
                  f'.index) and blobs there, or serve them with --config',
                  file=sys.stderr)
            return 2
        # FileStorage makes no directories; the blob directory is made by
        # the storage itself, with the permissions it wants.
        os.makedirs(os.path.dirname(os.path.join(var, DATA_FS)),
                    exist_ok=True)
        text = serve_config(args.address or (DEFAULT_HOST, DEFAULT_PORT),
                            var, args.layout or AUTOMATIC)
        argv = []
        options = ConfigTextOptions(text, '<zodbblob serve defaults>')
    options.realize(argv, progname=args.parser.prog)
    for opener in options.storages:
        data_files, blob_dirs = storage_places(opener)
        # One plain line before runzeo's log: where the data is, so that
        # nobody serves an empty database by mistake.
        print(f'{args.parser.prog}: storage {opener.name!r}: database '
              f'{", ".join(data_files) or opener.__class__.__name__}, '
              f'blobs in {", ".join(blob_dirs) or "(none)"}',
              file=sys.stderr, flush=True)
    try:
        ZEOServer(options).main()
    except (BlobStorageError, zc.lockfile.LockError) as e:
        # Another server has the storage: a message, not a traceback.
        print(f'{args.parser.prog}: error: {e}', file=sys.stderr)
        return 2
    return 0


# verify and recover

def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Check that every blob record has its file, and report files no '
        'record references (orphans), files whose size differs from the '
        'journal, unreadable files, anything under a blob name that is not '
        'a regular file (never opened), and transactions a crash left for '
        '`zodbblob recover`.  Opens the storage read-only: safe while a '
        'server runs.  Exit status 0 when clean, 1 when problems were '
        'found, 2 when it could not run.')
    add_storage_arguments(parser)
    parser.add_argument('--checksum', action='store_true',
                        help='read every byte of every blob file')


def verify(args: argparse.Namespace) -> int:
    storage = open_storage(args, read_only=True)
    try:
        report = check_blob_files(
            storage, checksum=args.checksum,
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


class _Collect(logging.Handler):

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def recover(args: argparse.Namespace) -> int:
    collect = _Collect()
    storage_logger = logging.getLogger('zodbblob.storage')
    storage_logger.addHandler(collect)
    level = storage_logger.level
    storage_logger.setLevel(logging.INFO)   # rows written are said too
    try:
        storage = open_storage(args, read_only=False)
    except (BlobStorageError, zc.lockfile.LockError) as e:
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


# cache

SIZE_UNITS = {'': 1, 'b': 1, 'kb': 1024, 'kib': 1024, 'mb': 1024 ** 2,
              'mib': 1024 ** 2, 'gb': 1024 ** 3, 'gib': 1024 ** 3,
              'tb': 1024 ** 4, 'tib': 1024 ** 4}


def parse_size(text: str) -> int:
    """Bytes in ``500MB``, ``2GB``, ``1.5GiB`` or ``1048576``.

    KB, MB, GB and TB count in 1024s, as ZConfig's byte sizes (and so
    ``blob-cache-size``) do.
    """
    text = text.strip()
    unit = text.lstrip('0123456789. ')
    number = text[:len(text) - len(unit)].strip()
    unit = unit.lower()
    if unit not in SIZE_UNITS or not number.replace('.', '', 1).isdigit():
        raise argparse.ArgumentTypeError(
            f'size {text!r}: expected bytes, or a number with KB, MB, GB, '
            f'TB (or KiB, MiB, GiB, TiB)')
    return int(float(number) * SIZE_UNITS[unit])


def format_size(size: int) -> str:
    for unit in ('bytes', 'KiB', 'MiB', 'GiB'):
        if size < 1024:
            break
        size /= 1024
    else:
        unit = 'TiB'
    return f'{size} bytes' if unit == 'bytes' else f'{size:.1f} {unit}'


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Show or prune a ZEO client blob cache directory.  Safe while '
        'clients use it: both go through the cache index, files being '
        'downloaded are never pruned, and those used in the last seconds '
        'go last.')
    actions = parser.add_subparsers(dest='action', metavar='ACTION',
                                    required=True)
    stats = actions.add_parser(
        'stats', help='files, bytes, oldest access and hit ratio')
    prune = actions.add_parser(
        'prune', help='evict the least recently used files down to a size')
    for action in (stats, prune):
        action.add_argument('directory', metavar='DIR',
                            help='the blob cache directory')
        action.add_argument('--quiet', action='store_true',
                            help='only the numbers (stats) or nothing '
                                 '(prune)')
    prune.add_argument('--size', type=parse_size, required=True,
                       metavar='SIZE',
                       help='bytes to keep at most, e.g. 500MB, 2GB, 1.5GiB')
    prune.add_argument('--check-percent', type=float, default=0,
                       metavar='PERCENT',
                       help='go this percent of SIZE further below it '
                            '(default 0)')


def check_cache_directory(directory: str) -> None:
    """Raise ToolError unless `directory` is a ZEO client's blob cache.

    Opening anything else would make it one (a marker written, an
    index created): refused before anything touches it.
    """
    from zodbblob.cache import LAYOUT
    from zodbblob.layout import LAYOUT_MARKER, LAYOUTS, read_marker
    if not os.path.exists(directory):
        raise ToolError(f"{directory} does not exist (expected a ZEO "
                        f"client's blob cache directory)")
    if not os.path.isdir(directory):
        raise ToolError(f"{directory} is not a directory (expected a ZEO "
                        f"client's blob cache directory)")
    try:
        marked = read_marker(directory)
    except UnicodeDecodeError:
        raise ToolError(f"{directory} is not a ZEO client's blob cache (its "
                        f"{LAYOUT_MARKER} marker is not text)") from None
    if marked == LAYOUT:
        return
    if marked in LAYOUTS:
        raise ToolError(f"{directory} is a storage's blob directory (layout "
                        f"{marked}), not a ZEO client's blob cache")
    if marked is None:
        raise ToolError(f"{directory} is not a ZEO client's blob cache (no "
                        f"{LAYOUT_MARKER} marker for layout {LAYOUT})")
    raise ToolError(f"{directory} is not a ZEO client's blob cache (its "
                    f"{LAYOUT_MARKER} marker names {marked!r}, not {LAYOUT})")


def cache(args: argparse.Namespace) -> int:
    from zodbblob.cache import BlobCache
    check_cache_directory(args.directory)
    # Opened without a size: pruned here, at once, not in the background.
    blob_cache = BlobCache(args.directory,
                           check_percent=getattr(args, 'check_percent', 0))
    # What the prune could not do is said in the outcome's one line, not
    # also as the library's warnings before it.
    collect = _Collect()
    collect.setLevel(logging.WARNING)
    cache_logger = logging.getLogger('zodbblob.cache')
    try:
        if args.action == 'prune':
            cache_logger.addHandler(collect)
            try:
                files, removed = blob_cache.prune(args.size)
            finally:
                cache_logger.removeHandler(collect)
        stats = blob_cache.stats()
    finally:
        blob_cache.close()
    if args.action == 'stats':
        print_cache_stats(blob_cache.directory, stats, args.quiet)
        return 0
    target = args.size - int(args.size * args.check_percent / 100)
    if not args.quiet:
        print(f'{blob_cache.directory}: removed {files} files, '
              f'{format_size(removed)}; {stats["files"]} files, '
              f'{format_size(stats["bytes"])} left')
    if stats['bytes'] <= target:
        for message in collect.messages:
            print(message, file=sys.stderr)
        return 0
    if collect.messages:
        why = one_line(collect.messages[0])
        if len(collect.messages) > 1:
            why += f' (and {len(collect.messages) - 1} more)'
    else:
        why = ('another process is pruning it, or its files are being '
               'downloaded')
    print(f'{blob_cache.directory}: still above {format_size(target)}: '
          f'{why}', file=sys.stderr)
    return 1


def print_cache_stats(directory: str, stats: dict, quiet: bool) -> None:
    import datetime
    if quiet:
        print(stats['files'], stats['bytes'])
        return
    print(f'{directory}:')
    print(f'  files: {stats["files"]}')
    readable = format_size(stats['bytes'])
    print(f'  bytes: {stats["bytes"]}'
          + (f' ({readable})' if stats['bytes'] >= 1024 else ''))
    if stats['oldest_access'] is not None:
        oldest = datetime.datetime.fromtimestamp(stats['oldest_access'])
        print(f'  oldest access: {oldest:%Y-%m-%d %H:%M:%S}')
    lookups = stats['hits'] + stats['misses']
    if lookups:
        print(f'  hits: {stats["hits"]}, misses: {stats["misses"]} '
              f'(hit ratio {stats["hits"] / lookups:.1%})')


# the command

COMMANDS = {
    'serve': (add_serve_arguments, serve,
              'run a ZEO server for a zodbblob storage'),
    'verify': (add_verify_arguments, verify,
               'check blob files against their records'),
    'recover': (add_recover_arguments, recover,
                'finish what a crash interrupted, without serving'),
    'cache': (add_cache_arguments, cache,
              'show or prune a ZEO client blob cache'),
    'migrate': (add_migrate_arguments, migrate_command,
                'copy a blob directory into another layout'),
    'backup': (add_backup_arguments, backup_command,
               'snapshot a storage, incrementally, beside a live server'),
    'restore': (add_restore_arguments, restore_command,
                'restore or check a snapshot taken by backup'),
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


def one_line(error: BaseException) -> str:
    """`error`'s message on one line, for stderr."""
    text = ' '.join(str(error).split())
    return text or type(error).__name__


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


if __name__ == '__main__':
    sys.exit(main())
