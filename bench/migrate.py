"""Layout migration: stock ``ZODB.scripts.migrateblobs`` against ours.

Not a test: a benchmark that prints seconds per run and ratios, and checks
that every side produced the same blob files.

The source is one bushy blob directory of N small files (300 bytes), laid
out by stock ``ZODB.blob.FilesystemHelper`` itself: oids 1..N, a new tid
every 1000 oids, as batched commits would leave it.  Then, each in a fresh
destination directory on the same filesystem (so every side hard-links):

- stock: ``ZODB.scripts.migrateblobs.migrate(source, dest, 'lawn')``,
  bushy -> lawn (stock knows only bushy and lawn).  It links each file
  (``os.link``, a silent ``shutil.copy`` on any error), prints a line per
  oid (sent to a null stream here, so the terminal is not timed), and does
  no check at the end.
- ours, bushy -> lawn: ``zodbblob.tools.migrate.migrate``, the same target, for
  a like-for-like row.
- ours, bushy -> chunky: the layout without a directory per oid.

Ours does more than stock's: it holds the storage locks, lists and stats
the source once before starting (the progress total, the sizes, and what
the end is checked against), writes its state file, and at the end lists
and stats the destination to compare it with that listing, syncs the
destination's filesystem (``syncfs``) and writes the marker last.  The
table also shows one list-and-stat of the source alone, for scale, and
each run prints the load average (1 minute) before and after it, and
its CPU time (user + system, in this process).

Each side runs ``--repeat`` times, in rotating order, each run in a fresh
destination; the table gives the median and the range.  Dirty pages are
flushed (``os.sync``) before every run; the page cache is warm (the source
was just written and is walked once before the first run); nothing drops
it.  The destinations stay until the end (they go with the work
directory, untimed): removing one (100,000 directories for lawn) right
before a run slowed that run by up to a third, whichever side it was.

Run from the project root:

    /tmp/venv/bin/python bench/migrate.py [--blobs 100000] [--quick]
        [--repeat 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

import ZODB.blob
import ZODB.scripts.migrateblobs
from ZODB.utils import p64

from machine import hardware, package_version  # bench/machine.py
from zodbblob.tools.inventory import inventory
from zodbblob.tools.inventory import iter_source
from zodbblob.tools.migrate import migrate


BLOB_SIZE = 300
OIDS_PER_TID = 1000
FIRST_TID = 0x03ec2b3f2e5c1a88


def build_source(path: str, count: int) -> None:
    helper = ZODB.blob.FilesystemHelper(path, 'bushy')
    helper.create()
    for index in range(1, count + 1):
        oid = p64(index)
        tid = p64(FIRST_TID + index // OIDS_PER_TID)
        helper.createPathForOID(oid)
        head = b'blob %d ' % index
        with open(helper.getBlobFilename(oid, tid), 'wb') as f:
            f.write((head * (BLOB_SIZE // len(head) + 1))[:BLOB_SIZE])


def run_stock(source: str, destination: str) -> None:
    # Stock prints a line per oid; a terminal would dominate its time.
    with contextlib.redirect_stdout(io.StringIO()):
        ZODB.scripts.migrateblobs.migrate(source, destination, 'lawn')


def run_ours(layout: str):
    def run(source: str, destination: str) -> None:
        report = migrate(source, destination, layout)
        if report.linked != report.files:
            raise AssertionError(f'ours linked {report.linked} of '
                                 f'{report.files} files')
    return run


SIDES = (
    ('stock migrateblobs, bushy -> lawn', 'lawn', run_stock),
    ('zodbblob migrate, bushy -> lawn', 'lawn', run_ours('lawn')),
    ('zodbblob migrate, bushy -> chunky', 'chunky', run_ours('chunky')),
)


def sizes(blob_dir: str, layout: str) -> dict:
    return {key: size for key, (size, path)
            in inventory(iter_source(blob_dir, layout)).items()}


def machine(root: str) -> str:
    return (f'{hardware(root)}\n'
            f'Python {platform.python_version()}, ZODB '
            f'{package_version("ZODB")}, ZEO {package_version("ZEO")}, '
            f'zodbblob {package_version("zodbblob")}')


def load() -> str:
    return f'{os.getloadavg()[0]:.2f}'


def cpu_time() -> float:
    """User and system seconds of this process: less at the mercy of the
    other work on the machine than the wall clock."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--blobs', type=int, default=100000,
                        help='blob files in the source (default 100000)')
    parser.add_argument('--quick', action='store_true',
                        help='5000 blobs, for a try-out')
    parser.add_argument('--repeat', type=int, default=3,
                        help='runs per side (default 3); median shown')
    parser.add_argument('--dir', help='work directory (created; must not '
                        'exist; kept afterwards)')
    args = parser.parse_args(argv)
    count = 5000 if args.quick else args.blobs
    if args.dir:
        os.makedirs(args.dir)
        work = args.dir
    else:
        work = tempfile.mkdtemp(prefix='zodbblob-bench-migrate-')
    try:
        return run(work, count, args.repeat)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def run(work: str, count: int, repeat: int) -> int:
    print(f'{datetime.date.today()}, {machine(work)}')
    source = os.path.join(work, 'source')
    start = time.perf_counter()
    build_source(source, count)
    os.sync()
    print(f'built a bushy source of {count} blob files in '
          f'{time.perf_counter() - start:.1f} s')
    start = time.perf_counter()
    expected = sizes(source, 'bushy')
    walk = time.perf_counter() - start
    problems = []
    if len(expected) != count:
        problems.append(f'source holds {len(expected)} files, not {count}')

    times = {name: [] for name, _, _ in SIDES}
    cpu = {name: [] for name, _, _ in SIDES}
    for round in range(repeat):
        order = SIDES[round % len(SIDES):] + SIDES[:round % len(SIDES)]
        for number, (name, layout, side) in enumerate(order):
            destination = os.path.join(work, f'dst-{round}-{number}-{layout}')
            os.sync()
            before = load()
            start, start_cpu = time.perf_counter(), cpu_time()
            side(source, destination)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(cpu_time() - start_cpu)
            after = load()
            found = sizes(destination, layout)
            if found != expected:
                problems.append(f'{name}, run {round + 1}: '
                                f'{len(found)} files, not the source\'s '
                                f'{len(expected)} with their sizes')
            print(f'  run {round + 1}: {name}: {times[name][-1]:.2f} s, '
                  f'CPU {cpu[name][-1]:.2f} s (load {before} -> {after})',
                  flush=True)

    stock = statistics.median(times[SIDES[0][0]])
    print()
    print(f'{count} blob files, {repeat} runs per side (median, range):')
    print()
    print('| migration | s | range s | stock / this | CPU s |')
    print('| --- | ---: | ---: | ---: | ---: |')
    for name, _, _ in SIDES:
        median = statistics.median(times[name])
        print(f'| {name} | {median:.2f} | {min(times[name]):.2f}-'
              f'{max(times[name]):.2f} | {stock / median:.2f}x | '
              f'{statistics.median(cpu[name]):.2f} |')
    print(f'| (one list + stat of the source alone) | {walk:.2f} | | | |')
    print()
    if problems:
        for problem in problems:
            print('CHECK FAILED:', problem)
        return 1
    print(f'Checks passed: every run produced the {count} files of the '
          'source with their sizes; every zodbblob run linked them all.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
