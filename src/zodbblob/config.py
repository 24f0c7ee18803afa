"""ZConfig support: the ``<zodbblob>`` section that ``%import zodbblob`` adds.

::

    %import zodbblob
    <zodb>
      <zodbblob>
        blob-dir var/blobs
        layout bushy
        <filestorage>
          path var/Data.fs
        </filestorage>
      </zodbblob>
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

import ZConfig
import ZODB.config
from ZConfig import ConfigurationError
from ZODB.config import BaseConfig

from zodbblob.layout import LAYOUT_MARKER, LAYOUTS, read_marker
from zodbblob.storage import BlobStorage

AUTOMATIC = 'automatic'


def layout_name(value: str) -> str:
    """ZConfig datatype of ``layout``: a registered layout or automatic."""
    if value != AUTOMATIC and value not in LAYOUTS:
        raise ValueError(
            f'layout {value!r} is not a blob directory layout; known '
            f'layouts: {", ".join(sorted(LAYOUTS))}, or {AUTOMATIC}')
    return value


def blob_dir(value: str) -> str:
    """ZConfig datatype of ``blob-dir``: a directory, or a path to make one.

    The path is made absolute now: a server that changes its working
    directory later must not find another blob directory.
    """
    path = os.path.abspath(os.path.expanduser(value))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f'blob-dir {value!r}: {path} is not a directory')
    # The first existing ancestor must be a directory too, or creating
    # the blob directory fails only after the base storage was opened.
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f'blob-dir {value!r}: {ancestor} is not a '
                         f'directory, so {path} cannot be created')
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

    @staticmethod
    def _check_marker(blob_dir: str, layout: str) -> None:
        marked = read_marker(blob_dir) if os.path.isdir(blob_dir) else None
        if marked is None:
            return
        marker = os.path.join(blob_dir, LAYOUT_MARKER)
        if marked not in LAYOUTS:
            raise ConfigurationError(
                f'blob-dir {blob_dir}: its marker {marker} names layout '
                f'{marked!r}, which is not a blob directory layout; known '
                f'layouts: {", ".join(sorted(LAYOUTS))}')
        if layout not in (AUTOMATIC, marked):
            raise ConfigurationError(
                f'layout {layout!r} selected for blob-dir {blob_dir}, but its '
                f'marker {marker} names layout {marked!r}')

    def open(self):
        base = self.config.base.open()
        try:
            return BlobStorage(self.config.blob_dir, base, self.config.layout)
        except BaseException:
            # The base is ours until the wrapper exists: close it, or its
            # lock file outlives the error.
            base.close()
            raise


_SECTION = re.compile(r'^\s*<zodbblob(\s[^>]*)?>.*?^\s*</zodbblob>',
                      re.IGNORECASE | re.MULTILINE | re.DOTALL)
_DIRECTIVE = re.compile(r'^\s*%(define|import)\s.*$', re.MULTILINE)


def storage_from_file(path: str, read_only: bool = False) -> BlobStorage:
    """Open the first ``<zodbblob>`` section of the config file `path`.

    Any file that holds one will do: a zope.conf, a zeo.conf, a ZODB
    config; its ``%define`` lines apply.  With `read_only`, the base is
    opened read-only (where its section has ``read-only``), so tools can
    look at a storage a server is using.
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
    return factory.open()
