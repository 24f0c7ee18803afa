"""zodbblob.zeo.ClientStorage against real ZEO server processes.

Each test runs a ZEO server on 127.0.0.1 (``counting_server``) that serves
stock ``FileStorage(blob_dir=...)`` or ``zodbblob.BlobStorage`` and writes
down every blob it sends, so that "downloaded exactly once" is counted at
the server.
"""

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.POSException import ConflictError

from zodbblob.cache.tests.test_cache import cache_bytes
from zodbblob.testing import ServerProcess
from zodbblob.testing import free_port
from zodbblob.zeo import ClientStorage
from zodbblob.zeo import ClientStorageError


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def reader_command(port, cache_dir, oid, tid, threads=1):
    return [sys.executable, '-m', 'zodbblob.tests.cache_reader', str(port),
            cache_dir, oid.hex(), tid.hex(), str(threads)]


def files_below(path, skip=()):
    """Every file below `path` (relative), but names in `skip`."""
    found = []
    for directory, dirs, names in os.walk(path):
        for name in names:
            relative = os.path.relpath(os.path.join(directory, name), path)
            if not any(relative.startswith(s) for s in skip):
                found.append(relative)
    return sorted(found)


def snapshot(path):
    """Everything about a directory tree that a write would change."""
    state = {}
    for directory, dirs, names in os.walk(path):
        for name in dirs + names:
            full = os.path.join(directory, name)
            info = os.lstat(full)
            state[os.path.relpath(full, path)] = (
                info.st_ino, info.st_size, info.st_mtime_ns, info.st_mode)
    state['.'] = os.stat(path).st_mtime_ns
    return state


class ServerTestCase(unittest.TestCase):

    kind = 'zodbblob'
    delay = 0.0

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-zeo-cache-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.server_dir = os.path.join(self.dir, 'server')
        os.mkdir(self.server_dir)
        self.port = free_port()
        self.address = ('127.0.0.1', self.port)
        self.server = ServerProcess(
            [sys.executable, '-m', 'zodbblob.tests.counting_server',
             self.server_dir, str(self.port), self.kind, str(self.delay)],
            self.address, cwd=self.dir,
            log_path=os.path.join(self.dir, 'server.log'))
        self.server.start()
        self.addCleanup(self.server.stop)
        self.cache_dir = os.path.join(self.dir, 'cache')
        self.addCleanup(transaction.abort)

    def client(self, cache_dir=None, **kw):
        storage = ClientStorage(self.address,
                                blob_dir=cache_dir or self.cache_dir,
                                wait_timeout=30, **kw)
        self.addCleanup(storage.close)
        return storage

    def db(self, **kw):
        db = ZODB.DB(self.client(**kw))
        self.addCleanup(db.close)
        return db

    def sent(self):
        """What the server sent: a list of (oid, tid)."""
        try:
            with open(os.path.join(self.server_dir, 'sent')) as f:
                return [tuple(bytes.fromhex(part) for part in line.split())
                        for line in f]
        except FileNotFoundError:
            return []

    def commit_blobs(self, db, blobs):
        """Commit {key: bytes} as blobs; return {key: (oid, tid)}."""
        with db.transaction() as conn:
            root = conn.root()
            for key, data in blobs.items():
                if key in root:
                    with root[key].open('w') as f:
                        f.write(data)
                else:
                    root[key] = Blob(data)
        with db.transaction() as conn:
            return {key: self.oid_tid(conn.root()[key]) for key in blobs}

    @staticmethod
    def wait_until_seen(db, tid, timeout=10.0):
        """Wait until the client of `db` has heard of the transaction
        `tid` (another client's commit reaches it asynchronously)."""
        deadline = time.monotonic() + timeout
        while db.storage.lastTransaction() < tid:
            if time.monotonic() > deadline:
                raise AssertionError(f'{db} never heard of {tid.hex()}')
            time.sleep(0.01)

    @staticmethod
    def oid_tid(blob):
        blob._p_activate()   # a ghost's serial is not known yet
        return blob._p_oid, blob._p_serial

    def writer(self):
        """A second client, with a cache of its own, to commit with."""
        return self.db(cache_dir=os.path.join(self.dir, 'writer-cache'))


class ClientTests(ServerTestCase):

    def test_commit_and_read_back(self):
        db = self.db()
        data = os.urandom(300000)
        (oid, tid), = self.commit_blobs(db, {'a': data}).values()
        with db.transaction() as conn:
            with conn.root()['a'].open() as f:
                self.assertEqual(f.read(), data)
        # Our own commit went into the cache: nothing was downloaded.
        self.assertEqual(self.sent(), [])
        stats = db.storage.blob_cache.stats()
        self.assertEqual((stats['files'], stats['bytes']), (1, len(data)))

    def test_a_cold_read_downloads_once_and_then_hits(self):
        (oid, tid), = self.commit_blobs(self.writer(),
                                        {'a': b'x' * 100000}).values()
        storage = self.client()
        for _ in range(3):
            with storage.openCommittedBlobFile(oid, tid) as f:
                self.assertEqual(f.read(), b'x' * 100000)
        self.assertEqual(self.sent(), [(oid, tid)])

    def test_a_read_counts_one_hit_or_one_miss(self):
        # ZODB looks a blob up when it loads the object and again when
        # the reader opens it (or asks for committed()): one read.
        blobs = {f'b{number}': b'%d' % number * 1000
                 for number in range(20)}
        self.commit_blobs(self.writer(), blobs)
        db = self.db()
        cache = db.storage.blob_cache

        def read_all(how, then_ghosts=False):
            with db.transaction() as conn:
                root = conn.root()
                for key, data in blobs.items():
                    if how == 'open':
                        with root[key].open() as f:
                            self.assertEqual(f.read(), data)
                    else:
                        with open(root[key].committed(), 'rb') as f:
                            self.assertEqual(f.read(), data)
                if then_ghosts:
                    conn.cacheMinimize()   # the next read loads them again

        def counts():
            stats = cache.stats()
            return stats['hits'], stats['misses']

        read_all('open')
        self.assertEqual(counts(), (0, 20))
        self.assertEqual(len(self.sent()), 20)
        read_all('open')             # the objects are loaded: one lookup
        self.assertEqual(counts(), (20, 20))
        read_all('committed', then_ghosts=True)
        self.assertEqual(counts(), (40, 20))
        read_all('open', then_ghosts=True)   # loaded again, then opened
        self.assertEqual(counts(), (60, 20))
        read_all('committed')        # loaded again, then committed()
        self.assertEqual(counts(), (80, 20))
        self.assertEqual(len(self.sent()), 20)

    def test_a_missing_blob_raises_poskeyerror_and_leaves_nothing(self):
        from ZODB.POSException import POSKeyError
        storage = self.client()
        with self.assertRaises(POSKeyError):
            storage.loadBlob(b'\0' * 7 + b'\x09', b'\x03' * 8)
        self.assertEqual(
            files_below(self.cache_dir, skip=('.layout', '.zodbblob-cache')),
            [])

    def test_file_evicted_before_open_is_fetched_again(self):
        (oid, tid), = self.commit_blobs(self.writer(),
                                        {'a': b'bytes'}).values()
        storage = self.client()
        path = storage.loadBlob(oid, tid)
        os.remove(path)   # another process's eviction, or an operator
        with storage.openCommittedBlobFile(oid, tid) as f:
            self.assertEqual(f.read(), b'bytes')
        self.assertEqual(self.sent(), [(oid, tid), (oid, tid)])

    def test_aborted_and_conflicting_commits_leave_no_file(self):
        db = self.db()
        self.commit_blobs(db, {'a': b'first'})
        # An abort after writing.
        conn = db.open()
        with conn.root()['a'].open('w') as f:
            f.write(b'aborted')
        transaction.abort()
        conn.close()
        # A conflict: two connections change the same blob.
        tm1 = transaction.TransactionManager()
        tm2 = transaction.TransactionManager()
        conn1, conn2 = db.open(tm1), db.open(tm2)
        for conn, data in ((conn1, b'winner'), (conn2, b'loser')):
            with conn.root()['a'].open('w') as f:
                f.write(data)
        tm1.commit()
        with self.assertRaises(ConflictError):
            tm2.commit()
        tm2.abort()
        conn1.close()
        conn2.close()
        with db.transaction() as conn:
            with conn.root()['a'].open() as f:
                self.assertEqual(f.read(), b'winner')
        left = files_below(self.cache_dir,
                           skip=('.layout', '.zodbblob-cache'))
        blobs = [name for name in left if name.endswith('.blob')]
        # Only committed revisions: 'first' and 'winner'; nothing else.
        self.assertEqual(len(blobs), 2, left)
        self.assertEqual(sorted(set(left) - set(blobs)), [], left)

    def test_committed_blobs_count_toward_the_cache_size(self):
        db = self.db(blob_cache_size=250000, blob_cache_size_check=20)
        for number in range(5):
            self.commit_blobs(db, {'blob-%d' % number: b'z' * 100000})
            # Each commit admitted 100 KB, used just now: the oldest go.
            self.assertLessEqual(cache_bytes(self.cache_dir), 250000)
        stats = db.storage.blob_cache.stats()
        self.assertEqual((stats['files'], stats['bytes']), (2, 200000))
        self.assertEqual(self.sent(), [])

    def test_reading_faster_than_the_grace_stays_within_the_size(self):
        # 40 blobs of 10 KB read in a loop through a cache of 100 KB, each
        # within seconds of its last use.
        size = 100 * 1000
        blobs = {'blob-%d' % number: os.urandom(10000)
                 for number in range(40)}
        pairs = self.commit_blobs(self.writer(), blobs)
        storage = self.client(blob_cache_size=size)
        for _ in range(3):
            for key, (oid, tid) in pairs.items():
                with storage.openCommittedBlobFile(oid, tid) as f:
                    self.assertEqual(f.read(), blobs[key])
                # After each check: the size, plus 10% (the check).
                self.assertLessEqual(cache_bytes(self.cache_dir),
                                     size * 1.1)
        self.assertEqual(len(self.sent()), 120)

    def test_cache_reopened_over_its_size_is_pruned(self):
        blobs = {'blob-%d' % number: os.urandom(10000)
                 for number in range(20)}
        pairs = self.commit_blobs(self.writer(), blobs)
        storage = self.client()
        for oid, tid in pairs.values():
            storage.loadBlob(oid, tid)
        storage.close()
        self.assertEqual(cache_bytes(self.cache_dir), 200000)
        self.client(blob_cache_size=50000)
        deadline = time.monotonic() + 60
        while cache_bytes(self.cache_dir) > 50000:
            if time.monotonic() > deadline:
                self.fail(f'{self.cache_dir} holds '
                          f'{cache_bytes(self.cache_dir)} bytes after 60 s')
            time.sleep(0.01)

    def test_cache_size_is_shown_as_zeo_shows_it(self):
        # As ZEO's client-config.test reads them.
        storage = self.client(blob_cache_size=1048576000,
                              blob_cache_size_check=10)
        self.assertEqual(storage._blob_cache_size, 1048576000)
        self.assertEqual(storage._blob_cache_size_check, 104857600)
        self.assertIsNone(self.client(
            cache_dir=os.path.join(self.dir, 'unbounded'))._blob_cache_size)

    def test_files_are_readable_as_their_directory_and_not_writable(self):
        # As ZODB's test_blob_file_permissions expects of committed files,
        # here for the committed and the downloaded ones.
        self.addCleanup(os.umask, os.umask(0o022))
        (oid, tid), = self.commit_blobs(self.db(), {'a': b'mine'}).values()
        reader = self.client(cache_dir=os.path.join(self.dir, 'reader'))
        for storage in (self.db().storage, reader):
            path = storage.loadBlob(oid, tid)
            directory_mode = os.stat(os.path.dirname(path)).st_mode
            self.assertEqual(stat.S_IMODE(directory_mode), 0o755)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o444)


class StockServerClientTests(ClientTests):
    kind = 'stock'


class SlowServerTestCase(ServerTestCase):
    # Every blob load at the server takes this long, so readers overlap.
    delay = 0.6


class OneDownloadTests(SlowServerTestCase):

    def test_threads_and_processes_download_each_blob_once(self):
        data = os.urandom(2 * 1024 * 1024)
        (oid, tid), = self.commit_blobs(self.writer(), {'a': data}).values()
        # Two further processes, 2 threads each, and 8 threads here, all
        # cold, all on one cache directory.
        others = [subprocess.Popen(
            reader_command(self.port, self.cache_dir, oid, tid, 2),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)]
        storage = self.client()
        digests = []

        def read():
            with storage.openCommittedBlobFile(oid, tid) as f:
                digests.append(sha256(f.read()))

        threads = [threading.Thread(target=read) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for other in others:
            out, err = other.communicate(timeout=60)
            self.assertEqual(other.returncode, 0, err.decode()[-2000:])
            digests.extend(line for line in out.decode().split()
                           if line != 'connected')
        self.assertEqual(digests, [sha256(data)] * 12)
        self.assertEqual(self.sent(), [(oid, tid)])


class ParallelDownloadTests(ServerTestCase):

    def test_different_blobs_download_in_parallel(self):
        # Two blobs whose oids are 997 apart: stock ZEO's lock file covers
        # both (oid % 997) for a whole transfer, so a slow download of one
        # holds up the other.
        db = self.writer()
        with db.transaction() as conn:
            root = conn.root()
            root['first'] = Blob(b'1' * 1000)
            conn.add(root['first'])
            first = u64 = int.from_bytes(root['first']._p_oid, 'big')
            fillers = []
            while u64 < first + 996:
                filler = PersistentMapping()
                conn.add(filler)
                fillers.append(filler)
                u64 = int.from_bytes(filler._p_oid, 'big')
            root['fillers'] = fillers
            root['second'] = Blob(b'2' * 1000)
            conn.add(root['second'])
            self.assertEqual(
                int.from_bytes(root['second']._p_oid, 'big') - first, 997)
        with db.transaction() as conn:
            slow_pair, fast_pair = [self.oid_tid(conn.root()[k])
                                    for k in ('first', 'second')]
        # A downloader of the first blob that does not finish until told
        # (not a delay: a busy machine would outlast it)...
        release = os.path.join(self.dir, 'release')
        slow = subprocess.Popen(
            reader_command(self.port, self.cache_dir, *slow_pair),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(os.environ, ZODBBLOB_TEST_HOLD_RECEIVE=release))
        self.addCleanup(slow.kill)
        deadline = time.monotonic() + 30
        while slow_pair not in self.sent():
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.01)
        # ... does not hold up another process reading the second one.
        fast = subprocess.run(
            reader_command(self.port, self.cache_dir, *fast_pair),
            capture_output=True, timeout=60)
        self.assertEqual(fast.returncode, 0, fast.stderr.decode()[-2000:])
        self.assertIsNone(slow.poll(), 'the slow download ended first')
        self.assertIn(sha256(b'2' * 1000), fast.stdout.decode())
        open(release, 'w').close()
        out, err = slow.communicate(timeout=60)
        self.assertEqual(slow.returncode, 0, err.decode()[-2000:])
        self.assertIn(sha256(b'1' * 1000), out.decode())
        self.assertEqual(sorted(self.sent()), sorted([slow_pair, fast_pair]))


class KilledDownloadTests(ServerTestCase):

    level = 2

    def test_a_downloader_killed_mid_transfer_leaves_nothing_wrong(self):
        data = os.urandom(96 * 1024 * 1024)
        (oid, tid), = self.commit_blobs(self.writer(), {'a': data}).values()
        tmp = os.path.join(self.cache_dir, '.tmp')
        killed_partial = False
        for attempt in range(5):
            reader = subprocess.Popen(
                reader_command(self.port, self.cache_dir, oid, tid),
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            self.assertEqual(reader.stdout.readline().strip(), b'connected')
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and reader.poll() is None:
                sizes = [os.path.getsize(os.path.join(tmp, name))
                         for name in (os.listdir(tmp)
                                      if os.path.isdir(tmp) else ())]
                if any(0 < size < len(data) for size in sizes):
                    reader.send_signal(signal.SIGKILL)
                    killed_partial = True
                    break
                time.sleep(0.0005)
            reader.wait()
            reader.stdout.close()
            if killed_partial:
                break
            shutil.rmtree(self.cache_dir)
        self.assertTrue(killed_partial, 'never caught a partial download')
        storage = self.client(blob_download_timeout=60)
        with storage.openCommittedBlobFile(oid, tid) as f:
            self.assertEqual(sha256(f.read()), sha256(data))
        self.assertEqual(len(self.sent()), attempt + 2)
        # No partial file is left.
        self.assertEqual(os.listdir(tmp), [])


class ReadOnlyBlobDirTests(ServerTestCase):

    def read_only_copy(self):
        """A frozen copy of the server's blob directory, mounted read-only
        where the machine allows it (a bind mount), as an operator would
        mount the server's directory.  Returns its path."""
        source = os.path.join(self.dir, 'mirror')
        shutil.copytree(os.path.join(self.server_dir, 'blobs'), source,
                        ignore=shutil.ignore_patterns('.zodbblob', 'tmp'))
        mount = os.path.join(self.dir, 'mount')
        os.mkdir(mount)
        try:
            subprocess.run(['mount', '--bind', source, mount], check=True,
                           capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            return source, False
        self.addCleanup(subprocess.run, ['umount', mount],
                        capture_output=True)
        subprocess.run(['mount', '-o', 'remount,bind,ro', mount],
                       check=True, capture_output=True)
        return mount, True

    def test_reads_from_the_mount_downloads_what_it_lacks_writes_over_zeo(
            self):
        writer = self.writer()
        old = self.commit_blobs(writer, {'old': b'before the copy'})
        read_only, mounted = self.read_only_copy()
        if mounted:
            with self.assertRaises(OSError):
                open(os.path.join(read_only, 'probe'), 'w')
        new = self.commit_blobs(writer, {'new': b'after the copy'})
        before = snapshot(read_only)
        sent_before = len(self.sent())
        db = self.db(read_only_blob_dir=read_only)
        with db.transaction() as conn:
            with conn.root()['old'].open() as f:
                self.assertEqual(f.read(), b'before the copy')
            self.assertTrue(
                conn.root()['old'].committed().startswith(read_only))
            # Not in the copy: downloaded, not POSKeyError.
            with conn.root()['new'].open() as f:
                self.assertEqual(f.read(), b'after the copy')
        self.assertEqual(self.sent()[sent_before:], [new['new']])
        # Writes travel over ZEO.
        mine = self.commit_blobs(db, {'mine': b'written by the client'})
        self.wait_until_seen(writer, mine['mine'][1])
        with writer.transaction() as conn:
            with conn.root()['mine'].open() as f:
                self.assertEqual(f.read(), b'written by the client')
        self.assertEqual(snapshot(read_only), before)
        self.assertNotIn(old['old'], self.sent()[sent_before:])

    def test_bad_read_only_blob_dir_is_refused(self):
        missing = os.path.join(self.dir, 'no-such-dir')
        with self.assertRaises(ClientStorageError) as raised:
            ClientStorage(self.address, blob_dir=self.cache_dir,
                          read_only_blob_dir=missing, wait_timeout=30)
        self.assertIn(missing, str(raised.exception))
        self.assertFalse(os.path.exists(self.cache_dir))
        with self.assertRaises(ClientStorageError):
            ClientStorage(self.address, blob_dir=self.cache_dir,
                          shared_blob_dir=True,
                          read_only_blob_dir=self.server_dir, wait_timeout=30)
        self.assertFalse(os.path.exists(self.cache_dir))


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
