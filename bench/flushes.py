"""Whether this disk overlaps two syncs: what one-sync commit can gain here.

Not a test.  A commit with one sync (``doc/design.rst``, "Commit") runs
the commit record's ``fdatasync`` (S1) while the base's ``tpc_finish``
fsyncs ``Data.fs`` (S2).  That only saves time if the disk can flush for
two files at once; a disk that serializes cache flushes takes as long
for both as for one after the other.  This times, with nothing of ZODB
in the way (medians of ``--count`` rounds, in a directory on the disk to
test):

- S1 alone: a 4 KiB ``pwrite`` over a zero-filled log and ``fdatasync``;
- S2 alone: a 600-byte append to another file and ``fsync``;
- S1 then S2;
- S1 in a worker thread while S2 runs (what one-sync commit does);
- the record only written back (``sync_file_range``: written to the
  device, no cache flush), then S2, whose flush covers every write the
  device has completed.  Not built: a route to one flush that only a
  block-level power-cut test can prove (see bench/README.md).

Run from the project root:

    .venv/bin/python bench/flushes.py [--dir DIR] [--count 200]
"""

from __future__ import annotations

import argparse
import ctypes
import concurrent.futures
import os
import shutil
import statistics
import tempfile
import time

PAGE = 4096
LOG_PAGES = 256


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dir', default=None,
                        help='where to write (default: a new directory '
                             'under /tmp, removed at the end)')
    parser.add_argument('--count', type=int, default=200,
                        help='rounds per measurement (default 200)')
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix='zodbblob-bench-flushes-', dir=args.dir)
    log = os.open(os.path.join(root, 'commit.log'), os.O_RDWR | os.O_CREAT)
    data = os.open(os.path.join(root, 'Data.fs'),
                   os.O_RDWR | os.O_CREAT | os.O_APPEND)
    worker = concurrent.futures.ThreadPoolExecutor(1)
    try:
        os.pwrite(log, b'\0' * PAGE * LOG_PAGES, 0)
        os.fsync(log)

        def record(i):
            os.pwrite(log, os.urandom(PAGE), (i % LOG_PAGES) * PAGE)

        def s1(i):
            record(i)
            os.fdatasync(log)

        def s2(i):
            os.write(data, os.urandom(600))
            os.fsync(data)

        libc = ctypes.CDLL(None, use_errno=True)
        libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_uint]
        # SYNC_FILE_RANGE_WAIT_BEFORE | _WRITE | _WAIT_AFTER
        write_back = 1 | 2 | 4

        def written_back(i):
            offset = (i % LOG_PAGES) * PAGE
            os.pwrite(log, os.urandom(PAGE), offset)
            if libc.sync_file_range(log, offset, PAGE, write_back):
                raise OSError(ctypes.get_errno(), 'sync_file_range')
            s2(i)

        def serial(i):
            s1(i)
            s2(i)

        def overlapped(i):
            record(i)
            syncing = worker.submit(os.fdatasync, log)
            s2(i)
            syncing.result()

        print(f'{root}: medians of {args.count} rounds, ms')
        for name, step in (('S1 alone', s1), ('S2 alone', s2),
                           ('S1 then S2', serial),
                           ('S1 while S2 (one sync)', overlapped),
                           ('written back, then S2', written_back)):
            times = []
            for i in range(args.count):
                start = time.perf_counter()
                step(i)
                times.append(time.perf_counter() - start)
            print(f'  {name:<24} {statistics.median(times) * 1000:7.3f}')
    finally:
        worker.shutdown()
        os.close(log)
        os.close(data)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
