"""``zodbblob serve``: a ZEO server for zodbblob storages.

``zodbblob serve`` is ZEO's own ``runzeo`` with a default configuration:
the same options object, the same signal handling and shutdown, and
ZEO's server with one change: a client's uploads that are never stored
are removed (``zodbblob.server``).  With no arguments it runs this
zeo.conf (see `serve_config`)::

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
import dataclasses
import io
import ipaddress
import logging
import os
import sys

import zc.lockfile
import ZConfig
import ZConfig.datatypes
import ZConfig.loader
import ZEO.runzeo
import ZODB.config

from zodbblob.layout import LAYOUTS
from zodbblob.objectstore import ObjectStoreSettings
from zodbblob.objectstore.settings import normalise_prefix
from zodbblob.server import create_server
from zodbblob.storage import BlobStorage, BlobStorageError

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


def s3_section(settings: ObjectStoreSettings, indent: str = '  ') -> str:
    """The ``<s3>`` section that loads as `settings`: every field that
    is not its default, under its key (``endpoint_url``: endpoint-url)."""
    lines = [f'{indent}<s3>\n']
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if value == field.default:
            continue
        key = field.name.replace('_', '-')
        lines.append(f'{indent}  {key} {_zconfig_value(str(value))}\n')
    lines.append(f'{indent}</s3>\n')
    return ''.join(lines)


def serve_config(address: tuple[str, int] = (DEFAULT_HOST, DEFAULT_PORT),
                 var: str = DEFAULT_VAR, layout: str = AUTOMATIC,
                 dedup: bool = False, *,
                 object_store: ObjectStoreSettings | None = None,
                 cache_size: int | None = None) -> str:
    """The zeo.conf that ``zodbblob serve`` runs when given no --config
    (with `dedup`, its ``<zodbblob>`` section says ``dedup on``; with
    `object_store`, it has an ``<s3>`` section and `cache_size`, if not
    None, as ``cache-size``)."""
    var = os.path.abspath(var)
    blob_dir = _zconfig_value(os.path.join(var, BLOB_DIR))
    data_fs = _zconfig_value(os.path.join(var, DATA_FS))
    s3 = ''
    if object_store is not None:
        s3 = s3_section(object_store)
        if cache_size is not None:
            s3 = f'  cache-size {cache_size}\n' + s3
    elif cache_size is not None:
        raise ValueError('cache_size bounds the local copies of the blobs '
                         'in a bucket: it needs an object_store')
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
        + ('  dedup on\n' if dedup else '') +
        '  <filestorage>\n'
        f'    path {data_fs}\n'
        '  </filestorage>\n'
        + s3 +
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
        # runzeo stops on SIGINT or SIGTERM by raising SystemExit out of
        # its loop, and leaves the loop to the garbage collector, which at
        # exit may close the loop's own socket first: its __del__ then
        # prints a traceback after a clean stop.  Close it here.
        acceptor = getattr(self.server, 'acceptor', None)
        loop = getattr(acceptor, 'event_loop', None)
        super().close_server()
        if loop is not None and not loop.is_running() \
                and not loop.is_closed():
            loop.close()
        # A server that could not open its first storage (another server
        # holds it) closed nothing: its error says why it stopped.
        if self.storages:
            logger.info(
                'Stopped; closed storages %s',
                ', '.join(repr(name) for name in sorted(self.storages)))


def describe_storage(storage) -> str:
    if isinstance(storage, BlobStorage):
        blob_dir = storage.fshelper.base_dir.rstrip(os.sep)
        objects = storage.object_store
        if objects is not None:
            size = objects.cache.size_limit
            cache = ('an unbounded cache' if size is None
                     else f'a cache of {size} bytes')
            return (f'{storage.base.getName()}, blobs in {objects.name} at '
                    f'{objects.bucket.endpoint}'
                    f'{", each content once (dedup on)" if storage.dedup else ""}'
                    f' (catalog and {cache} in {blob_dir})')
        return (f'{storage.base.getName()}, blobs in {blob_dir} '
                f'(layout {storage.fshelper.layout_name}'
                f'{", dedup on" if storage.dedup else ""})')
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
        bucket = getattr(config, 'object_store', None)
        blob_dirs.append(os.path.abspath(blob_dir) if bucket is None else
                         f's3://{bucket.bucket}/{bucket.prefix} (catalog '
                         f'and cache in {os.path.abspath(blob_dir)})')
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


S3_OPTIONS = ('s3_prefix', 's3_endpoint_url', 's3_region', 's3_cache_size')
_BYTE_SIZE = ZConfig.datatypes.Registry().get('byte-size')


def _s3_prefix(text: str) -> str:
    try:
        return normalise_prefix(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'{text!r} must not start with / nor have a .. part') from None


def _byte_size(text: str) -> int:
    try:
        size = _BYTE_SIZE(text)
    except ValueError:
        size = -1
    if size < 0:
        raise argparse.ArgumentTypeError(
            f'{text!r} is not a size in bytes (such as 2GB, 500MB or '
            f'1000000)')
    return size


def s3_settings(args: argparse.Namespace) -> ObjectStoreSettings | None:
    """The settings the --s3-* options give; None without --s3-bucket,
    when any other --s3-* is an error (`args.parser`'s, one line)."""
    if args.s3_bucket is None:
        given = [name for name in S3_OPTIONS
                 if getattr(args, name) is not None]
        if given:
            args.parser.error(
                f'--{given[0].replace("_", "-")} needs --s3-bucket: the '
                f'--s3-* options configure a bucket')
        return None
    try:
        return ObjectStoreSettings(
            args.s3_bucket, prefix=args.s3_prefix or '',
            endpoint_url=args.s3_endpoint_url, region=args.s3_region)
    except ValueError as e:
        args.parser.error(str(e))


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
        '--dedup', action='store_true',
        help='store a blob whose bytes equal a stored file\'s as a hard '
             'link to it (dedup on in the <zodbblob> section)')
    s3 = parser.add_argument_group(
        'object store',
        'Keep committed blobs in an S3-API bucket (<s3> in the '
        '<zodbblob> section).  Credentials come only from boto3\'s chain: '
        'AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment, '
        '~/.aws (AWS_PROFILE), an instance role; never from the command '
        'line, where other users see them.')
    s3.add_argument('--s3-bucket', metavar='NAME', help='the bucket')
    s3.add_argument('--s3-prefix', metavar='PREFIX', type=_s3_prefix,
                    help='put before every key (zodb/)')
    s3.add_argument('--s3-endpoint-url', metavar='URL',
                    help='the server (http://minio.example:9000); default '
                         'AWS, or AWS_ENDPOINT_URL')
    s3.add_argument('--s3-region', metavar='REGION',
                    help='the bucket\'s region (eu-west-1)')
    s3.add_argument('--s3-cache-size', metavar='SIZE', type=_byte_size,
                    help='the most bytes of local copies kept in the blob '
                         'directory (2GB, 500MB)')
    parser.add_argument(
        '--config', metavar='ZEO.CONF',
        help='run this ZEO server configuration instead (use %%import '
             'zodbblob in it for <zodbblob> sections); --address overrides '
             'its address')


def serve_command(args: argparse.Namespace) -> int:
    if args.config is not None:
        if (args.var is not None or args.layout is not None or args.dedup
                or args.s3_bucket is not None
                or any(getattr(args, name) is not None
                       for name in S3_OPTIONS)):
            args.parser.error('--var, --layout, --dedup and --s3-* '
                              'configure the default storage; with '
                              '--config, the file does (dedup on, <s3> in '
                              'its <zodbblob> section)')
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
        object_store = s3_settings(args)
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
                            var, args.layout or AUTOMATIC, args.dedup,
                            object_store=object_store,
                            cache_size=args.s3_cache_size)
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
