"""Blobs on a bucket: zodbblob against zodb-s3blobs, on one moto server.

Not a test: a benchmark that prints, per step, each side's numbers and
the ratio zodbblob / zodb-s3blobs, higher is better (for times and
requests: the peer's over ours).

One run starts one S3-API server (moto's, ``python -m moto.server`` on
127.0.0.1, as ``zodbblob.testing`` starts it for the tests) and, in front
of it, one counting proxy per side (``zodbblob.faults.FaultProxy`` in
PASS mode; here it also counts the bytes each way), so both sides' S3
requests and bytes are counted the same way, outside their processes.
Each step runs in a process of its own (``bench/objectstore_side.py``):
zodbblob's in this interpreter, zodb-s3blobs's in its venv's (made if
missing: ``bench/.venv-s3blobs``, git-ignored, ``pip install
--ignore-requires-python zodb-s3blobs==1.2.1``: it says it needs Python
3.12, and runs on 3.11), each on a fresh bucket, the sides interleaved
(peer first in odd rounds, ours first in even ones).  Both wrap a
FileStorage on the same disk.

Steps:

1. commits of 1 KiB x 1, 1 KiB x 50 and 10 MiB x 1 blobs per
   transaction: blobs/s, the clock around the commits and ``db.close()``
   (target: 50-blob transactions >= 3x); untimed after, every blob is
   read back from the bucket (the local copies removed); then the same
   again through proxies that hold each request ``--delay-ms`` (20) ms,
   as a network's round trip would;
2. a cold read of a 10 MiB blob, its local copy removed and the
   database reopened before the clock starts: seconds (target >= 1x);
3. pack of 20,000 blobs of 300 bytes (100 per transaction) with 200
   garbage (1%: 100 superseded revisions, 100 blobs removed from the
   tree), and of 2,000 blobs with the same 200: seconds and S3 requests
   (target: >= 50x fewer requests, and a pack time that does not grow
   with the store: the growth column is the 20,000 pack's time over the
   2,000 one's, per side); untimed after, the keys left in the bucket
   are counted and every live blob is read back from it;
4. undo of the change of a 50 MiB blob: whether the blob reads its
   earlier bytes after the undo, and after a pack (the local copies
   removed), and the bytes the undo sent and received.

The table gives medians over the rounds.  A zodbblob run that reads
back wrong bytes or leaves the wrong keys makes the script exit 1; the
peer's outcomes are reported as they are.

Run from the project root:

    .venv/bin/python bench/objectstore.py [--rounds 3] [--pack-rounds 1]
        [--steps commit,read,pack,undo] [--delay-ms 20]
        [--quick] [--zodbblob-only] [--peer-python PATH] [--dir DIR]

``--quick`` is the short run a test makes: one round, fewer
transactions, the pack at 400 blobs (40 garbage) only, a 5 MiB undo.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import boto3

import zodbblob
from machine import hardware, load_average, package_version  # bench/machine.py
from zodbblob.faults import FaultProxy
from zodbblob.testing import free_port, start_server

KiB = 1024
MiB = 1024 * KiB
HERE = os.path.dirname(os.path.abspath(__file__))
SIDE_SCRIPT = os.path.join(HERE, 'objectstore_side.py')
PEER_VENV = os.path.join(HERE, '.venv-s3blobs')
PEER = 'zodb-s3blobs==1.2.1'
REGION = 'us-east-1'
NAMES = {'ours': 'zodbblob', 'peer': 'zodb-s3blobs'}
STEPS = ('commit', 'read', 'pack', 'undo')
# The commits again over proxies that hold each request this long: an
# S3 PutObject's round trip within one AWS region is tens of ms; 20 is
# the low end, the least that favours uploads side by side.
DELAY_MS = 20.0

# (name, blob size, blobs per transaction, transactions; quick ones)
COMMIT_ROWS = (
    ('1 KiB x 1', KiB, 1, 100, 10),
    ('1 KiB x 50', KiB, 50, 10, 2),
    ('10 MiB x 1', 10 * MiB, 1, 10, 2),
)


class CountingProxy(FaultProxy):
    """A PASS proxy that also counts the bytes each way; with `delay`,
    it holds each request that many seconds before passing it on.

    The delay stands for a network's round trip: each request waits it
    once, on its own connection, so requests on several connections
    wait at the same time, as over a network (here, not in
    ``zodbblob.faults``: the tests need no delay).
    """

    def __init__(self, target, delay: float = 0.0):
        super().__init__(target)
        self.delay = delay
        self.sent = self.received_bytes = 0

    def note(self, framing, data):
        before = self.requests
        framing = super().note(framing, data)
        if self.delay and self.requests != before:
            time.sleep(self.delay)   # the request's head, held
        return framing

    def received(self, sock):
        data = super().received(sock)
        try:
            from_server = sock.getpeername() == self.target
        except OSError:
            return data
        with self.lock:
            if from_server:
                self.received_bytes += len(data)
            else:
                self.sent += len(data)
        return data

    def counts(self) -> tuple[int, int, int]:
        """(requests, bytes sent to the server, bytes it answered)."""
        with self.lock:
            return self.requests, self.sent, self.received_bytes


class Server:
    """One moto server; one counting proxy per side and delay (0: none),
    fresh buckets."""

    def __init__(self, root: str, sides, delays=(0.0,)):
        self.directory = os.path.join(root, 'moto')
        os.makedirs(self.directory)
        address = ('127.0.0.1', free_port())
        self.process = start_server(
            [sys.executable, '-m', 'moto.server', '-H', address[0],
             '-p', str(address[1])],
            address, self.directory, 'moto.log', 60.0)
        self.endpoint = 'http://%s:%d' % address
        self.delays = tuple(delays)
        self.proxies = {(side, delay): CountingProxy(address, delay).start()
                        for side in sides for delay in delays}
        self.client = boto3.client(
            's3', endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id='testing', aws_secret_access_key='testing')
        self.buckets = 0

    def endpoint_for(self, side: str, delay: float) -> str:
        return 'http://%s:%d' % self.proxies[side, delay].address

    def new_bucket(self) -> str:
        self.buckets += 1
        name = f'bench-{self.buckets}'
        self.client.create_bucket(Bucket=name)
        return name

    def drop_bucket(self, name: str) -> None:
        """Empty and remove `name`: moto keeps every object in memory."""
        pages = self.client.get_paginator('list_objects_v2').paginate(
            Bucket=name)
        for page in pages:
            keys = [{'Key': item['Key']} for item in page.get('Contents', ())]
            if keys:
                self.client.delete_objects(Bucket=name,
                                           Delete={'Objects': keys})
        self.client.delete_bucket(Bucket=name)

    def stop(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()
        self.client.close()
        self.process.stop()


def run_step(server: Server, python: str, side: str, step: str, root: str,
             label: str, delay: float = 0.0, **options) -> dict:
    """One step on one side in its own process, on a fresh bucket.

    The result has the step's own numbers, and under ``counts`` the
    proxy's (requests, bytes sent, bytes received) between each two
    marks the step printed, named by the later mark.
    """
    bucket = server.new_bucket()
    run_dir = os.path.join(root, label)
    proxy = server.proxies[side, delay]
    argv = [python, SIDE_SCRIPT, side, step, '--endpoint',
            server.endpoint_for(side, delay), '--bucket', bucket,
            '--dir', run_dir]
    for name, value in options.items():
        argv += [f'--{name.replace("_", "-")}', str(value)]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=HERE)
    counts, marked, result = {}, None, None
    try:
        for line in process.stdout:
            if line.startswith('mark '):
                now = proxy.counts()
                if marked is not None:
                    counts[line[5:].strip()] = [
                        b - a for a, b in zip(marked, now)]
                marked = now
                process.stdin.write('go\n')
                process.stdin.flush()
            elif line.startswith('result '):
                result = json.loads(line[7:])
        errors = process.stderr.read()
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
        server.drop_bucket(bucket)
    if result is None:
        tail = errors.strip().splitlines()[-1:] or ['no output']
        result = {'error': f'exit status {process.returncode}: {tail[0]}'}
    result['counts'] = counts
    return result


def rounds_of(sides, rounds: int):
    """Round numbers with their side order: peer first in odd rounds."""
    for number in range(1, rounds + 1):
        yield number, (sides if number % 2 else sides[::-1])


def peer_python(args) -> str:
    """The python of the zodb-s3blobs venv; the venv made if missing."""
    if args.peer_python:
        return args.peer_python
    python = os.path.join(PEER_VENV, 'bin', 'python')
    if not os.path.exists(python):
        print(f'making {PEER_VENV} with {PEER}', file=sys.stderr, flush=True)
        subprocess.run([sys.executable, '-m', 'venv', PEER_VENV], check=True)
        # It says Requires-Python >= 3.12 and runs on 3.11.
        subprocess.run([python, '-m', 'pip', 'install', '-q',
                        '--ignore-requires-python', PEER], check=True)
    return python


class Bench:
    """The rounds of every step; the results by (step, side)."""

    def __init__(self, args, server: Server, root: str, pythons: dict):
        self.args = args
        self.server = server
        self.root = root
        self.pythons = pythons
        self.sides = tuple(pythons)
        self.results: dict[tuple[str, str], list[dict]] = {}
        self.failures: list[str] = []
        self.runs = 0

    def step(self, key: str, side: str, step: str, **options) -> dict:
        self.runs += 1
        result = run_step(self.server, self.pythons[side], side, step,
                          self.root, f'{self.runs}-{side}-{step}',
                          **options)
        self.results.setdefault((key, side), []).append(result)
        shown = {k: v for k, v in result.items() if k != 'counts'}
        print(f'  {key:<24} {NAMES[side]:<12} {json.dumps(shown)} '
              f'{json.dumps(result["counts"])}', file=sys.stderr, flush=True)
        if side == 'ours':
            self.check(key, result)
        return result

    def check(self, key: str, result: dict) -> None:
        if 'error' in result:
            self.failures.append(f'zodbblob {key}: {result["error"]}')
        elif result.get('wrong'):
            self.failures.append(f'zodbblob {key}: {result["wrong"]} blobs '
                                 f'read back wrong bytes')
        elif result.get('keys', 0) != result.get('expected_keys', 0):
            self.failures.append(
                f'zodbblob {key}: {result["keys"]} keys left in the bucket, '
                f'{result["expected_keys"]} live blobs')
        for name in ('after_undo', 'after_pack'):
            if name in result and result[name] != 'right bytes':
                self.failures.append(f'zodbblob {key} {name}: '
                                     f'{result[name]}')

    def run(self) -> None:
        args = self.args
        if 'commit' in args.steps:
            for delay in self.server.delays:
                self.commits(delay)
        if 'read' in args.steps:
            for _, order in rounds_of(self.sides, args.rounds):
                for side in order:
                    self.step('cold read', side, 'read', size=10 * MiB)
        if 'pack' in args.steps:
            self.packs()
        if 'undo' in args.steps:
            for _, order in rounds_of(self.sides, args.pack_rounds):
                for side in order:
                    self.step('undo', side, 'undo',
                              size=args.undo_mib * MiB)

    def commits(self, delay: float) -> None:
        args = self.args
        for name, size, per_transaction, transactions, quick in COMMIT_ROWS:
            if args.quick and delay and per_transaction == 1:
                continue   # quick: the delayed rows' target row only
            for _, order in rounds_of(self.sides, args.rounds):
                for side in order:
                    self.step(commit_key(name, delay), side, 'commit',
                              delay=delay, size=size,
                              per_transaction=per_transaction,
                              transactions=quick if args.quick
                              else transactions)

    def packs(self) -> None:
        args = self.args
        for blobs in args.pack_blobs:
            for _, order in rounds_of(self.sides, args.pack_rounds):
                for side in order:
                    self.step(f'pack {blobs}', side, 'pack', blobs=blobs,
                              garbage=args.garbage)

    def ok(self, key: str, side: str) -> list[dict]:
        return [r for r in self.results.get((key, side), ())
                if 'error' not in r]

    def median(self, key: str, side: str, value) -> float | None:
        values = [value(r) for r in self.ok(key, side)]
        return statistics.median(values) if values else None


def commit_key(name: str, delay: float) -> str:
    """The step of commit row `name` over the proxy of `delay`."""
    if not delay:
        return f'commit {name}'
    return f'commit {name}, {delay * 1000:g} ms'


def ratio(ours: float | None, peer: float | None) -> str:
    if not ours or not peer:
        return '-'
    return f'{ours / peer:.2f}'


def cell(value: float | None, form: str) -> str:
    return '-' if value is None else format(value, form)


def report(bench: Bench) -> str:
    """The table, in Markdown (it goes into bench/README.md as it is)."""
    sides = bench.sides
    header = ['step', 'measure'] + [NAMES[s] for s in sides]
    if 'peer' in sides:
        header += ['zodbblob / zodb-s3blobs', 'target']
    lines = []

    def row(step, measure, values, better, target=''):
        cells = [step, measure] + [values[s][1] for s in sides]
        if 'peer' in sides:
            ours, peer = values['ours'][0], values['peer'][0]
            if better is None:  # no ratio: the sides do different things
                shown = '-'
            elif better == 'more':
                shown = ratio(ours, peer)
            else:
                shown = ratio(peer, ours)
            met = ''
            if target and shown != '-':
                met = (f'>= {target}x: '
                       + ('met' if float(shown) >= target else 'not met'))
            cells += [shown, met]
        lines.append(cells)

    for delay in bench.server.delays:
        for name, _, per_transaction, _, _ in COMMIT_ROWS:
            key = commit_key(name, delay)
            if not any(bench.results.get((key, s)) for s in sides):
                continue
            values = {}
            for side in sides:
                rate = bench.median(key, side,
                                    lambda r: r['blobs'] / r['seconds'])
                values[side] = (rate, cell(rate, '.1f'))
            row(key, 'blobs/s', values, 'more',
                3 if per_transaction == 50 else '')
    steps = bench.args.steps
    if 'read' in steps:
        values = {}
        for side in sides:
            seconds = bench.median('cold read', side, lambda r: r['seconds'])
            values[side] = (seconds, cell(seconds, '.3f'))
        row('cold read 10 MiB', 'seconds', values, 'less', 1)
    if 'pack' in steps:
        pack_rows(bench, row)
    if 'undo' in steps:
        undo_rows(bench, row)
    widths = [max(len(c) for c in column) for column in zip(header, *lines)]

    def line(cells):
        return '| ' + ' | '.join(c.ljust(w) for c, w in zip(cells, widths)) \
            + ' |'

    rule = '|' + '|'.join('-' * (w + 2) for w in widths) + '|'
    return '\n'.join([line(header), rule] + [line(c) for c in lines])


def pack_rows(bench: Bench, row) -> None:
    sides = bench.sides

    def requests(result, mark='end'):
        return result['counts'][mark][0]

    packs = {}
    for blobs in bench.args.pack_blobs:
        key = f'pack {blobs}'
        seconds, counted = {}, {}
        for side in sides:
            value = bench.median(key, side, lambda r: r['seconds'])
            seconds[side] = (value, cell(value, '.2f'))
            value = bench.median(key, side, requests)
            counted[side] = (value, cell(value, '.0f'))
        packs[blobs] = seconds
        label = f'pack {blobs:,} ({bench.args.garbage} garbage)'
        row(label, 'seconds', seconds, 'less')
        row(label, 'S3 requests', counted, 'less', 50)
    if len(packs) == 2:
        small, large = sorted(packs)
        values = {}
        for side in sides:
            a, b = packs[small][side][0], packs[large][side][0]
            growth = b / a if a and b is not None else None
            values[side] = (growth, cell(growth, '.2f'))
        row(f'pack growth {large:,} / {small:,}', 'time ratio', values,
            'less')
        values = {}
        for side in sides:
            a, b = packs[small][side][0], packs[large][side][0]
            added = b - a if a is not None and b is not None else None
            values[side] = (added, cell(added, '.2f'))
        row(f'pack growth {small:,} to {large:,}', 'seconds added', values,
            'less')


def undo_rows(bench: Bench, row) -> None:
    sides = bench.sides
    for name, mark in (('after undo', 'after_undo'),
                       ('after pack', 'after_pack')):
        values = {}
        for side in sides:
            seen = sorted({r.get(mark, r.get('error', '?'))
                           for r in bench.results.get(('undo', side), ())})
            values[side] = (None, '; '.join(seen) or '-')
        row(f'undo {bench.args.undo_mib} MiB', f'read {name}', values, 'more')
    keys = {}
    for side in sides:
        value = bench.median('undo', side, lambda r: r['keys_after_pack'])
        keys[side] = (value, cell(value, '.0f'))
    row(f'undo {bench.args.undo_mib} MiB', 'keys left after pack', keys,
        None)
    for measure, mark, index in (('undo: bytes sent', 'undone', 1),
                                 ('undo: bytes received', 'undone', 2),
                                 ('read after undo: bytes received',
                                  'read', 2)):
        values = {}
        for side in sides:
            value = bench.median(
                'undo', side, lambda r: r['counts'][mark][index])
            values[side] = (value, cell(value, ',.0f'))
        # The peer's undo copies nothing and its read fails: no ratio.
        row(f'undo {bench.args.undo_mib} MiB', measure, values, None)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=3,
                        help='runs per side of the commit and read steps '
                             '(default 3)')
    parser.add_argument('--pack-rounds', type=int, default=1,
                        help='runs per side of the pack and undo steps '
                             '(default 1: filling 20,000 blobs is slow)')
    parser.add_argument('--pack-blobs', default='2000,20000',
                        help='blob counts of the pack step (default '
                             '%(default)s)')
    parser.add_argument('--garbage', type=int, default=200,
                        help='garbage blobs at each pack (default 200)')
    parser.add_argument('--undo-mib', type=int, default=50,
                        help='size of the undone blob (default 50)')
    parser.add_argument('--quick', action='store_true',
                        help='a short run: 1 round, fewer transactions, '
                             'pack at 400 blobs, a 5 MiB undo')
    parser.add_argument('--steps', default=','.join(STEPS),
                        help='the steps to run, of %(default)s')
    parser.add_argument('--delay-ms', type=float, default=DELAY_MS,
                        help='the commits again over proxies that hold '
                             'each request this long (default %(default)g '
                             'ms, as a network\'s round trip; 0: not again)')
    parser.add_argument('--zodbblob-only', action='store_true',
                        help='run zodbblob alone (no venv, no peer)')
    parser.add_argument('--peer-python', default=None,
                        help='python with zodb-s3blobs (default: that of '
                             'bench/.venv-s3blobs, made if missing)')
    parser.add_argument('--dir', default=None,
                        help='where the runs write (default: a new '
                             'directory under /tmp, removed at the end)')
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = args.pack_rounds = 1
        args.pack_blobs = '400'
        args.garbage = 40
        args.undo_mib = 5
    args.steps = args.steps.split(',')
    unknown = sorted(set(args.steps) - set(STEPS))
    if unknown:
        parser.error(f'--steps {",".join(unknown)}: want some of '
                     f'{",".join(STEPS)}')
    if args.delay_ms < 0:
        parser.error(f'--delay-ms {args.delay_ms:g}: want 0 or more')
    try:
        args.pack_blobs = sorted(int(n) for n in args.pack_blobs.split(','))
    except ValueError:
        parser.error(f'--pack-blobs {args.pack_blobs!r}: want numbers '
                     f'separated by commas')
    if any(n <= args.garbage for n in args.pack_blobs):
        parser.error(f'--pack-blobs {args.pack_blobs}: each must be more '
                     f'than --garbage {args.garbage}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    pythons = {'ours': sys.executable}
    if not args.zodbblob_only:
        pythons = {'peer': peer_python(args), 'ours': sys.executable}
    if args.dir is None:
        root = tempfile.mkdtemp(prefix='zodbblob-bench-objectstore-',
                                dir='/tmp')
    else:
        root = os.path.abspath(args.dir)
        os.makedirs(root, exist_ok=True)
    now = datetime.datetime.now().isoformat(timespec='seconds')
    print(f'zodbblob object store benchmark, {now}')
    print(f'{hardware(root)}\nPython {platform.python_version()}, ZODB '
          f'{package_version("ZODB")}, boto3 {package_version("boto3")}, '
          f'moto {package_version("moto")}, zodbblob '
          f'{package_version("zodbblob")} from '
          f'{os.path.dirname(zodbblob.__file__)}')
    if 'peer' in pythons:
        peer = subprocess.run(
            [pythons['peer'], '-c', 'from importlib.metadata import version;'
             'import platform; print(version("zodb-s3blobs"),'
             'platform.python_version())'],
            capture_output=True, text=True, check=True).stdout.split()
        print(f'zodb-s3blobs {peer[0]} on Python {peer[1]} '
              f'({pythons["peer"]})')
    print(f'load average at start: {load_average()}', flush=True)
    started = time.perf_counter()
    delays = (0.0, args.delay_ms / 1000) if args.delay_ms else (0.0,)
    server = Server(root, tuple(pythons), delays)
    try:
        bench = Bench(args, server, root, pythons)
        bench.run()
    finally:
        server.stop()
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f'load average at end: {load_average()}; '
          f'{time.perf_counter() - started:.0f} s in all; steps '
          f'{",".join(args.steps)}; {args.rounds} rounds of commits and '
          f'reads, {args.pack_rounds} of pack and undo; medians; commits '
          f'also with {args.delay_ms:g} ms per request')
    print()
    print(report(bench))
    print()
    for side in bench.sides:
        for (key, of), results in sorted(bench.results.items()):
            for result in results:
                if of == side == 'peer' and 'error' in result:
                    print(f'peer    {key}: {result["error"]}')
    if bench.failures:
        for failure in bench.failures:
            print(f'FAILED  {failure}')
        return 1
    print('ok    every zodbblob run read back every blob it committed, '
          'and its packs left exactly the live keys')
    return 0


if __name__ == '__main__':
    sys.exit(main())
