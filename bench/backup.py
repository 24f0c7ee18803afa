"""Backup: ``zodbblob backup`` against ``rsync -a --link-dest``.

Not a test: a benchmark that prints, for a store of many small blobs, the
time and the bytes written of a first backup and of a second one after 1%
of the blobs changed, for both tools.

The store is a FileStorage with ``zodbblob.BlobStorage`` (bushy layout),
``--blobs`` blobs of 200 to 2000 random bytes in an ``IOBTree``,
``--per-transaction`` per transaction.  Then:

1. ``zodbblob backup --quiet`` (as a child process, the way a cron job runs
   it) into ``ours/``;  ``rsync -a var/ rsync/1/``.
2. One transaction changes ``--changed-percent`` of the blobs.
3. ``zodbblob backup`` again (incremental: copies into the destination's
   pool only the new blob files); ``rsync -a --link-dest=rsync/1 var/
   rsync/2/`` (a new tree that hard-links the unchanged files).

The two write different things.  zodbblob keeps each blob file once per
destination, in a pool of few directories, and a snapshot is its
manifest and its ``Data.fs`` parts; rsync makes a full tree of the
source per backup.  They make it durable in different ways: zodbblob
syncs its filesystem before it marks a snapshot complete, rsync syncs
nothing.  The table therefore gives rsync twice: alone, and followed by
a ``syncfs`` of the destination (what makes its copy as durable as
ours).  Before every timed run, ``os.sync()`` flushes what earlier
steps wrote, so no run pays for another's writeback.

Columns: *s*, the wall time; *new files* and *new bytes*, the files of the
whole destination whose inode was not there after the previous backup,
and their sizes (what was written rather than kept or linked); *new
dirs*, the directories that were not; *written*, the bytes the child
process dirtied (``getrusage`` ``ru_oublock`` x 512: file data, not
metadata).

Checks (exit 1 if one fails): the second backup of ours wrote exactly
the changed blob files plus the snapshot's 3 own files (its ``Data.fs``
part, ``manifest.sqlite``, ``COMPLETE``) and made one directory, the
snapshot (nothing tree-shaped); it restores (``zodbblob restore``) into
a database that ``zodbblob verify --checksum`` finds clean and whose
every blob reads the bytes of the source; rsync's second copy has the
same blob files as the source.

Run from the project root (``rsync`` must be installed):

    /tmp/venv/bin/python bench/backup.py [--blobs 50000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import transaction
import ZODB
import ZODB.FileStorage
from BTrees.IOBTree import IOBTree
from ZODB.blob import Blob

import zodbblob
from zodbblob import BlobStorage
from zodbblob.storage.catalog import sync_filesystem
from machine import hardware, load_average, package_version  # bench/machine.py

MiB = 1 << 20


def open_db(var: str) -> ZODB.DB:
    return ZODB.DB(BlobStorage(os.path.join(var, 'blobs'),
                               ZODB.FileStorage.FileStorage(
                                   os.path.join(var, 'Data.fs'))))


def blob_data(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randint(200, 2000))


def build(var: str, blobs: int, per_transaction: int,
          rng: random.Random) -> None:
    os.makedirs(var)
    db = open_db(var)
    try:
        with db.transaction() as conn:
            conn.root()['blobs'] = IOBTree()
        for start in range(0, blobs, per_transaction):
            with db.transaction() as conn:
                tree = conn.root()['blobs']
                for key in range(start, min(start + per_transaction, blobs)):
                    tree[key] = Blob(blob_data(rng))
    finally:
        db.close()


def change(var: str, count: int, blobs: int, rng: random.Random) -> None:
    db = open_db(var)
    try:
        with db.transaction() as conn:
            tree = conn.root()['blobs']
            for key in rng.sample(range(blobs), count):
                with tree[key].open('w') as f:
                    f.write(blob_data(rng))
    finally:
        db.close()


def contents(var: str) -> dict[int, str]:
    """key -> sha256 of every blob, read through the database."""
    db = ZODB.DB(BlobStorage(os.path.join(var, 'blobs'),
                             ZODB.FileStorage.FileStorage(
                                 os.path.join(var, 'Data.fs'),
                                 read_only=True)))
    try:
        conn = db.open()
        result = {}
        for key, blob in conn.root()['blobs'].items():
            with blob.open('r') as f:
                result[key] = hashlib.sha256(f.read()).hexdigest()
        conn.close()
        transaction.abort()
        return result
    finally:
        db.close()


def inodes(root: str) -> tuple[dict[int, int], set[int]]:
    """inode -> size of every regular file below `root`, and the inodes
    of its directories."""
    files = {}
    directories = set()
    for directory, _, names in os.walk(root):
        directories.add(os.lstat(directory).st_ino)
        for name in names:
            info = os.lstat(os.path.join(directory, name))
            files[info.st_ino] = info.st_size
    return files, directories


def blob_file_hashes(blob_dir: str) -> dict[str, str]:
    result = {}
    for directory, dirs, names in os.walk(blob_dir):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d != 'tmp']
        for name in names:
            if name.endswith('.blob'):
                path = os.path.join(directory, name)
                with open(path, 'rb') as f:
                    result[os.path.relpath(path, blob_dir)] = hashlib.sha256(
                        f.read()).hexdigest()
    return result


def timed(argv: list[str]) -> tuple[float, int, str]:
    """Run `argv`: (seconds, bytes it wrote, its output)."""
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock
    if result.returncode:
        sys.exit(f'{argv} failed ({result.returncode}):\n{result.stdout}'
                 f'{result.stderr}')
    return seconds, (after - before) * 512, result.stdout


def timed_sync(path: str) -> float:
    start = time.perf_counter()
    sync_filesystem(path)
    return time.perf_counter() - start


def machine(root: str) -> str:
    described = hardware(root)
    rsync = subprocess.run(['rsync', '--version'], capture_output=True,
                           text=True).stdout.split('\n')[0]
    return (f'{described}\n'
            f'Python {platform.python_version()}, ZODB '
            f'{package_version("ZODB")}, ZEO {package_version("ZEO")}, '
            f'zodbblob {package_version("zodbblob")} from '
            f'{os.path.dirname(zodbblob.__file__)}; {rsync}')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--blobs', type=int, default=50_000,
                        help='blobs in the store (default 50000)')
    parser.add_argument('--changed-percent', type=float, default=1.0,
                        help='percent of the blobs changed before the '
                             'second backup (default 1)')
    parser.add_argument('--per-transaction', type=int, default=1000,
                        help='blobs per transaction when building the store')
    parser.add_argument('--dir', help='work here and keep it (default: a '
                                      'temporary directory, removed)')
    parser.add_argument('--seed', type=int, default=20261125)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if shutil.which('rsync') is None:
        sys.exit('rsync is not installed (apt-get install rsync)')
    work = args.dir or tempfile.mkdtemp(prefix='zodbblob-bench-backup-')
    os.makedirs(work, exist_ok=True)
    rng = random.Random(args.seed)
    var = os.path.join(work, 'var')
    ours = os.path.join(work, 'ours')
    rsync = os.path.join(work, 'rsync')
    os.makedirs(rsync)
    print(f'{datetime.date.today()}, {machine(work)}')
    print(f'load average at the start: {load_average()}')
    started = time.perf_counter()
    build(var, args.blobs, args.per_transaction, rng)
    print(f'built {args.blobs} blobs in '
          f'{time.perf_counter() - started:.1f} s', flush=True)
    ours_command = [sys.executable, '-m', 'zodbblob.cli', 'backup',
                    '--quiet', '--data', os.path.join(var, 'Data.fs'),
                    '--blob-dir', os.path.join(var, 'blobs'), ours]

    rows = []
    seen_ours: tuple[dict[int, int], set[int]] = ({}, set())
    seen_rsync: tuple[dict[int, int], set[int]] = ({}, set())
    failures = []
    changed = max(1, int(args.blobs * args.changed_percent / 100))
    for run in (1, 2):
        if run == 2:
            change(var, changed, args.blobs, rng)
        seconds, written, output = timed(ours_command)
        snapshot = output.split(':', 1)[0]
        files, dirs = inodes(ours)
        new = {i: s for i, s in files.items() if i not in seen_ours[0]}
        new_dirs = dirs - seen_ours[1]
        seen_ours = files, dirs
        rows.append(('zodbblob backup', run, seconds, None, len(new),
                     sum(new.values()), len(new_dirs), written))
        print(output.strip(), flush=True)

        target = os.path.join(rsync, str(run))
        argv = ['rsync', '-a']
        if run == 2:
            argv.append('--link-dest=' + os.path.join(rsync, '1'))
        seconds, written, _ = timed(argv + [var + '/', target])
        sync_seconds = timed_sync(target)
        files, dirs = inodes(rsync)
        new = {i: s for i, s in files.items() if i not in seen_rsync[0]}
        new_dirs = dirs - seen_rsync[1]
        seen_rsync = files, dirs
        rows.append(('rsync -a' + (' --link-dest' if run == 2 else ''), run,
                     seconds, seconds + sync_seconds, len(new),
                     sum(new.values()), len(new_dirs), written))

    # checks
    last = rows[2]
    restored = os.path.join(work, 'restored')
    os.sync()
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, '-m', 'zodbblob.cli', 'restore', '--quiet',
         snapshot, restored], capture_output=True, text=True)
    restore_seconds = time.perf_counter() - started
    if result.returncode:
        failures.append(f'restore failed: {result.stdout}{result.stderr}')
    else:
        check = subprocess.run(
            [sys.executable, '-m', 'zodbblob.cli', 'verify', '--checksum',
             '--quiet', '--data', os.path.join(restored, 'Data.fs'),
             '--blob-dir', os.path.join(restored, 'blobs')],
            capture_output=True, text=True)
        if check.returncode:
            failures.append(f'verify of the restored store: {check.stdout}')
        if contents(restored) != contents(var):
            failures.append('the restored store reads other bytes than the '
                            'source')
    # New in the second backup: the changed blobs' files in the pool, and
    # the snapshot's Data.fs part, manifest and COMPLETE (its link in
    # .manifests is the manifest's inode); one directory, the snapshot.
    if last[4] != changed + 3:
        failures.append(f'second backup wrote {last[4]} files, expected '
                        f'{changed} blob files + 3')
    if last[6] != 1:
        failures.append(f'second backup made {last[6]} directories, '
                        f'expected 1 (the snapshot)')
    if (blob_file_hashes(os.path.join(var, 'blobs'))
            != blob_file_hashes(os.path.join(rsync, '2', 'blobs'))):
        failures.append("rsync's second copy differs from the source")

    print()
    print(f'{args.blobs} blobs of 200-2000 bytes, {changed} changed '
          f'({args.changed_percent}%) before the second backup')
    print()
    print('| tool | backup | s | s with sync | new files | new bytes | '
          'new dirs | written bytes |')
    print('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
    for (tool, run, seconds, synced, new_files, new_bytes, new_dirs,
         written) in rows:
        synced_text = '(syncs)' if synced is None else f'{synced:.2f}'
        print(f'| {tool} | {run} | {seconds:.2f} | {synced_text} | '
              f'{new_files:,} | {new_bytes:,} | {new_dirs:,} | '
              f'{written:,} |')
    first, second = rows[0], rows[2]
    print()
    print(f'zodbblob second/first: time {second[2] / first[2]:.3f}, new '
          f'bytes {second[5] / first[5]:.4f}, written bytes '
          f'{second[7] / max(first[7], 1):.4f}')
    rsync_first, rsync_second = rows[1], rows[3]
    print(f'rsync second/first: time {rsync_second[2] / rsync_first[2]:.3f}'
          f' (with sync {rsync_second[3] / rsync_first[3]:.3f})')
    print(f'zodbblob/rsync with sync: first {first[2] / rsync_first[3]:.2f},'
          f' second {second[2] / rsync_second[3]:.2f}')
    print(f'zodbblob restore of the second snapshot: '
          f'{restore_seconds:.2f} s')
    print(f'load average at the end: {load_average()}')
    for failure in failures:
        print('CHECK FAILED:', failure)
    if not failures:
        print('All checks passed.')
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
