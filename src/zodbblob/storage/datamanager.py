"""BlobDataManager: a transaction's temporary directory and savepoints.

``temporaryDirectory()`` hands out the directory of the current
transaction's BlobDataManager, joining it to the transaction on first use.
ZODB writes the transaction's uncommitted blob files there, and its
savepoint store (``ZODB.Connection.TmpStore``) puts its ``savepoints*``
directory there too.

Why a data manager at all: ZODB's savepoint store names a blob's savepoint
file ``<oid>-<serial>.spb``, the same name at every savepoint, so a second
savepoint overwrites the first one's bytes, and rolling back to the first
savepoint reads (and commits) the second one's.  And after a rollback to a
savepoint taken before a blob was saved, the store still finds the later
``.spb`` file by its name and reads it instead of the committed blob.  This
data manager keeps every savepoint's files alive with hard links (no copy),
puts them back on rollback and removes the ones the savepoint did not have.

When is a savepoint's state taken?  The data manager's ``savepoint()`` may
run before or after the Connection's in the same transaction savepoint
(the order is the order in which they joined).  So the state of a
savepoint is taken at the first *event* after it: the next savepoint call,
the next ``temporaryDirectory()`` call, or a rollback.  That is exact for
every blob that existed at the savepoint, because a Connection savepoint
changes the ``.spb`` file of an existing blob only when that blob was
opened for writing, and opening for writing asks for the directory (an
event).  What a late state can add is the ``.spb`` file of a blob created
after the savepoint, whose oid is unreachable after the rollback.

Savepoints taken before the data manager joined: the transaction rolls
them back by calling ``abort()`` (and dropping the data manager), which
here restores the files as they were when it joined, and the next
``temporaryDirectory()`` joins it again.  The data manager often joins
*inside* a transaction savepoint (the savepoint store asks for its
directory while it saves the first blob), and that savepoint, still being
built, does not list it.  So at the first event after each join, a second,
small resource joins (the *rollback sentinel*): the transaction lists it
in that savepoint as a resource that joined later, and rolling back there
calls its ``abort()``, which restores the files as the first event saw
them.

Which transaction?  ``Blob`` and the savepoint store ask the storage for
``temporaryDirectory()`` without naming their connection; the storage
finds the asking Blob or Connection on the call stack and joins the
current transaction of that connection's transaction manager (see
``asking_transaction_manager`` below), so two transaction managers in one
thread get two data managers and two directories.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import sys

import transaction.interfaces
import ZODB.blob
import ZODB.Connection
import zope.interface

from zodbblob.interfaces import IBlobDataManager
from zodbblob.layout import process_alive


logger = logging.getLogger(__name__)

SAVEPOINT_PREFIX = 'savepoints'   # what ZODB's TmpStore names its directory
SAVEPOINT_SUFFIX = '.spb'
SNAPSHOTS = '.snapshots'
PROCESS_PREFIX = 'proc-'
_names = itertools.count()


@zope.interface.implementer(transaction.interfaces.IDataManagerSavepoint)
class BlobSavepoint:
    """The ``.spb`` files of one savepoint, as hard links."""

    def __init__(self, manager: BlobDataManager, files=None):
        self.manager = manager
        self.files: dict[str, str] | None = files   # path -> snapshot link

    def rollback(self) -> None:
        self.manager.rollback(self)


@zope.interface.implementer(transaction.interfaces.IDataManagerSavepoint)
class NoChange:
    """The sentinel's savepoint: the data manager's own one does the work."""

    def rollback(self) -> None:
        pass


class RollbackSentinel:
    """Joins after the data manager to hear of rollbacks before it joined.

    See the module documentation.  It has nothing to commit.
    """

    def __init__(self, manager: BlobDataManager, savepoint: BlobSavepoint):
        self.manager = manager
        self.state = savepoint
        self.transaction_manager = manager.transaction_manager

    def abort(self, txn) -> None:
        # Rolled back to a savepoint the data manager did not hear of.  If
        # the data manager was rolled back too (to before it joined), its
        # state is the right one and this one is later: leave it.
        if self.manager.joined and not self.manager.finished:
            self.manager.rollback(self.state)

    def savepoint(self) -> NoChange:
        # Savepoints taken after it joined list the data manager too.
        return NoChange()

    def tpc_begin(self, txn) -> None:
        pass

    commit = tpc_vote = tpc_finish = tpc_abort = tpc_begin

    def sortKey(self) -> str:
        return '~zodbblob-sentinel:%s' % self.manager.directory


@zope.interface.implementer(IBlobDataManager)
class BlobDataManager:
    """Owns one transaction's temporary directory and blob savepoints."""

    def __init__(self, directory: str, transaction_manager=None):
        self.directory = directory
        self.transaction_manager = transaction_manager
        os.makedirs(directory)
        self._snapshots = os.path.join(directory, SNAPSHOTS)
        self._pending: BlobSavepoint | None = None
        self._linked: dict[tuple[int, int], str] = {}   # inode -> link
        self._join_state = BlobSavepoint(self, {})
        self._sentinel_due = False
        self.joined = False
        self.finished = False
        self._hooked = False

    def join(self, txn) -> None:
        """Join `txn` (again, after a rollback dropped us).

        Raises ValueError when `txn` is committing already.
        """
        txn.join(self)
        if not self._hooked:
            self._hooked = True
            txn.addAfterAbortHook(self._cleanup)
        self.joined = True
        self._join_state = BlobSavepoint(self)
        self._take(self._join_state)
        self._sentinel_due = True

    # what the transaction's Connections put here

    def _savepoint_files(self) -> dict[str, os.stat_result]:
        files = {}
        if not os.path.isdir(self.directory):
            return files
        for name in os.listdir(self.directory):
            if not name.startswith(SAVEPOINT_PREFIX):
                continue
            folder = os.path.join(self.directory, name)
            for entry in os.scandir(folder):
                if entry.name.endswith(SAVEPOINT_SUFFIX):
                    files[entry.path] = entry.stat()
        return files

    def _take(self, savepoint: BlobSavepoint) -> None:
        """Record the current ``.spb`` files as `savepoint`'s state."""
        files = {}
        for path, info in self._savepoint_files().items():
            inode = (info.st_dev, info.st_ino)
            link = self._linked.get(inode)
            if link is None:
                os.makedirs(self._snapshots, exist_ok=True)
                link = os.path.join(self._snapshots, '%d' % next(_names))
                os.link(path, link)
                self._linked[inode] = link
            files[path] = link
        savepoint.files = files

    def event(self, txn=None) -> None:
        """Something happened after the last savepoint: take its state.

        The very first blob savepoint creates its ``savepoints*`` directory
        through ``temporaryDirectory()`` before saving anything; that call
        must not take the (still empty) state of the savepoint being made.
        """
        if self._sentinel_due and txn is not None:
            self._sentinel_due = False
            state = BlobSavepoint(self)
            self._take(state)
            try:
                txn.join(RollbackSentinel(self, state))
            except ValueError:
                pass   # committing: no savepoint can be rolled back now
        if self._pending is not None and self._has_savepoint_directory():
            self._take(self._pending)
            self._pending = None

    def _has_savepoint_directory(self) -> bool:
        if not os.path.isdir(self.directory):
            return False
        return any(name.startswith(SAVEPOINT_PREFIX)
                   for name in os.listdir(self.directory))

    # ISavepointDataManager

    def savepoint(self) -> BlobSavepoint:
        self.event(self._current())
        if self._pending is not None:
            self._take(self._pending)
        savepoint = self._pending = BlobSavepoint(self)
        return savepoint

    def _current(self):
        try:
            return self.transaction_manager.get()
        except Exception:
            return None

    def rollback(self, savepoint: BlobSavepoint) -> None:
        if savepoint.files is None:
            # Nothing happened since: the files are the savepoint's state.
            self._take(savepoint)
            self._pending = None
            return
        self._pending = None
        self._restore(savepoint.files)

    def _restore(self, files: dict[str, str]) -> None:
        # Files saved after the savepoint go: ZODB's savepoint store looks
        # for <oid>-<serial>.spb before the database, so a later savepoint's
        # file would shadow the committed blob after the rollback.
        for path in self._savepoint_files():
            if path not in files:
                os.remove(path)
        for path, link in files.items():
            try:
                if os.path.samefile(link, path):
                    continue  # unchanged since; rename(2) would do nothing
            except FileNotFoundError:
                pass
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # Replace atomically: a reader never finds the name missing.
            staged = path + '.restore'
            os.link(link, staged)
            os.replace(staged, path)

    # IDataManager

    def abort(self, txn) -> None:
        """Roll back to the state at joining; the transaction drops us.

        A transaction calls this when a savepoint from before we joined is
        rolled back, and when it aborts (then the after-abort hook cleans
        up after every resource has aborted).
        """
        if self.finished or not self.joined:
            return
        self._pending = None
        self._restore(self._join_state.files or {})
        self.joined = False
        self._sentinel_due = False

    def tpc_begin(self, txn) -> None:
        pass

    def commit(self, txn) -> None:
        pass

    def tpc_vote(self, txn) -> None:
        pass

    def tpc_finish(self, txn) -> None:
        self._cleanup()

    def tpc_abort(self, txn) -> None:
        self._cleanup()

    def sortKey(self) -> str:
        # Last: the Connections have taken their files from here by then.
        return '~zodbblob:%s' % self.directory

    def _cleanup(self) -> None:
        """Drop the snapshots; drop the directory once it is empty.

        Files that are left belong to blobs still open in this process
        (uncommitted data of an object that outlives the transaction, or of
        a connection run by another transaction manager): they are removed
        by ZODB when the blob goes away, or at the next open after the
        process ends.
        """
        self.finished = True
        self.joined = False
        self._pending = None
        shutil.rmtree(self._snapshots, ignore_errors=True)
        self._linked.clear()
        try:
            os.rmdir(self.directory)
        except OSError:
            pass


def asking_transaction_manager(depth: int = 12):
    """The transaction manager of the Blob or Connection calling us.

    ``Blob`` asks for a directory for a new uncommitted file, and the
    Connection's savepoint store asks for one to put savepoint files in;
    neither says for which transaction.  Both are on the call stack, a few
    frames up, as ``self``; their connection names its transaction manager.
    This reads the stack and changes nothing.  None when neither is found.
    """
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        caller = frame.f_locals.get('self')
        if isinstance(caller, ZODB.Connection.Connection):
            return caller.transaction_manager
        if isinstance(caller, ZODB.blob.Blob) and caller._p_jar is not None:
            return caller._p_jar.transaction_manager
        frame = frame.f_back
    return None


def process_directory_is_dead(name: str) -> bool:
    """Whether `name` is a ``proc-<pid>-<n>`` directory of a dead process."""
    if not name.startswith(PROCESS_PREFIX):
        return False
    pid = name[len(PROCESS_PREFIX):].split('-')[0]
    return pid.isdigit() and not process_alive(int(pid))


class TransactionDirectories:
    """What a storage's ``temporaryDirectory()`` hands out.

    A directory of this process below `temp_dir` (``proc-<pid>-<n>``, so
    the next open can tell a dead process's files from a live one's), and
    in it one directory per transaction, owned by that transaction's
    BlobDataManager.
    """

    def __init__(self, temp_dir: str):
        self.temp_dir = temp_dir
        self.process_dir: str | None = None

    def process_directory(self) -> str:
        if self.process_dir is None:
            path = os.path.join(self.temp_dir, '%s%d-%d' % (
                PROCESS_PREFIX, os.getpid(), next(_names)))
            os.makedirs(path, exist_ok=True)
            self.process_dir = path
        return self.process_dir

    def directory(self) -> str:
        """The asking transaction's directory (see the module doc).

        Anything but a Blob or a Connection asking, a transaction manager
        with no transaction begun, or a transaction already committing
        gets the process directory.
        """
        process_dir = self.process_directory()
        txn_manager = asking_transaction_manager()
        if txn_manager is None:
            return process_dir
        try:
            current = txn_manager.get()
        except transaction.interfaces.NoTransaction:
            return process_dir
        manager = self.manager_of(current)
        if manager is None:
            manager = BlobDataManager(
                os.path.join(process_dir, 'txn-%d' % next(_names)),
                txn_manager)
            # The transaction keys its data by id(self); holding self
            # keeps that id from going to another storage's directories
            # while the transaction lives (it would get our manager).
            current.set_data(self, (self, manager))
        if manager.finished:
            # Asked again after the commit (an after-commit hook).
            return process_dir
        if manager.joined:
            manager.event(current)
        else:
            try:
                manager.join(current)
            except ValueError:
                # Committing already (a blob opened by a commit hook): too
                # late to join; the process directory serves.
                if not manager.joined:
                    manager.tpc_abort(current)
                return process_dir
        return manager.directory

    def manager_of(self, txn) -> BlobDataManager | None:
        """The BlobDataManager of `txn` here, if it has one."""
        try:
            return txn.data(self)[1]
        except KeyError:
            return None

    def remove(self) -> None:
        """Remove the process directory (the storage is closing)."""
        if self.process_dir is not None:
            shutil.rmtree(self.process_dir, ignore_errors=True)
            self.process_dir = None

    def sweep(self) -> list[str]:
        """Remove the directories of processes that ended; return them.

        Only ``proc-`` directories: loose files in `temp_dir` may belong
        to stock ZODB or ZEO code that is alive.
        """
        removed = []
        if not os.path.isdir(self.temp_dir):
            return removed
        for name in os.listdir(self.temp_dir):
            path = os.path.join(self.temp_dir, name)
            if os.path.isdir(path) and process_directory_is_dead(name):
                if os.listdir(path):
                    removed.append(path)
                shutil.rmtree(path, ignore_errors=True)
        return removed
