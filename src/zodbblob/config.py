"""ZConfig support: the sections that ``%import zodbblob`` adds.

``<zodbblob>`` gives the storage section inside it blob support::

    %import zodbblob
    <zodb>
      <zodbblob>
        blob-dir var/blobs
        layout bushy
        dedup on
        <filestorage>
          path var/Data.fs
        </filestorage>
      </zodbblob>
    </zodb>

``<zodbblobclient>`` is a ZEO client with zodbblob's blob cache
(`zodbblob.zeo.ClientStorage`).  It takes every key of ZODB's
``<zeoclient>`` (it extends it) and of ZEO's ``<clientstorage>``, whose
``<ssl>`` section is called ``<zodbblob-ssl>`` here, plus its own::

    %import zodbblob
    <zodb>
      <zodbblobclient>
        server zeo.example.com:8100
        blob-dir var/blob-cache
        blob-cache-size 2GB
        read-only-blob-dir /mnt/zeo-blobs
        blob-download-timeout 5m
      </zodbblobclient>
    </zodb>

Everything that can be checked without opening a storage is checked while
the configuration loads, so a bad configuration fails before any file is
created: a storage opened first (the base's ``Data.fs``) would otherwise be
left behind by an error that was known all along.
"""

from __future__ import annotations

import io
import os
import re
import stat

import ZConfig
import ZODB.config
from ZConfig import ConfigurationError
from ZODB.config import BaseConfig

from zodbblob.layout import LAYOUT_MARKER, LAYOUTS, read_marker
from zodbblob.objectstore.zconfig import positive_seconds
from zodbblob.storage import BlobStorage, check_state_layout
from zodbblob.storage.commitlog import CommitLog, CommitLogError, commit_log_path
from zodbblob.storage.filestorage import FileStorageOpener

# A marker holds a layout name: anything longer is not one.
_MARKER_LIMIT = 256

AUTOMATIC = 'automatic'


def layout_name(value: str) -> str:
    """ZConfig datatype of ``layout``: a registered layout or automatic."""
    if value != AUTOMATIC and value not in LAYOUTS:
        raise ValueError(
            f'layout {value!r} is not a blob directory layout; known '
            f'layouts: {", ".join(sorted(LAYOUTS))}, or {AUTOMATIC}')
    return value


def _shown(value: str) -> str:
    # A path of thousands of characters makes no readable message.
    return repr(value if len(value) <= 80 else value[:60] + '...')


def _stat(value: str, path: str) -> os.stat_result | None:
    """`path`'s stat; None if nothing is there; ValueError, in one line
    naming the value, when the path cannot be looked at."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise ValueError(f'blob-dir {_shown(value)}: cannot use '
                         f'{_shown(path)}: {e.strerror}') from None


def _may(path: str, mode: int) -> bool:
    # As the process will open it: with its effective ids.
    return os.access(path, mode,
                     effective_ids=os.access in os.supports_effective_ids)


def blob_dir(value: str) -> str:
    """ZConfig datatype of ``blob-dir``: a directory, or a path to make one.

    The path is made absolute now: a server that changes its working
    directory later must not find another blob directory.  An empty value
    is refused (it would make the working directory a blob directory), and
    so is a path with a NUL byte, one too long for the system, or one this
    process may not read (or, to create it, write).
    """
    if not value.strip():
        raise ValueError('blob-dir is empty: expected the path of a blob '
                         'directory')
    if '\0' in value:
        raise ValueError(f'blob-dir {_shown(value)}: a path cannot hold a '
                         f'NUL byte')
    path = os.path.abspath(os.path.expanduser(value))
    info = _stat(value, path)
    if info is not None:
        if not stat.S_ISDIR(info.st_mode):
            raise ValueError(f'blob-dir {_shown(value)}: {_shown(path)} is '
                             f'not a directory')
        if not _may(path, os.R_OK | os.X_OK):
            raise ValueError(f'blob-dir {_shown(value)}: {_shown(path)} '
                             f'cannot be read: permission denied')
        return path
    # The first existing ancestor must be a directory this process may
    # write in, or creating the blob directory fails only after the base
    # storage was opened.
    ancestor = os.path.dirname(path)
    while (found := _stat(value, ancestor)) is None:
        ancestor = os.path.dirname(ancestor)
    if not stat.S_ISDIR(found.st_mode):
        raise ValueError(f'blob-dir {_shown(value)}: {_shown(ancestor)} is '
                         f'not a directory, so {_shown(path)} cannot be '
                         f'created')
    if not _may(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f'blob-dir {_shown(value)}: {_shown(path)} cannot '
                         f'be created: {_shown(ancestor)} is not writable')
    try:
        name_max = os.pathconf(ancestor, 'PC_NAME_MAX')
    except (OSError, ValueError):
        name_max = 255
    if any(len(os.fsencode(name)) > name_max
           for name in path[len(ancestor):].split(os.sep)):
        raise ValueError(f'blob-dir {_shown(value)}: a name in the path is '
                         f'too long (over {name_max} bytes)')
    return path


def _section_label(section) -> str:
    name = section.getSectionName()
    kind = section.getSectionType()
    return f'<{kind} {name}>' if name else f'<{kind}>'


def _blob_dirs(factory, path=()):
    """``(section path, blob_dir)`` for each storage below `factory` that
    has blob support of its own (``blob-dir`` set), however deeply nested
    (a ``<demostorage>`` or ``<zlibstorage>`` around a ``<filestorage>``).
    """
    section = getattr(factory, 'config', None)
    if section is None or not hasattr(section, 'getSectionAttributes'):
        return
    path = path + (_section_label(section),)
    own = getattr(section, 'blob_dir', None)
    if own:
        yield path, own
    for attribute in section.getSectionAttributes():
        value = getattr(section, attribute, None)
        for nested in value if isinstance(value, list) else [value]:
            if hasattr(nested, 'open'):
                yield from _blob_dirs(nested, path)


def marked_layout(blob_dir: str) -> str | None:
    """The layout `blob_dir`'s marker names, or None without a marker.

    ValueError, in one line naming the path, for a marker that names no
    known layout (damaged, or a ZEO client blob cache's) or that cannot
    be read.
    """
    marker = os.path.join(blob_dir, LAYOUT_MARKER)
    try:
        with open(marker, 'rb') as f:
            raw = f.read(_MARKER_LIMIT + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise ValueError(f'blob-dir {blob_dir}: cannot read its marker '
                         f'{marker}: {e.strerror}') from None
    try:
        marked = raw.decode('ascii').strip()
    except UnicodeDecodeError:
        marked = None
    if marked in LAYOUTS:
        return marked
    from zodbblob.cache import LAYOUT as CACHE_LAYOUT
    if marked == CACHE_LAYOUT:
        raise ValueError(f'blob-dir {blob_dir} is a ZEO client blob cache '
                         f'(its marker {marker} says {CACHE_LAYOUT!r}), not '
                         f'a storage\'s blob directory')
    shown = repr(marked) if marked and len(raw) <= _MARKER_LIMIT else (
        'no layout name')
    raise ValueError(f'blob-dir {blob_dir}: its marker {marker} is damaged '
                     f'or foreign: it holds {shown}; expected one of '
                     f'{", ".join(sorted(LAYOUTS))}')


def check_blob_directory(blob_dir: str) -> None:
    """Refuse, with a one-line ValueError naming the path, a blob
    directory that no storage can open: state files of the wrong kind (a
    ``.zodbblob`` that is a file, a ``journal.sqlite`` that is a
    directory), a damaged or foreign marker, a client cache, a commit log
    without a valid header.  Changes nothing.
    """
    check_state_layout(blob_dir)
    marked_layout(blob_dir)
    path = commit_log_path(blob_dir)
    if os.path.lexists(path):
        try:
            CommitLog(path, read_only=True).close()
        except CommitLogError as e:
            raise ValueError(str(e)) from None
        except OSError as e:
            raise ValueError(f'blob-dir {blob_dir}: cannot read its commit '
                             f'log {path}: {e.strerror}') from None


class BlobStorageConfig(BaseConfig):
    """The ``<zodbblob>`` section: checked at load, opened by `open`.

    Errors found here are ``ZConfig.ConfigurationError``: they concern the
    section as a whole, which a ``ValueError`` would tag with no position.
    """

    def __init__(self, config):
        super().__init__(config)
        found = next(_blob_dirs(config.base), None)
        if found is not None:
            path, other = found
            raise ConfigurationError(
                f'<zodbblob> (blob-dir {config.blob_dir}) cannot wrap '
                f'{" in ".join(reversed(path))}: it has blob support of its '
                f'own, blob-dir {other}; remove blob-dir from {path[-1]}')
        self._check_marker(config.blob_dir, config.layout)
        self._check_cache_size(config)

    @staticmethod
    def _check_cache_size(config) -> None:
        size = config.cache_size
        if size is None:
            return
        if config.object_store is None:
            raise ConfigurationError(
                f'<zodbblob> (blob-dir {config.blob_dir}): cache-size {size} '
                f'needs an <s3> section: it bounds the local copies of the '
                f'blobs kept in a bucket')
        if size < 0:
            raise ConfigurationError(
                f'<zodbblob> (blob-dir {config.blob_dir}): cache-size {size}: '
                f'a size in bytes cannot be negative')

    @staticmethod
    def _check_marker(blob_dir: str, layout: str) -> None:
        try:
            marked = marked_layout(blob_dir)
        except ValueError as e:
            raise ConfigurationError(str(e)) from None
        if marked is not None and layout not in (AUTOMATIC, marked):
            marker = os.path.join(blob_dir, LAYOUT_MARKER)
            raise ConfigurationError(
                f'layout {layout!r} selected for blob-dir {blob_dir}, but its '
                f'marker {marker} names layout {marked!r}')

    def _options(self) -> dict:
        """The keyword arguments of the storage: the object store's only
        with an ``<s3>`` section (a storage without one is opened as
        before it existed)."""
        config = self.config
        options = {'scrub': config.scrub}
        if config.object_store is not None:
            options['object_store'] = config.object_store
            options['cache_size'] = config.cache_size
        return options

    def open(self):
        # Checked again when opened: the directory may have changed since
        # the configuration loaded, and a refusal now opens no base.
        check_blob_directory(self.config.blob_dir)
        section = self.config.base
        if isinstance(section, ZODB.config.FileStorage):
            # Opened by the storage, after it locked the blob directory and
            # rolled back a torn last transaction: it commits with one sync.
            opener = FileStorageOpener(
                section.config.path, open=section.open,
                read_only=bool(getattr(section.config, 'read_only', False)),
                create=bool(getattr(section.config, 'create', False)))
            return BlobStorage(self.config.blob_dir, opener,
                               self.config.layout, self.config.dedup,
                               **self._options())
        base = section.open()
        try:
            return BlobStorage(self.config.blob_dir, base, self.config.layout,
                               self.config.dedup, **self._options())
        except BaseException:
            # The base is ours until the wrapper exists: close it, or its
            # lock file outlives the error.
            base.close()
            raise


def read_only_blob_dir(value: str) -> str:
    """ZConfig datatype of ``read-only-blob-dir``: the server's blob
    directory, mounted read-only, as an absolute path.

    It must exist when the client starts (a mount that is missing would
    silently turn every read into a download), and it must look like a
    server's blob directory: a marker naming a known layout, or empty.
    """
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.isdir(path):
        problem = ('is not a directory' if os.path.exists(path)
                   else 'does not exist')
        raise ValueError(f'read-only-blob-dir {value!r}: {path} {problem}')
    try:
        marked = read_marker(path)
        used = bool(marked is None and os.listdir(path))
    except OSError as e:
        raise ValueError(
            f'read-only-blob-dir {value!r}: cannot read {path}: {e}') from None
    if used:
        raise ValueError(
            f'read-only-blob-dir {value!r}: {path} has files but no '
            f'{LAYOUT_MARKER} marker; a ZEO server\'s blob directory has one')
    if marked is not None and marked not in LAYOUTS:
        raise ValueError(
            f'read-only-blob-dir {value!r}: its marker '
            f'{os.path.join(path, LAYOUT_MARKER)} names layout {marked!r}, '
            f'which is not a blob directory layout; known layouts: '
            f'{", ".join(sorted(LAYOUTS))}')
    return path


def download_timeout(value: str) -> float:
    """ZConfig datatype of ``blob-download-timeout``: positive seconds,
    written as a number (``0.5``, ``300``) or as ZConfig's time-interval
    (``5m``, ``1h``)."""
    return positive_seconds('blob-download-timeout', value)


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


class ClientStorageConfig(BaseConfig):
    """The ``<zodbblobclient>`` section: checked at load, opened by `open`.

    Each key goes to the `zodbblob.zeo.ClientStorage` argument of its
    name, as ``ZODB.config.ZEOClient`` and ``ZEO.zconfig`` pass them.  What
    the client would refuse only when opened, after connecting or
    creating blob-dir, is refused here, naming the key and its value.
    """

    def __init__(self, config):
        super().__init__(config)
        self._check()

    def _check(self) -> None:
        config = self.config
        where = _section_label(config)
        blob_dir = config.blob_dir
        if blob_dir is not None:
            # As ZEO will open it: relative to the working directory.
            path = os.path.abspath(blob_dir)
            if os.path.exists(path) and not os.path.isdir(path):
                raise ConfigurationError(
                    f'{where}: blob-dir {blob_dir}: {path} is not a '
                    f'directory')
            if not config.shared_blob_dir:
                self._check_cache_marker(where, blob_dir, path)
        size = config.blob_cache_size
        if size is not None and size < 0:
            raise ConfigurationError(
                f'{where}: blob-cache-size {size}: a size in bytes cannot '
                f'be negative')
        if config.object_store is not None and (
                blob_dir is None or config.shared_blob_dir):
            raise ConfigurationError(
                f'{where}: <s3> (bucket {config.object_store.bucket!r}) '
                f'needs a blob-dir with shared-blob-dir off: blobs read '
                f'from the bucket are kept in the client\'s blob cache')
        check = config.blob_cache_size_check
        if check is not None and not 0 <= check < 100:
            raise ConfigurationError(
                f'{where}: blob-cache-size-check {check}: expected a '
                f'percent of blob-cache-size, from 0 to 99')
        read_only_dir = config.read_only_blob_dir
        if read_only_dir is None:
            return
        if config.shared_blob_dir:
            raise ConfigurationError(
                f'{where}: read-only-blob-dir {read_only_dir} cannot be used '
                f'with shared-blob-dir on: a client writes into a shared '
                f'blob directory, and never into a read-only one')
        if blob_dir is None:
            raise ConfigurationError(
                f'{where}: read-only-blob-dir {read_only_dir} needs a '
                f'blob-dir too, to download the blobs not yet visible in it')
        if _inside(blob_dir, read_only_dir) or _inside(read_only_dir,
                                                       blob_dir):
            raise ConfigurationError(
                f'{where}: blob-dir {blob_dir} and read-only-blob-dir '
                f'{read_only_dir} must be apart: the cache is written, the '
                f'server\'s blob directory never is')

    @staticmethod
    def _check_cache_marker(where: str, blob_dir: str, path: str) -> None:
        # The likely mistake: blob-dir naming the server's blob directory.
        # The cache refuses it too, but only once the client is opened.
        marked = read_marker(path) if os.path.isdir(path) else None
        if marked is None:
            return
        from zodbblob.cache import LAYOUT
        if marked != LAYOUT:
            raise ConfigurationError(
                f'{where}: blob-dir {blob_dir}: its marker '
                f'{os.path.join(path, LAYOUT_MARKER)} names layout '
                f'{marked!r}, not the blob cache\'s {LAYOUT!r}; a server\'s '
                f'blob directory is read-only-blob-dir (or blob-dir with '
                f'shared-blob-dir on), never a cache')

    def open(self):
        # Imported here, not above: every config with %import zodbblob
        # loads this module, servers included, and they need no client.
        from zodbblob.zeo import ClientStorage

        config = self.config
        options = {}
        # Unset, these keep the constructor's defaults, as in ZODB.config.
        if config.blob_cache_size is not None:
            options['blob_cache_size'] = config.blob_cache_size
        if config.blob_cache_size_check is not None:
            options['blob_cache_size_check'] = config.blob_cache_size_check
        if config.ssl is not None:
            options['ssl'], options['ssl_server_hostname'] = config.ssl
        if config.object_store is not None:
            options['object_store'] = config.object_store
        return ClientStorage(
            [server.address for server in config.server],
            storage=config.storage,
            cache_size=config.cache_size,
            name=config.name,
            wait_timeout=config.wait_timeout,
            read_only=config.read_only,
            read_only_fallback=config.read_only_fallback,
            blob_dir=config.blob_dir,
            shared_blob_dir=config.shared_blob_dir,
            client_label=config.client_label,
            cache=config.cache_path,
            client=config.client,
            var=config.var,
            min_disconnect_poll=config.min_disconnect_poll,
            max_disconnect_poll=config.max_disconnect_poll,
            wait=config.wait,
            drop_cache_rather_verify=config.drop_cache_rather_verify,
            server_sync=config.server_sync,
            username=config.username,
            password=config.password,
            realm=config.realm,
            read_only_blob_dir=config.read_only_blob_dir,
            blob_download_timeout=config.blob_download_timeout,
            **options)


_SECTION = re.compile(r'^\s*<zodbblob(\s[^>]*)?>.*?^\s*</zodbblob>',
                      re.IGNORECASE | re.MULTILINE | re.DOTALL)
_DIRECTIVE = re.compile(r'^\s*%(define|import)\s.*$', re.MULTILINE)


def storage_from_file(path: str, read_only: bool = False,
                      existing: bool = False,
                      scrub: bool | None = None) -> BlobStorage:
    """Open the first ``<zodbblob>`` section of the config file `path`.

    Any file that holds one will do: a zope.conf, a zeo.conf, a ZODB
    config; its ``%define`` lines apply.  With `read_only`, the base is
    opened read-only (where its section has ``read-only``), so tools can
    look at a storage a server is using.  With `existing`, a blob-dir
    that is no blob directory yet (missing, or without a marker) is a
    ValueError before anything is opened: a tool must not make one.
    `scrub`, unless None, replaces the section's ``scrub`` (tools open
    their storages without the background scrubber).
    """
    with open(path) as f:
        text = f.read()
    match = _SECTION.search(text)
    if match is None:
        raise ConfigurationError(f'{path} has no <zodbblob> section')
    directives = [d.group(0).strip() for d in _DIRECTIVE.finditer(text)
                  if d.group(0).split() != ['%import', 'zodbblob']]
    section = '\n'.join(['%import zodbblob'] + directives + [match.group(0)])
    root, handlers = ZConfig.loadConfigFile(
        ZODB.config.getStorageSchema(), io.StringIO(section), path)
    factory = root.storage
    if read_only:
        base = factory.config.base.config
        if not hasattr(base, 'read_only'):
            raise ConfigurationError(
                f'{path}: the base storage of its <zodbblob> section cannot '
                f'be opened read-only')
        base.read_only = True
    if existing:
        check_existing_blob_directory(factory.config.blob_dir)
    if scrub is not None:
        factory.config.scrub = scrub
    return factory.open()


def check_existing_blob_directory(blob_dir: str) -> None:
    """Refuse, with a one-line ValueError naming the path, a `blob_dir`
    that is not a blob directory already: missing, not a directory, or
    without a ``.layout`` marker; or one `check_blob_directory` refuses.

    Opening a storage would make any of these a new blob directory, and
    a tool would then report on (or recover) an empty one.
    """
    if not os.path.isdir(blob_dir):
        raise ValueError(f'blob-dir {blob_dir} is not a blob directory: no '
                         f'such directory')
    check_blob_directory(blob_dir)
    if marked_layout(blob_dir) is None:
        raise ValueError(f'blob-dir {blob_dir} is not a blob directory: no '
                         f'{LAYOUT_MARKER} marker')
