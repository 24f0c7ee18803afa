"""A zc.buildout recipe for a ZEO server of a zodbblob storage.

``recipe = zodbblob`` in a part ``[zeoserver]`` writes

- ``parts/zeoserver/zeo.conf``: a ZEO server for a FileStorage wrapped in
  ``<zodbblob>``;
- ``parts/zeoserver/client.conf``: the ``<zodbblobclient>`` section that
  talks to it, for a zope.conf to ``%include`` (or to copy);
- ``bin/zeoserver``: ``zodbblob serve --config parts/zeoserver/zeo.conf``
  with the part's eggs on its path.

The options are named as in plone.recipe.zeoserver and
plone.recipe.zope2instance; ``doc/recipe.rst`` describes them.  Each is
checked when the part is read, and the written zeo.conf is loaded as the
server will load it, so a bad value stops the buildout with a
``zc.buildout.UserError`` naming the option, not the server at its start.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import MutableMapping
from typing import NoReturn

import zc.buildout
import zc.buildout.easy_install
import ZConfig
import ZConfig.datatypes

from zodbblob.config import AUTOMATIC
from zodbblob.layout import LAYOUTS

DEFAULTS = {
    'file-storage': os.path.join('var', 'filestorage', 'Data.fs'),
    'blob-storage': os.path.join('var', 'blobstorage'),
    'client-blob-dir': os.path.join('var', 'blobcache'),
    'zeo-address': '127.0.0.1:8100',
    'layout': AUTOMATIC,
}

# The storage's name in the server, as plone.recipe.zeoserver and
# plone.recipe.zope2instance (zeo-storage) have it by default.
STORAGE_NAME = '1'

_BYTE_SIZE = ZConfig.datatypes.Registry().get('byte-size')
_BOOLEAN = ZConfig.datatypes.Registry().get('boolean')


def _fail(name: str, part: str, value: str, expected: str) -> NoReturn:
    raise zc.buildout.UserError(
        f'[{part}] {name} = {value!r}: {expected}')


def _zconfig_value(value: str) -> str:
    # ZConfig substitutes $NAME in values: a path holding a $ must reach
    # the storage as written.
    return value.replace('$', '$$')


def parse_zeo_address(part: str, value: str) -> tuple[str, int]:
    """``(host, port)`` of zeo-address: ``HOST:PORT``, ``[IPV6]:PORT``, or
    a bare ``PORT``, which means 127.0.0.1 as for ``zodbblob serve``.

    A server that listens on port 0 would pick a port no client knows, so
    it is refused here too.
    """
    text = value.strip()
    host, colon, port = text.rpartition(':')
    if not colon:
        host = '127.0.0.1'
    elif host.startswith('[') and host.endswith(']'):
        host = host[1:-1]
    elif not host or ':' in host or ' ' in host:
        _fail('zeo-address', part, value,
              'expected HOST:PORT, [IPV6]:PORT or PORT')
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        _fail('zeo-address', part, value,
              f'expected HOST:PORT, [IPV6]:PORT or PORT, with a port from 1 '
              f'to 65535, not {port!r}')
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


def client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`:
    the loopback address of its family when it listens on every
    interface."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.is_unspecified:
        return '::1' if address.version == 6 else '127.0.0.1'
    return host


class Recipe:
    """The ``zodbblob`` recipe: ``zeo.conf``, ``client.conf`` and the
    server script of one part.

    The constructor checks the options and publishes the paths (so other
    parts can use ``${zeoserver:client-conf}``); `install` writes the files.
    """

    def __init__(self, buildout: MutableMapping, name: str,
                 options: MutableMapping):
        self.buildout, self.name, self.options = buildout, name, options
        directory = buildout['buildout']['directory']
        for option, default in DEFAULTS.items():
            options.setdefault(option, default)

        def path(option: str) -> str:
            value = options[option].strip()
            if not value or '\n' in value:
                _fail(option, name, options[option],
                      'expected a path, on one line')
            return os.path.normpath(os.path.join(
                directory, os.path.expanduser(value)))

        self.file_storage = path('file-storage')
        self.blob_storage = path('blob-storage')
        self.client_blob_dir = path('client-blob-dir')
        if self.client_blob_dir == self.blob_storage:
            _fail('client-blob-dir', name, options['client-blob-dir'],
                  f'the clients\' blob cache cannot be the server\'s '
                  f'blob-storage {self.blob_storage}')
        self.address = parse_zeo_address(name, options['zeo-address'])
        self.layout = options['layout'].strip()
        if self.layout != AUTOMATIC and self.layout not in LAYOUTS:
            _fail('layout', name, options['layout'],
                  f'expected a blob directory layout: '
                  f'{", ".join(sorted(LAYOUTS))}, or {AUTOMATIC}')
        self.dedup = options.get('dedup', '').strip()
        if self.dedup:
            try:
                self.dedup = _BOOLEAN(self.dedup)
            except ValueError:
                # Written into zeo.conf, where ZConfig's boolean reads it.
                _fail('dedup', name, options['dedup'],
                      'expected on or off (or yes, no, true, false)')
        self.blob_cache_size = options.get('blob-cache-size', '').strip()
        if self.blob_cache_size:
            try:
                size = _BYTE_SIZE(self.blob_cache_size)
            except ValueError:
                size = -1
            if size < 0:
                # Written into client.conf, where ZConfig's byte-size
                # reads it: whole numbers, units of 1024.
                _fail('blob-cache-size', name, self.blob_cache_size,
                      'expected a whole number of bytes, or of KB, MB or GB '
                      '(units of 1024, as ZConfig reads client.conf: not '
                      'TB, KiB, MiB, GiB or fractions)')
        self.blob_cache_size_check = options.get(
            'blob-cache-size-check', '').strip()
        if self.blob_cache_size_check and not (
                self.blob_cache_size_check.isdigit()
                and int(self.blob_cache_size_check) < 100):
            _fail('blob-cache-size-check', name, self.blob_cache_size_check,
                  'expected a percent of blob-cache-size, from 0 to 99')
        self.additional = options.get('zeo-conf-additional', '')

        location = os.path.join(buildout['buildout']['parts-directory'],
                                name)
        options['location'] = location
        options['zeo-conf'] = os.path.join(location, 'zeo.conf')
        options['client-conf'] = os.path.join(location, 'client.conf')
        options['script'] = os.path.join(
            buildout['buildout']['bin-directory'], name)

    def zeo_conf(self) -> str:
        """The text of ``zeo.conf``."""
        text = (
            f'# Written by buildout for its part [{self.name}]: change '
            f'buildout.cfg, not this file.\n'
            f'%import zodbblob\n'
            f'\n'
            f'<zeo>\n'
            f'  address {format_address(*self.address)}\n'
            f'</zeo>\n'
            f'\n'
            f'<zodbblob {STORAGE_NAME}>\n'
            f'  blob-dir {_zconfig_value(self.blob_storage)}\n'
            f'  layout {self.layout}\n'
            + ('  dedup on\n' if self.dedup else '') +
            f'  <filestorage>\n'
            f'    path {_zconfig_value(self.file_storage)}\n'
            f'  </filestorage>\n'
            f'</zodbblob>\n')
        additional = self.additional.strip('\n')
        if additional.strip():
            text += f'\n{additional}\n'
        return text

    def client_conf(self) -> str:
        """The text of ``client.conf``: a storage section, for a
        ``<zodb_db>`` (or ``<zodb>``) section to include."""
        host, port = self.address
        lines = [
            (f'# Written by buildout for its part [{self.name}]: the ZEO '
             f'client of'),
            f'# {self.options["zeo-conf"]}',
            '%import zodbblob',
            '<zodbblobclient>',
            f'  server {format_address(client_host(host), port)}',
            f'  storage {STORAGE_NAME}',
            f'  blob-dir {_zconfig_value(self.client_blob_dir)}',
        ]
        if self.blob_cache_size:
            lines.append(f'  blob-cache-size {self.blob_cache_size}')
        if self.blob_cache_size_check:
            lines.append(
                f'  blob-cache-size-check {self.blob_cache_size_check}')
        lines.append('</zodbblobclient>')
        return '\n'.join(lines) + '\n'

    def check_zeo_conf(self) -> None:
        """Load the written zeo.conf with ZEO's own schema, as the server
        will, so that its errors stop the buildout and not the server.

        Loading opens nothing: it checks the keys and sections
        (zeo-conf-additional's too) and what ``<zodbblob>`` can tell
        before opening, such as a layout that the blob-storage's marker
        contradicts.
        """
        import ZEO.runzeo
        options = ZEO.runzeo.ZEOOptions()
        options.load_schema()
        try:
            ZConfig.loadConfig(options.schema, self.options['zeo-conf'])
        except ZConfig.ConfigurationError as e:
            raise zc.buildout.UserError(
                f'[{self.name}] {self.options["zeo-conf"]} does not load '
                f'with ZEO\'s schema: {e}') from None

    def working_set(self):
        """zodbblob and the part's ``eggs``, installed as the buildout
        installs recipes (nothing is fetched when it is offline)."""
        buildout = self.buildout['buildout']
        specs = ['zodbblob'] + [
            line.strip() for line in self.options.get('eggs', '').split('\n')
            if line.strip()]
        if buildout.get('offline') == 'true':
            dest = None
            path = [buildout['develop-eggs-directory'],
                    buildout['eggs-directory']]
        else:
            dest = buildout['eggs-directory']
            path = [buildout['develop-eggs-directory']]
        return zc.buildout.easy_install.install(
            specs, dest,
            links=buildout.get('find-links', '').split(),
            index=buildout.get('index'),
            path=path,
            newest=buildout.get('newest') == 'true',
            allow_hosts=buildout.get('allow-hosts', '*').split('\n'))

    def install(self) -> list[str]:
        options = self.options
        location = options['location']
        os.makedirs(location, exist_ok=True)
        # FileStorage makes no directories; the blob directories are made
        # by the storage and the client, with the permissions they want.
        os.makedirs(os.path.dirname(self.file_storage), exist_ok=True)
        with open(options['zeo-conf'], 'w') as f:
            f.write(self.zeo_conf())
        self.check_zeo_conf()
        with open(options['client-conf'], 'w') as f:
            f.write(self.client_conf())
        script = zc.buildout.easy_install.scripts(
            [(self.name, 'zodbblob.cli', 'main')],
            self.working_set(), sys.executable,
            self.buildout['buildout']['bin-directory'],
            # The script's own arguments follow, so --address still works.
            arguments=f'[{"serve"!r}, {"--config"!r}, '
                      f'{options["zeo-conf"]!r}] + sys.argv[1:]')
        # Never the data: uninstalling the part leaves var/ alone.
        return [location] + script

    update = install
