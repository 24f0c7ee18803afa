"""A child process for the power-cut tests: writes until the power goes.

Usage: python -m zodbblob.powercut.tests.workload WORKLOAD DIR REPORT SEED
           [--stock | --one-sync] [--dedup]
       python -m zodbblob.powercut.tests.workload --serve  (see serve())

WORKLOAD is ``commit`` (transactions of every shape: one and many blobs,
inline and not, more files than SYNCFS_THRESHOLD, removals), ``pack``
(commits and packs), ``undo`` (commits and undos), ``open`` (opens the
storage, which recovers, and closes it), ``torn`` (holds a commit in one
sync's torn window: see ``torn_workload``), ``pack-hold`` (commits,
packs, and holds until the power goes: see ``pack_hold_workload``),
``cache`` (downloads into a
zodbblob.cache.BlobCache in DIR/cache) or ``backup`` (commits to a
storage in REPORT's directory and backs it up into DIR/backup).  The
database is ``DIR/Data.fs`` with blobs in ``DIR/blobs``; ``--stock``
opens it as stock ZODB does, ``FileStorage(path, blob_dir=...)``;
``--one-sync`` as ``zodbblob.open_filestorage`` does (and the
configuration), which commits with one sync; without either,
``BlobStorage(blobs, FileStorage(path))``, which commits serially.
``--dedup`` turns dedup on and draws the blobs' bytes from two contents
per size, so that most files are links to an equal one.

After each transaction or backup returns, one JSON line goes to REPORT
(outside the filesystem whose power is cut), flushed and fsynced: what
the parent must find after the cut.  The power goes at some operation;
every later one fails with EIO, and the parent kills this process.
"""

import ctypes
import hashlib
import json
import os
import random
import sys
import signal
import tempfile
import threading
import time
import traceback

import transaction
import ZODB
import ZODB.FileStorage
import ZODB.POSException
from ZODB.blob import Blob

import zodbblob.storage.commit
from zodbblob import BlobStorage, open_filestorage
from zodbblob.powercut.tests.launcher import Lines

# Small limits, so that a few dozen transactions cover every path of the
# commit: blobs in the log (up to 64 KiB a transaction), files synced one
# by one, files synced together (8 or more), and checkpoints.
INLINE_LIMIT = 64 * 1024
CHECKPOINT_RECORDS = 6
KEYS = 30
# With dedup: a checkpoint after every commit whose links leave this many
# bytes held by staged names alone.
HELD_LIMIT = 64 * 1024
NOTE = 'powercut workload'
PR_SET_PDEATHSIG = 1


# The settings of a bucket (JSON) that the storage keeps its blobs in:
# set by the parent for the power-cut tests on a bucket, inherited by the
# workload (the bucket is outside the filesystem whose power goes).
BUCKET_VARIABLE = 'ZODBBLOB_POWERCUT_BUCKET'


def bucket_settings():
    """The settings `BUCKET_VARIABLE` gives, or None."""
    value = os.environ.get(BUCKET_VARIABLE)
    if not value:
        return None
    from zodbblob.objectstore import ObjectStoreSettings
    return ObjectStoreSettings(**json.loads(value))


def open_database(directory: str, stock: bool = False,
                  one_sync: bool = False, dedup: bool = False) -> ZODB.DB:
    zodbblob.storage.commit.INLINE_LIMIT = INLINE_LIMIT
    zodbblob.storage.commit.CHECKPOINT_RECORDS = CHECKPOINT_RECORDS
    zodbblob.storage.commit.HELD_LIMIT = HELD_LIMIT
    path = os.path.join(directory, 'Data.fs')
    blobs = os.path.join(directory, 'blobs')
    bucket = bucket_settings()
    if bucket is not None:
        return ZODB.DB(open_filestorage(path, blobs, object_store=bucket,
                                        dedup=dedup))
    if stock:
        return ZODB.DB(ZODB.FileStorage.FileStorage(path, blob_dir=blobs))
    if one_sync:
        return ZODB.DB(open_filestorage(path, blobs, dedup=dedup))
    return ZODB.DB(BlobStorage(blobs, ZODB.FileStorage.FileStorage(path),
                               dedup=dedup))


def pooled(rng: random.Random, size: int) -> bytes:
    """One of two contents of about `size` bytes (a power of two)."""
    if not size:
        return b''
    bits = size.bit_length()
    return random.Random(bits * 2 + rng.randrange(2)).randbytes(
        1 << (bits - 1))


def shapes(rng: random.Random) -> list[int]:
    """Sizes of the blobs of one transaction."""
    shape = rng.randrange(5)
    if shape == 0:
        return [rng.randrange(0, 20000)]                     # inline
    if shape == 1:
        return [rng.randrange(1, 8000) for _ in range(3)]    # inline, 3
    if shape == 2:
        return [rng.randrange(70000, 200000)]                # synced file
    if shape == 3:
        return [rng.randrange(8000, 12000) for _ in range(10)]  # 10 synced
    return [rng.randrange(0, 2000) for _ in range(10)]       # 10 inline


def state_of(root) -> dict:
    state = {}
    for key, blob in root.items():
        with blob.open() as f:
            state[key] = hashlib.sha256(f.read()).hexdigest()
    return state


def report(log, entry: dict) -> None:
    log.write(json.dumps(entry) + '\n')
    log.flush()
    os.fsync(log.fileno())


def commit_one(rng: random.Random, root, dedup: bool = False) -> None:
    for size in shapes(rng):
        key = 'blob-%d' % rng.randrange(KEYS)
        data = pooled(rng, size) if dedup else rng.randbytes(size)
        if key in root:
            with root[key].open('w') as f:
                f.write(data)
        else:
            root[key] = Blob(data)
    if rng.randrange(6) == 0 and root:
        del root[rng.choice(sorted(root))]
    transaction.get().note(NOTE)
    transaction.commit()


def database_workload(workload: str, directory: str, log,
                      rng: random.Random, stock: bool,
                      one_sync: bool, dedup: bool = False) -> None:
    db = open_database(directory, stock, one_sync, dedup)
    if workload == 'open':
        db.close()
        report(log, {'opened': True})
        return
    conn = db.open()
    root = conn.root()
    for number in range(10 ** 6):
        if workload == 'pack' and number % 4 == 3:
            db.pack()
            report(log, {'packed': True})
            continue
        if workload == 'undo' and number % 3 == 2:
            # Only the workload's own commits: undoing the one that made
            # the root object would leave a database no DB can open.
            undoable = [entry for entry in db.undoLog(0, 4)
                        if entry['description'] == NOTE]
            if undoable:
                db.undo(rng.choice(undoable)['id'])
                try:
                    transaction.commit()
                except ZODB.POSException.UndoError:
                    transaction.abort()
                    continue
                conn.sync()
                report(log, {'tid': db.lastTransaction().hex(),
                             'state': state_of(root)})
                continue
        commit_one(rng, root, dedup)
        report(log, {'tid': db.lastTransaction().hex(),
                     'state': state_of(root)})


def torn_workload(directory: str, log, rng: random.Random,
                  go_on: bool = False) -> None:
    """Commit once; then hold a commit between its two syncs.

    One sync's torn window: the base's finish (the fsync of ``Data.fs``)
    has returned, the commit record's sync has not begun (a job queued
    ahead of it on the storage's sync thread holds it).  Reports the
    held transaction's tid as ``torn`` and waits for the power to go;
    with `go_on`, then for the test's word (a file ``<report>.go``) to
    let the held commit go on, and reports how its commit ended
    (``failed``, or its ``tid`` as any commit that returned) and
    ``done``.
    """
    db = open_database(directory, one_sync=True)
    root = db.open().root()
    commit_one(rng, root)
    report(log, {'tid': db.lastTransaction().hex(), 'state': state_of(root)})
    storage = db.storage
    hold = threading.Event()
    storage._shared.syncer().submit(hold.wait)
    before = storage.base.lastTransaction()

    def commit():
        conn = db.open()
        try:
            commit_one(rng, conn.root())
        except Exception as error:  # noqa: BLE001 (reported)
            report(log, {'failed': '%s: %s' % (type(error).__name__,
                                               error)})
            return
        report(log, {'tid': db.lastTransaction().hex(),
                     'state': state_of(conn.root())})

    committing = threading.Thread(target=commit, daemon=True)
    committing.start()
    while storage.base.lastTransaction() == before:
        time.sleep(0.01)
    report(log, {'torn': storage.base.lastTransaction().hex()})
    if go_on:
        while not os.path.exists(log.name + '.go'):
            time.sleep(0.01)
        hold.set()
        committing.join()
        report(log, {'done': True})
    threading.Event().wait()


def pack_hold_workload(directory: str, log, rng: random.Random,
                       one_sync: bool) -> None:
    """Commit until some revisions are superseded, pack, and hold.

    Pack makes its removals durable only at the next checkpoint: the
    power goes between the two.  Reports each commit, then ``packed``
    with the number of blob files the pack removed, and waits.
    """
    db = open_database(directory, one_sync=one_sync)
    root = db.open().root()
    for _ in range(6):
        commit_one(rng, root)
        report(log, {'tid': db.lastTransaction().hex(),
                     'state': state_of(root)})
    fshelper = db.storage.fshelper
    before = len(list(fshelper.iter_blobs()))
    db.pack()
    removed = before - len(list(fshelper.iter_blobs()))
    report(log, {'packed': True, 'removed': removed})
    threading.Event().wait()


def cache_bytes(oid: int, tid: int) -> bytes:
    """The bytes of a cached revision: the parent knows them too."""
    rng = random.Random(oid * 1000003 + tid)
    return rng.randbytes(rng.randrange(0, 20000))


def cache_workload(directory: str, rng: random.Random, seed: int) -> None:
    from zodbblob.cache import BlobCache
    cache = BlobCache(os.path.join(directory, 'cache'))
    while True:
        # Revisions of this run's own: a cache that had them all already
        # would write nothing, and the power would never go.
        oid, tid = rng.randrange(1, 200), seed * 4 + rng.randrange(1, 5)

        def fetch(path, oid=oid, tid=tid):
            with open(path, 'wb') as f:
                f.write(cache_bytes(oid, tid))

        cache.load(oid.to_bytes(8, 'big'), tid.to_bytes(8, 'big'), fetch)


def backup_workload(directory: str, source: str, log,
                    rng: random.Random) -> None:
    from zodbblob.tools.backup import backup
    db = open_database(source)
    conn = db.open()
    root = conn.root()
    while True:
        for _ in range(rng.randrange(1, 4)):
            commit_one(rng, root)
        for result in backup(db.storage, os.path.join(directory, 'backup'),
                             full=rng.randrange(4) == 0):
            report(log, {'snapshot': result.snapshot,
                         'tid': result.tid.hex()})


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux's prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def serve() -> None:
    """Fork one workload per request: a cut costs no new interpreter.

    Orders arrive one per line on standard input: a JSON ``[argv, log
    path]`` starts a child (one at a time), answered ``pid N``; ``kill``
    sends it SIGKILL.  Once the child has ended, killed or not, the
    answer is ``exit N``.  The launcher kills its child when its input
    ends, and dies with the process that started it, as does the child.
    """
    die_with_parent()
    orders = Lines(0)
    while (order := orders.next(None)) is not None:
        if order == 'kill':
            continue  # for a child that had ended already
        argv, log_path = json.loads(order)
        pid = os.fork()
        if pid == 0:
            run_child(argv, log_path)
        print('pid %d' % pid, flush=True)
        while True:
            ended, status = os.waitpid(pid, os.WNOHANG)
            if ended:
                break
            order = orders.next(0.02)
            if order == 'kill' or order is None:
                os.kill(pid, signal.SIGKILL)
                if order is None:
                    os.waitpid(pid, 0)
                    return
        print('exit %d' % os.waitstatus_to_exitcode(status), flush=True)


def run_child(argv: list[str], log_path: str) -> None:
    code = 1
    try:
        die_with_parent()
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        main(argv)
        code = 0
    except BaseException:  # noqa: BLE001 (the log tells)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str]) -> None:
    workload, directory, report_path, seed = argv[:4]
    if '--bucket' in argv:
        # Given here, not inherited: a served workload is forked from a
        # process started before the test chose its bucket.
        os.environ[BUCKET_VARIABLE] = argv[argv.index('--bucket') + 1]
    rng = random.Random(int(seed))
    # A new Blob's bytes are written before it has a storage, to a
    # temporary file: on the database's filesystem, so that storeBlob
    # renames it as it would in production.
    tempfile.tempdir = os.path.join(directory, 'scratch')
    os.makedirs(tempfile.tempdir, exist_ok=True)
    with open(report_path, 'a') as log:
        if workload == 'cache':
            cache_workload(directory, rng, int(seed))
        elif workload in ('torn', 'torn-go-on'):
            torn_workload(directory, log, rng, workload == 'torn-go-on')
        elif workload == 'pack-hold':
            pack_hold_workload(directory, log, rng, '--one-sync' in argv)
        elif workload == 'backup':
            backup_workload(directory, os.path.join(
                os.path.dirname(report_path), 'source'), log, rng)
        else:
            database_workload(workload, directory, log, rng,
                              '--stock' in argv, '--one-sync' in argv,
                              '--dedup' in argv)


if __name__ == '__main__':
    if sys.argv[1:] == ['--serve']:
        serve()
    else:
        main(sys.argv[1:])
