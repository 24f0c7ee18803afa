"""Opening a blob directory: its lock, its catalog, and recovery.

Opening takes the directory's lock, opens (or rebuilds) the catalog and
replays the commit log's records since the last checkpoint: what a crash
interrupted is finished or undone, a pack that was killed is finished,
and what staging and dead processes left behind is removed.
``check_state_layout`` refuses, before anything is touched, a directory
whose state files are of the wrong kind.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat

import ZODB.FileStorage
from ZODB.utils import oid_repr, z64

from zodbblob.layout import (
    LAYOUT_MARKER,
    FilesystemHelper,
    file_kind,
    makedirs_durable,
    remove_if_exists,
)
from zodbblob.storage.catalog import (
    STATE_DIR,
    Journal,
    JournalError,
    journal_path,
    kill_point,
)
from zodbblob.storage.checkpoint import Shared, checkpoint
from zodbblob.storage.commit import STAGING_PREFIX, read_bytes
from zodbblob.storage.commitlog import (
    CommitLog,
    Entry,
    commit_log_path,
    latest_entries,
)
from zodbblob.storage.datamanager import TransactionDirectories
from zodbblob.storage.dedup import same_bytes
from zodbblob.storage.digest import digest_bytes, digest_file
from zodbblob.storage.filestorage import (
    FileStorageOpener,
    file_lock,
    torn_transaction,
    truncate,
)
from zodbblob.storage.lock import LOCK_NAME, BlobStorageError, lock_blob_directory
from zodbblob.storage.binding import was_in_use
from zodbblob.storage.objects import (
    ObjectStore,
    open_objects,
    rebuild_from_bucket,
    recover_objects,
)
from zodbblob.storage.pack import (
    base_has,
    remove_blob_files,
    remove_unreferenced,
)

logger = logging.getLogger(__name__)


def check_state_layout(blob_dir: str) -> None:
    """Refuse a blob directory whose state has the wrong kind of file.

    ``.zodbblob`` a regular file, ``journal.sqlite`` or ``commit.log`` a
    directory: opening would fail deep in SQLite or ``os.makedirs`` with
    an error that names no path, or (read-only) go on without the
    catalog.  ValueError, one line naming the path and what it is;
    nothing is read, created or moved aside.  A missing name is fine: a
    new or stock blob directory has none of these.
    """
    blob_dir = os.path.normpath(blob_dir)
    if not os.path.isdir(blob_dir):
        return   # the layout's own check names a blob_dir that is a file
    state_dir = os.path.join(blob_dir, STATE_DIR)
    journal = journal_path(blob_dir)
    expected = [(os.path.join(blob_dir, LAYOUT_MARKER), False),
                (os.path.join(blob_dir, 'tmp'), True),
                (state_dir, True)]
    for path in (journal, journal + '-wal', journal + '-shm',
                 commit_log_path(blob_dir),
                 os.path.join(state_dir, LOCK_NAME)):
        expected.append((path, False))
    for path, directory in expected:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            if os.path.lexists(path):
                raise ValueError(f'{path} is a symbolic link to '
                                 f'{os.readlink(path)}, which does not '
                                 f'exist') from None
            continue
        except NotADirectoryError:
            continue   # below .zodbblob, refused already
        if directory and not stat.S_ISDIR(mode):
            raise ValueError(f'{path} is {file_kind(mode)}, not a '
                             f'directory')
        if not directory and not stat.S_ISREG(mode):
            raise ValueError(f'{path} is {file_kind(mode)}, not a regular '
                             f'file')


def _holds(path: str, data: bytes) -> bool:
    """Whether the file at `path` holds exactly `data`."""
    try:
        if os.stat(path).st_size != len(data):
            return False
        return read_bytes(path) == data
    except FileNotFoundError:
        return False


def _recovered_digest(entry: Entry, final: str) -> bytes | None:
    """The digest of a committed file whose row recovery writes.

    An inline entry's from the record's bytes; a larger one's by reading
    the file rolled forward (recovery is rare: correct before fast).
    None for a file that is lost (verify reports it missing).
    """
    if entry.data is not None:
        return digest_bytes(entry.data)
    try:
        return digest_file(final)
    except OSError:
        return None


def open_blob_directory(base, blob_dir: str, layout: str,
                        object_store=None) -> Shared:
    """Open `blob_dir` for a storage over `base`: what its instances share.

    `object_store` is ``(bucket, cache_size, dedup)`` for a storage whose blobs
    live in a bucket (``objects.py``), or None.
    """
    return Recovery(base, object_store).open(blob_dir, layout)


def open_with_base(opener: FileStorageOpener, blob_dir: str,
                   layout: str, object_store=None) -> tuple:
    """Open `blob_dir`, then the base `opener` opens: ``(base, shared)``.

    The base is opened after the blob directory is locked and a torn last
    transaction of its ``Data.fs`` rolled back, so the storage commits
    with one sync (``filestorage.py`` has the argument).
    """
    recovery = Recovery(None, object_store)
    shared = recovery.open(blob_dir, layout, opener)
    return recovery.base, shared


def log_protocol(fshelper, opener, objects, base) -> None:
    """Say at INFO which commit protocol the storage uses, and why."""
    if objects is not None:
        logger.info(
            'Blob directory %s keeps its blobs in %s; commits are '
            'serial (the commit record is durable before the uploads)',
            fshelper.base_dir, objects.name,
            extra={'commit_protocol': 'serial'})
    elif opener is not None:
        logger.info(
            'Blob directory %s commits with one sync: zodbblob opened '
            '%s itself, so it can roll back a torn last transaction',
            fshelper.base_dir, opener.path,
            extra={'commit_protocol': 'one sync'})
    else:
        logger.info(
            'Blob directory %s commits serially (the commit record is '
            'durable before the base commits): its base %r was opened '
            'by the caller', fshelper.base_dir, base,
            extra={'commit_protocol': 'serial'})


def raise_for_bucket(error: BaseException, blob_dir: str) -> None:
    """A bucket's answer at open (a marker too large, a store gone
    during recovery's deletes) as the storage's error, naming the blob
    directory; anything else is left to propagate."""
    from zodbblob.objectstore.bucket import ObjectStoreError
    if isinstance(error, ObjectStoreError):
        raise BlobStorageError(f'Blob directory {blob_dir}: {error}') from None


class Recovery:
    """Opens a blob directory, finishing what a crash interrupted there."""

    def __init__(self, base, object_store=None):
        self.base = base
        self._shared: Shared | None = None
        self._object_store = object_store
        self.objects: ObjectStore | None = None
        self._in_use = True

    def open(self, blob_dir: str, layout: str,
             opener: FileStorageOpener | None = None) -> Shared:
        check_state_layout(blob_dir)
        fshelper = FilesystemHelper(blob_dir, layout)
        ours = opener is not None
        if ours and opener.read_only:
            # Read-only commits nothing, and may not cut Data.fs.
            self.base, opener = opener(), None
        try:
            return self._open(fshelper, opener)
        except BaseException as e:
            if ours and self.base is not None:
                self.base.close()   # ours: nobody else can close it
                self.base = None
            if self._object_store is not None:
                raise_for_bucket(e, fshelper.base_dir)
            raise

    def _open(self, fshelper, opener) -> Shared:
        if self.base is not None and getattr(self.base, 'isReadOnly',
                                             bool)():
            fshelper.check_marker()
            shared = Shared(fshelper, self._open_journal_read_only(fshelper),
                            None, True)
            self._bind(shared.journal, fshelper, read_only=True)
            shared.objects = self.objects
            if self.objects is not None:
                self.objects.base = self.base
            return shared
        state_dir = os.path.join(fshelper.base_dir, STATE_DIR)
        lock_path = os.path.join(state_dir, LOCK_NAME)
        # Lock before creating anything where a lock may be held already
        # (a live storage, a tool such as migrate): a refused open writes
        # nothing.
        fshelper.check_marker()
        lock = lock_blob_directory(fshelper, lock_path) if os.path.isdir(
            state_dir) else None
        try:
            fshelper.create()
            os.makedirs(state_dir, exist_ok=True)
            if lock is None:
                lock = lock_blob_directory(fshelper, lock_path)
        except BaseException:
            if lock is not None:
                lock.close()
            raise
        try:
            # A directory whose catalog is missing was used before if
            # its commit log is there: on a bucket, its catalog is
            # rebuilt from a listing; a new one never adopts a prefix.
            self._in_use = was_in_use(fshelper.base_dir)
            commit_log = CommitLog(commit_log_path(fshelper.base_dir))
            try:
                if opener is not None:
                    self._roll_back_torn_tail(fshelper, commit_log, opener)
                    self.base = opener()
                else:
                    self._refuse_torn_tail(fshelper, commit_log)
                journal = self._open_journal(fshelper)
                try:
                    self._bind(journal, fshelper)
                except BaseException:
                    journal.close()
                    raise
            except BaseException:
                commit_log.close()
                raise
            shared = Shared(fshelper, journal, lock, False)
            shared.commit_log = commit_log
            shared.objects = self.objects
            if self.objects is not None:
                self.objects.base = self.base
            # On a bucket, vote waits for the record's sync anyway (the
            # uploads start after it): the serial protocol.
            shared.one_sync = opener is not None and self.objects is None
            self._shared = shared
            try:
                self._recover(journal, fshelper)
                journal.set_meta(state='open')
                # Before the first commit: from here on, a crash may leave
                # a torn last transaction for the next open to roll back.
                if commit_log.open_one_sync != shared.one_sync:
                    commit_log.mark_open_one_sync(shared.one_sync)
            except BaseException:
                commit_log.close()
                journal.close()
                raise
        except BaseException:
            lock.close()
            if self.objects is not None:
                self.objects.close()
            raise
        log_protocol(fshelper, opener, self.objects, self.base)
        return shared

    def _roll_back_torn_tail(self, fshelper, commit_log,
                             opener: FileStorageOpener) -> None:
        """Cut a last transaction whose tpc_finish never returned.

        Under FileStorage's own lock, so that a file another process has
        open is never cut; released before the opener takes it.
        """
        path = opener.path
        if opener.create or not os.path.exists(path):
            return
        lock = file_lock(path)
        try:
            torn = torn_transaction(path, commit_log, fshelper)
            if torn is None:
                return
            saved = truncate(path, torn.start)
        finally:
            lock.close()
        logger.warning(
            'Rolled back transaction %s at the end of %s: it committed in '
            'the base, but its commit record in %s never became durable, so '
            'its tpc_finish never returned and nobody was told; its bytes '
            'were saved to %s', oid_repr(torn.tid), path, commit_log.path,
            saved)

    def _refuse_torn_tail(self, fshelper, commit_log) -> None:
        """Refuse a FileStorage opened by the caller that ends with a
        transaction a one-sync storage left torn: serving it would serve
        its blobs as missing, and only an open that opens the file itself
        can roll it back."""
        if not (commit_log.open_one_sync
                and isinstance(self.base, ZODB.FileStorage.FileStorage)):
            return
        path = self.base.getName()   # FileStorage's name is its path
        if not os.path.isfile(path):
            return
        torn = torn_transaction(path, commit_log, fshelper)
        if torn is not None:
            raise BlobStorageError(
                f'Blob directory {fshelper.base_dir}: {path} ends with '
                f'transaction {oid_repr(torn.tid)}, which a crash '
                f'interrupted before its blob files were durable; open it '
                f'with zodbblob.open_filestorage or a <zodbblob> section '
                f'around <filestorage> to roll it back')

    def _bind(self, journal, fshelper, read_only=False) -> None:
        """Open the object store, bound to this blob directory; or refuse
        a blob directory bound to one when none was given."""
        if self.objects is None:
            self.objects = open_objects(self._object_store, journal,
                                        fshelper, read_only)

    def _open_journal(self, fshelper) -> Journal:
        path = journal_path(fshelper.base_dir)
        try:
            journal = Journal(fshelper.base_dir)
        except JournalError as e:
            damage = str(e)
        else:
            damage = journal.check()
            if damage is not None:
                journal.close()
        if damage is not None:
            # Moved aside, never deleted: the rows are rebuilt from a scan
            # (and the commit log, which recovery replays next), but the
            # file may be wanted to see what happened.
            aside = path + '.corrupt'
            os.replace(path, aside)
            remove_if_exists(aside + '-wal')
            if os.path.exists(path + '-wal'):
                os.replace(path + '-wal', aside + '-wal')
            remove_if_exists(path + '-shm')
            journal = Journal(fshelper.base_dir)
            self._rebuild(journal, fshelper, 'the catalog %s was damaged (%s) '
                          'and was moved to %s' % (path, damage, aside),
                          level=logging.WARNING)
            return journal
        state = journal.get_meta('state')
        last_tid = journal.get_meta('last_tid')
        base_tid = self.base.lastTransaction()
        if state is None:
            self._rebuild(journal, fshelper, 'it has no blob catalog yet')
        elif state == 'closed' and base_tid > (last_tid or z64):
            # Only forward: FileStorage may report, for one open after a
            # crash, the tid of a transaction it truncated (a phantom), and
            # a tid behind ours means a restored Data.fs, not new files.
            self._rebuild(
                journal, fshelper,
                'its base storage was changed without zodbblob (last '
                'transaction %s, catalog knows %s)'
                % (oid_repr(base_tid), oid_repr(last_tid or z64)))
        return journal


    def _open_journal_read_only(self, fshelper) -> Journal | None:
        try:
            return Journal(fshelper.base_dir, read_only=True)
        except (JournalError, Exception):
            return None

    def _rebuild(self, journal, fshelper, reason: str,
                 level: int | None = None) -> None:
        if self._object_store is not None:
            if journal.get_meta('state') is None and not self._in_use:
                return   # a new blob directory: bound at its first open
            self.objects = rebuild_from_bucket(
                self._object_store, journal, fshelper.base_dir, reason)
            return
        blobs = [(oid, tid, os.stat(path).st_size)
                 for oid, tid, path in fshelper.iter_blobs()]
        if level is None:
            level = logging.WARNING if blobs else logging.DEBUG
        logger.log(level, 'Rebuilt the blob catalog of %s from a scan (%s): '
                   '%d blob files', fshelper.base_dir, reason, len(blobs))
        journal.rebuild(blobs)

    def _recover(self, journal, fshelper) -> None:
        """Finish or undo what a crash interrupted, then clear staging.

        Each blob file a record of the commit log names since the last
        checkpoint is decided on its own: if the base storage has that
        revision, the file gets its final name and exact bytes (rewritten
        from the record, or linked from its staged name) and its catalog
        row; if not, the file and row are removed.  A file whose revision
        the base has is never removed.  Replaying twice is harmless.
        """
        shared = self._shared
        latest = latest_entries(shared.commit_log.records)
        in_catalog = journal.known(latest)
        if shared.objects is not None:
            recover_objects(shared, self.base, latest, in_catalog)
            self._after_replay(journal, fshelper)
            return
        forward, back, rows, gone = set(), set(), [], []
        for (oid, tid), entry in sorted(latest.items(),
                                        key=lambda item: item[0][::-1]):
            final = fshelper.getBlobFilename(oid, tid)
            if base_has(self.base, oid, tid):
                if entry is None:
                    continue  # aborted; the revision is someone else's
                if self._roll_forward(entry, final, tid):
                    forward.add(tid)
                if (oid, tid) not in in_catalog:
                    rows.append((oid, tid, entry.size,
                                 _recovered_digest(entry, final)))
                shared.unsynced.append(final)
            else:
                if entry is not None:
                    back.add(tid)
                remove_if_exists(final)
                # The checkpoint syncs its directory: the removal durable
                # before the record goes, or a power cut brings it back.
                shared.unsynced.append(final)
                if entry is not None and entry.staged:
                    remove_if_exists(os.path.join(fshelper.temp_dir,
                                                  entry.staged))
                if (oid, tid) in in_catalog:
                    gone.append((oid, tid))
            kill_point('mid_recovery')
        journal.add(rows)
        journal.remove(gone)
        checkpoint(shared)
        for tid in sorted(forward | back):
            logger.warning(
                'Recovered blob directory %s: rolled %s the blob files '
                'of interrupted transaction %s', fshelper.base_dir,
                'back' if tid in back else 'forward', oid_repr(tid))
        # A process that ended without closing its storage (Zope does, on
        # every SIGTERM) leaves its last rows to the log: routine, no alarm.
        rows_only = {row[1] for row in rows} - forward - back
        if rows_only:
            logger.info('Recovered blob directory %s: wrote the catalog rows '
                        'of %d committed transactions from the commit log',
                        fshelper.base_dir, len(rows_only))
        self._after_replay(journal, fshelper)

    def _after_replay(self, journal, fshelper) -> None:
        """Finish an interrupted pack; clear staging."""
        shared = self._shared
        # Marks whose removal no sync made durable: the files may be
        # back.  A revision the base has (restored since) is kept.
        garbage = journal.garbage()
        if garbage:
            kept = [(oid, tid) for oid, tid in garbage
                    if base_has(self.base, oid, tid)]
            doomed = sorted(set(garbage) - set(kept))
            # Marks whose files and rows are gone are a finished pack's:
            # its process ended before a sync let them go.
            left = journal.known(doomed) | {
                pair for pair in doomed
                if os.path.exists(fshelper.getBlobFilename(*pair))}
            if left:
                logger.warning('Recovered blob directory %s: finished '
                               'removing the %d blob files of an '
                               'interrupted pack', fshelper.base_dir,
                               len(left))
            remove_blob_files(shared, doomed)
            # A kept revision's file came back with it (a base that went
            # back to before its pack): its row too.
            known = journal.known(kept)
            journal.add([(oid, tid, os.path.getsize(path))
                         for oid, tid in kept if (oid, tid) not in known
                         for path in [fshelper.getBlobFilename(oid, tid)]
                         if os.path.isfile(path)])
            journal.forget_garbage(kept)
        if journal.pack_started() is not None:
            self._finish_pack(journal, fshelper, quiet=bool(garbage))
        checkpoint(shared, removals=True)
        # Staging belongs to the storage holding the blob directory's lock,
        # and that is the one opening now: what is there is left over.
        if os.path.isdir(fshelper.temp_dir):
            for name in os.listdir(fshelper.temp_dir):
                path = os.path.join(fshelper.temp_dir, name)
                if name.startswith(STAGING_PREFIX) and os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
        # Uncommitted files of processes that died: nobody can commit them
        # any more.
        shared.directories = TransactionDirectories(fshelper.temp_dir)
        for path in shared.directories.sweep():
            logger.warning('Removed %s: uncommitted blob files of a process '
                           'that ended', path)

    def _finish_pack(self, journal, fshelper, quiet: bool) -> None:
        """Remove the files of a pack killed before it marked its garbage.

        The base may have packed: every catalog row whose revision the
        base no longer has is garbage.  Asked with ``loadSerial``, not by
        unpickling records: there is no database yet to untransform them,
        and a revision the base still has is never removed.  Every row,
        streamed: what the base's GC removed is not known here.
        """
        removed = remove_unreferenced(self._shared, self.base, journal.rows())
        if removed or not quiet:
            logger.warning('Recovered blob directory %s: finished a pack '
                           'interrupted after its base storage packed (%d '
                           'blob files removed)', fshelper.base_dir, removed)
        journal.end_pack()

    def _roll_forward(self, entry: Entry, final: str, tid: bytes) -> bool:
        """Give a committed file its final name and bytes; True if needed."""
        if entry.data is not None:
            if _holds(final, entry.data):
                return False
            self._rewrite(final, entry.data)
            return True
        staged = os.path.join(self._shared.fshelper.temp_dir, entry.staged)
        if os.path.exists(final):
            return self._relink_if_changed(final, staged)
        if os.path.exists(staged):
            makedirs_durable(os.path.dirname(final))
            os.link(staged, final)
        else:
            logger.error('Blob file %s of oid %s tid %s is lost: neither it '
                         'nor %s exists', final, oid_repr(entry.oid),
                         oid_repr(tid), staged)
        return True

    def _relink_if_changed(self, final: str, staged: str) -> bool:
        """Give `final` its staged file's bytes if dedup linked it to
        another file whose bytes differ now; True if it had to.

        A file that is not inline is published as a link to its staged
        file, whose bytes are durable, or (dedup) to a committed file of
        the same bytes: one whose own bytes may not be durable yet (an
        inline one, before a checkpoint), which a power cut may have
        lost.  Only then are bytes compared.
        """
        try:
            if (os.path.samestat(os.lstat(final), os.lstat(staged))
                    or same_bytes(final, staged)):
                return False
        except OSError:
            # No staged name (a checkpoint made final durable), or no
            # regular file at final (verify reports it; never opened).
            return False
        temporary = os.path.join(self._shared.fshelper.temp_dir,
                                 'recovered-%d.blob' % os.getpid())
        remove_if_exists(temporary)
        os.link(staged, temporary)
        os.replace(temporary, final)
        return True

    def _rewrite(self, final: str, data: bytes) -> None:
        """Write `final` afresh from the commit log's copy of its bytes."""
        directory = os.path.dirname(final)
        makedirs_durable(directory)
        temporary = os.path.join(self._shared.fshelper.temp_dir,
                                 'recovered-%d.blob' % os.getpid())
        with open(temporary, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, os.stat(directory).st_mode & 0o444)
        os.replace(temporary, final)
