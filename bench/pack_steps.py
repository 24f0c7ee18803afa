"""The blob phase of zodbblob's pack, step by step.

Not a test: a benchmark that copies a store built by ``scale.py``,
commits new revisions of 200 of its blobs (or ``--garbage``), warms the
copy as ``scale.py --warm`` does, and packs it in a child process that
wraps each step of the blob phase with a timer: the packed ``Data.fs``'s
fsync, the catalog's garbage marks, the ``loadSerial`` that confirms
each, the unlinks, the catalog's delete, the end of the pack, and the
``syncfs`` of any checkpoint (the one at close included, which is after
the pack).  It prints one line per run, seconds.

Run from the project root, after ``scale.py`` built the store:

    .venv/bin/python bench/pack_steps.py /work/scale-stores/1000000 \\
        1000000 [--runs 3] [--garbage 200]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale  # noqa: E402

CHILD = r'''
import json, sys, time
sys.path.insert(0, sys.argv[2])
import scale
import zodbblob.storage.checkpoint as checkpoint
import zodbblob.storage.pack as pack
from zodbblob.storage.catalog import Journal

times = {}


def timed(owner, name, label):
    function = getattr(owner, name)

    def wrapper(*args, **kw):
        start = time.perf_counter()
        try:
            return function(*args, **kw)
        finally:
            times[label] = times.get(label, 0) + time.perf_counter() - start

    setattr(owner, name, wrapper)


timed(pack, 'sync_packed_base', 'packed Data.fs fsync')
timed(pack, 'base_has', 'loadSerial')
timed(pack, 'remove_if_exists', 'unlinks')
timed(checkpoint, 'sync_filesystem', 'syncfs (checkpoints)')
timed(Journal, 'mark_garbage', 'mark')
timed(Journal, 'remove', 'catalog delete')
timed(Journal, 'end_pack', 'end')
result = scale.child_pack('zodbblob', sys.argv[1])
result['steps'] = times
print(json.dumps(result))
'''


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('store', help="a size's directory built by scale.py")
    parser.add_argument('blobs', type=int, help='how many blobs it has')
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--garbage', type=int, default=200)
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.store, 'built')):
        parser.error(f'{args.store}: no store built by scale.py there')
    work = os.path.join(args.store, 'steps')
    copy = os.path.join(work, 'zodbblob')
    try:
        for _ in range(args.runs):
            shutil.rmtree(work, ignore_errors=True)
            scale.copy_store(os.path.join(args.store, 'base'), copy, True)
            scale.make_garbage(copy, args.blobs, args.garbage)
            scale.warm(copy)
            os.sync()
            child = subprocess.run(
                [sys.executable, '-c', CHILD, copy,
                 os.path.dirname(os.path.abspath(__file__))],
                capture_output=True, text=True)
            if child.returncode:
                raise SystemExit(child.stderr)
            result = json.loads(child.stdout.splitlines()[-1])
            steps = ', '.join('%s %.4f' % item
                              for item in sorted(result['steps'].items()))
            print('%d blobs, %d garbage: blob phase %.4f (base pack %.2f); '
                  '%s' % (args.blobs, args.garbage, result['blob_phase'],
                          result['base_pack'], steps), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
