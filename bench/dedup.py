"""A Plone-like copy of a folder of files: stock blobs against zodbblob's dedup.

Not a test: a benchmark that prints, per side, how much the blob
directory grows when a folder of 400 files is copied in one transaction,
and how long that transaction takes, with the ratios stock / zodbblob.

The folder is what a Plone site holds: an ``OOBTree`` (the folder's
``_tree``) of persistent objects (``PersistentMapping``: a title and a
``Blob``, as a File object holds its ``NamedBlobFile``'s blob).  400
files, sizes spread log-uniformly from 1 KiB to 20 MiB (fixed seed: most
are small, a few are large; the total is printed), random bytes, each
committed in a transaction of its own (one upload each).

The copy is done as Zope's copy/paste does it (``OFS.CopySupport``'s
``_getCopy``): the folder is exported with ``Connection.exportFile`` into
a temporary file (every blob's bytes streamed into it) and imported with
``Connection.importFile`` (each blob's bytes written to a new file in the
storage's temporary directory, handed to ``storeBlob``), then attached
under a new key, in one transaction.  ``--copy write`` instead makes a
new ``Blob`` per object and copies the old one's bytes into
``blob.open('w')``.  Either way the copy's blob files hold the bytes of
files already committed: stock renames them into place (the copy costs
its bytes), zodbblob with dedup links each to the file it equals.

Sides, each in fresh directories, in one process:

- ``stock``: ``ZODB.FileStorage.FileStorage(path, blob_dir=...)``;
- ``dedup``: ``zodbblob.open_filestorage(path, blob_dir, dedup=True)``
  (the drop-in the docs recommend, as ``<zodbblob> dedup on``);
- ``nodedup`` (optional, ``--sides``): the same without dedup.

Per side: the blob directory's bytes before and after the copy (each
inode counted once, by ``(st_dev, st_ino)``: allocated blocks, and apparent
size; the blob files alone and the whole directory, zodbblob's
``.zodbblob`` state included), the growth as a percentage of the bytes
copied, and the copy's times: export, import, ``transaction.commit()``,
and the three together.  ``os.sync()`` before each clock.

Checks: every copied object reads back the bytes of its original (by
SHA-256 against the seed's), on every side, and the originals still do;
a missing or wrong blob makes the script print FAILED and exit 1.

Run from the project root:

    .venv/bin/python bench/dedup.py [--repeat 3] [--sides stock,dedup]
        [--files 400] [--copy export|write] [--dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import transaction
import ZODB
import ZODB.FileStorage
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob

import zodbblob
from machine import hardware, load_average, package_version  # bench/machine.py

KiB = 1024
MiB = 1024 * KiB
SEED = 15
SMALLEST = KiB
LARGEST = 20 * MiB
SIDES = ('stock', 'dedup', 'nodedup')
CHUNK = 1 * MiB


def file_sizes(count: int) -> list[int]:
    """`count` sizes, log-uniform from SMALLEST to LARGEST, both ends
    included, in a fixed order from the seed."""
    rng = random.Random(SEED)
    low, high = math.log(SMALLEST), math.log(LARGEST)
    sizes = [int(math.exp(rng.uniform(low, high))) for _ in range(count - 2)]
    sizes += [SMALLEST, LARGEST]
    rng.shuffle(sizes)
    return sizes


def file_bytes(index: int, size: int) -> bytes:
    return random.Random(f'{SEED}:{index}').randbytes(size)


def open_db(side: str, run_dir: str) -> ZODB.DB:
    path = os.path.join(run_dir, 'Data.fs')
    blob_dir = os.path.join(run_dir, 'blobs')
    if side == 'stock':
        storage = ZODB.FileStorage.FileStorage(path, blob_dir=blob_dir)
    else:
        storage = zodbblob.open_filestorage(path, blob_dir,
                                            dedup=(side == 'dedup'))
    return ZODB.DB(storage)


def fill(db: ZODB.DB, sizes: list[int]) -> None:
    """The folder, one upload per transaction."""
    with db.transaction() as conn:
        conn.root()['folder'] = OOBTree()
    for index, size in enumerate(sizes):
        with db.transaction(f'upload file-{index}') as conn:
            conn.root()['folder'][f'file-{index}'] = PersistentMapping(
                title=f'File {index}', file=Blob(file_bytes(index, size)))
        if index % 50 == 0:
            conn.cacheMinimize()


def directory_bytes(blob_dir: str) -> dict:
    """Bytes under `blob_dir`, each inode once: allocated (st_blocks)
    and apparent (st_size), for the ``.blob`` files and for everything."""
    seen = set()
    totals = {'blob_blocks': 0, 'blob_size': 0, 'all_blocks': 0,
              'all_size': 0, 'blob_names': 0, 'blob_inodes': 0}
    for directory, dirnames, filenames in os.walk(blob_dir):
        for name in filenames + dirnames:
            st = os.lstat(os.path.join(directory, name))
            is_blob = name.endswith('.blob')
            if is_blob:
                totals['blob_names'] += 1
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            totals['all_blocks'] += st.st_blocks * 512
            totals['all_size'] += st.st_size
            if is_blob:
                totals['blob_inodes'] += 1
                totals['blob_blocks'] += st.st_blocks * 512
                totals['blob_size'] += st.st_size
    return totals


def copy_by_export(conn, run_dir: str) -> dict:
    """The folder copied as OFS.CopySupport._getCopy does, one transaction."""
    times = {}
    folder = conn.root()['folder']
    start = time.perf_counter()
    with tempfile.TemporaryFile(dir=run_dir) as f:
        conn.exportFile(folder._p_oid, f)
        times['export'] = time.perf_counter() - start
        f.seek(0)
        start = time.perf_counter()
        conn.root()['copy'] = conn.importFile(f)
    times['import'] = time.perf_counter() - start
    return times


def copy_by_write(conn, run_dir: str) -> dict:
    """A new Blob per object, written from the old one's bytes."""
    start = time.perf_counter()
    copy = conn.root()['copy'] = OOBTree()
    for key, item in conn.root()['folder'].items():
        blob = Blob()
        with item['file'].open('r') as source, blob.open('w') as target:
            shutil.copyfileobj(source, target, CHUNK)
        copy[key] = PersistentMapping(title=item['title'], file=blob)
    return {'export': 0.0, 'import': time.perf_counter() - start}


def read_back(db: ZODB.DB, sizes: list[int], expected: list[str]) -> int:
    """Objects of the folder or its copy that are missing or read back
    other bytes than their original's."""
    wrong = 0
    with db.transaction() as conn:
        root = conn.root()
        for name in ('folder', 'copy'):
            tree = root.get(name)
            for index in range(len(sizes)):
                item = tree.get(f'file-{index}') if tree is not None else None
                if item is None:
                    wrong += 1
                    continue
                digest = hashlib.sha256()
                with item['file'].open('r') as f:
                    while chunk := f.read(CHUNK):
                        digest.update(chunk)
                if digest.hexdigest() != expected[index]:
                    wrong += 1
            conn.cacheMinimize()
    return wrong


def run(side: str, sizes: list[int], expected: list[str], root: str,
        label: str, how: str) -> dict:
    run_dir = os.path.join(root, label)
    os.makedirs(run_dir)
    blob_dir = os.path.join(run_dir, 'blobs')
    db = open_db(side, run_dir)
    try:
        fill(db, sizes)
        db.cacheMinimize()
        os.sync()
        before = directory_bytes(blob_dir)
        conn = db.open()
        try:
            os.sync()
            start = time.perf_counter()
            times = (copy_by_export if how == 'export' else copy_by_write)(
                conn, run_dir)
            commit_start = time.perf_counter()
            transaction.get().note(f'copy of the folder ({side})')
            transaction.commit()
            end = time.perf_counter()
            # Until on disk: stock leaves its files to the writeback.
            os.sync()
            synced = time.perf_counter()
        finally:
            transaction.abort()
            conn.close()
        times['commit'] = end - commit_start
        times['copy'] = end - start
        times['commit_sync'] = synced - commit_start
        times['copy_sync'] = synced - start
        committed = directory_bytes(blob_dir)
    finally:
        # zodbblob's checkpoint at close drops the staged names of the
        # copy's files, which recovery needed until then.
        db.close()
    after = directory_bytes(blob_dir)
    db = open_db(side, run_dir)
    try:
        wrong = read_back(db, sizes, expected)
    finally:
        db.close()
    return {'before': before, 'committed': committed, 'after': after,
            'times': times, 'wrong': wrong, 'dir': run_dir}


def growth(result: dict, key: str, copied: int,
           when: str = 'after') -> float:
    return (result[when][key] - result['before'][key]) / copied


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--files', type=int, default=400,
                        help='files in the folder (default 400)')
    parser.add_argument('--repeat', type=int, default=1,
                        help='runs per side; the table shows medians')
    parser.add_argument('--sides', default='stock,dedup',
                        help='comma-separated, of: ' + ', '.join(SIDES))
    parser.add_argument('--copy', choices=('export', 'write'),
                        default='export',
                        help='export/import as OFS copy/paste (default), '
                        "or a new Blob per object written from the old")
    parser.add_argument('--dir', help='where runs write; a given --dir is '
                        'kept (each run in its own subdirectory)')
    args = parser.parse_args(argv)
    sides = args.sides.split(',')
    if not sides or not set(sides) <= set(SIDES) or len(set(sides)) != len(
            sides):
        parser.error(f'--sides {args.sides}: the sides are '
                     + ', '.join(SIDES))
    if 'stock' not in sides or len(sides) < 2:
        parser.error(f'--sides {args.sides}: stock and at least one '
                     'zodbblob side are needed for the ratios')
    if args.files < 2:
        parser.error(f'--files {args.files}: at least 2')
    if args.repeat < 1:
        parser.error(f'--repeat {args.repeat}: at least 1')
    if args.dir is not None and not os.path.isdir(args.dir):
        parser.error(f'--dir {args.dir}: no such directory')
    args.sides = sides
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    root = args.dir or tempfile.mkdtemp(prefix='dedup-bench-',
                                        dir='/tmp')
    sizes = file_sizes(args.files)
    copied = sum(sizes)
    expected = [hashlib.sha256(file_bytes(index, size)).hexdigest()
                for index, size in enumerate(sizes)]
    head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'],
                          capture_output=True, text=True).stdout.strip()
    print(f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} '
          f'UTC, commit {head}, load {load_average()}')
    print(f'{hardware(root)}\nPython {platform.python_version()}, ZODB '
          f'{package_version("ZODB")}, zodbblob from '
          f'{os.path.dirname(zodbblob.__file__)}')
    print(f'{len(sizes)} files, {min(sizes):,} to {max(sizes):,} bytes, '
          f'median {int(statistics.median(sizes)):,}, total {copied:,} '
          f'bytes ({copied / MiB:.1f} MiB); copy by {args.copy}; '
          f'{args.repeat} run(s) per side', flush=True)
    results = {side: [] for side in args.sides}
    failed = False
    try:
        for number in range(args.repeat):
            order = args.sides if number % 2 == 0 else args.sides[::-1]
            for side in order:
                result = run(side, sizes, expected, root,
                             f'{number}-{side}', args.copy)
                results[side].append(result)
                t = result['times']
                print(f'  run {number} {side}: growth '
                      f'{growth(result, "blob_blocks", copied):.2%} '
                      f'(blob files, blocks; right after the commit '
                      f'{growth(result, "all_blocks", copied, "committed"):.2%}'
                      f' of the whole directory), export '
                      f'{t["export"]:.3f} s, import {t["import"]:.3f} s, '
                      f'commit {t["commit"]:.3f} s, + sync '
                      f'{t["commit_sync"]:.3f} s, copy {t["copy"]:.3f} s, '
                      f'wrong {result["wrong"]}, load {load_average()}',
                      file=sys.stderr, flush=True)
                if result['wrong']:
                    failed = True
                if args.dir is None:
                    shutil.rmtree(result['dir'])
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    def median(side, pick):
        return statistics.median(pick(result) for result in results[side])

    print()
    print('| side | blob files before | after | growth, % of copied '
          '| whole directory | right after the commit | export s '
          '| import s | commit s | commit + sync s | copy s '
          '| copy + sync s |')
    print('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: '
          '| ---: | ---: | ---: |')
    for side in args.sides:
        print('| {} | {:,.1f} MiB | {:,.1f} MiB | {:.2%} | {:.2%} | {:.2%} '
              '| {:.3f} | {:.3f} | {:.3f} | {:.3f} | {:.3f} | {:.3f} |'.format(
                  side,
                  median(side, lambda r: r['before']['blob_blocks']) / MiB,
                  median(side, lambda r: r['after']['blob_blocks']) / MiB,
                  median(side, lambda r: growth(r, 'blob_blocks', copied)),
                  median(side, lambda r: growth(r, 'all_blocks', copied)),
                  median(side, lambda r: growth(r, 'all_blocks', copied,
                                                'committed')),
                  *(median(side, lambda r, k=k: r['times'][k])
                    for k in ('export', 'import', 'commit', 'commit_sync',
                              'copy', 'copy_sync'))))
    print()
    for side in args.sides:
        if side == 'stock':
            continue
        for key in ('commit', 'commit_sync', 'copy', 'copy_sync'):
            ratios = [s['times'][key] / o['times'][key]
                      for s, o in zip(results['stock'], results[side])]
            print(f'stock / {side}, {key} time: median '
                  f'{statistics.median(ratios):.2f}x (runs: '
                  + ', '.join(f'{r:.2f}' for r in ratios) + ')')
        apparent = median(side, lambda r: growth(r, 'blob_size', copied))
        print(f'{side}: apparent size of the blob files grew '
              f'{apparent:.2%} (names count once per inode)')
    print(f'load after: {load_average()}')
    if failed:
        print('FAILED: some copied or original blob read back wrong bytes')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
