"""Copy a blob directory into a new one of another layout.

The source is any blob directory of a registered layout (``bushy``,
``lawn``, ``chunky``, ``flat``: named by its ``.layout`` marker, or
``lawn`` by ZODB's rule for a used directory without one), or a ZEO client
blob cache (``zeocache``, stock ZEO's or zodbblob's).  The source is only
read.  Files are hard-linked into the destination where both sit on one
filesystem, and copied otherwise.

A destination becomes a blob directory only at the end.  While files are
added it holds a state file, ``.zodbblob-migrate`` (which source, which
layout), and no ``.layout`` marker, so nothing takes it for a finished
one.  Running an interrupted migration again (Ctrl-C, a crash, SIGKILL)
resumes it: files already there with the source's size are kept, the others
are written again, each under a temporary name first and then renamed, so
a partial file never has a blob's name.  The end: the destination is
enumerated afresh and must hold the ``(oid, tid)`` pairs of the source,
as this run listed them when it started, with the same sizes; the
destination is made durable, gets its marker, and loses the state file.
The source is listed once per run: it must not change during the run,
which the storage lock ensures for a zodbblob storage (a stock one must be
stopped).

zodbblob's own state (``.zodbblob/``) is not carried over, but for one
thing: from a zodbblob source, the destination gets a catalog of its files
with the source's content digests, written after the marker (a crash
before it leaves no catalog, and a storage opened on the destination
builds one from a scan, the digests unknown until the scrubber or
``verify --checksum`` finds them again).  Names that share an inode in
the source (dedup's links) share one in the destination
(``placement.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
from collections.abc import Callable

from zodbblob.cache import LAYOUT as ZEOCACHE
from zodbblob.storage.commitlog import commit_log_path
from zodbblob.storage.commitlog import unfinished_records
from zodbblob.storage.catalog import STATE_DIR
from zodbblob.storage.catalog import Journal
from zodbblob.storage.catalog import JournalError
from zodbblob.storage.catalog import journal_path
from zodbblob.storage.catalog import sync_filesystem
from zodbblob.storage.catalog import syncfs_works
from zodbblob.layout import LAYOUT_MARKER
from zodbblob.layout import LAYOUTS
from zodbblob.layout import FilesystemHelper
from zodbblob.layout import LINKED_DIRECTORY
from zodbblob.layout import fsync_directory
from zodbblob.layout import fsync_path, makedirs_durable
from zodbblob.layout import get_layout
from zodbblob.layout import read_marker
from zodbblob.tools.inventory import Inventory
from zodbblob.tools.inventory import inventory
from zodbblob.tools.inventory import source_inventory
from zodbblob.tools.placement import Writer
from zodbblob.storage import LOCK_NAME
from zodbblob.storage import check_state_layout
from zodbblob.storage import hold_blob_directory

logger = logging.getLogger(__name__)

STATE_FILE = '.zodbblob-migrate'
TEMPORARY_DIR = '.zodbblob-migrate-tmp'

NEW, RESUME, FINISHED = 'new', 'resume', 'finished'


class MigrationError(ValueError):
    """A migration was refused or could not be verified.

    Refusals change nothing on disk.  A failed verification leaves the
    destination unfinished (no marker), to be resumed.
    """


@dataclasses.dataclass
class Report:
    """What a migration did.  `files` and `bytes` count the whole source."""

    source: str
    destination: str
    source_layout: str
    layout: str
    files: int = 0
    bytes: int = 0
    linked: int = 0
    copied: int = 0
    skipped: int = 0       # already in the destination with the right size
    removed: int = 0       # left by an earlier run, gone from the source
    finished_before: bool = False   # the destination was complete already
    # (path, kind) of what is under a source blob name but is no regular
    # file: neither linked nor copied.
    not_files: list = dataclasses.field(default_factory=list)

    def problems(self) -> list[str]:
        return [f'not followed: {path} is {kind}; the blob files below it '
                f'are not migrated' if kind == LINKED_DIRECTORY else
                f'not a file: {path} is {kind} under a blob name, not a '
                f'regular file; not migrated'
                for path, kind in self.not_files]

    def summary(self) -> str:
        if self.finished_before:
            return (f'Nothing to do: {self.destination} holds the '
                    f'{self.files} blob files ({self.bytes} bytes) of '
                    f'{self.source} in layout {self.layout} already')
        text = (f'Migrated {self.files} blob files ({self.bytes} bytes) '
                f'from {self.source} ({self.source_layout}) to '
                f'{self.destination} ({self.layout}): {self.linked} linked, '
                f'{self.copied} copied, {self.skipped} already there')
        if self.removed:
            text += f', {self.removed} no longer in the source removed'
        return text


# the source (its files are listed by zodbblob.tools.inventory)

def _has_lawn_blob(directory: str) -> bool:
    # Looks one level deep only: a wrong path (a home directory, /) must
    # be refused at once, not walked.
    lawn = get_layout('lawn')
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        try:
            lawn.path_to_oid(name)
        except ValueError:
            continue
        if os.path.isdir(path) and any(
                _is_blob_name(lawn, os.path.join(name, file))
                for file in os.listdir(path)):
            return True
    return False


def _is_blob_name(layout, relative: str) -> bool:
    try:
        layout.blob_path_to_oid_tid(relative)
    except ValueError:
        return False
    return True


def detect_layout(directory: str) -> str:
    """The layout of blob directory `directory`, or MigrationError."""
    if not os.path.exists(directory):
        raise MigrationError(f'Source {directory} does not exist: expected '
                             'a blob directory')
    if not os.path.isdir(directory):
        raise MigrationError(f'Source {directory} is not a directory: '
                             'expected a blob directory')
    try:
        check_state_layout(directory)
    except ValueError as e:
        raise MigrationError(f'Source {directory}: {e}') from None
    try:
        marked = read_marker(directory)
    except UnicodeDecodeError:
        marked = ''   # no layout name at all: damaged
    if marked is None:
        if not _has_lawn_blob(directory):
            raise MigrationError(
                f'Source {directory} is not a blob directory: it has no '
                f'{LAYOUT_MARKER} marker and no blob files')
        return 'lawn'  # ZODB's rule: used, and written before markers
    if marked != ZEOCACHE and marked not in LAYOUTS:
        raise MigrationError(
            f'Source {directory} has a marker '
            f'{os.path.join(directory, LAYOUT_MARKER)} for layout '
            f'`{marked}`, which is not known here (known: '
            f'{", ".join(sorted([*LAYOUTS, ZEOCACHE]))})')
    return marked


# the destination

def _state_path(destination: str) -> str:
    return os.path.join(destination, STATE_FILE)


def _read_state(destination: str) -> dict | None:
    path = _state_path(destination)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:
        # Written to a temporary name and renamed, so never partial.
        raise MigrationError(
            f'Migration state file {path} is not readable JSON: remove '
            f'{destination} and migrate again') from None


def _write_state(destination: str, state: dict) -> None:
    path = _state_path(destination)
    staged = path + '.new'
    with open(staged, 'w') as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, path)
    # The state file is what makes the directory ours on a re-run.
    fsync_directory(destination)


def _lock_only(state_dir: str) -> bool:
    return set(os.listdir(state_dir)) <= {LOCK_NAME}


def _looks_empty(destination: str) -> bool:
    """True if `destination` holds nothing, or only what a run left that
    was stopped before writing its state file."""
    for name in os.listdir(destination):
        path = os.path.join(destination, name)
        if name == STATE_DIR and os.path.isdir(path) and _lock_only(path):
            continue
        if name == STATE_FILE + '.new':
            continue
        return False
    return True


def destination_state(destination: str, expected: dict) -> str:
    """NEW, RESUME or FINISHED; MigrationError for a directory not ours."""
    if not os.path.exists(destination):
        return NEW
    if not os.path.isdir(destination):
        raise MigrationError(f'Destination {destination} is not a directory')
    state = _read_state(destination)
    marked = read_marker(destination)
    if state is not None:
        if state != expected:
            raise MigrationError(
                f'Destination {destination} holds an unfinished migration of '
                f'{state.get("source")} to layout `{state.get("layout")}`: '
                f'run that one again to finish it, or remove {destination}')
        if marked not in (None, expected['layout']):
            raise MigrationError(
                f'Destination {destination} holds an unfinished migration, '
                f'but a marker for layout `{marked}` (a storage opened it?): '
                f'remove {destination} and migrate again')
        return RESUME
    if marked is not None:
        if marked != expected['layout']:
            raise MigrationError(
                f'Destination {destination} is a blob directory of layout '
                f'`{marked}` already: migrate into a new directory')
        return FINISHED
    if not _looks_empty(destination):
        raise MigrationError(
            f'Destination {destination} is not empty and holds no unfinished '
            f'migration ({STATE_FILE}): migrate into a new or empty directory')
    return NEW


def _check_apart(source: str, destination: str) -> None:
    real_source = os.path.realpath(source)
    real_destination = os.path.realpath(destination)
    if real_destination == real_source:
        raise MigrationError(f'Destination {destination} is the source '
                             'directory: migrate into a new directory')
    if real_destination.startswith(real_source + os.sep):
        raise MigrationError(f'Destination {destination} is inside the '
                             f'source directory {source}')
    if real_source.startswith(real_destination + os.sep):
        raise MigrationError(f'Source {source} is inside the destination '
                             f'directory {destination}')


def _check_closed_cleanly(source: str) -> None:
    """Refuse a zodbblob blob directory whose storage did not close.

    After a crash, files of committed transactions may still wait under
    their staging names, and files of unfinished ones may have final
    names: only the storage's recovery knows which is which.
    """
    path = journal_path(source)
    if not os.path.exists(path):
        return
    unclean = os.path.exists(path + '-wal') and os.path.getsize(
        path + '-wal') > 0
    if not unclean:
        try:
            journal = Journal(source, read_only=True)
        except JournalError:
            unclean = True
        else:
            try:
                bucket = journal.get_meta('object_store')
                unclean = (journal.get_meta('state') == 'open'
                           or bool(unfinished_records(
                               commit_log_path(source))))
            finally:
                journal.close()
            if bucket is not None:
                raise MigrationError(
                    f'Source {source} keeps its blobs in {bucket}: '
                    f'migrate does not move blobs out of an object store '
                    f'yet')
    if unclean:
        raise MigrationError(
            f'Source {source} was not closed cleanly by its storage (its '
            f'journal {path} has unfinished work): run `zodbblob recover` '
            f'on it first')


def _hold(held: contextlib.ExitStack, blob_dir: str):
    """Take `blob_dir`'s storage lock for the migration, if it has one."""
    try:
        lock = hold_blob_directory(blob_dir)
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        # A read-only source: nothing here can change it, but a storage
        # elsewhere still could.
        logger.warning('Cannot take the lock of blob directory %s (%s): '
                       'make sure no storage uses it during the migration',
                       blob_dir, e.strerror)
        return None
    if lock is not None:
        held.callback(lock.close)
    return lock


def _differences(source: Inventory, destination: Inventory) -> list[str]:
    problems = []
    for key, (size, path) in source.items():
        found = destination.get(key)
        if found is None:
            problems.append(f'missing: {path}')
        elif found[0] != size:
            problems.append(f'{found[0]} bytes instead of {size}: {found[1]}')
    problems.extend(f'not in the source: {path}'
                    for key, (size, path) in destination.items()
                    if key not in source)
    return problems


def _sync(directory: str) -> None:
    if syncfs_works(directory):
        return sync_filesystem(directory)
    # Where syncfs does nothing (FUSE), sync(2) does nothing either.
    for parent, dirs, names in os.walk(directory):
        for name in names:
            fsync_path(os.path.join(parent, name), data_only=True)
        fsync_directory(parent)


def migrate(src: str, dst: str, layout: str,
            progress: Callable[[int, int], None] | None = None) -> Report:
    """Copy blob directory `src` into `dst`, a blob directory of `layout`.

    `dst` must be new, empty, or an unfinished migration of the same
    source to the same layout (which this resumes).  A `dst` finished
    before with the same content is left as it is.  `progress` is called
    as ``progress(files done, files in all)`` after each file.

    Raises MigrationError (changing nothing) for a missing or unknown
    source, an unknown layout, nested directories, or a destination that
    is not one of those; BlobDirectoryInUse when a live storage holds
    either directory.  Both locks are held until the end.
    """
    try:
        target = get_layout(layout)
    except ValueError as e:
        raise MigrationError(str(e)) from None
    source = os.path.abspath(src)
    destination = os.path.abspath(dst)
    source_layout = detect_layout(source)
    _check_apart(source, destination)
    expected = {'source': os.path.realpath(source), 'layout': layout}
    destination_state(destination, expected)   # refuse before any change
    report = Report(source, destination, source_layout, layout)
    state_dir = os.path.join(destination, STATE_DIR)
    # A damaged commit log is refused before the lock is taken (taking it
    # writes the lock file): a refusal changes nothing.
    unfinished_records(commit_log_path(source))
    with contextlib.ExitStack() as held:
        _hold(held, source)
        _check_closed_cleanly(source)
        if destination_state(destination, expected) == FINISHED:
            _hold(held, destination)
            return _check_finished(source, source_layout, destination,
                                   target, report)
        makedirs_durable(state_dir)  # a power cut must not forget it
        _hold(held, destination)
        # Looked at again under the lock: a migration started meanwhile by
        # another process has finished, or left its state file.
        state = destination_state(destination, expected)
        if state == FINISHED:
            return _check_finished(source, source_layout, destination,
                                   target, report)
        if not _lock_only(state_dir):
            raise MigrationError(
                f'A storage opened {destination} before its migration was '
                f'finished ({state_dir} holds its state); its catalog does '
                f'not know the files added since: remove {destination} and '
                f'migrate again')
        if state == NEW:
            _write_state(destination, expected)
        wanted = _fill(source, source_layout, destination, target,
                       state == RESUME, report, progress)
        _finish(source, destination, target, wanted)
        _carry_digests(source, destination, wanted)
        # Our lock file goes too where no catalog was carried, so that the
        # destination is a plain blob directory; removing it while held is
        # harmless (whoever opens the name now gets a new file, and the
        # migration is over).
        if _lock_only(state_dir):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(state_dir, LOCK_NAME))
    with contextlib.suppress(OSError):
        os.rmdir(state_dir)
    return report


def _check_finished(source, source_layout, destination, target,
                    report) -> Report:
    wanted = source_inventory(source, source_layout, report.not_files)
    problems = _differences(
        wanted, inventory(target.iter_blob_paths(destination)))
    if problems:
        raise MigrationError(
            f'Destination {destination} is a finished blob directory of '
            f'layout `{target.name}` that differs from {source} '
            f'({len(problems)} differences, e.g. {problems[0]}): migrate '
            f'into a new directory')
    report.files = report.skipped = len(wanted)
    report.bytes = sum(size for size, _ in wanted.values())
    report.finished_before = True
    return report


def _fill(source, source_layout, destination, target, resume, report,
          progress) -> Inventory:
    """Put every source file in place; count in `report`.

    Returns the source's inventory, listed once: what `_finish` checks
    the destination against.
    """
    wanted = source_inventory(source, source_layout, report.not_files)
    for path, kind in report.not_files:
        logger.warning('%s of %s is %s: not migrated', path, source, kind)
    report.files = len(wanted)
    report.bytes = sum(size for size, _ in wanted.values())
    present = inventory(target.iter_blob_paths(destination)) if resume else {}
    temporary = os.path.join(destination, TEMPORARY_DIR)
    # Partial copies of a run that was killed: none has a final name.
    shutil.rmtree(temporary, ignore_errors=True)
    os.mkdir(temporary)
    writer = Writer(source, destination, temporary, report)
    made = {destination}
    with writer.tree:
        for done, ((oid, tid), (size, path)) in enumerate(wanted.items(), 1):
            found = present.pop((oid, tid), None)
            if found is not None and found[0] == size:
                report.skipped += 1
                writer.kept(path, found[1])
            else:
                final = os.path.join(destination,
                                     target.getBlobFilePath(oid, tid))
                _make_directory(os.path.dirname(final), made)
                writer.put(path, final)
            if progress is not None:
                progress(done, report.files)
    for size, path in present.values():
        os.remove(path)
        report.removed += 1
    if report.removed:
        logger.warning('Removed %d files from %s that an earlier run had '
                       'migrated and %s no longer holds (packed since?)',
                       report.removed, destination, source)
    shutil.rmtree(temporary)
    return wanted


def _make_directory(directory: str, made: set[str]) -> None:
    """Create `directory` and its missing parents, once per run.

    Tried first, checked only when it fails: in a new destination nearly
    every directory is missing, and one ``mkdir`` is all it costs (lawn
    makes one per oid).
    """
    if directory in made:
        return
    try:
        os.mkdir(directory)
    except FileExistsError:
        pass
    except FileNotFoundError:
        _make_directory(os.path.dirname(directory), made)
        os.mkdir(directory)
    made.add(directory)


def _finish(source, destination, target, wanted: Inventory) -> None:
    """Verify, then make `destination` a blob directory: its marker.

    The destination is listed afresh and must hold exactly the files in
    `wanted`, the source's inventory from the start of this run, with
    their sizes.
    """
    problems = _differences(
        wanted, inventory(target.iter_blob_paths(destination)))
    if problems:
        raise MigrationError(
            f'Destination {destination} does not match {source} after the '
            f'migration ({len(problems)} differences: '
            f'{"; ".join(problems[:5])}): did either change meanwhile? '
            f'Run the migration again to bring it up to date')
    # The marker declares the directory finished: every file and name must
    # be on disk before it, or a power loss could leave a marked directory
    # without some of them.
    _sync(destination)
    marked = read_marker(destination)
    if marked not in (None, target.name):
        raise MigrationError(
            f'Destination {destination} got a marker for layout `{marked}` '
            f'during the migration (a storage tried to open it?): remove '
            f'{destination} and migrate again')
    FilesystemHelper(destination, target.name).create()
    os.remove(_state_path(destination))
    fsync_directory(destination)


def _carry_digests(source: str, destination: str, wanted: Inventory) -> None:
    """Give finished `destination` a catalog of its files, `wanted`, with
    `source`'s digests: from a zodbblob source (closed cleanly, so its
    catalog's rows are its files) whose catalog has any.

    Each row keeps the size and digest the source recorded, not what
    the file has now: a file truncated or extended in the source is as
    damaged in the destination, and its verify says so (a warning here
    names it).
    """
    if not os.path.exists(journal_path(source)):
        return
    try:
        journal = Journal(source, read_only=True)
    except JournalError:
        return
    try:
        last_tid = journal.get_meta('last_tid')
        known = {(oid, tid): (size, digest)
                 for batch in journal.rows(digests=True)
                 for oid, tid, size, digest in batch}
    finally:
        journal.close()
    if last_tid is None or not any(
            digest is not None for _, digest in known.values()):
        return
    for key, (size, path) in wanted.items():
        recorded = known.get(key, (size,))[0]
        if recorded != size:
            logger.warning('%s has %d bytes, its catalog recorded %d: '
                           'migrated as it is, with the recorded size and '
                           'digest (verify reports it)', path, size,
                           recorded)
    try:
        carried = Journal(destination)
        try:
            carried.rebuild((oid, tid, known.get((oid, tid), (size,))[0])
                            for (oid, tid), (size, path) in wanted.items())
            carried.record_digests([
                (known[key][1], *key) for key in wanted
                if known.get(key, (0, None))[1] is not None])
            # As the source's storage closed it: a storage opened on the
            # destination over the same Data.fs takes the rows as they are.
            carried.set_meta(state='closed', last_tid=last_tid)
        finally:
            carried.close()
    except (JournalError, OSError) as e:
        # The migration is finished: without the catalog, a storage
        # scans the destination and the scrubber hashes it again.
        logger.warning('Migrated %s without its digests: cannot write a '
                       'catalog to %s (%s)', source, journal_path(
                           destination), e)
