"""``zodbblob verify --checksum`` throughput against ``cat`` of the same files.

Not a test: a benchmark that prints how fast ``zodbblob verify
--checksum`` reads and checks a store of N small blob files (default
100,000), in MB/s, against the floor of reading the same files: ``find
BLOB_DIR -name '*.blob' -print0 | xargs -0 cat > /dev/null``; cold (the
page cache dropped before each: ``echo 3 > /proc/sys/vm/drop_caches``,
root only; skipped with a note otherwise) and warm (right after a read
of every file).  Both run as child processes, the verify through the
command line as a user runs it (``--quiet``); plain ``zodbblob verify``
(sizes, no bytes read) is timed too, for scale.

The store is built once under ``--dir`` (reused while its ``built``
marker is there) with ``zodbblob.open_filestorage``: an ``OOBTree`` of
blobs, sizes like a Plone site's (fixed seed): 95% from 512 bytes to
32 KiB, 4.8% from 32 KiB to 1 MiB, 0.2% from 1 MiB to 10 MiB, each
range log-uniform (``--mix small``: all from 512 bytes to 32 KiB, for a
store of 1,000,000); unique contents; 1,000 files or 64 MiB per
transaction.  Files of transactions too large for their commit record
get their digests from the background scrub, so the build ends with
``zodbblob verify --record-checksums`` (timed), after which every file
has its digest and ``--checksum`` reads all of them.

Checks: every verify exits 0 and reports the store clean, every file
with a digest (no ``--record-checksums`` note), with as many files as
were built; ``cat`` exits 0.  Otherwise FAILED and exit 1.

Run from the project root:

    .venv/bin/python bench/verify_checksum.py --dir /work/checksum-store
        [--files 100000] [--repeat 3] [--build-only]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time

import ZODB
from BTrees.IOBTree import IOBTree
from ZODB.blob import Blob

import zodbblob
from machine import hardware, load_average, package_version  # bench/machine.py

KiB = 1024
MiB = 1024 * KiB
SEED = 15
# (share of the files, smallest, largest): a Plone site's mix.
MIXES = {
    'plone': ((0.95, 512, 32 * KiB), (0.048, 32 * KiB, MiB),
              (0.002, MiB, 10 * MiB)),
    # Small files only: 1,000,000 of the Plone mix would be 30 GB.
    'small': ((1.0, 512, 32 * KiB),),
}
BATCH_FILES = 1000
BATCH_BYTES = 64 * MiB
POOL = 16 * MiB   # random bytes the contents are cut from


def file_sizes(count: int, mix: str = 'plone') -> list[int]:
    rng = random.Random(SEED)
    sizes = []
    for share, low, high in MIXES[mix]:
        sizes += [int(math.exp(rng.uniform(math.log(low), math.log(high))))
                  for _ in range(round(count * share))]
    sizes = (sizes + [4 * KiB] * count)[:count]
    rng.shuffle(sizes)
    return sizes


def zodbblob_command(*args: str) -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), 'zodbblob'), *args]


def build(store: str, count: int, mix: str) -> None:
    """`count` blob files in `store`, once."""
    marker = os.path.join(store, 'built')
    if os.path.exists(marker):
        return
    os.makedirs(store, exist_ok=True)
    pool = random.Random(SEED).randbytes(POOL + 10 * MiB)
    sizes = file_sizes(count, mix)
    start = time.perf_counter()
    db = ZODB.DB(zodbblob.open_filestorage(
        os.path.join(store, 'Data.fs'), os.path.join(store, 'blobs')))
    try:
        with db.transaction() as conn:
            conn.root()['files'] = IOBTree()
        index = 0
        while index < count:
            with db.transaction() as conn:
                tree = conn.root()['files']
                batch_bytes = 0
                first = index
                while (index < count and index - first < BATCH_FILES
                       and batch_bytes < BATCH_BYTES):
                    head = b'file %d\n' % index
                    offset = (index * 7919) % POOL
                    size = max(sizes[index], len(head))
                    tree[index] = Blob(
                        head + pool[offset:offset + size - len(head)])
                    batch_bytes += size
                    index += 1
                conn.cacheMinimize()
            if index // BATCH_FILES != first // BATCH_FILES and \
                    index // BATCH_FILES % 10 == 0:
                print(f'  built {index:,} of {count:,} files '
                      f'({time.perf_counter() - start:.0f} s)', flush=True)
    finally:
        db.close()
    built = time.perf_counter() - start
    recording = time.perf_counter()
    result = subprocess.run(zodbblob_command(
        'verify', '--record-checksums', '--quiet', *store_args(store)),
        capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f'verify --record-checksums of {store} failed:\n'
                         + result.stdout + result.stderr)
    recorded = time.perf_counter() - recording
    with open(marker, 'w') as f:
        f.write(f'{count} files, {sum(sizes)} bytes, built in {built:.1f} s, '
                f'verify --record-checksums {recorded:.1f} s\n')
    print(f'  built in {built:.1f} s; verify --record-checksums '
          f'{recorded:.1f} s', flush=True)


def store_args(store: str) -> list[str]:
    return ['--data', os.path.join(store, 'Data.fs'),
            '--blob-dir', os.path.join(store, 'blobs')]


def blob_bytes(blob_dir: str) -> tuple[int, int]:
    """Files and bytes of the ``.blob`` files, each inode once."""
    seen = set()
    total = 0
    for directory, _, filenames in os.walk(blob_dir):
        for name in filenames:
            if not name.endswith('.blob'):
                continue
            st = os.lstat(os.path.join(directory, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return len(seen), total


def drop_caches() -> bool:
    os.sync()
    try:
        with open('/proc/sys/vm/drop_caches', 'w') as f:
            f.write('3\n')
    except OSError as error:
        print(f'  note: cannot drop the page cache ({error}); cold runs '
              'skipped', flush=True)
        return False
    return True


def timed(command: list[str] | str, shell: bool = False) -> tuple[float, str,
                                                                    int]:
    start = time.perf_counter()
    result = subprocess.run(command, shell=shell, capture_output=True,
                            text=True)
    return (time.perf_counter() - start, result.stdout + result.stderr,
            result.returncode)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dir', required=True,
                        help='where the store is built and kept')
    parser.add_argument('--files', type=int, default=100_000)
    parser.add_argument('--repeat', type=int, default=1,
                        help='runs of each kind; the table shows medians')
    parser.add_argument('--mix', choices=sorted(MIXES), default='plone',
                        help='file sizes: plone (default; 95%% up to 32 '
                        'KiB, a few up to 10 MiB) or small (512 bytes to '
                        '32 KiB only)')
    parser.add_argument('--build-only', action='store_true')
    args = parser.parse_args(argv)
    if not os.path.isdir(args.dir):
        parser.error(f'--dir {args.dir}: no such directory')
    if args.files < 1 or args.repeat < 1:
        parser.error('--files and --repeat: at least 1')
    store = os.path.join(args.dir, str(args.files)
                         + ('' if args.mix == 'plone' else '-' + args.mix))
    print(f'building {args.files:,} files in {store}', flush=True)
    build(store, args.files, args.mix)
    if args.build_only:
        return 0
    blob_dir = os.path.join(store, 'blobs')
    files, total = blob_bytes(blob_dir)
    head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'],
                          capture_output=True, text=True).stdout.strip()
    print(f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} '
          f'UTC, commit {head}, load {load_average()}')
    print(f'{hardware(store)}\nPython {platform.python_version()}, ZODB '
          f'{package_version("ZODB")}, zodbblob from '
          f'{os.path.dirname(zodbblob.__file__)}')
    print(f'{files:,} blob files, {total:,} bytes ({total / MiB:,.1f} MiB)',
          flush=True)
    cat = ('find %s -name "*.blob" -print0 | xargs -0 cat > /dev/null'
           % shlex.quote(blob_dir))
    kinds = {
        'cat': (cat, True),
        'verify --checksum': (zodbblob_command(
            'verify', '--checksum', '--quiet', *store_args(store)), False),
        'verify': (zodbblob_command(
            'verify', '--quiet', *store_args(store)), False),
    }
    seconds = {(kind, cold): [] for kind in kinds for cold in (True, False)}
    failed = False
    can_drop = True
    for number in range(args.repeat):
        order = list(kinds) if number % 2 == 0 else list(kinds)[::-1]
        for cold in (True, False):
            if cold and not can_drop:
                continue
            for kind in order:
                command, shell = kinds[kind]
                if cold:
                    can_drop = drop_caches()
                    if not can_drop:
                        break
                else:
                    # Warm: every file read once right before.
                    timed(cat, shell=True)
                    os.sync()
                elapsed, output, code = timed(command, shell)
                seconds[(kind, cold)].append(elapsed)
                problem = ''
                if code:
                    problem = f'exit {code}'
                elif kind != 'cat' and (
                        'clean' not in output
                        or 'record-checksums' in output
                        or f'{files} blob files' not in output):
                    problem = 'not clean, or files without a digest'
                print(f'  run {number} {"cold" if cold else "warm"} '
                      f'{kind}: {elapsed:.2f} s, '
                      f'{total / elapsed / 1e6:.0f} MB/s, load '
                      f'{load_average()}'
                      + (f'; FAILED: {problem}\n{output}' if problem else ''),
                      file=sys.stderr, flush=True)
                failed = failed or bool(problem)
    print()
    print('| run | cache | seconds | MB/s | `cat` / this (time) |')
    print('| --- | --- | ---: | ---: | ---: |')
    for cold in (True, False):
        if not seconds[('cat', cold)]:
            continue
        cat_median = statistics.median(seconds[('cat', cold)])
        for kind in kinds:
            median = statistics.median(seconds[(kind, cold)])
            print(f'| `{kind}` | {"cold" if cold else "warm"} '
                  f'| {median:.2f} | {total / median / 1e6:.0f} '
                  f'| {cat_median / median:.2f}x |')
    print(f'load after: {load_average()}')
    if failed:
        print('FAILED: a verify was not clean, or a command failed')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
