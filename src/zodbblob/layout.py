"""Blob directory layouts: where the file of each (oid, tid) lives.

``bushy`` and ``lawn`` name files exactly as ``ZODB.blob`` does, so a blob
directory moves between stock ZODB and zodbblob unchanged.  ``chunky`` and
``flat`` are adapted from DirectoryStorage's formats: they create no
directory per oid, which makes committing new blobs cheaper on filesystems
with fast wide directories.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterator

import zope.interface
import zope.interface.verify
from ZODB.utils import oid_repr, p64

from zodbblob.interfaces import ILayout

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


def _entry_name(entry: os.DirEntry) -> str:
    return entry.name


def _scan(base_dir: str, root, depth: int | None, read_level, read_file,
          files_only: bool, not_files: list | None = None
          ) -> Iterator[tuple[bytes, bytes, str]]:
    """``(oid, tid, path)`` of the blob files below `base_dir`.

    Files are read only `depth` levels deep (at any level for None), and
    a directory's files come before its subdirectories, each in name
    order, as ``os.walk`` with sorted names gives them.  What ``os.walk``
    passes over is passed over: hidden directories, ``tmp`` at the top,
    links to directories (not followed), and directories that cannot be
    listed.
    """
    waiting = [(base_dir, 0, root)]
    while waiting:
        path, level, above = waiting.pop()
        try:
            with os.scandir(path) as listing:
                entries = sorted(listing, key=_entry_name)
        except OSError:
            continue
        directories = []
        for entry in entries:
            try:
                is_directory = entry.is_dir()
            except OSError:
                is_directory = False
            if is_directory and (depth is None or level == depth) and \
                    read_file(above, entry.name) is not None:
                # A directory (or a link to one) under a blob name is no
                # blob file, and nothing below it is one either.
                if not_files is not None:
                    not_files.append((entry.path, 'a symbolic link'
                                      if entry.is_symlink()
                                      else 'a directory'))
            elif is_directory:
                if level != depth:
                    directories.append(entry)
            elif depth is None or level == depth:
                found = read_file(above, entry.name)
                if found is not None and (not files_only
                                          or _is_file(entry)):
                    yield found[0], found[1], entry.path
        below = []
        for entry in directories:
            name = entry.name
            # Hidden directories and tmp hold no committed blob: staged
            # files of running transactions, the journal.
            if name.startswith('.') or (level == 0 and name == 'tmp'):
                continue
            read = read_level(level, above, name)
            if read is None:
                continue
            if entry.is_symlink():
                # Never followed: it would take a tool outside the blob
                # directory, to files it has no business reading.
                if not_files is not None:
                    not_files.append((entry.path, LINKED_DIRECTORY))
                continue
            below.append((entry.path, level + 1, read))
        waiting.extend(reversed(below))


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


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


# A file's bytes (and size), without its timestamps; fsync where the
# platform has no fdatasync.
fdatasync = getattr(os, 'fdatasync', os.fsync)


def fsync_path(path: str, data_only: bool = False) -> None:
    """Make `path` durable: a file's bytes, or a directory's entries.

    With `data_only`, an fdatasync: the bytes without the timestamps.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        (fdatasync if data_only else os.fsync)(fd)
    finally:
        os.close(fd)


fsync_directory = fsync_path


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host is alive (another user's too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_if_exists(path: str) -> None:
    """Remove the file `path`; one that is gone already is fine."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def makedirs_durable(path: str) -> None:
    """Create `path` and its missing parents, each entry fsynced.

    A directory that a crash forgets would take the blob files in it
    along, however well those files were synced.
    """
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            continue
        fsync_directory(os.path.dirname(directory))


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
        return f'<FilesystemHelper {self.base_dir} ({self.layout_name})>'

    def check_marker(self) -> None:
        """Refuse a directory whose marker names another layout."""
        marked = read_marker(self.base_dir)
        if marked is not None and marked != self.layout_name:
            raise ValueError(
                f'Directory layout `{self.layout_name}` selected for blob '
                f'directory {self.base_dir}, but marker found for layout '
                f'`{marked}`')

    def create(self) -> None:
        """Create the directory, its ``tmp`` and the marker, if missing.

        The marker is checked before anything is created, so a mismatch
        (or a blob directory path that is a file) changes nothing on disk.
        """
        self.check_marker()
        if not os.path.isdir(self.base_dir):
            logger.info('Creating blob directory %s', self.base_dir)
        makedirs_durable(self.temp_dir)
        marker = os.path.join(self.base_dir, LAYOUT_MARKER)
        if not os.path.exists(marker):
            self._write_marker(marker)

    def _write_marker(self, marker: str) -> None:
        # Staged under a hidden name, which auto-detection never counts as
        # content, and synced: a marker that a crash left empty would make
        # the directory unreadable.
        fd, staged = tempfile.mkstemp(dir=self.base_dir,
                                      prefix=LAYOUT_MARKER + '-')
        try:
            # mkstemp makes 0600; the marker must be readable by everyone
            # who may read the directory, as ZODB's is (read-only mounts).
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
            with os.fdopen(fd, 'w') as f:
                f.write(self.layout_name)
                f.flush()
                os.fsync(f.fileno())
            try:
                # A link, unlike a rename, never replaces the marker of a
                # process that created the directory at the same time.
                os.link(staged, marker)
            except FileExistsError:
                pass
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP,
                                   errno.EOPNOTSUPP):
                    raise
                os.replace(staged, marker)  # no hard links here
        finally:
            if os.path.exists(staged):
                os.remove(staged)
        fsync_directory(self.base_dir)
        self.check_marker()

    def getPathForOID(self, oid, create: bool = False) -> str:
        oid = check_id(oid, 'oid', self.base_dir)
        if create:
            os.makedirs(os.path.join(self.base_dir,
                                     self.layout.oid_directory(oid)),
                        exist_ok=True)
        return os.path.join(self.base_dir, self.layout.oid_to_path(oid))

    def createPathForOID(self, oid) -> str:
        return self.getPathForOID(oid, create=True)

    def getOIDForPath(self, path: str) -> bytes:
        path = path.removeprefix(self.base_dir)
        return self.layout.path_to_oid(path)

    def getBlobFilename(self, oid, tid) -> str:
        # Checked here too, not only by the built-in layouts: a layout
        # registered by someone else may build paths from anything.
        return os.path.join(self.base_dir, self.layout.getBlobFilePath(
            check_id(oid, 'oid', self.base_dir),
            check_id(tid, 'tid', self.base_dir)))

    def splitBlobFilename(self, filename: str):
        """``(oid, tid)`` of a blob file name; ``(None, None)`` otherwise."""
        if not filename.endswith(BLOB_SUFFIX):
            return None, None
        filename = filename.removeprefix(self.base_dir)
        try:
            return self.layout.blob_path_to_oid_tid(filename)
        except ValueError:
            return None, None

    def blob_mkstemp(self, oid, tid):
        """A new temporary file beside the committed files of `oid`."""
        oid = check_id(oid, 'oid', self.base_dir)
        tid = check_id(tid, 'tid', self.base_dir)
        directory = os.path.join(self.base_dir,
                                 self.layout.oid_directory(oid))
        return tempfile.mkstemp(suffix='.tmp', prefix=oid_repr(tid),
                                dir=directory)

    def iter_blobs(self, not_files: list | None = None) -> Iterator[
            tuple[bytes, bytes, str]]:
        """``(oid, tid, path)`` of every committed blob file; see
        `ILayout.iter_blob_paths` for `not_files`."""
        if not_files is None:   # a layout of ILayout's first signature
            return self.layout.iter_blob_paths(self.base_dir)
        return self.layout.iter_blob_paths(self.base_dir, not_files)


    def listOIDs(self) -> Iterator[tuple[bytes, str]]:
        """``(oid, oid path)`` for every oid that has a blob file."""
        seen = None
        for oid, _, _ in self.iter_blobs():
            if oid != seen:
                seen = oid
                yield oid, self.getPathForOID(oid)

    def getOIDsForSerial(self, search_serial: bytes) -> list[bytes]:
        return [oid for oid, tid, path in self.iter_blobs()
                if tid == search_serial]


# Opening a blob name safely, for the tools: anything but a regular file
# under a blob name (a FIFO, a device, a symbolic link to anywhere) is
# damage or an attack, and a tool that opened it blindly would wait on it
# forever, read a device without end, or copy a file it should never see.

_FILE_KINDS = ((stat.S_ISLNK, 'a symbolic link'), (stat.S_ISFIFO, 'a FIFO'),
               (stat.S_ISCHR, 'a character device'),
               (stat.S_ISBLK, 'a block device'), (stat.S_ISSOCK, 'a socket'),
               (stat.S_ISDIR, 'a directory'))


LINKED_DIRECTORY = 'a symbolic link to a directory under the blob directory'


class NotABlobFile(OSError):
    """Something other than a regular file is under a blob name, or a
    link stands where a directory of blob files belongs (`path` names
    the link then)."""

    def __init__(self, path: str, kind: str):
        if kind == LINKED_DIRECTORY:
            message = f'{path} is {kind}: expected a directory, not followed'
        else:
            message = (f'{path} is {kind}, not a regular file: expected a '
                       f'blob file')
        super().__init__(message)
        self.path = path
        self.kind = kind


def file_kind(mode: int) -> str:
    """What `mode` (an ``st_mode``) is, in words: ``a FIFO``."""
    for test, kind in _FILE_KINDS:
        if test(mode):
            return kind
    return 'a regular file' if stat.S_ISREG(mode) else 'not a file'


def check_blob_file(path: str) -> os.stat_result:
    """The ``lstat`` of blob file `path`; NotABlobFile unless regular.

    For a tool about to hard-link `path`: a link to a symbolic link is
    the symbolic link.
    """
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise NotABlobFile(path, file_kind(info.st_mode))
    return info


def open_blob_file(path: str) -> int:
    """A read-only descriptor of blob file `path`; NotABlobFile unless
    it is a regular file.

    Nothing else is opened: a symbolic link is not followed, and neither
    opening a FIFO nor reading a device can wait.  The kind is checked
    again on the descriptor, for a file replaced between the two looks.
    """
    check_blob_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotABlobFile(path, 'a symbolic link') from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotABlobFile(path, file_kind(mode))
    return fd


class BlobTree:
    """The blob files under blob directory `root`, opened and checked
    without following a symbolic link anywhere below `root`.

    `root` itself may be a link or sit under one (/srv/blobs ->
    /mnt/disk2/blobs); a link below it (``0x01`` -> /home/someone) would
    hand a tool files from elsewhere under blob names.  A check of the
    directories by path, then an open by path, leaves a window in which
    a directory can be swapped for a link (``O_NOFOLLOW`` guards only the
    last component); so every directory is opened from its parent's
    descriptor with ``O_NOFOLLOW``, and the file from its directory's,
    and no name below `root` is ever resolved through a link.

    The directories above a file's own are held open while the tool's
    walk is below them (one chain, as deep as the layout), so a run over
    millions of files costs one ``open`` per directory, not per level and
    file.  A file's own directory is opened afresh for each file in it:
    a swap there is refused the next time.  A held directory swapped
    meanwhile is still read as the directory it was, never the link.
    `close` lets the descriptors go.
    """

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self._root_fd: int | None = None
        # (name, fd) from the root down: directories held for the walk.
        self._held: list[tuple[str, int]] = []

    def close(self) -> None:
        """Close the descriptors the tree holds; it may be used again."""
        while self._held:
            os.close(self._held.pop()[1])
        if self._root_fd is not None:
            fd, self._root_fd = self._root_fd, None
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _names(self, path: str) -> tuple[list[str], str]:
        """The directory names between `root` and `path`, and its name."""
        absolute = os.path.abspath(path)
        prefix = self.root.rstrip(os.sep) + os.sep
        if not absolute.startswith(prefix) or absolute == prefix:
            raise ValueError(f'{path} is not under blob directory '
                             f'{self.root}: expected a blob file there')
        *directories, name = absolute[len(prefix):].split(os.sep)
        return directories, name

    def _open_directory(self, parent_fd: int, name: str, path: str) -> int:
        try:
            return os.open(name, os.O_RDONLY | os.O_DIRECTORY
                           | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        except OSError as e:
            # Linux says ENOTDIR for a link, as for a file; others ELOOP.
            if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            try:
                linked = stat.S_ISLNK(os.stat(name, dir_fd=parent_fd,
                                              follow_symlinks=False).st_mode)
            except OSError:
                linked = False
            if not linked:
                raise
        raise NotABlobFile(path, LINKED_DIRECTORY)

    def _directory(self, path: str) -> tuple[int, str, int]:
        """``(fd, name, own)`` for blob file `path`: a descriptor of its
        directory, its name there, and the descriptor to close after use
        (-1 when the tree holds it: the root's, for a file at the top).
        """
        directories, name = self._names(path)
        if self._root_fd is None:
            # The root is the one name that may be (or sit under) a link.
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY
                                    | os.O_CLOEXEC)
        above, leaf = directories[:-1], directories[-1:]
        kept = 0
        while (kept < len(self._held) and kept < len(above)
               and self._held[kept][0] == above[kept]):
            kept += 1
        while len(self._held) > kept:
            os.close(self._held.pop()[1])
        where = self.root
        for held_name, _ in self._held:
            where = os.path.join(where, held_name)
        fd = self._held[-1][1] if self._held else self._root_fd
        for directory in above[kept:]:
            where = os.path.join(where, directory)
            fd = self._open_directory(fd, directory, where)
            self._held.append((directory, fd))
        if not leaf:
            return fd, name, -1
        own = self._open_directory(fd, leaf[0], os.path.join(where, leaf[0]))
        return own, name, own

    def check_directories(self, path: str) -> None:
        """NotABlobFile naming the link if a directory between `root`
        and blob file `path` is a symbolic link."""
        _, _, own = self._directory(path)
        if own != -1:
            os.close(own)

    def check(self, path: str) -> os.stat_result:
        """`check_blob_file`, and no link above `path` below `root`."""
        with self._regular_file(path) as (_, _, info):
            return info

    @contextlib.contextmanager
    def _regular_file(self, path: str):
        """``(directory fd, name, stat)`` of blob file `path`, which is
        a regular file (NotABlobFile if not), its directory held open
        for the block."""
        directory, name, own = self._directory(path)
        try:
            # lstat first: opening a device can act on it (a tape rewinds).
            info = os.stat(name, dir_fd=directory, follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode):
                raise NotABlobFile(path, file_kind(info.st_mode))
            yield directory, name, info
        finally:
            if own != -1:
                os.close(own)

    def open(self, path: str) -> int:
        """`open_blob_file`, and no link above `path` below `root`."""
        with self._regular_file(path) as (directory, name, _):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW
                             | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise NotABlobFile(path, 'a symbolic link') from None
                raise
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise NotABlobFile(path, file_kind(mode))
        return fd

    def link(self, path: str, target: str) -> None:
        """Hard-link blob file `path` as `target` (a new name, as
        ``os.link``), never a link nor anything but a regular file.

        The name is linked from its directory's descriptor without
        following it; what was linked is checked under `target` and
        removed again if a swap made it anything else.
        """
        with self._regular_file(path) as (directory, name, _):
            os.link(name, target, src_dir_fd=directory,
                    follow_symlinks=False)
        mode = os.lstat(target).st_mode
        if not stat.S_ISREG(mode):
            os.remove(target)
            raise NotABlobFile(path, file_kind(mode))
