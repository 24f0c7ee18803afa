"""Pack and verify at scale: stock FileStorage blobs against zodbblob.

Not a test: a benchmark that prints, per store size, pack time, the blob
phase of the pack, peak memory, commit rate and ``verify`` time and memory
for stock ``FileStorage(path, blob_dir=...)`` (both pack modes) and
zodbblob side by side, with ratios.

A store of N small blobs (an IOBTree of Blobs, many blobs per transaction)
is built once per size under ``--dir`` (reused between runs).  For each
garbage case (1% of the blobs given a new revision; exactly 200 given one)
the store is copied (blob files hard-linked: they never change; Data.fs
and the catalog copied), the garbage is committed, and each side packs
its own copy (pack time: now) in a child process of its own, so that its
peak memory (VmHWM) is its own.  The blob phase is the pack's time minus
the base FileStorage's own ``pack``; it includes the fsync of the packed
``Data.fs`` (which stock does not do), also printed on its own.  Its
memory is the peak after the base pack minus the resident size the base
pack left (the peak is reset with ``/proc/self/clear_refs`` when the base
pack returns).

Run from the project root:

    .venv/bin/python bench/scale.py --dir /work/scale-stores
        [--sizes 20000,200000,1000000] [--build-only]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

import transaction
import ZODB
import ZODB.blob
import ZODB.FileStorage
from BTrees.IOBTree import IOBTree

BATCH = 5000          # blobs per transaction while building
BLOB_SIZE = 300       # bytes per small blob
GARBAGE_BATCH = 1000  # new revisions per transaction when making garbage


def small_blob_bytes(index: int, revision: int) -> bytes:
    head = b'blob %d revision %d ' % (index, revision)
    return (head * (BLOB_SIZE // len(head) + 1))[:BLOB_SIZE]


def open_zodbblob(side_dir: str, base=None):
    import zodbblob
    if base is None:
        base = ZODB.FileStorage.FileStorage(os.path.join(side_dir, 'Data.fs'))
    return zodbblob.BlobStorage(os.path.join(side_dir, 'blobs'), base)


def build(store: str, blobs: int) -> None:
    """Build `store`/base with `blobs` small blobs, once."""
    base_dir = os.path.join(store, 'base')
    if os.path.exists(os.path.join(store, 'built')):
        return
    shutil.rmtree(store, ignore_errors=True)
    os.makedirs(base_dir)
    start = time.perf_counter()
    db = ZODB.DB(open_zodbblob(base_dir), cache_size=BATCH * 2)
    try:
        conn = db.open()
        tree = conn.root()['blobs'] = IOBTree()
        transaction.commit()
        for first in range(0, blobs, BATCH):
            for index in range(first, min(first + BATCH, blobs)):
                tree[index] = ZODB.blob.Blob(small_blob_bytes(index, 0))
            transaction.get().note('add blobs %d..' % first)
            transaction.commit()
            conn.cacheMinimize()
            if first % (BATCH * 20) == 0:
                print('  built %d of %d blobs (%.0f s)' % (
                    first + BATCH, blobs, time.perf_counter() - start),
                    flush=True)
        conn.close()
    finally:
        db.close()
    with open(os.path.join(store, 'built'), 'w') as f:
        f.write('%d blobs in %.1f s\n' % (blobs, time.perf_counter() - start))



class TimedFileStorage(ZODB.FileStorage.FileStorage):
    """A FileStorage that times its own pack, and resets the peak memory
    when it returns, so that what follows (the blob phase) has its own."""

    pack_seconds: float | None = None
    rss_after_pack = 0
    peak_in_pack = 0

    def pack(self, t, referencesf, gc=None):
        start = time.perf_counter()
        try:
            return super().pack(t, referencesf, gc)
        finally:
            self.pack_seconds = time.perf_counter() - start
            self.peak_in_pack = memory()['VmHWM']
            reset_peak()
            self.rss_after_pack = memory()['VmRSS']


def memory() -> dict:
    """VmRSS and VmHWM of this process, KiB."""
    found = {}
    with open('/proc/self/status') as f:
        for line in f:
            name = line.split(':')[0]
            if name in ('VmRSS', 'VmHWM'):
                found[name] = int(line.split()[1])
    return found


def reset_peak() -> None:
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')


def child_pack(side: str, path: str) -> dict:
    from ZODB.serialize import referencesf
    data_fs = os.path.join(path, 'Data.fs')
    blob_dir = os.path.join(path, 'blobs')
    synced = []
    if side == 'zodbblob':
        import zodbblob.storage.pack as packing
        sync_packed_base = packing.sync_packed_base

        def timed_sync(base):
            start = time.perf_counter()
            sync_packed_base(base)
            synced.append(time.perf_counter() - start)

        packing.sync_packed_base = timed_sync
        base = TimedFileStorage(data_fs)
        storage = open_zodbblob(path, base)
    else:
        base = storage = TimedFileStorage(
            data_fs, blob_dir=blob_dir,
            pack_keep_old=(side == 'stock-keep'))
    baseline = memory()['VmRSS']
    reset_peak()
    start = time.perf_counter()
    storage.pack(time.time(), referencesf)
    seconds = time.perf_counter() - start
    after = memory()
    storage.close()
    result = {'pack': seconds, 'base_pack': base.pack_seconds,
              'baseline_kib': baseline}
    if side == 'zodbblob':
        # Peak was reset when the base pack returned.
        result['blob_phase'] = seconds - base.pack_seconds
        # Of which the packed Data.fs made durable (stock skips it): the
        # bytes the base's pack wrote, which grow with the store.
        result['base_sync'] = sum(synced)
        result['blob_peak_kib'] = after['VmHWM'] - base.rss_after_pack
        result['peak_kib'] = max(base.peak_in_pack,
                                 after['VmHWM']) - baseline
    else:
        result['peak_kib'] = after['VmHWM'] - baseline
    return result


def child_verify(path: str) -> dict:
    from zodbblob.tools.verify import verify
    base = ZODB.FileStorage.FileStorage(os.path.join(path, 'Data.fs'),
                                        read_only=True)
    storage = open_zodbblob(path, base)
    baseline = memory()['VmRSS']
    reset_peak()
    start = time.perf_counter()
    report = verify(storage)
    seconds = time.perf_counter() - start
    after = memory()
    storage.close()
    return {'verify': seconds, 'peak_kib': after['VmHWM'] - baseline,
            'clean': report.clean, 'files': report.files}


COMMITS = 100


def child_commit(side: str, path: str) -> dict:
    data_fs = os.path.join(path, 'Data.fs')
    if side == 'zodbblob':
        storage = open_zodbblob(path)
    else:
        storage = ZODB.FileStorage.FileStorage(
            data_fs, blob_dir=os.path.join(path, 'blobs'))
    db = ZODB.DB(storage)
    try:
        data = b'x' * 1024
        with db.transaction() as conn:
            conn.root()['commit-rate'] = ZODB.blob.Blob(data)
        start = time.perf_counter()
        for _ in range(COMMITS):
            with db.transaction() as conn:
                with conn.root()['commit-rate'].open('w') as f:
                    f.write(data)
        seconds = time.perf_counter() - start
    finally:
        db.close()
    return {'commits_per_s': COMMITS / seconds}


def run_child(*args) -> dict:
    os.sync()
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), '--child', *args],
        capture_output=True, text=True)
    if result.returncode:
        raise SystemExit('child %s failed:\n%s' % (args, result.stderr))
    return json.loads(result.stdout.splitlines()[-1])


def copy_store(source: str, target: str, with_state: bool) -> None:
    """`source` copied to `target`: blob files hard-linked (they never
    change), Data.fs and the state directory copied."""
    os.makedirs(target)
    for name in ('Data.fs', 'Data.fs.index'):
        if os.path.exists(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name),
                         os.path.join(target, name))
    subprocess.run(['cp', '-al', os.path.join(source, 'blobs'),
                    os.path.join(target, 'blobs')], check=True)
    state = os.path.join(target, 'blobs', '.zodbblob')
    shutil.rmtree(state, ignore_errors=True)
    if with_state:
        shutil.copytree(os.path.join(source, 'blobs', '.zodbblob'), state)
    for leftover in ('tmp',):
        shutil.rmtree(os.path.join(target, 'blobs', leftover),
                      ignore_errors=True)


def warm(path: str) -> None:
    """Read `path`'s Data.fs, its index and catalog, and list every
    directory of its blob tree, so that the side about to pack starts
    from a page cache and a dentry cache as warm as the other's.

    Without it the side whose copy was made last (stock's) packs with
    its files and directories just written, and the other (zodbblob's,
    copied first, then given its garbage) with whatever the kernel kept
    of them meanwhile; on this machine (proactive reclaim, kdamond) that
    is little at 1,000,000 blobs.  The listing's atime updates are
    flushed by `run_child`'s sync, not left to zodbblob's pack to sync.
    """
    names = [os.path.join(path, name) for name in ('Data.fs', 'Data.fs.index')]
    state = os.path.join(path, 'blobs', '.zodbblob')
    if os.path.isdir(state):
        names += [os.path.join(state, name) for name in os.listdir(state)]
    for name in names:
        if os.path.isfile(name):
            with open(name, 'rb') as f:
                while f.read(1 << 20):
                    pass
    for _ in os.walk(os.path.join(path, 'blobs')):
        pass


def make_garbage(path: str, blobs: int, count: int) -> None:
    """New revisions of `count` blobs spread evenly over the tree."""
    db = ZODB.DB(open_zodbblob(path), cache_size=GARBAGE_BATCH * 2)
    try:
        conn = db.open()
        tree = conn.root()['blobs']
        step = max(blobs // count, 1)
        picks = list(range(0, blobs, step))[:count]
        for first in range(0, len(picks), GARBAGE_BATCH):
            for index in picks[first:first + GARBAGE_BATCH]:
                with tree[index].open('w') as f:
                    f.write(small_blob_bytes(index, 1))
            transaction.get().note('garbage')
            transaction.commit()
            conn.cacheMinimize()
        conn.close()
    finally:
        db.close()


SIDES = ('stock-keep', 'stock-nokeep', 'zodbblob')


def measure(store: str, blobs: int, case: str, sides=SIDES,
            verifying: bool = True, warming: bool = False) -> dict:
    count = max(blobs // 100, 1) if case == '1%' else 200
    work = os.path.join(store, 'run-%s' % case.replace('%', 'pct'))
    shutil.rmtree(work, ignore_errors=True)
    garbage_source = os.path.join(work, 'zodbblob')
    copy_store(os.path.join(store, 'base'), garbage_source, True)
    make_garbage(garbage_source, blobs, count)
    for side in sides:
        if side != 'zodbblob':
            copy_store(garbage_source, os.path.join(work, side), False)
    # Stock opens the copies with no `.zodbblob`: its own blob directory.
    results = {'garbage': count}
    for side in sides:
        if warming:
            warm(os.path.join(work, side))
        results[side] = run_child('pack', side, os.path.join(work, side))
        print('  %s %s: %s' % (case, side, results[side]), flush=True)
    if verifying:
        results['verify'] = run_child('verify', garbage_source)
        print('  verify: %s' % results['verify'], flush=True)
    if case == '1%' and set(sides) >= {'stock-nokeep', 'zodbblob'}:
        for side in ('stock-nokeep', 'zodbblob'):
            results['commit-' + side] = run_child(
                'commit', side, os.path.join(work, side))
            print('  commit %s: %s' % (side, results['commit-' + side]),
                  flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return results


def table(all_results: dict) -> str:
    lines = [
        '| blobs | garbage | stock default | stock `pack_keep_old=False` '
        '| zodbblob | ratio (stock no-keep / zodbblob) | zodbblob blob '
        'phase | of which packed Data.fs fsync | blob phase / base pack '
        '| blob phase peak | zodbblob pack peak | stock no-keep pack peak |',
        '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for blobs, cases in all_results.items():
        for case, r in cases.items():
            keep, nokeep, ours = (r['stock-keep'], r['stock-nokeep'],
                                  r['zodbblob'])
            lines.append(
                '| {:,} | {} | {:.2f} s | {:.2f} s | {:.2f} s | {:.2f}x '
                '| {:.3f} s | {:.3f} s | {:.1%} | +{:.1f} MiB | +{:.1f} MiB '
                '| +{:.1f} MiB |'.format(
                    blobs, '%s (%d files)' % (case, r['garbage']),
                    keep['pack'], nokeep['pack'],
                    ours['pack'], nokeep['pack'] / ours['pack'],
                    ours['blob_phase'], ours.get('base_sync', 0.0),
                    ours['blob_phase'] / ours['base_pack'],
                    max(ours['blob_peak_kib'], 0) / 1024,
                    ours['peak_kib'] / 1024, nokeep['peak_kib'] / 1024))
    lines += ['', '| blobs | verify | verify peak | commits/s stock '
              '| commits/s zodbblob | ratio |', '|---:|---:|---:|---:|---:|---:|']
    for blobs, cases in all_results.items():
        r = cases.get('1%')
        if r is None:
            continue
        stock = r['commit-stock-nokeep']['commits_per_s']
        ours = r['commit-zodbblob']['commits_per_s']
        lines.append('| {:,} | {:.1f} s | +{:.1f} MiB | {:.0f} | {:.0f} '
                     '| {:.2f}x |'.format(
                         blobs, r['verify']['verify'],
                         r['verify']['peak_kib'] / 1024, stock, ours,
                         ours / stock))
    return '\n'.join(lines)


def blob_counts(value: str) -> list[int]:
    try:
        counts = [int(size) for size in value.split(',')]
    except ValueError:
        counts = []
    if not counts or min(counts) < 200:
        raise argparse.ArgumentTypeError(
            f'{value!r} is not a comma-separated list of blob counts '
            '(at least 200 each)')
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--dir',
                        help='where the stores are built and kept')
    parser.add_argument('--sizes', type=blob_counts,
                        default='20000,200000,1000000')
    parser.add_argument('--build-only', action='store_true')
    parser.add_argument('--child', nargs='+', help=argparse.SUPPRESS)
    parser.add_argument('--cases', default='1%,200')
    parser.add_argument('--sides', default=','.join(SIDES),
                        help='which sides pack (default: all three)')
    parser.add_argument('--no-verify', action='store_true',
                        help='measure pack only')
    parser.add_argument('--warm', action='store_true',
                        help="read each side's files and list its blob "
                        'directories right before it packs')
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        result = {'pack': child_pack, 'verify': child_verify,
                  'commit': child_commit}[kind](*rest)
        print(json.dumps(result))
        return
    sizes = args.sizes
    if args.dir is None:
        parser.error('--dir: where to build and keep the stores is required')
    if not os.path.isdir(args.dir):
        parser.error(f'--dir {args.dir}: no such directory')
    cases = args.cases.split(',')
    sides = args.sides.split(',')
    if not sides or not set(sides) <= set(SIDES):
        parser.error(f'--sides {args.sides}: the sides are '
                     + ', '.join(SIDES))
    if not set(cases) <= {'1%', '200'}:
        parser.error(f'--cases {args.cases}: the cases are 1% and 200')
    for size in sizes:
        store = os.path.join(args.dir, str(size))
        print('building %d blobs in %s' % (size, store), flush=True)
        build(store, size)
    if args.build_only:
        return
    head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'],
                          capture_output=True, text=True).stdout.strip()
    print('%s, commit %s, load %s' % (
        datetime.datetime.now(datetime.timezone.utc).strftime(
            '%Y-%m-%d %H:%M UTC'), head,
        ' '.join('%.2f' % load for load in os.getloadavg())), flush=True)
    all_results = {}
    for size in sizes:
        store = os.path.join(args.dir, str(size))
        # The first open with this zodbblob migrates an older catalog:
        # once, before the copies.
        open_zodbblob(os.path.join(store, 'base')).close()
        all_results[size] = {}
        for case in cases:
            print('%d blobs, garbage %s' % (size, case), flush=True)
            all_results[size][case] = measure(store, size, case, sides,
                                              not args.no_verify, args.warm)
        if sides == list(SIDES) and not args.no_verify:
            print(table(all_results), flush=True)
    with open(os.path.join(args.dir, 'results.json'), 'w') as f:
        json.dump(all_results, f)
    print('load after: %s' % ' '.join(
        '%.2f' % load for load in os.getloadavg()))


if __name__ == '__main__':
    main()
