"""What a power cut loses: stock ZODB and zodbblob side by side.

Usage: python bench/powercut.py [--cuts N] [--workloads commit,pack,undo]
           [--first-seed S]

For each workload and each side, N power cuts, each on a fresh database
on the power-cut filesystem (``zodbblob.powercut``): a child process
commits (``zodbblob.powercut.tests.workload``) and reports each
transaction whose commit returned; the power goes at a write, fsync or
rename drawn from the seed (the same seeds for every side); the child is
killed; the filesystem keeps only what was made durable; the database is
opened again as the side opens it (stock: ``FileStorage(path,
blob_dir=...)``; zodbblob: ``BlobStorage`` over ``FileStorage``, serial
commits; zodbblob, one sync: ``zodbblob.open_filestorage``) and every
blob of the last acknowledged transaction is read.

Prints, per workload and side: cuts, acknowledged transactions, the blobs
of the last acknowledged transactions checked, and how many of those
were lost (no file: POSKeyError, or the transaction itself gone) or wrong
(other bytes).  Needs FUSE (root, /dev/fuse, fusermount3, mfusepy).
Exits 1 if zodbblob lost or damaged an acknowledged blob.
"""

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import ZODB
import ZODB.POSException

from zodbblob.powercut import mount, unavailable
from zodbblob.powercut.tests.test_storage import MOST, acknowledged
from zodbblob.powercut.tests.workload import open_database

CUT_TIMEOUT = 120.0


# Each side: the workload's flag, and how it is opened.
SIDES = {
    'stock': ['--stock'],                   # FileStorage(path, blob_dir=)
    'zodbblob': [],                         # BlobStorage(blobs, FileStorage)
    'zodbblob, one sync': ['--one-sync'],   # zodbblob.open_filestorage
}


def one_cut(top: str, workload: str, seed: int, side: str) -> dict:
    flags = SIDES[side]
    stock, one_sync = '--stock' in flags, '--one-sync' in flags
    backing = os.path.join(top, 'backing')
    os.mkdir(backing)
    open_database(backing, stock, one_sync).close()
    report = os.path.join(top, 'report')
    rng = random.Random(seed)
    kind = rng.choice(sorted(MOST))
    with mount(backing, os.path.join(top, 'mnt')) as fs:
        fs.arm(kind, rng.randrange(1, MOST[kind] + 1))
        child = subprocess.Popen(
            [sys.executable, '-m', 'zodbblob.powercut.tests.workload',
             workload, fs.mountpoint, report, str(seed)]
            + flags,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + CUT_TIMEOUT
        while child.poll() is None and time.monotonic() < deadline:
            if fs.wait_cut(0.5):
                break
        child.send_signal(signal.SIGKILL)
        child.wait()
        fs.remount()
        entries = [e for e in acknowledged(report) if 'tid' in e]
        result = {'transactions': len(entries), 'blobs': 0, 'lost': 0,
                  'wrong': 0}
        if not entries:
            return result
        last = entries[-1]
        result['blobs'] = len(last['state'])
        db = open_database(fs.mountpoint, stock, one_sync)
        try:
            tid = bytes.fromhex(last['tid'])
            if db.lastTransaction() < tid:
                result['lost'] = len(last['state'])
                return result
            conn = db.open(at=tid)
            root = conn.root()
            for key, sha in last['state'].items():
                try:
                    with root[key].open() as f:
                        data = f.read()
                except (KeyError, ZODB.POSException.POSKeyError, OSError):
                    result['lost'] += 1
                    continue
                if hashlib.sha256(data).hexdigest() != sha:
                    result['wrong'] += 1
            conn.close()
        finally:
            db.close()
        return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--cuts', type=int, default=10)
    parser.add_argument('--workloads', default='commit,pack,undo')
    parser.add_argument('--first-seed', type=int, default=0)
    args = parser.parse_args(argv)
    # Recovery says at WARNING what it repaired: not this table's business.
    logging.basicConfig(level=logging.ERROR)
    reason = unavailable()
    if reason:
        print(f'power-cut benchmark needs FUSE: {reason}', file=sys.stderr)
        return 2
    rows = []
    for workload in args.workloads.split(','):
        for side in SIDES:
            total = {'transactions': 0, 'blobs': 0, 'lost': 0, 'wrong': 0}
            for seed in range(args.first_seed, args.first_seed + args.cuts):
                top = tempfile.mkdtemp(prefix='powercut-bench-')
                try:
                    for key, value in one_cut(top, workload, seed,
                                              side).items():
                        total[key] += value
                finally:
                    shutil.rmtree(top, ignore_errors=True)
            rows.append((workload, side, args.cuts, total))
            print(json.dumps({'workload': workload, 'side': side,
                              'cuts': args.cuts, **total}), flush=True)
    print()
    print('| workload | side | cuts | acknowledged transactions '
          '| blobs checked | lost | wrong |')
    print('|---|---|---:|---:|---:|---:|---:|')
    for workload, side, cuts, total in rows:
        print(f'| {workload} | {side} | {cuts} | {total["transactions"]} '
              f'| {total["blobs"]} | {total["lost"]} | {total["wrong"]} |')
    damaged = sum(total['lost'] + total['wrong']
                  for workload, side, cuts, total in rows
                  if side != 'stock')
    return 1 if damaged else 0


if __name__ == '__main__':
    sys.exit(main())
