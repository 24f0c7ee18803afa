"""The ``zodbblob`` command.

One subcommand per job.  Each is a pair in `COMMANDS`: a function that adds
its arguments to a subparser, and the function that runs it and returns
the exit status: ``serve``, ``verify``, ``recover``, ``cache``,
``migrate``, ``export``, ``import``, ``backup`` and ``restore``.

``zodbblob serve`` is ZEO's own ``runzeo`` with a default configuration:
the same options object, the same server class, the same signal handling
and shutdown.  With no arguments it runs this zeo.conf (see
`serve_config`)::

    %import zodbblob
    <zeo>
      address 127.0.0.1:8100
    </zeo>
    <zodbblob 1>
      blob-dir ./var/blobs
      layout automatic
      <filestorage>
        path ./var/Data.fs
      </filestorage>
    </zodbblob>
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence

import zc.lockfile
import ZConfig
import ZEO.runzeo

from zodbblob.arguments import add_storage_arguments, open_storage
from zodbblob.backup import (add_backup_arguments, add_restore_arguments,
                              backup_command, restore_command)
from zodbblob.layout import LAYOUTS
from zodbblob.migrate import add_migrate_arguments, migrate_command
from zodbblob.progress import Progress
from zodbblob.storage import BlobStorage, BlobStorageError
from zodbblob.verify import verify as check_blob_files
from zodbblob.zexp import (add_export_arguments, add_import_arguments,
                           export_command, import_command)

logger = logging.getLogger(__name__)

DEFAULT_HOST = '127.0.0.1'
DEFAULT_PORT = 8100
DEFAULT_VAR = 'var'
AUTOMATIC = 'automatic'


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
    blob_dir = _zconfig_value(os.path.join(var, 'blobs'))
    data_fs = _zconfig_value(os.path.join(var, 'Data.fs'))
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


class ConfigTextOptions(ZEO.runzeo.ZEOOptions):
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
        super().create_server()
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
        logger.info('Stopped; closed storages %s',
                    ', '.join(repr(name) for name in sorted(self.storages)))


def describe_storage(storage) -> str:
    if isinstance(storage, BlobStorage):
        return (f'{storage.base.getName()}, blobs in '
                f'{storage.fshelper.base_dir.rstrip(os.sep)} '
                f'(layout {storage.fshelper.layout_name})')
    return storage.getName()


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Run a ZEO server.  Without --config it serves a FileStorage at '
        'VAR/Data.fs with blobs in VAR/blobs, on 127.0.0.1:8100.')
    parser.add_argument(
        '--address', type=parse_address, metavar='HOST:PORT',
        help=f'where to listen (default {DEFAULT_HOST}:{DEFAULT_PORT}; a '
             f'bare PORT means {DEFAULT_HOST})')
    parser.add_argument(
        '--var', metavar='DIR',
        help=f'directory for Data.fs and blobs/, created if missing '
             f'(default ./{DEFAULT_VAR})')
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
        argv = ['-C', args.config]
        if args.address is not None:
            argv += ['-a', format_address(args.address)]
        options = ZEO.runzeo.ZEOOptions()
    else:
        var = args.var if args.var is not None else DEFAULT_VAR
        if os.path.exists(var) and not os.path.isdir(var):
            args.parser.error(f'--var {var}: not a directory')
        os.makedirs(var, exist_ok=True)
        text = serve_config(args.address or (DEFAULT_HOST, DEFAULT_PORT),
                            var, args.layout or AUTOMATIC)
        argv = []
        options = ConfigTextOptions(text, '<zodbblob serve defaults>')
    options.realize(argv, progname=args.parser.prog)
    try:
        ZEOServer(options).main()
    except (BlobStorageError, zc.lockfile.LockError) as e:
        # Another server has the storage: a message, not a traceback.
        print(f'{args.parser.prog}: error: {e}', file=sys.stderr)
        return 1
    return 0


# verify and recover

def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Check that every blob record has its file, and report files no '
        'record references (orphans), files whose size differs from the '
        'journal, and unreadable files.  Opens the storage read-only: safe '
        'while a server runs.  Exit status 0 when clean, 1 otherwise.')
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
    try:
        storage = open_storage(args, read_only=False)
    except (BlobStorageError, zc.lockfile.LockError) as e:
        print(f'{args.parser.prog}: error: the storage is in use by another '
              f'process (a running server?), so it is not recovered: {e}',
              file=sys.stderr)
        return 1
    finally:
        storage_logger.removeHandler(collect)
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


def cache(args: argparse.Namespace) -> int:
    from zodbblob.cache import LAYOUT, BlobCache
    from zodbblob.layout import LAYOUT_MARKER, read_marker
    try:
        marked = read_marker(args.directory)
    except ValueError:
        marked = None
    if marked != LAYOUT:
        # Opening it would make it a cache: refuse before anything does.
        print(f'{args.parser.prog}: error: {args.directory} is not a blob '
              f'cache directory (no {LAYOUT_MARKER} marker for layout '
              f'{LAYOUT})', file=sys.stderr)
        return 2
    # Opened without a size: pruned here, at once, not in the background.
    blob_cache = BlobCache(args.directory,
                           check_percent=getattr(args, 'check_percent', 0))
    try:
        if args.action == 'prune':
            files, removed = blob_cache.prune(args.size)
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
    if stats['bytes'] > target:
        print(f'{blob_cache.directory}: still above '
              f'{format_size(target)}: another process is pruning it, or '
              f'files could not be removed', file=sys.stderr)
        return 1
    return 0


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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='zodbblob',
        description='Safe, fast and manageable blobs for ZODB and ZEO.')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND',
                                     required=True)
    for name, (add_arguments, run, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary)
        add_arguments(sub)
        sub.set_defaults(run=run, parser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return args.run(args)


if __name__ == '__main__':
    sys.exit(main())
