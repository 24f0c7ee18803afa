"""The walk of a blob directory that every layout's scan is made of."""

from __future__ import annotations

import os
from collections.abc import Iterator

from zodbblob.layout.files import LINKED_DIRECTORY


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
