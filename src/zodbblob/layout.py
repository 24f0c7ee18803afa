"""Blob directory layouts: where the file of each (oid, tid) lives.

``bushy`` and ``lawn`` name files exactly as ``ZODB.blob`` does, so a blob
directory moves between stock ZODB and zodbblob unchanged.  ``chunky`` and
``flat`` are adapted from DirectoryStorage's formats: they create no
directory per oid, which makes committing new blobs cheaper on filesystems
with fast wide directories.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator

import zope.interface
from ZODB.utils import oid_repr
from ZODB.utils import p64
from ZODB.utils import repr_to_oid

from zodbblob.interfaces import ILayout


logger = logging.getLogger(__name__)

BLOB_SUFFIX = '.blob'
LAYOUT_MARKER = '.layout'
LAYOUTS: dict[str, ILayout] = {}

_HEX_BYTE = re.compile(r'0x[0-9a-f]{1,2}$')
_TID_NAME = re.compile(r'(0x[0-9a-f]{2,16})\.blob$')


def register_layout(layout: ILayout) -> ILayout:
    """Make `layout` selectable by its name (in configs and markers)."""
    LAYOUTS[layout.name] = layout
    return layout


def _invalid(path: str) -> ValueError:
    return ValueError('Not a valid OID path: `%s`' % path)


def _tid_from_name(name: str, path: str) -> bytes:
    match = _TID_NAME.match(name)
    if match is None:
        raise ValueError('Not a blob file name: `%s`' % path)
    return repr_to_oid(match.group(1))


class _Layout:
    """What every layout shares: file names carry ``<tid repr>.blob``."""

    name = None
    directory_per_oid = True

    def __repr__(self):
        return '<%s layout>' % self.name

    def oid_directory(self, oid: bytes) -> str:
        return self.oid_to_path(oid)

    def getBlobFilePath(self, oid: bytes, tid: bytes) -> str:
        return os.path.join(self.oid_to_path(oid),
                            oid_repr(tid) + BLOB_SUFFIX)

    def blob_path_to_oid_tid(self, path: str) -> tuple[bytes, bytes]:
        directory, name = os.path.split(path)
        return self.path_to_oid(directory), _tid_from_name(name, path)

    def iter_blob_paths(self, base_dir: str) -> Iterator[
            tuple[bytes, bytes, str]]:
        base_dir = os.path.abspath(base_dir)
        for dirpath, dirnames, filenames in os.walk(base_dir):
            # Hidden directories and tmp hold no committed blob; sorting
            # makes enumeration (and so tests and migrations) repeatable.
            dirnames[:] = sorted(
                d for d in dirnames
                if not d.startswith('.') and not (
                    dirpath == base_dir and d == 'tmp'))
            relative = os.path.relpath(dirpath, base_dir)
            for name in sorted(filenames):
                if not name.endswith(BLOB_SUFFIX):
                    continue
                try:
                    oid, tid = self.blob_path_to_oid_tid(
                        os.path.join(relative, name))
                except ValueError:
                    continue
                yield oid, tid, os.path.join(dirpath, name)


@zope.interface.implementer(ILayout)
class BushyLayout(_Layout):
    """One directory level per oid byte, most significant first.

    ``0x00/0x00/0x00/0x00/0x00/0x00/0x12/0x34/0x03e1....blob``: at most
    256 entries per directory, 8 levels, a leaf directory per oid.
    """

    name = 'bushy'

    def oid_to_path(self, oid: bytes) -> str:
        return os.path.sep.join('0x%02x' % byte for byte in oid)

    def path_to_oid(self, path: str) -> bytes:
        parts = path.split(os.path.sep)
        if len(parts) != 8 or not all(_HEX_BYTE.match(p) for p in parts):
            raise _invalid(path)
        return bytes(int(p, 16) for p in parts)


@zope.interface.implementer(ILayout)
class LawnLayout(_Layout):
    """One directory per oid, all directly below the blob directory."""

    name = 'lawn'

    def oid_to_path(self, oid: bytes) -> str:
        return oid_repr(oid)

    def path_to_oid(self, path: str) -> bytes:
        if not re.match(r'0x[0-9a-f]{1,16}$', path):
            raise _invalid(path)
        return repr_to_oid(path)


@zope.interface.implementer(ILayout)
class ChunkyLayout(_Layout):
    """Few levels of wide directories and no directory per oid.

    The 16 hex digits of the oid are cut 4-3-3-3-3: four directory levels
    (the first one only grows past ``0x0000`` beyond 2**48 oids), and the
    last three digits start the file name.  A leaf directory holds the
    files of up to 4096 oids:
    ``0x0000/0x000/0x000/0x001/0x234.0x03e1....blob``.
    """

    name = 'chunky'
    directory_per_oid = False
    _cuts = ((0, 4), (4, 7), (7, 10), (10, 13), (13, 16))
    _pattern = re.compile(
        r'0x([0-9a-f]{4})/0x([0-9a-f]{3})/0x([0-9a-f]{3})/'
        r'0x([0-9a-f]{3})/0x([0-9a-f]{3})$'.replace('/', re.escape(os.sep)))

    def oid_to_path(self, oid: bytes) -> str:
        digits = oid.hex()
        return os.path.sep.join('0x' + digits[a:b] for a, b in self._cuts)

    def path_to_oid(self, path: str) -> bytes:
        match = self._pattern.match(path)
        if match is None:
            raise _invalid(path)
        return bytes.fromhex(''.join(match.groups()))

    def oid_directory(self, oid: bytes) -> str:
        return os.path.dirname(self.oid_to_path(oid))

    def getBlobFilePath(self, oid: bytes, tid: bytes) -> str:
        return '%s.%s%s' % (self.oid_to_path(oid), oid_repr(tid), BLOB_SUFFIX)

    def blob_path_to_oid_tid(self, path: str) -> tuple[bytes, bytes]:
        directory, name = os.path.split(path)
        prefix, dot, rest = name.partition('.')
        if not dot:
            raise ValueError('Not a blob file name: `%s`' % path)
        return (self.path_to_oid(os.path.join(directory, prefix)),
                _tid_from_name(rest, path))


@zope.interface.implementer(ILayout)
class FlatLayout(_Layout):
    """Every blob file in the blob directory itself: ``0x12.0x03e1....blob``.

    For small stores and study: one ``listdir`` shows everything.
    """

    name = 'flat'
    directory_per_oid = False

    def oid_to_path(self, oid: bytes) -> str:
        return oid_repr(oid)

    def path_to_oid(self, path: str) -> bytes:
        return LAYOUTS['lawn'].path_to_oid(path)

    def oid_directory(self, oid: bytes) -> str:
        return ''

    getBlobFilePath = ChunkyLayout.getBlobFilePath
    blob_path_to_oid_tid = ChunkyLayout.blob_path_to_oid_tid

    def iter_blob_paths(self, base_dir: str) -> Iterator[
            tuple[bytes, bytes, str]]:
        base_dir = os.path.abspath(base_dir)
        if not os.path.isdir(base_dir):
            return
        for name in sorted(os.listdir(base_dir)):
            try:
                oid, tid = self.blob_path_to_oid_tid(name)
            except ValueError:
                continue
            yield oid, tid, os.path.join(base_dir, name)


for _layout in (BushyLayout(), LawnLayout(), ChunkyLayout(), FlatLayout()):
    register_layout(_layout)


def read_marker(base_dir: str) -> str | None:
    """The layout name in `base_dir`'s marker, or None without one."""
    try:
        with open(os.path.join(base_dir, LAYOUT_MARKER)) as marker:
            return marker.read().strip()
    except FileNotFoundError:
        return None


def auto_layout_select(path: str) -> str:
    """The layout of blob directory `path`, by ZODB's rules.

    A marker wins; a missing or empty directory (hidden files aside) gets
    ``bushy``; a used directory without a marker was written before
    markers existed, so it is ``lawn``.
    """
    marked = read_marker(path) if os.path.isdir(path) else None
    if marked is not None:
        logger.debug('Blob directory %s has a marker for layout %r',
                     path, marked)
        return marked
    if not os.path.exists(path):
        return 'bushy'
    if any(not name.startswith('.') for name in os.listdir(path)):
        logger.debug('Blob directory %s is used and has no marker: '
                     'selected layout lawn', path)
        return 'lawn'
    return 'bushy'


def get_layout(name: str, base_dir: str = '') -> ILayout:
    """The registered layout `name`; ValueError naming the choices."""
    try:
        return LAYOUTS[name]
    except KeyError:
        where = ' for blob directory %s' % base_dir if base_dir else ''
        raise ValueError(
            'Unknown blob directory layout `%s`%s; known layouts: %s'
            % (name, where, ', '.join(sorted(LAYOUTS)))) from None


class FilesystemHelper:
    """Paths of one blob directory; the API of ``ZODB.blob``'s helper.

    Storages, tools and ZEO code written against ``ZODB.blob
    .FilesystemHelper`` work with this one, for every layout.
    """

    def __init__(self, base_dir: str, layout_name: str = 'automatic'):
        self.base_dir = os.path.abspath(base_dir) + os.path.sep
        self.temp_dir = os.path.join(self.base_dir, 'tmp')
        if layout_name == 'automatic':
            layout_name = auto_layout_select(base_dir)
        self.layout = get_layout(layout_name, self.base_dir)
        self.layout_name = layout_name

    def __repr__(self):
        return '<FilesystemHelper %s (%s)>' % (self.base_dir,
                                               self.layout_name)

    def check_marker(self) -> None:
        """Refuse a directory whose marker names another layout."""
        marked = read_marker(self.base_dir)
        if marked is not None and marked != self.layout_name:
            raise ValueError(
                'Directory layout `%s` selected for blob directory %s, but '
                'marker found for layout `%s`'
                % (self.layout_name, self.base_dir, marked))

    def create(self) -> None:
        """Create the directory, its ``tmp`` and the marker, if missing.

        The marker is checked before anything is created, so a mismatch
        changes nothing on disk.
        """
        if os.path.exists(self.base_dir) and not os.path.isdir(
                self.base_dir):
            raise ValueError('Blob directory %s is not a directory'
                             % self.base_dir.rstrip(os.sep))
        self.check_marker()
        if not os.path.isdir(self.base_dir):
            os.makedirs(self.base_dir)
            logger.info('Created blob directory %s', self.base_dir)
        os.makedirs(self.temp_dir, exist_ok=True)
        marker = os.path.join(self.base_dir, LAYOUT_MARKER)
        if not os.path.exists(marker):
            # Write then rename: a marker is never seen half-written.
            fd, staged = tempfile.mkstemp(dir=self.base_dir,
                                          prefix='.layout-')
            with os.fdopen(fd, 'w') as f:
                f.write(self.layout_name)
            os.rename(staged, marker)

    def getPathForOID(self, oid, create: bool = False) -> str:
        if isinstance(oid, int):
            oid = p64(oid)
        if create:
            os.makedirs(os.path.join(self.base_dir,
                                     self.layout.oid_directory(oid)),
                        exist_ok=True)
        return os.path.join(self.base_dir, self.layout.oid_to_path(oid))

    def createPathForOID(self, oid) -> str:
        return self.getPathForOID(oid, create=True)

    def getOIDForPath(self, path: str) -> bytes:
        if path.startswith(self.base_dir):
            path = path[len(self.base_dir):]
        return self.layout.path_to_oid(path)

    def getBlobFilename(self, oid, tid) -> str:
        if isinstance(oid, int):
            oid = p64(oid)
        if isinstance(tid, int):
            tid = p64(tid)
        return os.path.join(self.base_dir,
                            self.layout.getBlobFilePath(oid, tid))

    def splitBlobFilename(self, filename: str):
        """``(oid, tid)`` of a blob file name; ``(None, None)`` otherwise."""
        if not filename.endswith(BLOB_SUFFIX):
            return None, None
        if filename.startswith(self.base_dir):
            filename = filename[len(self.base_dir):]
        try:
            return self.layout.blob_path_to_oid_tid(filename)
        except ValueError:
            return None, None

    def blob_mkstemp(self, oid, tid):
        """A new temporary file beside the committed files of `oid`."""
        directory = os.path.join(self.base_dir,
                                 self.layout.oid_directory(oid))
        return tempfile.mkstemp(suffix='.tmp', prefix=oid_repr(tid),
                                dir=directory)

    def iter_blobs(self) -> Iterator[tuple[bytes, bytes, str]]:
        """``(oid, tid, path)`` of every committed blob file."""
        return self.layout.iter_blob_paths(self.base_dir)

    def listOIDs(self) -> Iterator[tuple[bytes, str]]:
        """``(oid, oid path)`` for every oid that has a blob file."""
        seen = None
        for oid, tid, path in self.iter_blobs():
            if oid != seen:
                seen = oid
                yield oid, self.getPathForOID(oid)

    def getOIDsForSerial(self, search_serial: bytes) -> list[bytes]:
        return [oid for oid, tid, path in self.iter_blobs()
                if tid == search_serial]
