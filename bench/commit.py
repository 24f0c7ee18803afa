"""Commit throughput: stock FileStorage blobs against zodbblob.BlobStorage.

Not a test: a benchmark that prints blobs per second for each side and the
ratio ours/stock, one row per blob size and transaction shape.

Stock is ``ZODB.FileStorage.FileStorage(path, blob_dir=...)``, the usual
blob setup: it renames each blob file into place at ``storeBlob`` and
fsyncs no blob file (FileStorage fsyncs ``Data.fs`` once per commit).
Ours is ``zodbblob.open_filestorage(path, blob_dir=...)``, the way the
``<zodbblob>`` section around ``<filestorage>`` (zope.conf, ``zodbblob
serve``) opens it: the storage opens its FileStorage itself and commits
with one sync (the commit record's fdatasync overlapping the base's
fsync of ``Data.fs``); ``tpc_finish`` returns once both are durable.

Both are driven the way an application drives them::

    with db.transaction() as conn:
        conn.root()['blobs'][key] = Blob(data)

The blob bytes are made before the clock starts; writing them to the blob's
temporary file (inside ``Blob(data)``) is timed, on both sides.  Keys come
from a fixed set of 1000 in an ``OOBTree``, so the tree's pickles stay
small and the same size all along.  The timed region is the commit loop
plus ``db.close()`` (where zodbblob's checkpoint makes every file, name
and catalog row durable).  With ``--to-disk`` it also holds an
``os.sync()`` after the close, on both sides: then each side is timed
until everything it wrote is on disk (stock leaves its blob files to the
kernel's writeback, which the plain timing does not see).

Rows: 1 KiB, 100 KiB and 10 MiB blobs, one blob per transaction and 1000
per transaction (50 for 10 MiB: 1000 would write 10 GiB per transaction).
After each run, untimed, the database is reopened and every key read
back; a blob missing or with wrong bytes, or the two sides of a round
reading back different bytes (SHA-256 over all keys), makes the script
exit 1.

This machine's disk timing is noisy, so each row is run ``--repeat`` times
per side, stock and ours alternating (stock first in odd rounds, ours
first in even ones: S O O S S O ...), every run in fresh directories; the
table gives the medians, and the range of the ratio of each round's two
runs.  A row's rounds run one after the other, after one untimed warm-up
run (stock's) of that row: the first run after a row of another blob size
is slow whichever side it is (10 MiB, one per transaction: 21-28 blobs/s,
against 30-47 for the runs after it), and with the rows interleaved that
handicap fell on one side in 3 of 5 rounds.  The page cache's dirty data
is flushed (``os.sync``) before every run, so one run's writeback is not
charged to the next.

Run from the project root:

    /tmp/venv/bin/python bench/commit.py [--repeat 5] [--transactions N]
        [--batch-transactions M] [--rows 1KiB:1,10MiB:50] [--only ours]
        [--profile] [--dir DIR]

``--only ours --rows ... --repeat 1`` runs one side alone, e.g. under
``strace -c -f``; ``--profile`` prints a cProfile of each timed region.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import hashlib
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time

import ZODB
import ZODB.FileStorage
from BTrees.OOBTree import OOBTree
from ZODB.blob import Blob
from ZODB.POSException import POSKeyError

import zodbblob
from machine import hardware, load_average, package_version  # bench/machine.py

KiB = 1024
MiB = 1024 * KiB
KEYS = 1000          # the fixed key set: the tree never outgrows it
DATA_VARIANTS = 4    # distinct blob contents per size, used in turn

# (name, blob size, blobs per transaction, default transactions per run)
ROWS = (
    ('1KiB:1', KiB, 1, 300),
    ('1KiB:1000', KiB, 1000, 2),
    ('100KiB:1', 100 * KiB, 1, 300),
    ('100KiB:1000', 100 * KiB, 1000, 2),
    ('10MiB:1', 10 * MiB, 1, 40),
    # 50, not 1000: 1000 blobs of 10 MiB would write 10 GiB per transaction.
    ('10MiB:50', 10 * MiB, 50, 2),
)
SIDES = ('stock', 'ours')


def size_name(size: int) -> str:
    if size >= MiB:
        return f'{size // MiB} MiB'
    return f'{size // KiB} KiB'


def open_db(side: str, run_dir: str, create: bool = True) -> ZODB.DB:
    path = os.path.join(run_dir, 'Data.fs')
    blob_dir = os.path.join(run_dir, 'blobs')
    if side == 'stock':
        storage = ZODB.FileStorage.FileStorage(path, blob_dir=blob_dir)
    else:
        storage = zodbblob.open_filestorage(path, blob_dir=blob_dir)
    db = ZODB.DB(storage)
    if create:
        with db.transaction() as conn:
            conn.root()['blobs'] = OOBTree()
    return db


def commit_loop(db: ZODB.DB, data: list[bytes], per_transaction: int,
                transactions: int) -> None:
    key = 0
    for number in range(transactions):
        with db.transaction() as conn:
            tree = conn.root()['blobs']
            for index in range(per_transaction):
                tree[key] = Blob(data[(number + index) % len(data)])
                key = (key + 1) % KEYS


def expected_contents(per_transaction: int,
                      transactions: int) -> dict[int, int]:
    """Key -> index into the size's data variants, after `commit_loop`."""
    expected = {}
    key = 0
    for number in range(transactions):
        for index in range(per_transaction):
            expected[key] = (number + index) % DATA_VARIANTS
            key = (key + 1) % KEYS
    return expected


def check_all(side: str, run_dir: str, data: list[bytes],
              per_transaction: int, transactions: int) -> tuple[int, str]:
    """Reopen the closed database; read back every blob committed.

    Returns the number of keys that are missing or read back wrong bytes,
    and a SHA-256 over all keys' bytes in key order, to compare the sides.
    """
    expected = expected_contents(per_transaction, transactions)
    digest = hashlib.sha256()
    wrong = 0
    db = open_db(side, run_dir, create=False)
    try:
        with db.transaction() as conn:
            tree = conn.root()['blobs']
            if sorted(tree.keys()) != sorted(expected):
                wrong += len(set(tree.keys()) ^ set(expected))
            for key in sorted(expected):
                try:
                    with tree[key].open() as f:
                        content = f.read()
                except (KeyError, OSError, POSKeyError):
                    wrong += 1
                    continue
                digest.update(b'%d:%d:' % (key, len(content)))
                digest.update(content)
                if content != data[expected[key]]:
                    wrong += 1
    finally:
        db.close()
    return wrong, digest.hexdigest()


class Result:
    """One run of one row on one side."""

    def __init__(self, rate: float, seconds: float, wall: float, wrong: int,
                 digest: str):
        self.rate = rate      # blobs per second
        self.seconds = seconds  # the timed region
        self.wall = wall      # the whole run: setup, sync, check, cleanup
        self.wrong = wrong    # keys missing or reading wrong bytes
        self.digest = digest  # SHA-256 of every key's bytes, in key order


def run(side: str, row: tuple, data: list[bytes], transactions: int,
        root: str, label: str, profile: bool, to_disk: bool) -> Result:
    """One run of `row` on `side`, in fresh directories."""
    name, _, per_transaction, _ = row
    run_dir = os.path.join(root, label)
    os.makedirs(run_dir)
    wall = time.perf_counter()
    try:
        db = open_db(side, run_dir)
        gc.collect()
        # Nothing dirty from the previous run may be written back on
        # this run's clock.
        os.sync()
        profiler = cProfile.Profile() if profile else None
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        commit_loop(db, data, per_transaction, transactions)
        db.close()
        if to_disk:
            os.sync()
        if profiler is not None:
            profiler.disable()
        seconds = time.perf_counter() - start
        # Untimed: reopen and read every blob back.
        wrong, digest = check_all(side, run_dir, data, per_transaction,
                                  transactions)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    if profiler is not None:
        print(f'\n--- cProfile: {side} {name}, {transactions} '
              f'transactions, {seconds:.3f} s ---', file=sys.stderr)
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats('tottime').print_stats(25)
    return Result(transactions * per_transaction / seconds, seconds,
                  time.perf_counter() - wall, wrong, digest)


def machine(root: str) -> str:
    described = hardware(root)
    return (f'{described}\n'
            f'Python {platform.python_version()}, ZODB '
            f'{package_version("ZODB")}, ZEO {package_version("ZEO")}, '
            f'transaction {package_version("transaction")}, zodbblob '
            f'{package_version("zodbblob")} from '
            f'{os.path.dirname(zodbblob.__file__)}')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        '--transactions', type=int, default=None,
        help='transactions per run for the one-blob rows (default: 300 for '
             '1 KiB and 100 KiB, 40 for 10 MiB)')
    parser.add_argument(
        '--batch-transactions', type=int, default=None,
        help='transactions per run for the many-blob rows (default: 2)')
    parser.add_argument(
        '--repeat', type=int, default=5,
        help='runs per row and side; the table gives the median (default 5)')
    parser.add_argument(
        '--rows', default=','.join(row[0] for row in ROWS),
        help='comma-separated rows to run, SIZE:BLOBS_PER_TRANSACTION '
             '(default: all, %(default)s)')
    parser.add_argument('--only', choices=SIDES,
                        help='run one side only (for strace or profiling)')
    parser.add_argument('--to-disk', action='store_true',
                        help='time each run until everything it wrote is '
                             'on disk: an os.sync() after the close, on '
                             'both sides')
    parser.add_argument('--profile', action='store_true',
                        help='print a cProfile of every timed region to '
                             'stderr')
    parser.add_argument(
        '--dir', default=None,
        help='where the runs write (default: a new directory under /tmp, '
             'removed at the end; a given one is kept)')
    args = parser.parse_args(argv)
    known = {row[0]: row for row in ROWS}
    try:
        args.rows = [known[name] for name in args.rows.split(',')]
    except KeyError as e:
        parser.error(f'unknown row {e}; known rows: {", ".join(known)}')
    return args


def transactions_for(args, row) -> int:
    per_transaction, default = row[2], row[3]
    given = (args.transactions if per_transaction == 1
             else args.batch_transactions)
    return default if given is None else given


def main(argv=None) -> int:
    args = parse_args(argv)
    sides = (args.only,) if args.only else SIDES
    if args.dir is None:
        root = tempfile.mkdtemp(prefix='zodbblob-bench-commit-', dir='/tmp')
        remove_root = True
    else:
        root = os.path.abspath(args.dir)
        os.makedirs(root, exist_ok=True)
        remove_root = False
    # Blob(data) writes its file to tempfile's directory: keep it on the
    # blob directories' filesystem, so commit renames it as ZODB expects
    # instead of copying it.
    tempfile.tempdir = os.path.join(root, 'blob-tmp')
    os.makedirs(tempfile.tempdir, exist_ok=True)

    now = datetime.datetime.now().isoformat(timespec='seconds')
    print(f'zodbblob commit benchmark, {now}')
    print(machine(root))
    print(f'load average at start: {load_average()}')
    sys.stdout.flush()

    data = {size: [os.urandom(size) for _ in range(DATA_VARIANTS)]
            for size in {row[1] for row in args.rows}}
    rates: dict[tuple[str, str], list[float]] = {
        (row[0], side): [] for row in args.rows for side in sides}
    failures = []
    started = time.perf_counter()
    try:
        for row in args.rows:
            transactions = transactions_for(args, row)
            # Rounds 0 .. repeat; round 0 is a warm-up, one untimed run:
            # the first run after a row of another size is the slow one
            # (10 MiB: 21-28 blobs/s against 30-47 for the runs after it,
            # on either side), and it would always be one side's.
            for round_number in range(args.repeat + 1):
                if round_number == 0:
                    order = sides[:1]
                else:
                    order = sides if round_number % 2 else sides[::-1]
                digests = {}
                for side in order:
                    label = f'{side}-{row[0].replace(":", "x")}-{round_number}'
                    result = run(side, row, data[row[1]], transactions, root,
                                 label, args.profile, args.to_disk)
                    if round_number:
                        rates[row[0], side].append(result.rate)
                    digests[side] = result.digest
                    which = (f'round {round_number}' if round_number
                             else 'warm-up')
                    print(f'  {which:<8} {row[0]:<12} {side:<5} '
                          f'{result.rate:10.1f} blobs/s  '
                          f'{result.seconds:6.2f} s timed, '
                          f'{result.wall:6.2f} s in all'
                          + (f'  {result.wrong} WRONG' if result.wrong
                             else ''),
                          file=sys.stderr, flush=True)
                    if result.wrong:
                        failures.append(
                            f'{side} {row[0]} round {round_number}: '
                            f'{result.wrong} blobs missing or wrong after '
                            f'reopening')
                if len(set(digests.values())) > 1:
                    failures.append(
                        f'{row[0]} round {round_number}: the sides read '
                        f'back different bytes')
    finally:
        if remove_root:
            shutil.rmtree(root, ignore_errors=True)
    elapsed = time.perf_counter() - started

    print(f'load average at end: {load_average()}; {elapsed:.0f} s in all, '
          f'{args.repeat} runs per row and side'
          + ('; timed until on disk (--to-disk)' if args.to_disk else ''))
    print()
    print(report(args, sides, rates))
    print()
    if failures:
        for failure in failures:
            print(f'FAILED  {failure}')
        return 1
    both = ' (stock and ours: the same bytes)' if len(sides) == 2 else ''
    print(f'ok    every run, reopened, read back every blob it '
          f'committed{both}')
    return 0


def report(args, sides, rates) -> str:
    """The table, in Markdown (it goes into bench/README.md as it is)."""
    header = ['blob size', 'blobs/txn', 'txns/run']
    header += [f'{side} blobs/s' for side in sides]
    if len(sides) == 2:
        header += ['ours/stock', 'ours/stock range', '>= 0.8x']
    lines = []
    for row in args.rows:
        name, size, per_transaction, _ = row
        cells = [size_name(size), str(per_transaction),
                 str(transactions_for(args, row))]
        medians = {}
        for side in sides:
            medians[side] = statistics.median(rates[name, side])
            cells.append(f'{medians[side]:.1f}')
        if len(sides) == 2:
            ratio = medians['ours'] / medians['stock']
            cells.append(f'{ratio:.2f}')
            # Round by round, each ours run against its stock partner.
            pairs = [o / s for s, o in zip(rates[name, 'stock'],
                                           rates[name, 'ours'])]
            cells.append(f'{min(pairs):.2f}-{max(pairs):.2f}')
            cells.append('met' if ratio >= 0.8 else 'not met')
        lines.append(cells)
    widths = [max(len(cell) for cell in column)
              for column in zip(header, *lines)]

    def format_line(cells):
        return '| ' + ' | '.join(cell.rjust(width)
                                 for cell, width in zip(cells, widths)) + ' |'

    rule = '|' + '|'.join('-' * (width + 1) + ':' for width in widths) + '|'
    return '\n'.join([format_line(header), rule]
                     + [format_line(cells) for cells in lines])


if __name__ == '__main__':
    sys.exit(main())
