"""FilesystemHelper: the paths of one blob directory, as ZODB names them."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Iterator

from ZODB.utils import oid_repr

from zodbblob.layout.files import fsync_directory, makedirs_durable
from zodbblob.layout.naming import (
    BLOB_SUFFIX,
    LAYOUT_MARKER,
    auto_layout_select,
    check_id,
    get_layout,
    read_marker,
)

logger = logging.getLogger(__name__)


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
