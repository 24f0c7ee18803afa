"""The ZEXP file format: its markers, and the error naming a file's flaw.

Shared by export and import, which write and read the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable

from ZODB.POSException import ExportError

MAGIC = b'ZEXP'
BLOB_MARKER = b'\0BLOBSTART'
END_MARKER = b'\xff' * 16
HEADER_SIZE = 16
CHUNK = 1 << 20

ProgressCallback = Callable[[int, int], None]


class ZexpError(ExportError):
    """A ZEXP file that cannot be imported, and where it goes wrong."""

    def __init__(self, path: str, offset: int, problem: str):
        super().__init__(f'Cannot import {path}: {problem} (at byte '
                         f'{offset})')
        self.path = path
        self.offset = offset
        self.problem = problem


def _copy(source, target, size: int, progress=None) -> int:
    copied = 0
    while copied < size:
        chunk = source.read(min(CHUNK, size - copied))
        if not chunk:
            break
        target.write(chunk)
        copied += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return copied
