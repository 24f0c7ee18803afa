"""Blob directory layouts: where the file of each (oid, tid) lives.

``bushy`` and ``lawn`` name files exactly as ``ZODB.blob`` does, so a blob
directory moves between stock ZODB and zodbblob unchanged.  ``chunky`` and
``flat`` are adapted from DirectoryStorage's formats: they create no
directory per oid, which makes committing new blobs cheaper on filesystems
with fast wide directories.  Here too: the ids that every path is built
from (``check_id``), the registry of layouts and the ``.layout`` marker.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator

import zope.interface
import zope.interface.verify
from ZODB.utils import oid_repr, p64

from zodbblob.interfaces import ILayout
from zodbblob.layout.scan import _scan

logger = logging.getLogger(__name__)

BLOB_SUFFIX = '.blob'
LAYOUT_MARKER = '.layout'
LAYOUTS: dict[str, ILayout] = {}

_REPR = re.compile(r'0x(?:[0-9a-f]{2}){1,8}')
_BUSHY_LEVEL = re.compile(r'0x[0-9a-f]{2}')


def register_layout(layout: ILayout) -> ILayout:
    """Make `layout` selectable by its name (in configs and markers).

    A name already taken by another layout is refused: replacing, say,
    ``bushy`` would make every existing bushy directory unreadable.
    """
    zope.interface.verify.verifyObject(ILayout, layout)
    name = layout.name
    if name == 'automatic' or LAYOUTS.get(name, layout) is not layout:
        raise ValueError(
            f'Cannot register {layout!r}: the blob directory layout name '
            f'`{name}` is taken (registered layouts: '
            f'{", ".join([*sorted(LAYOUTS), "automatic"])})')
    LAYOUTS[name] = layout
    return layout


def _invalid(path: str) -> ValueError:
    return ValueError(f'Not a valid OID path: `{path}`')


def _from_repr(text: str) -> bytes | None:
    """The 8 bytes that ``oid_repr`` writes as `text`; None for others.

    Only the exact spelling ZODB writes is accepted: ``0x0001`` or
    ``0x1`` would otherwise name the same oid as ``0x01``, and a walk of
    the directory would report files that ``getBlobFilename`` never
    points at.
    """
    if _REPR.fullmatch(text) is None:
        return None
    # oid_repr writes no leading zero byte, except for zero itself.
    if text.startswith('0x00') and text != '0x00':
        return None
    return bytes.fromhex(text[2:]).rjust(8, b'\0')


def _tid_from_name(name: str, path: str) -> bytes:
    tid = None
    if name.endswith(BLOB_SUFFIX):
        tid = _from_repr(name[:-len(BLOB_SUFFIX)])
    if tid is None:
        raise ValueError(f'Not a blob file name: `{path}`')
    return tid


class InvalidIdError(ValueError):
    """An oid or tid that is not exactly 8 bytes."""


def check_id(value, kind: str = 'oid', blob_dir: str | None = None) -> bytes:
    """`value` as the 8 bytes of an oid or tid; InvalidIdError otherwise.

    Every path and every commit log record is built from ids that passed
    here.  ``oid_repr`` writes ``repr()`` for an id of another length,
    slashes and ``..`` included, so a path made of a ZEO client's 20-byte
    "oid" would leave the blob directory; and ``struct`` packs such an id
    cut or padded to 8 bytes, so a record would name another object.
    ZODB passes ids around as integers in places: those are packed.
    """
    if isinstance(value, bytes):
        if len(value) == 8:
            return value
        what = f'{len(value)} bytes'
    elif isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < 1 << 64:
            return p64(value)
        what = 'an integer out of range'
    else:
        what = f'a {type(value).__name__}'
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + '...'
    where = f' for blob directory {blob_dir}' if blob_dir else ''
    article = 'an' if kind[0] in 'aeiou' else 'a'
    raise InvalidIdError(f'Refused {kind} {shown}{where}: {article} {kind} '
                         f'is exactly 8 bytes, this is {what}')


class _Layout:
    """What every layout shares: file names carry ``<tid repr>.blob``."""

    name = None
    directory_per_oid = True

    def __repr__(self):
        return f'<{self.name} layout>'

    def oid_directory(self, oid: bytes) -> str:
        return self.oid_to_path(oid)

    def getBlobFilePath(self, oid: bytes, tid: bytes) -> str:
        return os.path.join(self.oid_to_path(oid),
                            oid_repr(check_id(tid, 'tid')) + BLOB_SUFFIX)

    def blob_path_to_oid_tid(self, path: str) -> tuple[bytes, bytes]:
        directory, name = os.path.split(path)
        return self.path_to_oid(directory), _tid_from_name(name, path)

    def iter_blob_paths(self, base_dir: str, not_files: list | None = None
                        ) -> Iterator[tuple[bytes, bytes, str]]:
        """``(oid, tid, path)`` of the blob files below `base_dir`; what
        is passed over where a blob file or its directory belongs (a link
        to a directory, a directory under a blob name) goes to `not_files`
        as ``(path, kind)``."""
        base_dir = os.path.abspath(base_dir)
        if self._reads_paths_by_level():
            return _scan(base_dir, self._root, self._depth, self._read_level,
                         self._read_file, self._files_only, not_files)
        return _scan(base_dir, '', None, self._join_level, self._parse_file,
                     self._files_only, not_files)

    # A scan reads a path one directory level at a time, and each level
    # once, however many files are below it: `_read_level` turns what the
    # levels above gave (`_root` at the top) and a directory name into
    # what the next level needs, or None where no blob file can be below;
    # `_read_file` turns what `_depth` levels gave and a file name into
    # ``(oid, tid)``, or None.  Together they accept exactly the paths
    # that `blob_path_to_oid_tid` accepts.
    _root = None
    _depth: int | None = None
    _files_only = False   # or anything but a directory, as os.walk lists

    def _read_level(self, level: int, above, name: str) -> None:
        return None   # a layout without directory levels: flat

    def _reads_paths_by_level(self) -> bool:
        # A subclass that names files its own way (FanoutLayout in
        # doc/layouts.rst overrides path_to_oid) inherits readers that do
        # not know its paths: it gets the walk that asks
        # blob_path_to_oid_tid about every file instead.
        for cls in type(self).__mro__:
            defined = vars(cls)
            if '_read_file' in defined:
                return True
            if any(name in defined for name in _PATH_METHODS):
                return False
        return False

    @staticmethod
    def _join_level(level: int, above: str, name: str) -> str:
        return os.path.join(above, name)

    def _parse_file(self, above: str, name: str) -> tuple[
            bytes, bytes] | None:
        if not name.endswith(BLOB_SUFFIX):
            return None
        try:
            return self.blob_path_to_oid_tid(os.path.join(above, name))
        except ValueError:
            return None


_PATH_METHODS = ('oid_to_path', 'path_to_oid', 'oid_directory',
                 'getBlobFilePath', 'blob_path_to_oid_tid')


def _tid_of(name: str) -> bytes | None:
    """The tid of file name ``<tid repr>.blob``; None for other names."""
    if not name.endswith(BLOB_SUFFIX):
        return None
    return _from_repr(name[:-len(BLOB_SUFFIX)])


class _SharedDirectoryLayout(_Layout):
    """Files of many oids in one directory: ``<oid path>.<tid>.blob``."""

    directory_per_oid = False

    def oid_directory(self, oid: bytes) -> str:
        return os.path.dirname(self.oid_to_path(oid))

    def getBlobFilePath(self, oid: bytes, tid: bytes) -> str:
        return (f'{self.oid_to_path(oid)}.{oid_repr(check_id(tid, "tid"))}'
                f'{BLOB_SUFFIX}')

    def blob_path_to_oid_tid(self, path: str) -> tuple[bytes, bytes]:
        directory, name = os.path.split(path)
        prefix, dot, rest = name.partition('.')
        if not dot:
            raise ValueError(f'Not a blob file name: `{path}`')
        return (self.path_to_oid(os.path.join(directory, prefix)),
                _tid_from_name(rest, path))

    @staticmethod
    def _split_file_name(name: str) -> tuple[str, bytes] | None:
        """``(oid part, tid)`` of ``<oid part>.<tid repr>.blob``, or None."""
        prefix, dot, rest = name.partition('.')
        tid = _tid_of(rest) if dot else None
        return None if tid is None else (prefix, tid)


@zope.interface.implementer(ILayout)
class BushyLayout(_Layout):
    """One directory level per oid byte, most significant first.

    ``0x00/0x00/0x00/0x00/0x00/0x00/0x12/0x34/0x03e1....blob``: at most
    256 entries per directory, 8 levels, a leaf directory per oid.
    """

    name = 'bushy'

    def oid_to_path(self, oid: bytes) -> str:
        return os.path.sep.join(f'0x{byte:02x}' for byte in check_id(oid))

    def path_to_oid(self, path: str) -> bytes:
        levels = path.split(os.path.sep)
        if len(levels) != 8 or not all(
                _BUSHY_LEVEL.fullmatch(level) for level in levels):
            raise _invalid(path)
        return bytes(int(level, 16) for level in levels)

    _root = b''
    _depth = 8

    def _read_level(self, level: int, above: bytes, name: str) -> \
            bytes | None:
        if _BUSHY_LEVEL.fullmatch(name) is None:
            return None
        return above + bytes.fromhex(name[2:])

    def _read_file(self, oid: bytes, name: str) -> tuple[
            bytes, bytes] | None:
        tid = _tid_of(name)
        return None if tid is None else (oid, tid)


@zope.interface.implementer(ILayout)
class LawnLayout(_Layout):
    """One directory per oid, all directly below the blob directory."""

    name = 'lawn'

    def oid_to_path(self, oid: bytes) -> str:
        return oid_repr(check_id(oid))

    def path_to_oid(self, path: str) -> bytes:
        oid = _from_repr(path)
        if oid is None:
            raise _invalid(path)
        return oid

    _depth = 1

    def _read_level(self, level: int, above: None, name: str) -> \
            bytes | None:
        return _from_repr(name)

    _read_file = BushyLayout._read_file


@zope.interface.implementer(ILayout)
class ChunkyLayout(_SharedDirectoryLayout):
    """Few levels of wide directories and no directory per oid.

    The 16 hex digits of the oid are cut 4-3-3-3-3: four directory levels
    (the first one only grows past ``0x0000`` beyond 2**48 oids), and the
    last three digits start the file name.  A leaf directory holds the
    files of up to 4096 oids:
    ``0x0000/0x000/0x000/0x001/0x234.0x03e1....blob``.
    """

    name = 'chunky'
    _cuts = ((0, 4), (4, 7), (7, 10), (10, 13), (13, 16))
    _pattern = re.compile(
        r'0x([0-9a-f]{4})/0x([0-9a-f]{3})/0x([0-9a-f]{3})/'
        r'0x([0-9a-f]{3})/0x([0-9a-f]{3})'.replace('/', re.escape(os.sep)))

    def oid_to_path(self, oid: bytes) -> str:
        digits = check_id(oid).hex()
        return os.path.sep.join('0x' + digits[a:b] for a, b in self._cuts)

    def path_to_oid(self, path: str) -> bytes:
        match = self._pattern.fullmatch(path)
        if match is None:
            raise _invalid(path)
        return bytes.fromhex(''.join(match.groups()))

    _root = ''
    _depth = 4
    _levels = (re.compile('0x[0-9a-f]{4}'),) + 3 * (
        re.compile('0x[0-9a-f]{3}'),)
    _file_prefix = re.compile('0x[0-9a-f]{3}')

    def _read_level(self, level: int, digits: str, name: str) -> \
            str | None:
        if self._levels[level].fullmatch(name) is None:
            return None
        return digits + name[2:]

    def _read_file(self, digits: str, name: str) -> tuple[
            bytes, bytes] | None:
        split = self._split_file_name(name)
        if split is None or self._file_prefix.fullmatch(split[0]) is None:
            return None
        return bytes.fromhex(digits + split[0][2:]), split[1]


@zope.interface.implementer(ILayout)
class FlatLayout(_SharedDirectoryLayout):
    """Every blob file in the blob directory itself: ``0x12.0x03e1....blob``.

    For small stores and study: one ``listdir`` shows everything.
    """

    name = 'flat'
    oid_to_path = LawnLayout.oid_to_path
    path_to_oid = LawnLayout.path_to_oid

    # No walk: nothing below the top level can be a flat blob file.
    _depth = 0
    _files_only = True

    def _read_file(self, above: None, name: str) -> tuple[
            bytes, bytes] | None:
        split = self._split_file_name(name)
        oid = None if split is None else _from_repr(split[0])
        return None if oid is None else (oid, split[1])


for _layout in (BushyLayout(), LawnLayout(), ChunkyLayout(), FlatLayout()):
    register_layout(_layout)


def read_marker(base_dir: str) -> str | None:
    """The layout name in `base_dir`'s marker, or None without one.

    Raises ValueError, naming the path, when `base_dir` is not a directory.
    """
    try:
        with open(os.path.join(base_dir, LAYOUT_MARKER)) as marker:
            return marker.read().strip()
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise ValueError(f'Blob directory {os.path.normpath(base_dir)} is '
                         'not a directory') from None


def auto_layout_select(path: str) -> str:
    """The layout of blob directory `path`, by ZODB's rules.

    A marker wins; a missing or empty directory (hidden files aside) gets
    ``bushy``; a used directory without a marker was written before
    markers existed, so it is ``lawn``.
    """
    marked = read_marker(path)
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
        where = f' for blob directory {base_dir}' if base_dir else ''
        raise ValueError(
            f'Unknown blob directory layout `{name}`{where}; known layouts: '
            f'{", ".join(sorted(LAYOUTS))}') from None
