"""Pack and undo: stock ZODB.blob.BlobStorage against zodbblob.BlobStorage.

Not a test: a benchmark that prints a table of seconds and ratios, and the
checks that both sides ended in the same state.

One database is built with zodbblob (N small blobs, committed in batches;
then about 1% of them made garbage before the pack time: half superseded
by a new revision, half removed from the tree and so unreachable).  It is
copied twice: one copy without zodbblob's ``.zodbblob/`` state directory,
which is exactly what ``ZODB.blob.BlobStorage`` would have written (same
bushy paths, same ``<tid>.blob`` names, same tids), and one copy as is.
Each side then, in turn:

- opens its copy (``FileStorage`` wrapped by its ``BlobStorage``),
- times ``db.pack()`` (pack time: now, after the garbage was made), and
  separately the base ``FileStorage.pack`` inside it,
- commits a large blob and a change of it (untimed), and times undo of
  the change (``db.undo`` + ``transaction.commit``), once in the packed
  database and once more in a fresh database whose blob directory holds
  only that blob (stock's undo walks the whole blob directory; the second
  row shows the cost of the copy against the link alone).

Both sides run the same way with a warm page cache: their files were just
copied and are read once more before each timing, and dirty pages are
flushed (sync) so that no writeback backlog lands on either side's clock;
nothing drops the cache.

Run from the project root:

    /tmp/venv/bin/python bench/pack_undo.py [--blobs 20000]
        [--garbage-percent 1] [--big-mib 50] [--dir DIR] [--ours-first]
"""

from __future__ import annotations

import argparse
import base64
import datetime
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from importlib.metadata import version

import transaction
import ZODB
import ZODB.blob
import ZODB.FileStorage
from BTrees.IOBTree import IOBTree

import zodbblob
from zodbblob.storage.catalog import STATE_DIR
from zodbblob.storage.catalog import Journal


BATCH = 100          # blobs per transaction while building
BLOB_SIZE = 300      # bytes per small blob
STATE_NAMES = frozenset({'tmp', STATE_DIR})


class TimedFileStorage(ZODB.FileStorage.FileStorage):
    """A FileStorage that remembers how long its own pack took."""

    pack_seconds: float | None = None

    def pack(self, t, referencesf, gc=None):
        start = time.perf_counter()
        try:
            return super().pack(t, referencesf, gc)
        finally:
            self.pack_seconds = time.perf_counter() - start


def small_blob_bytes(index: int, revision: int) -> bytes:
    head = b'blob %d revision %d ' % (index, revision)
    return (head * (BLOB_SIZE // len(head) + 1))[:BLOB_SIZE]


def blob_files(blob_dir: str) -> set[str]:
    """Relative paths of the committed blob files under `blob_dir`."""
    found = set()
    for directory, subdirs, files in os.walk(blob_dir):
        if directory == blob_dir:
            subdirs[:] = [d for d in subdirs if d not in STATE_NAMES]
        for name in files:
            if name.endswith('.blob'):
                found.add(os.path.relpath(os.path.join(directory, name),
                                          blob_dir))
    return found


def blob_path(oid: bytes, tid: bytes) -> str:
    return ZODB.blob.BushyLayout().getBlobFilePath(oid, tid)


def warm(side_dir: str) -> None:
    """Warm the cache for `side_dir`, with no writeback pending.

    Reads the Data.fs and stats every blob-tree entry, then flushes dirty
    pages (sync): what one side wrote is not written back on the other
    side's clock, and a copy into the page cache is not throttled by an
    earlier backlog.
    """
    with open(os.path.join(side_dir, 'Data.fs'), 'rb') as f:
        while f.read(1 << 20):
            pass
    for directory, subdirs, files in os.walk(os.path.join(side_dir, 'blobs')):
        for name in files:
            os.stat(os.path.join(directory, name))
    os.sync()


class Model:
    """What the built database holds, to check both sides against."""

    def __init__(self):
        self.live: dict[int, bytes] = {}    # tree key -> current bytes
        self.garbage: set[str] = set()      # blob paths pack must remove
        self.superseded = 0
        self.removed = 0
        self.tmp_left: list[str] = []       # what the build left in tmp/


def build(work: str, blobs: int, garbage_percent: float) -> Model:
    """Build the database with zodbblob; return what it should hold."""
    model = Model()
    storage = zodbblob.BlobStorage(os.path.join(work, 'blobs'),
                                   ZODB.FileStorage.FileStorage(
                                       os.path.join(work, 'Data.fs')))
    db = ZODB.DB(storage)
    try:
        conn = db.open()
        tree = conn.root()['blobs'] = IOBTree()
        transaction.commit()
        for start in range(0, blobs, BATCH):
            for index in range(start, min(start + BATCH, blobs)):
                data = small_blob_bytes(index, 0)
                tree[index] = ZODB.blob.Blob(data)
                model.live[index] = data
            transaction.get().note('add blobs %d..' % start)
            transaction.commit()

        # Garbage, spread evenly over the tree: the first half of the
        # picks get a new revision (the old file is garbage once the pack
        # time is past it), the second half leave the tree (unreachable,
        # so the pack's GC drops the object and its only file).
        count = round(blobs * garbage_percent / 100)
        step = max(blobs // max(count, 1), 1)
        picks = list(range(0, blobs, step))[:count]
        replaced, removed = picks[:count // 2], picks[count // 2:]
        for start in range(0, len(replaced), BATCH):
            for index in replaced[start:start + BATCH]:
                blob = tree[index]
                blob._p_activate()   # a ghost's _p_serial is not loaded
                model.garbage.add(blob_path(blob._p_oid, blob._p_serial))
                data = small_blob_bytes(index, 1)
                with blob.open('w') as f:
                    f.write(data)
                model.live[index] = data
            transaction.get().note('supersede blobs')
            transaction.commit()
        for start in range(0, len(removed), BATCH):
            for index in removed[start:start + BATCH]:
                blob = tree.pop(index)
                blob._p_activate()
                model.garbage.add(blob_path(blob._p_oid, blob._p_serial))
                del model.live[index]
            transaction.get().note('remove blobs')
            transaction.commit()
        model.superseded, model.removed = len(replaced), len(removed)
        conn.close()
    finally:
        db.close()
    model.tmp_left = os.listdir(os.path.join(work, 'blobs', 'tmp'))
    return model


def copy_side(built: str, side_dir: str, with_state: bool) -> None:
    os.mkdir(side_dir)
    for name in ('Data.fs', 'Data.fs.index'):
        shutil.copy2(os.path.join(built, name), os.path.join(side_dir, name))
    ignore = None if with_state else shutil.ignore_patterns(STATE_DIR)
    shutil.copytree(os.path.join(built, 'blobs'),
                    os.path.join(side_dir, 'blobs'), ignore=ignore)


def open_side(name: str, side_dir: str):
    base = TimedFileStorage(os.path.join(side_dir, 'Data.fs'))
    blob_dir = os.path.join(side_dir, 'blobs')
    if name == 'stock':
        storage = ZODB.blob.BlobStorage(blob_dir, base)
    else:
        storage = zodbblob.BlobStorage(blob_dir, base)
    return ZODB.DB(storage), base


def check_live_blobs(db, model: Model) -> int:
    """Read every live blob through the database; return the mismatches."""
    conn = db.open()
    try:
        tree = conn.root()['blobs']
        wrong = 0
        if sorted(tree.keys()) != sorted(model.live):
            wrong += 1
        for index, data in model.live.items():
            with tree[index].open('r') as f:
                if f.read() != data:
                    wrong += 1
            if index % 1000 == 0:
                conn.cacheMinimize()
        return wrong
    finally:
        conn.close()


def undo_big_blob(db, side_dir: str, big: tuple[bytes, bytes],
                  repeat: int) -> dict:
    """Commit a large blob; `repeat` times, change it and time the undo.

    Returns the median undo time, and whether every undo brought back the
    earlier bytes and left a file that is (or is not) a hard link of the
    earlier revision's file.
    """
    big_before, big_after = big
    conn = db.open()
    blob = conn.root()['big'] = ZODB.blob.Blob()
    with blob.open('w') as f:
        f.write(big_before)
    transaction.get().note('big blob')
    transaction.commit()
    oid = blob._p_oid
    conn.close()
    created = db.undoLog(0, 1)[0]
    assert created['description'] == 'big blob', created
    earlier = db.storage.loadBlob(
        oid, base64.decodebytes(created['id'] + b'\n'))

    times, reads_earlier, linked = [], True, True
    for _ in range(repeat):
        conn = db.open()
        with conn.root()['big'].open('w') as f:
            f.write(big_after)
        transaction.get().note('change big blob')
        transaction.commit()
        conn.close()
        entry = db.undoLog(0, 1)[0]
        assert entry['description'] == 'change big blob', entry
        warm(side_dir)
        start = time.perf_counter()
        db.undo(entry['id'])
        transaction.commit()
        times.append(time.perf_counter() - start)

        conn = db.open()
        blob = conn.root()['big']
        with blob.open('r') as f:
            reads_earlier = reads_earlier and f.read() == big_before
        restored = db.storage.loadBlob(oid, blob._p_serial)
        linked = linked and os.path.samefile(restored, earlier)
        conn.close()
    return {'seconds': statistics.median(times), 'times': times,
            'reads_earlier': reads_earlier, 'linked': linked,
            'changed_tid': base64.decodebytes(entry['id'] + b'\n')}


def run_side(name: str, side_dir: str, model: Model,
             big: tuple[bytes, bytes], repeat: int) -> dict:
    result: dict = {'name': name}
    blob_dir = os.path.join(side_dir, 'blobs')
    warm(side_dir)
    db, base = open_side(name, side_dir)
    try:
        # pack
        before = blob_files(blob_dir)
        start = time.perf_counter()
        db.pack()
        result['pack'] = time.perf_counter() - start
        result['base_pack'] = base.pack_seconds
        after = blob_files(blob_dir)
        result['files_before'] = len(before)
        result['files_after'] = after
        result['removed_as_expected'] = before - after == model.garbage
        result['wrong_live'] = check_live_blobs(db, model)

        # undo of a change to a large blob, in the packed database
        undo = undo_big_blob(db, side_dir, big, repeat)
        result['undo'] = undo['seconds']
        result['undo_times'] = undo['times']
        result['undo_reads_earlier'] = undo['reads_earlier']
        result['undo_linked'] = undo['linked']
        changed_tid = undo['changed_tid']
        result['files_end'] = len(blob_files(blob_dir))

        if name == 'stock':
            # How much of stock's undo is its walk of the blob directory
            # (getOIDsForSerial), apart from the copy of the file.
            fshelper = ZODB.blob.FilesystemHelper(blob_dir)
            start = time.perf_counter()
            fshelper.getOIDsForSerial(changed_tid)
            result['undo_walk'] = time.perf_counter() - start
    finally:
        db.close()
    if name == 'ours':
        journal = Journal(blob_dir, read_only=True)
        try:
            result['catalog_rows'] = len(journal)
        finally:
            journal.close()

    # the same undo where the blob directory holds nothing else
    alone = os.path.join(side_dir, 'alone')
    os.mkdir(alone)
    db, base = open_side(name, alone)
    try:
        undo = undo_big_blob(db, alone, big, repeat)
    finally:
        db.close()
    result['undo_alone'] = undo['seconds']
    result['undo_alone_times'] = undo['times']
    result['undo_alone_reads_earlier'] = undo['reads_earlier']
    return result


def ratio(stock: float, ours: float) -> str:
    if ours <= 0:
        return 'n/a'
    return '%.1fx' % (stock / ours)


def report(args, model: Model, build_seconds: float, stock: dict,
           ours: dict, built_files: int) -> bool:
    print()
    print('zodbblob bench/pack_undo.py  %s' % datetime.date.today())
    print('Python %s, ZODB %s, ZEO %s, zodbblob %s; %s' % (
        platform.python_version(), version('ZODB'), version('ZEO'),
        version('zodbblob'), platform.platform()))
    print('%d small blobs (%d bytes), %d per transaction, bushy layout; '
          'built in %.1f s (with zodbblob, then copied for each side)'
          % (args.blobs, BLOB_SIZE, BATCH, build_seconds))
    print('garbage at pack time: %d files (%d superseded revisions, %d '
          'unreachable blobs) of %d' % (len(model.garbage), model.superseded,
                                        model.removed, built_files))
    print('page cache: warm for both sides (files just copied and read '
          'again before each timing, then sync; no cache drop); %s ran first'
          % ('ours' if args.ours_first else 'stock'))
    print()
    rows = [
        ('pack total (db.pack)', stock['pack'], ours['pack']),
        ('  base FileStorage.pack part', stock['base_pack'],
         ours['base_pack']),
        ('  blob phase (total - base)', stock['pack'] - stock['base_pack'],
         ours['pack'] - ours['base_pack']),
        ('undo of %d MiB blob (undo+commit)' % args.big_mib, stock['undo'],
         ours['undo']),
        ('  same, blob dir holding only it', stock['undo_alone'],
         ours['undo_alone']),
    ]
    print('%-36s %10s %10s %11s' % ('operation', 'stock s', 'ours s',
                                    'stock/ours'))
    for label, s, o in rows:
        print('%-36s %10.4f %10.4f %11s' % (label, s, o, ratio(s, o)))
    print()
    print('undo rows: median of %d undos each (undo times in s, '
          'min..max: stock %.4f..%.4f and %.4f..%.4f alone; ours '
          '%.4f..%.4f and %.4f..%.4f alone)' % (
              args.undo_repeat,
              min(stock['undo_times']), max(stock['undo_times']),
              min(stock['undo_alone_times']), max(stock['undo_alone_times']),
              min(ours['undo_times']), max(ours['undo_times']),
              min(ours['undo_alone_times']), max(ours['undo_alone_times'])))
    print('stock undo in the packed database: its walk of the blob '
          'directory (getOIDsForSerial) alone takes %.4f s; the rest is '
          'mostly the %d MiB copy' % (stock['undo_walk'], args.big_mib))
    print()

    checks = [
        ('the build (with zodbblob) left tmp/ empty (%d entries)'
         % len(model.tmp_left), not model.tmp_left),
        ('both sides had the same %d blob files before pack'
         % stock['files_before'],
         stock['files_before'] == ours['files_before'] == built_files),
        ('after pack both sides have exactly the same set of blob files',
         stock['files_after'] == ours['files_after']),
        ('after pack both sides have the same count (stock %d, ours %d, '
         'expected %d)' % (len(stock['files_after']),
                           len(ours['files_after']),
                           built_files - len(model.garbage)),
         len(stock['files_after']) == len(ours['files_after'])
         == built_files - len(model.garbage)),
        ('stock pack removed exactly the %d garbage files'
         % len(model.garbage), stock['removed_as_expected']),
        ('ours pack removed exactly the %d garbage files'
         % len(model.garbage), ours['removed_as_expected']),
        ('every live blob reads its bytes after pack (stock %d wrong, '
         'ours %d wrong)' % (stock['wrong_live'], ours['wrong_live']),
         stock['wrong_live'] == ours['wrong_live'] == 0),
        ('ours catalog rows = blob files at the end (%d rows, %d files: '
         'after pack + the big blob + %d changes + %d undos)'
         % (ours['catalog_rows'], ours['files_end'], args.undo_repeat,
            args.undo_repeat),
         ours['catalog_rows'] == ours['files_end']
         == len(ours['files_after']) + 1 + 2 * args.undo_repeat),
        ('stock: after each undo the big blob reads the earlier bytes',
         stock['undo_reads_earlier']),
        ('ours: after each undo the big blob reads the earlier bytes',
         ours['undo_reads_earlier']),
        ('both: after undo in the otherwise empty database too',
         stock['undo_alone_reads_earlier']
         and ours['undo_alone_reads_earlier']),
        ('ours: the restored big blob file is a hard link of the earlier '
         'revision (stock: %s)' % ('a link too' if stock['undo_linked']
                                   else 'a copy'),
         ours['undo_linked']),
    ]
    ok = True
    for label, passed in checks:
        print('%s  %s' % ('ok  ' if passed else 'FAIL', label))
        ok = ok and passed
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--blobs', type=int, default=20000,
                        help='small blobs in the database (default 20000)')
    parser.add_argument('--garbage-percent', type=float, default=1.0,
                        help='percent of them that are garbage at pack time '
                             '(default 1)')
    parser.add_argument('--big-mib', type=int, default=50,
                        help='size of the blob whose change is undone, in '
                             'MiB (default 50)')
    parser.add_argument('--undo-repeat', type=int, default=5,
                        help='undos timed per database (change, undo; '
                        'the median is shown; default 5)')
    parser.add_argument('--dir', help='work directory (created; must not '
                        'exist or be empty; kept afterwards); default a '
                        'temporary directory, removed at the end')
    parser.add_argument('--ours-first', action='store_true',
                        help='run zodbblob before stock (default after)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.dir:
        work = os.path.abspath(args.dir)
        os.makedirs(work, exist_ok=True)
        if os.listdir(work):
            parser.error('--dir %s is not empty' % work)
    else:
        work = tempfile.mkdtemp(prefix='zodbblob-bench-')
    try:
        built = os.path.join(work, 'built')
        os.mkdir(built)
        print('building %d blobs in %s ...' % (args.blobs, built), flush=True)
        start = time.perf_counter()
        model = build(built, args.blobs, args.garbage_percent)
        build_seconds = time.perf_counter() - start
        built_files = len(blob_files(os.path.join(built, 'blobs')))
        copy_side(built, os.path.join(work, 'stock'), with_state=False)
        copy_side(built, os.path.join(work, 'ours'), with_state=True)
        shutil.rmtree(built)

        big = (os.urandom(args.big_mib << 20), os.urandom(args.big_mib << 20))
        results = {}
        order = ['ours', 'stock'] if args.ours_first else ['stock', 'ours']
        for name in order:
            print('running %s ...' % name, flush=True)
            results[name] = run_side(name, os.path.join(work, name), model,
                                     big, args.undo_repeat)
        ok = report(args, model, build_seconds, results['stock'],
                    results['ours'], built_files)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
