"""Which blob directory writes a bucket's prefix: copies of a site.

The marker (``binding.py``) ties a prefix to one database, but a copy of
a site (``cp -a`` of Data.fs and the blob directory, a restored backup, a
snapshot) carries the catalog's database id, and a copy pointed at the
same prefix would pack away blobs the original still uses.  So the
prefix also names its *writer*: the object ``PREFIX.writer.zodbblob.json``
holds the identity of the blob directory that writes it, and every
writable open compares it with its own.

The identity is the blob directory's file ``.zodbblob/writer``: a random
id written once, and the file's inode number.  A copy of the directory
has the id but another inode (a copy makes new files); the directory
itself keeps both across restarts, reboots, a new host name (a
container's), ``chown -R``.  A snapshot or clone of the filesystem
(LVM, ZFS, a VM's disk) keeps inode numbers too: for it, a generation,
counted up at each writable open, here (``.zodbblob/writer-generation``,
first) and in the record.  A writable open:

- finds no writer object: writes its own (the first open; a prefix from
  before writers were recorded);
- finds its own, of its generation (or one behind: a crash between the
  two writes): counts on and goes on;
- finds another's, or its own of a later generation (a clone opened
  it since): refused in one line, naming the other's host, directory
  and time.  A site that was moved or restored is the writer again
  after ``zodbblob takeover`` (`taking_over`), once.

So a clone of a stopped site and the site exclude each other (whichever
opens first writes).  A clone of a *running* site has its identity and
generation too: the running writer holds a lease, a session of its own
in the record, renewed every LEASE_RENEWAL seconds and released at a
clean close; an open (or a takeover) is refused while another session's
record is fresh by the server's clock, unless it is from a process of
this host that is gone.

Every delete asks again first (one GetObject; one for all of a pack's):
a storage whose directory lost the prefix to a takeover since it opened
deletes nothing there, neither a pack's garbage nor an abort's uploads
(which then wait, as when the bucket refuses).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import socket
import time
import uuid

from zodbblob.layout import fsync_directory, fsync_path
from zodbblob.storage.catalog import STATE_DIR
from zodbblob.storage.lock import BlobStorageError

logger = logging.getLogger(__name__)

# Beside the marker, ending as it does (``.zodbblob.json``): the prefix's
# own objects, which are no blobs.
WRITER = '.writer.zodbblob.json'
IDENTITY_FILE = 'writer'
# A running writer renews its record this often (seconds); a record not
# renewed for LEASE_STALE is a storage that is gone.
LEASE_RENEWAL = 60
LEASE_STALE = 180
GENERATION_FILE = 'writer-generation'

_taking_over = contextvars.ContextVar('zodbblob_taking_over', default=False)


@contextlib.contextmanager
def taking_over():
    """Writable opens inside this make their blob directory the writer
    of its prefix (``zodbblob takeover``)."""
    token = _taking_over.set(True)
    try:
        yield
    finally:
        _taking_over.reset(token)


def writer_key(bucket) -> str:
    return bucket.settings.prefix + WRITER


def _identity_path(blob_dir: str, name: str = IDENTITY_FILE) -> str:
    return os.path.join(blob_dir, STATE_DIR, name)


def _write_durably(path: str, text: str) -> None:
    """A new file renamed over `path`, and its name made durable (a
    power cut must not make the site a stranger to its own prefix)."""
    temporary = path + '.new'
    with open(temporary, 'w', encoding='ascii') as f:
        f.write(text)
    fsync_path(temporary)
    os.replace(temporary, path)
    fsync_directory(os.path.dirname(path))
    fsync_directory(os.path.dirname(os.path.dirname(path)))


def local_identity(blob_dir: str) -> tuple[str, int]:
    """This blob directory's identity (its writer id and the inode of
    the file that holds it, which is never written again) and its
    generation (in a file of its own, replaced at each bump); the id
    made at the first call, durably."""
    path = _identity_path(blob_dir)
    try:
        with open(path, encoding='ascii', errors='replace') as f:
            value = f.read(200).strip()
    except FileNotFoundError:
        value = ''
    if not value:
        value = uuid.uuid4().hex
        _write_durably(path, value + '\n')
    try:
        with open(_identity_path(blob_dir, GENERATION_FILE),
                  encoding='ascii', errors='replace') as f:
            generation = int(f.read(40).strip() or 0)
    except FileNotFoundError:
        generation = 0
    except ValueError:
        generation = -1   # matches no record: refused, takeover mends it
    info = os.stat(path)
    if info.st_nlink > 1:
        # A copy made of links (cp -al, rsync --link-dest): the file,
        # and so the identity, is the site's.
        raise BlobStorageError(
            f'Blob directory {blob_dir}: {path} has {info.st_nlink} names: '
            f'a copy of a blob directory made of hard links shares its '
            f'files with the original, and cannot be opened for writing '
            f'(copy it with cp -a or rsync -a without --link-dest)')
    return f'{value}-{info.st_ino}', generation


def _bump(blob_dir: str, generation: int) -> None:
    _write_durably(_identity_path(blob_dir, GENERATION_FILE),
                   f'{generation}\n')


def read_writer(bucket) -> dict | None:
    """The prefix's writer record; None if there is none.  One that is
    not a record zodbblob wrote names nobody (writer None)."""
    return bucket.get_record(writer_key(bucket), 'writer')


def describe_writer(writer: dict) -> str:
    return (f'host {writer.get("host", "?")}, blob directory '
            f'{writer.get("blob_dir", "?")}, since {writer.get("since", "?")}')


def _record(blob_dir: str, identity: str, generation: int, session: str,
            released: bool = False) -> bytes:
    return json.dumps({
        'writer': identity, 'generation': generation, 'session': session,
        'released': released, 'pid': os.getpid(),
        'host': socket.gethostname(),
        'blob_dir': os.path.realpath(blob_dir),
        'since': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
    }).encode()


def _generation(writer: dict) -> int:
    generation = writer.get('generation', 0)
    return generation if isinstance(generation, int) else -2


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False   # ours: a process before this one, with our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True   # someone else's, alive
    return True


def _refuse_a_live_lease(writer: dict | None, blob_dir: str,
                         name: str) -> None:
    """Refuse while a running storage holds the prefix: a record it
    renewed less than `LEASE_STALE` seconds ago (by the server's clock),
    not released at its close, and not from a process of this host
    that is gone (a crash, then this restart)."""
    if (writer is None or writer.get('released') is not False
            or not isinstance(writer.get('session'), str)):
        return
    age = writer.get('age')
    if age is not None and age >= LEASE_STALE:
        return
    if writer.get('host') == socket.gethostname() and not _alive(
            writer.get('pid')):
        return
    raise BlobStorageError(
        f'Blob directory {blob_dir}: {name} is in use by a running storage '
        f'({describe_writer(writer)}, pid {writer.get("pid")}, renewed '
        f'{"?" if age is None else int(age)} s ago): a copy of a site '
        f'needs a prefix of its own; if that storage is gone, its claim '
        f'lapses {LEASE_STALE} s after its last renewal')


def claim_writer(bucket, blob_dir: str, name: str) -> str:
    """A writable open of the blob directory bound to `name`
    (``s3://bucket/prefix``): go on as its writer, one generation on,
    or refuse a copy; the new session (`renew`, `release`)."""
    identity, generation = local_identity(blob_dir)
    writer = read_writer(bucket)
    ours = writer is not None and writer['writer'] == identity
    if ours or _taking_over.get():
        # A clone of a running site, or a takeover while it runs.
        _refuse_a_live_lease(writer, blob_dir, name)
    # Its own record, or one generation behind it: a crash between the
    # two writes of the last open's bump.
    if ours and _generation(writer) in (generation, generation - 1):
        pass
    elif writer is not None and not _taking_over.get():
        if ours:
            raise BlobStorageError(
                f'Blob directory {blob_dir}: {name} was last opened for '
                f'writing by a later generation of this directory '
                f'({describe_writer(writer)}): a snapshot or clone of its '
                f'filesystem, or this directory restored from one; each '
                f'needs a prefix of its own.  If this directory is the site, '
                f'with every other copy stopped, make it the writer once '
                f'with: zodbblob takeover --config FILE')
        raise BlobStorageError(
            f'Blob directory {blob_dir}: {name} is written by another copy '
            f'of this site ({describe_writer(writer)}); a copy of a site '
            f'needs a prefix of its own.  If this directory is the site '
            f'(moved, or restored), make it the writer once with: '
            f'zodbblob takeover --config FILE')
    # The next generation: here first, then in the bucket.
    # Ours: one past the record, never past it by more (an open whose
    # PUT failed or was killed must not move the directory further ahead).
    generation = (_generation(writer) + 1 if ours and not _taking_over.get()
                  else max(generation, _generation(writer or {})) + 1)
    _bump(blob_dir, generation)
    session = uuid.uuid4().hex
    bucket.put_bytes(writer_key(bucket),
                     _record(blob_dir, identity, generation, session))
    if writer is not None and not ours:
        logger.warning('Blob directory %s took %s over from %s', blob_dir,
                       name, describe_writer(writer))
    return session


def _is_session(writer: dict | None, blob_dir: str, session: str) -> bool:
    return (writer is not None and writer.get('session') == session
            and (writer['writer'], _generation(writer))
            == local_identity(blob_dir))


def renew(bucket, blob_dir: str, session: str,
          released: bool = False) -> str | None:
    """Write the record of `session` again (its Last-Modified is the
    lease's renewal; with `released`, a clean close gives it up); what
    holds the prefix instead, if another does (nothing written)."""
    writer = read_writer(bucket)
    if not _is_session(writer, blob_dir, session):
        return 'no writer' if writer is None else describe_writer(writer)
    identity, generation = local_identity(blob_dir)
    bucket.put_bytes(writer_key(bucket), _record(
        blob_dir, identity, generation, session, released))
    return None


class NotTheWriter(BlobStorageError):
    """This blob directory no longer writes its prefix; `said` names
    the one that does."""

    def __init__(self, message: str, said: str):
        super().__init__(message)
        self.said = said


def confirm_writer(bucket, blob_dir: str, name: str) -> None:
    """Refuse to go on (a delete) if another blob directory took the
    prefix over since this one opened, or a copy of it opened it."""
    writer = read_writer(bucket)
    if writer is not None and (writer['writer'], _generation(writer)) \
            == local_identity(blob_dir):
        return
    said = 'no writer' if writer is None else describe_writer(writer)
    raise NotTheWriter(
        f'Blob directory {blob_dir}: {name} is no longer written by this '
        f'directory ({said}): it deletes nothing there', said)
