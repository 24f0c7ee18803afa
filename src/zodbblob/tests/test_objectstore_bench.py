"""``bench/objectstore.py --quick --zodbblob-only`` still runs.

The benchmark against zodb-s3blobs is not run in CI (the peer needs a
venv of its own); its zodbblob side is, short, so that a change of the
storage's API does not leave the script broken until someone measures.
It starts its own moto server, as it does when run by hand.
"""

import os
import subprocess
import sys
import unittest

import zodbblob
from zodbblob.testing import S3_MISSING

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(zodbblob.__file__)))), 'bench')
BENCH = os.path.join(BENCH_DIR, 'objectstore.py')
TIMEOUT = 900  # seconds: about one minute on an idle machine


@unittest.skipIf(S3_MISSING, S3_MISSING)
@unittest.skipUnless(os.path.isdir(BENCH_DIR),
                     f'{BENCH_DIR} not found: not a source checkout')
class ObjectStoreBenchTests(unittest.TestCase):

    def test_quick_zodbblob_run_prints_its_table(self):
        done = subprocess.run(
            [sys.executable, BENCH, '--quick', '--zodbblob-only'],
            capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        rows = {}
        for line in done.stdout.splitlines():
            cells = [cell.strip() for cell in line.strip('|').split('|')]
            if line.startswith('| ') and len(cells) == 3:
                rows[cells[0], cells[1]] = cells[2]
        self.assertEqual(rows['step', 'measure'], 'zodbblob')
        # The commits also over proxies that hold each request 20 ms.
        for step in ('commit 1 KiB x 1', 'commit 1 KiB x 50',
                     'commit 10 MiB x 1', 'commit 1 KiB x 50, 20 ms'):
            self.assertGreater(float(rows[step, 'blobs/s']), 0)
        self.assertGreater(float(rows['cold read 10 MiB', 'seconds']), 0)
        # 40 garbage keys, 1,000 a DeleteObjects request, and the
        # writer's record read once.
        self.assertEqual(rows['pack 400 (40 garbage)', 'S3 requests'],
                         '2')
        self.assertEqual(rows['undo 5 MiB', 'read after undo'],
                         'right bytes')
        self.assertEqual(rows['undo 5 MiB', 'read after pack'],
                         'right bytes')
        self.assertIn('ok    every zodbblob run read back every blob',
                      done.stdout)
