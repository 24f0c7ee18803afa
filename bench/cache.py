"""ZEO client blob cache: stock ZEO 6.2 against zodbblob.cache.BlobCache.

Not a test: a benchmark that times the size check, eviction and the
cache-hit path of both caches in one run, and prints the ratios.

Both caches keep the same files in the same place (layout ``zeocache``:
``<oid % 997>/<oid // 997>.<tid hex>.blob``), so each size gets two
directories holding identical files: 100 bytes each, oids ``0 .. n-1``,
one revision each, with access times one millisecond apart in a random
order, all a day old.  Stock's directory is the files and its layout
marker; ours is the same, adopted by opening a ``BlobCache`` on it (its
scan of the directory builds the index).  Building is not timed; its time
is printed on its own.

Rows:

no-op check
    The cache is under its limit, nothing to evict.  Stock:
    ``ZEO.ClientStorage._check_blob_cache_size(blob_dir, target)`` with
    `target` above the total, which is what stock's checker thread runs
    after downloads: it lists and stats every file.  Ours:
    ``cache.prune()`` with a size limit of twice the total (the flush, the
    prune lease, one look at the total in the index).
evict 10%
    A target 10% under the total, so the least recently accessed 10% of
    the files must go (the same files on both sides: stock orders by
    atime, ours by the index's access time, which adoption took from the
    atime).  Stock: ``_check_blob_cache_size(blob_dir, 0.9 * total)``;
    ours: ``cache.prune(size_limit=total)`` with ``check_percent=10``.
    Between repeats the evicted files are written again with their times
    (and, for ours, the index file is put back from a copy taken before
    the first eviction, and the cache reopened, its sizes preloaded and
    one no-op prune run, as in a client that has been running: the first
    write to a new index's log syncs it), untimed, then ``os.sync()``:
    the files to evict are on disk, as in a cache that has run for a
    while (removing a file whose blocks were never written is much
    cheaper).  Ours checkpoints its index in a thread after a prune; the
    next repeat waits for it, untimed.
os.remove of those files alone
    The same files removed by ``os.remove``, nothing else: in one thread
    (the floor under stock's eviction), and spread over as many threads
    as a ``BlobCache`` removes files with (``REMOVAL_THREADS`` where
    removing a file only works, ``PRUNE_THREADS`` where it waits for the
    disk: the lower is the floor under ours).
cache hit
    Random keys over the cache of ``--hit-files`` files, a new sequence
    each round, the same for every side; again over a working set of
    50,000 of them; and each file once, in a ``BlobCache`` opened just
    before the round, so that no size is remembered yet and every hit
    reads the index.  Stock, as ``ClientStorage.loadBlob`` and its
    caller: ``os.path.exists(path)``, ``_accessed(path)`` (a stat and a
    utime), ``open(path, 'rb').close()``.  Ours: ``cache.lookup(oid,
    tid)`` (a stat, a lookup of the size it remembers for the last
    ``KNOWN_SIZES`` files it read, the access batched and appended to the
    index's access log every ~1024 hits, the log folded into the rows
    every ~262,144) and the same ``open``.  The paths of stock are
    computed beforehand; ours computes its path inside ``lookup``, so a
    second stock row computes its path as ``loadBlob`` does
    (``BlobCacheLayout.getBlobFilePath`` and a join).

cold download
    Against a real ZEO server process on 127.0.0.1
    (``zodbblob.tests.counting_server``: stock ``FileStorage`` with a blob
    directory, writing down every blob it sends), one blob of
    ``--download-mib`` MiB, committed beforehand: a client connected to
    an empty cache directory reads it with ``loadBlob(oid, tid)``, timed
    from the call to its return, stock ``ZEO.ClientStorage`` against
    ``zodbblob.zeo.ClientStorage``.  Then ``--readers`` threads of one
    client, released together, read it cold at once: wall time from
    their release until the last has its file, and the blobs the server
    sent meanwhile.  Each round starts both clients afresh (a new cache
    directory), alternating which goes first, ``os.sync()`` before each
    timing; every reader's file is checked against the bytes committed.

churn
    Against the same kind of server: ``--churn-files`` blobs of
    ``--churn-kib`` KiB, ten times as many bytes as the cache's
    ``blob_cache_size`` (``blob_cache_size_check`` 10), read by
    ``--readers`` threads of one client, ``--churn-reads`` random ones
    each (``openCommittedBlobFile`` and a read of every byte), stock
    ``ZEO.ClientStorage`` against ``zodbblob.zeo.ClientStorage``, each
    with a new cache directory.  A thread walks the cache directory
    every 10 ms meanwhile: the peak of the bytes of its files (blob files
    and downloads under way) over the size, and the blobs the server
    sent.  ``--churn`` runs this row alone.

Stock is timed for sizes up to ``--stock-max`` files; for larger sizes its
figure is extrapolated linearly from the largest size measured, and
labelled so.  Each figure is the median of several repeats; every timing
comes after one untimed run of the same operation, so the page cache
(the directory entries, the inodes, the index file) is warm for both
sides.  Nothing drops the cache.  ``os.sync()`` runs after the build and
before every eviction and every round of hits, so no writeback of what
came before lands on the clock.

Checks (exit 1 on failure): both sides evict the same number of files,
exactly the oldest ones; the no-op check removes nothing; every hit finds
its file; every download has the committed bytes; zodbblob's concurrent
readers cause exactly one transfer.

Run from the project root:

    /tmp/venv/bin/python bench/cache.py [--sizes 10000,100000,1000000]
        [--quick] [--repeat 3] [--hits 100000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import ZEO.ClientStorage
import ZODB
from ZODB.blob import Blob

import zodbblob.zeo
from zodbblob.testing import ServerProcess, free_port

from zodbblob.cache import BUCKETS
from zodbblob.cache import INDEX
from zodbblob.cache import KNOWN_SIZES
from zodbblob.cache import PRUNE_THREADS
from zodbblob.cache import REMOVAL_THREADS
from zodbblob.cache import BlobCache
from zodbblob.layout import LAYOUT_MARKER
from machine import hardware, package_version  # bench/machine.py

PAYLOAD = b'x' * 100
TID0 = 0x03E0_0000_0000_0000   # an arbitrary tid of 2020s vintage
AGE = 86400.0                  # every file was last accessed a day ago
STEP = 0.001                   # s between two files' access times
EVICT_PERCENT = 10
# Disk per 100-byte file on ext4: one 4 KiB block plus its directory
# entry; the inode comes out of the preallocated table (counted apart).
BYTES_PER_FILE = 4096 + 64
INDEX_BYTES_PER_FILE = 200     # the index and its copy, generously
GiB = 1024 ** 3
# Hits over fewer keys than the cache has files.
WORKING_SET = 50_000


class Population:
    """The files of one size: oid ``i`` has tid ``TID0 + i`` and the
    access time ``start + rank[i] * STEP``."""

    def __init__(self, count: int, seed: int, start: float):
        self.count = count
        self.start = start
        self.order = list(range(count))          # oids, oldest access first
        random.Random(seed).shuffle(self.order)
        self.rank = [0] * count
        for rank, oid in enumerate(self.order):
            self.rank[oid] = rank
        self.evicted = count - (count * (100 - EVICT_PERCENT)) // 100

    @staticmethod
    def key(oid: int) -> tuple[bytes, bytes]:
        return oid.to_bytes(8, 'big'), (TID0 + oid).to_bytes(8, 'big')

    @staticmethod
    def path(directory: str, oid: int) -> str:
        base, bucket = divmod(oid, BUCKETS)
        return os.path.join(directory, str(bucket),
                            f'{base}.{TID0 + oid:016x}.blob')

    def write(self, directory: str, oid: int) -> None:
        path = self.path(directory, oid)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, PAYLOAD)
        finally:
            os.close(fd)
        when = self.start + self.rank[oid] * STEP
        os.utime(path, (when, when))

    def build(self, directory: str) -> None:
        os.makedirs(directory)
        with open(os.path.join(directory, LAYOUT_MARKER), 'w') as marker:
            marker.write('zeocache')
        for bucket in range(min(self.count, BUCKETS)):
            os.mkdir(os.path.join(directory, str(bucket)))
        for oid in range(self.count):
            self.write(directory, oid)

    def restore(self, directory: str) -> None:
        """Write the files that an eviction of 10% removed, again."""
        for oid in self.order[:self.evicted]:
            self.write(directory, oid)

    @property
    def total(self) -> int:
        return self.count * len(PAYLOAD)


def count_files(directory: str) -> int:
    count = 0
    with os.scandir(directory) as buckets:
        for bucket in buckets:
            if bucket.name.isdigit() and bucket.is_dir():
                with os.scandir(bucket.path) as entries:
                    count += sum(entry.name.endswith('.blob')
                                 for entry in entries)
    return count


def remove_all(paths: list[str], threads: int) -> None:
    if threads == 1:
        for path in paths:
            os.remove(path)
        return
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(os.remove, paths, chunksize=16):
            pass


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


class Failures(list):

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            print(f'CHECK FAILED: {message}', flush=True)
            self.append(message)


# stock

def stock_check(directory: str, target: int) -> None:
    ZEO.ClientStorage._check_blob_cache_size(directory, target)


def stock_hits(paths: list[str]) -> float:
    exists = os.path.exists
    accessed = ZEO.ClientStorage._accessed
    start = time.perf_counter()
    for path in paths:
        if not exists(path):
            raise AssertionError(f'stock cache miss: {path}')
        open(accessed(path), 'rb').close()
    return time.perf_counter() - start


def stock_hits_with_path(directory: str,
                         keys: list[tuple[bytes, bytes]]) -> float:
    # What loadBlob computes through its FilesystemHelper.getBlobFilename.
    base = os.path.abspath(directory) + os.path.sep
    layout = ZEO.ClientStorage.BlobCacheLayout()
    exists = os.path.exists
    accessed = ZEO.ClientStorage._accessed
    join = os.path.join
    start = time.perf_counter()
    for oid, tid in keys:
        path = join(base, layout.getBlobFilePath(oid, tid))
        if not exists(path):
            raise AssertionError(f'stock cache miss: {path}')
        open(accessed(path), 'rb').close()
    return time.perf_counter() - start


# ours

def ours_hits(cache: BlobCache, keys: list[tuple[bytes, bytes]]) -> float:
    lookup = cache.lookup
    start = time.perf_counter()
    for oid, tid in keys:
        path = lookup(oid, tid)
        if path is None:
            raise AssertionError(f'zodbblob cache miss: {oid!r} {tid!r}')
        open(path, 'rb').close()
    # The batched accesses are part of the cost of the hits.
    cache.flush()
    return time.perf_counter() - start


def ours_restore(cache: BlobCache, population: Population, backup: str,
                 size_limit: int) -> BlobCache:
    directory = cache.directory
    cache.close()
    index = os.path.join(directory, INDEX)
    for suffix in ('-wal', '-shm'):
        if os.path.exists(index + suffix):
            os.remove(index + suffix)
    shutil.copyfile(backup, index)
    population.restore(directory)
    return running(BlobCache(directory, size_limit=size_limit,
                             check_percent=10))


def running(cache: BlobCache) -> BlobCache:
    """`cache` as in a client that has been running: its sizes preloaded,
    a no-op prune run."""
    cache._preloading.join()
    limit = cache.size_limit
    cache.prune(size_limit=2 * limit)
    return cache


# the runs

class Results:

    def __init__(self):
        self.build = {}        # (side, count) -> seconds (ours: files, scan)
        self.times = {}        # (operation, side, count) -> [seconds]
        self.hits = {}         # (row, side) -> [seconds per hit]
        self.hit_files = None
        self.working_set = None
        self.extrapolated_from = None
        self.downloads = {}    # (row, side) -> [seconds]
        self.transfers = {}    # side -> [blobs sent per concurrent round]


def run_size(count: int, args, root: str, results: Results,
             failures: Failures) -> None:
    population = Population(count, seed=count, start=time.time() - AGE)
    stock_dir = os.path.join(root, f'stock-{count}')
    ours_dir = os.path.join(root, f'ours-{count}')
    with_stock = count <= args.stock_max
    total = population.total
    k = population.evicted
    print(f'\n{count:,} files ({total:,} bytes); evicting 10% = {k:,} files',
          flush=True)

    if with_stock:
        seconds = timed(lambda: population.build(stock_dir))
        results.build['stock', count] = (seconds,)
        print(f'  built stock: {seconds:.1f} s', flush=True)
    files = timed(lambda: population.build(ours_dir))
    caches = []
    scan = timed(lambda: caches.append(BlobCache(ours_dir)))
    caches[0].close()
    results.build['ours', count] = (files, scan)
    print(f'  built ours: {files:.1f} s files + {scan:.1f} s adoption scan',
          flush=True)
    # The build's writeback must not land on the first side's clock.
    os.sync()

    repeat_noop = max(args.repeat, 5 if count <= 10_000 else args.repeat)

    # no-op check
    if with_stock:
        target = 2 * total
        stock_check(stock_dir, target)             # warm-up
        samples = [timed(lambda: stock_check(stock_dir, target))
                   for _ in range(repeat_noop)]
        results.times['noop', 'stock', count] = samples
        failures.check(
            count_files(stock_dir) == count,
            f'stock no-op check at {count} removed files')
        print(f'  stock no-op check: {fmt_list(samples)}', flush=True)
    cache = BlobCache(ours_dir, size_limit=2 * total, check_percent=10)
    cache.prune()                                  # warm-up
    samples, removed = [], []
    for _ in range(max(21, repeat_noop)):
        start = time.perf_counter()
        removed.append(cache.prune())
        samples.append(time.perf_counter() - start)
    cache.close()
    results.times['noop', 'ours', count] = samples
    failures.check(set(removed) == {(0, 0)},
                   f'zodbblob no-op prune at {count} removed {removed}')
    print(f'  zodbblob no-op prune: {fmt_list(samples)}', flush=True)

    # evict 10%
    oldest_kept = population.order[k]
    newest_evicted = population.order[k - 1]
    if with_stock:
        target = total - total * EVICT_PERCENT // 100
        samples = []
        for attempt in range(args.repeat + 1):
            # The evicted files are on disk, as in a cache that has run for
            # a while: removing a file whose blocks were never written is
            # ten times cheaper here.
            os.sync()
            seconds = timed(lambda: stock_check(stock_dir, target))
            if attempt == 0:
                # The first one is the warm-up, but it must do the work
                # right like every other.
                failures.check(
                    count_files(stock_dir) == count - k
                    and not os.path.exists(
                        population.path(stock_dir, newest_evicted))
                    and os.path.exists(
                        population.path(stock_dir, oldest_kept)),
                    f'stock eviction at {count}: not exactly the oldest '
                    f'{k} files')
            else:
                samples.append(seconds)
            population.restore(stock_dir)
        results.times['evict', 'stock', count] = samples
        print(f'  stock eviction: {fmt_list(samples)}', flush=True)
    # The floor of both: removing those files and nothing else.  The
    # index does not notice (the cache is closed; the same files are back
    # before it opens).
    paths = [population.path(ours_dir, oid)
             for oid in population.order[:k]]
    for threads in (1, REMOVAL_THREADS, PRUNE_THREADS):
        samples = []
        for _ in range(args.repeat):
            os.sync()
            samples.append(timed(lambda: remove_all(paths, threads)))
            population.restore(ours_dir)
        results.times['unlink', threads, count] = samples
        print(f'  removing the {k:,} files alone, {threads} thread(s): '
              f'{fmt_list(samples)}', flush=True)
    backup = os.path.join(root, f'index-{count}.copy')
    shutil.copyfile(os.path.join(ours_dir, INDEX), backup)
    cache = running(BlobCache(ours_dir, size_limit=total, check_percent=10))
    samples = []
    for attempt in range(args.repeat + 1):
        if cache._index.checkpointing is not None:
            cache._index.checkpointing.join()
        os.sync()
        start = time.perf_counter()
        removed = cache.prune()
        seconds = time.perf_counter() - start
        if attempt == 0:
            failures.check(
                removed == (k, k * len(PAYLOAD))
                and cache.stats()['files'] == count - k
                and count_files(ours_dir) == count - k
                and not os.path.exists(
                    population.path(ours_dir, newest_evicted))
                and os.path.exists(population.path(ours_dir, oldest_kept)),
                f'zodbblob eviction at {count}: not exactly the oldest {k} '
                f'files ({removed})')
        else:
            samples.append(seconds)
        cache = ours_restore(cache, population, backup, total)
    cache.close()
    os.remove(backup)
    results.times['evict', 'ours', count] = samples
    print(f'  zodbblob eviction: {fmt_list(samples)}', flush=True)

    if with_stock and count == args.hit_files:
        run_hits(population, stock_dir, ours_dir, args, results)

    for directory in (stock_dir, ours_dir):
        shutil.rmtree(directory, ignore_errors=True)


def run_downloads(args, root: str, results: Results,
                  failures: Failures) -> None:
    """The cold download rows, against a counting ZEO server process."""
    directory = os.path.join(root, 'server')
    os.makedirs(directory)
    address = ('127.0.0.1', free_port())
    server = ServerProcess(
        [sys.executable, '-m', 'zodbblob.tests.counting_server', directory,
         str(address[1]), 'stock'],
        address, cwd=directory, log_path=os.path.join(directory, 'log'))
    server.start()
    try:
        payload = os.urandom(args.download_mib * 1024 * 1024)
        db = ZODB.DB(ZEO.ClientStorage.ClientStorage(
            address, blob_dir=os.path.join(root, 'committer'),
            wait_timeout=30))
        try:
            with db.transaction() as conn:
                conn.root()['blob'] = Blob(payload)
            with db.transaction() as conn:
                blob = conn.root()['blob']
                blob._p_activate()
                key = blob._p_oid, blob._p_serial
        finally:
            db.close()
        print(f'\ncold downloads of one {args.download_mib} MiB blob, '
              f'{args.download_rounds} rounds; {args.readers} readers at '
              f'once', flush=True)
        sides = {'stock': ZEO.ClientStorage.ClientStorage,
                 'ours': zodbblob.zeo.ClientStorage}
        sent = os.path.join(directory, 'sent')
        for round_ in range(args.download_rounds + 1):
            order = list(sides) if round_ % 2 else list(sides)[::-1]
            for readers in (1, args.readers):
                for side in order:
                    before = count_lines(sent)
                    seconds, paths_ok = cold_read(
                        sides[side], address, key, readers, root, payload)
                    transfers = count_lines(sent) - before
                    failures.check(
                        paths_ok,
                        f'{side}: a cold download of {readers} reader(s) '
                        f'does not have the committed bytes')
                    if side == 'ours':
                        failures.check(
                            transfers == 1,
                            f'zodbblob: {readers} cold reader(s) caused '
                            f'{transfers} transfers')
                    if round_ == 0:
                        continue  # the warm-up round
                    row = 'single' if readers == 1 else 'concurrent'
                    results.downloads.setdefault((row, side), []).append(
                        seconds)
                    if readers > 1:
                        results.transfers.setdefault(side, []).append(
                            transfers)
        for row in ('single', 'concurrent'):
            for side in sides:
                print(f'  {row} {side}: '
                      f'{fmt_list(results.downloads[row, side])}',
                      flush=True)
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def run_churn(args, root: str) -> tuple[str, bool]:
    """The churn row, against a counting ZEO server process: its table,
    and whether every read had the committed bytes."""
    directory = os.path.join(root, 'churn-server')
    os.makedirs(directory)
    address = ('127.0.0.1', free_port())
    server = ServerProcess(
        [sys.executable, '-m', 'zodbblob.tests.counting_server', directory,
         str(address[1]), 'stock'],
        address, cwd=directory, log_path=os.path.join(directory, 'log'))
    server.start()
    size = args.churn_files * args.churn_kib * 1024 // 10
    try:
        payloads = [os.urandom(args.churn_kib * 1024)
                    for _ in range(args.churn_files)]
        db = ZODB.DB(ZEO.ClientStorage.ClientStorage(
            address, blob_dir=os.path.join(root, 'churn-committer'),
            wait_timeout=30))
        try:
            with db.transaction() as conn:
                conn.root()['blobs'] = [Blob(data) for data in payloads]
            with db.transaction() as conn:
                keys = []
                for blob in conn.root()['blobs']:
                    blob._p_activate()
                    keys.append((blob._p_oid, blob._p_serial))
        finally:
            db.close()
        print(f'\nchurn: {args.churn_files} blobs of {args.churn_kib} KiB '
              f'through a cache of {size / 2 ** 20:.1f} MiB, '
              f'{args.readers} readers x {args.churn_reads} reads',
              flush=True)
        sent = os.path.join(directory, 'sent')
        rows, correct = [], True
        for side, factory in (('stock', ZEO.ClientStorage.ClientStorage),
                              ('ours', zodbblob.zeo.ClientStorage)):
            before = count_lines(sent)
            peak, ok, seconds = churn(factory, address, keys, payloads,
                                      size, args, root)
            correct = correct and ok
            downloads = count_lines(sent) - before
            rows.append((side, peak / size, downloads, seconds))
            print(f'  {side}: peak {peak / size:.2f} x the size, '
                  f'{downloads} downloads, {seconds:.1f} s', flush=True)
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    reads = args.readers * args.churn_reads
    lines = [f'churn ({args.churn_files} x {args.churn_kib} KiB blobs, '
             f'cache {size / 2 ** 20:.1f} MiB, {args.readers} readers, '
             f'{reads} reads)   peak/size   downloads   downloads/reads',
             '-' * 100]
    for side, ratio, downloads, _ in rows:
        lines.append(f'  {side:<8}{ratio:>60.2f}{downloads:>12}'
                     f'{downloads / reads:>18.2f}')
    return '\n'.join(lines), correct


def churn(factory, address, keys, payloads, size, args, root):
    """``(peak bytes, every read right, seconds)`` of one side."""
    cache_dir = tempfile.mkdtemp(prefix='churn-', dir=root)
    storage = factory(address, blob_dir=cache_dir, wait_timeout=30,
                      blob_cache_size=size, blob_cache_size_check=10)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, cache_bytes(cache_dir))
            done.wait(0.01)

    wrong = []

    def read(seed):
        chosen = random.Random(seed)
        for _ in range(args.churn_reads):
            number = chosen.randrange(len(keys))
            with storage.openCommittedBlobFile(*keys[number]) as f:
                if f.read() != payloads[number]:
                    wrong.append(number)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(args.readers) as pool:
            for result in [pool.submit(read, seed)
                           for seed in range(args.readers)]:
                result.result()
    finally:
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        storage.close()
        shutil.rmtree(cache_dir, ignore_errors=True)
    return peak, not wrong, seconds


def cache_bytes(directory: str) -> int:
    """Bytes of the files below `directory` but zodbblob's index, lock
    and marker (blob files, downloads under way)."""
    total = 0
    for dirpath, _, names in os.walk(directory):
        for name in names:
            if name.startswith(('.zodbblob-cache', '.layout', '.lock')):
                continue
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def cold_read(factory, address, key, readers: int, root: str,
              payload: bytes) -> tuple[float, bool]:
    """`readers` threads of one new client, with an empty cache, reading
    the blob `key` at once: the seconds until the last has its file, and
    whether every file has `payload`."""
    cache_dir = tempfile.mkdtemp(prefix='cold-', dir=root)
    storage = factory(address, blob_dir=cache_dir, wait_timeout=30)
    try:
        paths = [None] * readers
        finished = [0.0] * readers
        barrier = threading.Barrier(readers + 1)

        def read(number):
            barrier.wait()
            paths[number] = storage.loadBlob(*key)
            finished[number] = time.perf_counter()

        threads = [threading.Thread(target=read, args=(number,))
                   for number in range(readers)]
        for thread in threads:
            thread.start()
        os.sync()
        barrier.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        return (max(finished) - start,
                all(read_bytes(path) == payload for path in paths))
    finally:
        storage.close()
        shutil.rmtree(cache_dir, ignore_errors=True)


def count_lines(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def read_bytes(path) -> bytes | None:
    if path is None:
        return None
    with open(path, 'rb') as f:
        return f.read()


def run_hits(population: Population, stock_dir: str, ours_dir: str, args,
             results: Results) -> None:
    count = population.count
    results.hit_files = count
    results.working_set = min(count, WORKING_SET)
    rng = random.Random(1)
    working_set = rng.sample(range(count), results.working_set)
    # A fresh cache on ours' directory, as a client process starts.
    cache = BlobCache(ours_dir)
    print(f'  cache hits: {args.hits:,} per round, {args.rounds} rounds; '
          f'a BlobCache remembers {KNOWN_SIZES:,} sizes', flush=True)
    for row, universe in (('random', range(count)),
                          ('working set', working_set),
                          ('first', range(count))):
        # A new sequence of keys each round (the same for every side), so
        # that over the rounds the keys are as many as the universe, and a
        # warm-up round before them.  The first hits are each key's first
        # in a BlobCache opened just before the round.
        rounds = []
        for _ in range(args.rounds + 1):
            if row == 'first':
                oids = rng.sample(universe, min(args.hits, count))
            else:
                oids = rng.choices(universe, k=args.hits)
            rounds.append(([population.key(oid) for oid in oids],
                           [population.path(stock_dir, oid)
                            for oid in oids]))
        keys, paths = rounds[0]
        stock_hits(paths)
        ours_hits(cache, keys)
        sides = ('stock', 'stock+path', 'ours')
        for side in sides:
            results.hits[row, side] = []
        for round_, (keys, paths) in enumerate(rounds[1:]):
            runs = {'stock': lambda: stock_hits(paths),
                    'stock+path': lambda: stock_hits_with_path(stock_dir,
                                                               keys),
                    'ours': lambda: ours_hits(cache, keys)}
            # Alternate who goes first, so a drift lands on both sides.
            for side in sides if round_ % 2 == 0 else sides[::-1]:
                if side == 'ours' and row == 'first':
                    cache.close()
                    cache = BlobCache(ours_dir)
                # The other side's dirty inodes or index pages are written
                # back off its clock, not on this one's.
                os.sync()
                results.hits[row, side].append(runs[side]() / len(keys))
        print(f'    {row}: stock '
              f'{statistics.median(results.hits[row, "stock"]) * 1e6:.2f} '
              f'us, zodbblob '
              f'{statistics.median(results.hits[row, "ours"]) * 1e6:.2f} us',
              flush=True)
    cache.close()


# the report

def fmt_ms(seconds: float) -> str:
    ms = seconds * 1000
    if ms >= 100:
        return f'{ms:,.0f}'
    if ms >= 10:
        return f'{ms:.1f}'
    if ms >= 1:
        return f'{ms:.2f}'
    return f'{ms:.3f}'


def fmt_ratio(ratio: float) -> str:
    return f'{ratio:,.0f}x' if ratio >= 100 else f'{ratio:.1f}x'


def fmt_list(samples: list[float]) -> str:
    return ', '.join(f'{fmt_ms(s)} ms' for s in samples)


def report(sizes: list[int], args, results: Results) -> tuple[str, list]:
    lines = ['| operation | files | stock ms | zodbblob ms | stock / zodbblob |',
             '| --- | ---: | ---: | ---: | ---: |']
    names = {'noop': 'no-op check (under the limit)',
             'evict': f'evict {EVICT_PERCENT}% (least recently accessed)'}
    measured = [n for n in sizes if ('noop', 'stock', n) in results.times]
    ratios = {}
    for operation in ('noop', 'evict'):
        for count in sizes:
            ours = statistics.median(results.times[operation, 'ours', count])
            stock_samples = results.times.get((operation, 'stock', count))
            if stock_samples is not None:
                stock = statistics.median(stock_samples)
                stock_cell = fmt_ms(stock)
            elif measured:
                base = max(measured)
                stock = (statistics.median(
                    results.times[operation, 'stock', base]) * count / base)
                stock_cell = f'{fmt_ms(stock)} (extrapolated from {base:,})'
            else:
                stock = None
                stock_cell = 'not run'
            ratio = stock / ours if stock is not None else None
            ratios[operation, count] = (ratio, stock_samples is not None)
            lines.append(
                f'| {names[operation]} | {count:,} | {stock_cell} | '
                f'{fmt_ms(ours)} | '
                f'{fmt_ratio(ratio) if ratio is not None else "-"} |')
    for count in sizes:
        floor = fmt_ms(statistics.median(results.times['unlink', 1, count]))
        lines.append(f'| `os.remove` of those {EVICT_PERCENT}% alone, one '
                     f'thread (stock\'s floor) | {count:,} | {floor} | - | - |')
        for threads in (REMOVAL_THREADS, PRUNE_THREADS):
            threaded = fmt_ms(statistics.median(
                results.times['unlink', threads, count]))
            lines.append(f'| `os.remove` of those {EVICT_PERCENT}% alone, '
                         f'{threads} threads (zodbblob uses one of these) | '
                         f'{count:,} | - | {threaded} | - |')

    lines += ['', '| cache hit, then open | keys | stock us | zodbblob us '
              '| zodbblob / stock |', '| --- | --- | ---: | ---: | ---: |']
    hit_ratio = None
    if results.hit_files is not None:
        keys = {'random': f'random over {results.hit_files:,}',
                'working set': f'random over {results.working_set:,} '
                               f'of them',
                'first': 'each once, in a new `BlobCache`'}
        for row in ('random', 'working set', 'first'):
            ours = statistics.median(results.hits[row, 'ours'])
            for side, label in (('stock', 'stock path given'),
                                ('stock+path', 'stock computes its path')):
                stock = statistics.median(results.hits[row, side])
                ratio = ours / stock
                if row == 'random' and side == 'stock':
                    hit_ratio = ratio
                lines.append(f'| {label} | {keys[row]} | {stock * 1e6:.2f} '
                             f'| {ours * 1e6:.2f} | {ratio:.2f}x |')

    download_verdicts = []
    if results.downloads:
        mib = args.download_mib
        lines += ['', f'| cold download of one {mib} MiB blob | stock ms '
                  f'| zodbblob ms | stock / zodbblob |',
                  '| --- | ---: | ---: | ---: |']
        medians = {key: statistics.median(samples)
                   for key, samples in results.downloads.items()}
        for row, label in (('single', 'one reader'),
                           ('concurrent', f'{args.readers} readers of one '
                                          f'client at once')):
            stock, ours = medians[row, 'stock'], medians[row, 'ours']
            lines.append(f'| {label} | {fmt_ms(stock)} | {fmt_ms(ours)} | '
                         f'{stock / ours:.2f}x |')
        lines.append(
            f'| one reader, MiB/s | {mib / medians["single", "stock"]:.0f} '
            f'| {mib / medians["single", "ours"]:.0f} | - |')
        lines.append(
            f'| blobs sent per round of {args.readers} readers | '
            f'{", ".join(map(str, results.transfers["stock"]))} | '
            f'{", ".join(map(str, results.transfers["ours"]))} | - |')
        ratio = medians['single', 'stock'] / medians['single', 'ours']
        download_verdicts.append(
            f'{mib} MiB cold download throughput zodbblob >= stock: '
            f'{"MET" if ratio >= 1 else "NOT MET"} ({ratio:.2f}x)')
        ratio = medians['concurrent', 'ours'] / medians['single', 'ours']
        once = set(results.transfers['ours']) == {1}
        download_verdicts.append(
            f'{args.readers} concurrent cold readers: zodbblob one '
            f'transfer, wall <= 1.2x one reader: '
            f'{"MET" if once and ratio <= 1.2 else "NOT MET"} '
            f'({ratio:.2f}x; transfers per round '
            f'{sorted(set(results.transfers["ours"]))})')

    lines += ['', '| build (untimed above) | files | s |',
              '| --- | ---: | ---: |']
    for count in sizes:
        if ('stock', count) in results.build:
            lines.append(f'| stock: write the files | {count:,} | '
                         f'{results.build["stock", count][0]:.1f} |')
        files, scan = results.build['ours', count]
        lines.append(f'| zodbblob: write the files | {count:,} | '
                     f'{files:.1f} |')
        lines.append(f'| zodbblob: adoption scan (first `BlobCache()`) | '
                     f'{count:,} | {scan:.1f} |')

    verdicts = []
    at = 100_000 if 100_000 in measured else (max(measured) if measured
                                              else None)
    for operation, goal in (('noop', 100), ('evict', 10)):
        if at is None:
            verdicts.append(f'{names[operation]} >= {goal}x faster: not run')
            continue
        ratio = ratios[operation, at][0]
        note = '' if at == 100_000 else f' (at {at:,} files, not 100,000)'
        verdicts.append(
            f'{names[operation]} >= {goal}x faster than stock at '
            f'{at:,} files: {"MET" if ratio >= goal else "NOT MET"} '
            f'({fmt_ratio(ratio)}){note}')
    if hit_ratio is None:
        verdicts.append('cache hit <= 1.1x stock: not run')
    else:
        note = ('' if results.hit_files == 100_000
                else f' (over {results.hit_files:,} files, not 100,000)')
        verdicts.append(
            f'cache hit zodbblob <= 1.1x stock: '
            f'{"MET" if hit_ratio <= 1.1 else "NOT MET"} '
            f'({hit_ratio:.2f}x){note}')
    return '\n'.join(lines), verdicts + download_verdicts


# the machine

def machine(root: str) -> str:
    described = hardware(root)
    return (f'{described}\n'
            f'Python {platform.python_version()}, ZODB '
            f'{package_version("ZODB")}, ZEO {package_version("ZEO")}, '
            f'zodbblob {package_version("zodbblob")}')


def contention() -> str:
    """The load average and, where the kernel has it, the I/O pressure:
    other work on the machine shows in both."""
    text = f'load average {" ".join(f"{v:.2f}" for v in os.getloadavg())}'
    try:
        with open('/proc/pressure/io') as f:
            some = f.readline().split()
    except OSError:
        return text
    return f'{text}; I/O pressure (some) {" ".join(some[1:4])}'


def fitting(sizes: list[int], root: str, stock_max: int) -> list[int]:
    """The sizes whose directories fit on `root`'s filesystem.

    One size's directories are removed before the next is built, so the
    largest one decides; 10% of the space and of the inodes are left.
    """
    usage = os.statvfs(root)
    space = usage.f_bavail * usage.f_frsize * 0.9
    inodes = usage.f_favail * 0.9
    kept = []
    for count in sizes:
        copies = 2 if count <= stock_max else 1
        needed = count * (copies * BYTES_PER_FILE + INDEX_BYTES_PER_FILE)
        if needed > space or copies * count > inodes:
            print(f'SKIPPED {count:,} files: needs about '
                  f'{needed / GiB:.1f} GiB and {copies * count:,} inodes; '
                  f'{space / GiB:.1f} GiB and {inodes:,.0f} inodes usable '
                  f'in {root}', flush=True)
        else:
            kept.append(count)
    return kept


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        '--sizes', default='10000,100000,1000000',
        type=lambda text: sorted(int(n) for n in text.split(',')),
        help='cache sizes in files (default: %(default)s)')
    parser.add_argument(
        '--quick', action='store_true',
        help='a smoke run: 10,000 files only, hits over them')
    parser.add_argument(
        '--stock-max', type=int, default=100_000,
        help='largest size stock is timed at; above, its figure is '
             'extrapolated (default: %(default)s)')
    parser.add_argument(
        '--hit-files', type=int, default=100_000,
        help='size of the cache of the hit rows (default: %(default)s)')
    parser.add_argument(
        '--hits', type=int, default=100_000,
        help='cache hits per round and side (default: %(default)s)')
    parser.add_argument(
        '--rounds', type=int, default=5,
        help='rounds of hits per side (default: %(default)s)')
    parser.add_argument(
        '--repeat', type=int, default=3,
        help='timed repeats of each check (default: %(default)s)')
    parser.add_argument(
        '--download-mib', type=int, default=10,
        help='size of the blob of the cold download rows, in MiB '
             '(default: %(default)s)')
    parser.add_argument(
        '--download-rounds', type=int, default=5,
        help='rounds of cold downloads per side; 0 leaves them out '
             '(default: %(default)s)')
    parser.add_argument(
        '--readers', type=int, default=8,
        help='threads reading the blob cold at once (default: %(default)s)')
    parser.add_argument(
        '--churn', action='store_true',
        help='run the churn row alone')
    parser.add_argument(
        '--churn-files', type=int, default=600,
        help='blobs of the churn row (default: %(default)s)')
    parser.add_argument(
        '--churn-kib', type=int, default=100,
        help='KiB per blob of the churn row (default: %(default)s)')
    parser.add_argument(
        '--churn-reads', type=int, default=200,
        help='reads per reader of the churn row; 0 leaves it out '
             '(default: %(default)s)')
    parser.add_argument(
        '--dir', help='where to work; a given one is kept, what is made in '
                      'it is removed (default: a temporary directory)')
    args = parser.parse_args(argv)
    if args.quick:
        args.download_rounds = min(args.download_rounds, 2)
        args.sizes = [10_000]
        args.hit_files = 10_000
        args.hits = min(args.hits, 20_000)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # The caches log their adoption scans and a prune that misses its
    # target at WARNING: worth seeing.
    logging.basicConfig(level=logging.WARNING,
                        format='%(levelname)s %(name)s: %(message)s')
    if args.dir is None:
        root = tempfile.mkdtemp(prefix='zodbblob-bench-cache-', dir='/tmp')
        remove_root = True
    else:
        root = os.path.abspath(args.dir)
        os.makedirs(root, exist_ok=True)
        remove_root = False
    now = datetime.datetime.now().isoformat(timespec='seconds')
    print(f'zodbblob blob cache benchmark, {now}')
    print(machine(root))
    print(f'at start: {contention()}', flush=True)
    results = Results()
    failures = Failures()
    started = time.perf_counter()
    churned = None
    try:
        if args.churn:
            churned, correct = run_churn(args, root)
            failures.check(correct, 'churn: a read had the wrong bytes')
            sizes = []
        else:
            sizes = fitting(args.sizes, root, args.stock_max)
            for count in sizes:
                run_size(count, args, root, results, failures)
            if args.download_rounds:
                run_downloads(args, root, results, failures)
            if args.churn_reads:
                churned, correct = run_churn(args, root)
                failures.check(correct, 'churn: a read had the wrong bytes')
    finally:
        if remove_root:
            shutil.rmtree(root, ignore_errors=True)
    if args.churn:
        print(f'\nat the end: {contention()}\n')
        print(churned)
        return 1 if failures else 0
    table, verdicts = report(sizes, args, results)
    if churned is not None:
        table = f'{table}\n\n{churned}'
    print(f'\nat the end: {contention()}')
    print(f'medians; run took {time.perf_counter() - started:.0f} s\n')
    print(table)
    print()
    for verdict in verdicts:
        print(verdict)
    if failures:
        print(f'\n{len(failures)} CHECKS FAILED')
        return 1
    print('\nall checks passed')
    return 0


if __name__ == '__main__':
    sys.exit(main())
