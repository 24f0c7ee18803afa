"""The background scrubber (``storage/scrub.py``): with dedup off, the
files that are not inline get their digests after the commit, from a
thread at the lowest CPU priority, and commit never waits for it."""

import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest
from unittest import mock

import blake3
import ZODB
import ZODB.blob
import ZODB.FileStorage
from ZODB.blob import Blob

from zodbblob import BlobStorage
from zodbblob.storage import commit
from zodbblob.storage.catalog import journal_path

DEADLINE = 10   # seconds: every wait here is bounded


def blake3_of(data):
    return blake3.blake3(data).digest()


def raw_digest(blob_dir, oid, tid):
    """The row's digest as the database file has it (no pending rows)."""
    db = sqlite3.connect(journal_path(blob_dir))
    try:
        row = db.execute('SELECT digest FROM blob WHERE oid = ? AND tid = ?',
                         (oid, tid)).fetchone()
    finally:
        db.close()
    return row[0] if row else 'no row'


class ScrubTestCase(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-scrub-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.blob_dir = os.path.join(self.dir, 'blobs')
        self.data_fs = os.path.join(self.dir, 'Data.fs')

    def open_db(self, **kw):
        storage = BlobStorage(self.blob_dir,
                              ZODB.FileStorage.FileStorage(self.data_fs),
                              **kw)
        db = ZODB.DB(storage)
        self.addCleanup(lambda: hasattr(db, '_mvcc_storage') and db.close())
        return db

    def commit(self, db, key, data):
        with db.transaction() as conn:
            conn.root()[key] = Blob(data)
        with db.transaction() as conn:
            oid = conn.root()[key]._p_oid
        return oid, db.storage._shared.journal.revisions(oid)[-1]

    def digest(self, db, oid, tid):
        return db.storage._shared.journal.digest(oid, tid)

    def wait_for_digest(self, db, oid, tid):
        deadline = time.monotonic() + DEADLINE
        while self.digest(db, oid, tid) is None:
            self.assertLess(time.monotonic(), deadline,
                            'the scrubber recorded no digest')
            time.sleep(0.01)
        return self.digest(db, oid, tid)

    def wait_until(self, condition, what):
        deadline = time.monotonic() + DEADLINE
        while not condition():
            self.assertLess(time.monotonic(), deadline, what)
            time.sleep(0.01)

    def hold(self, db):
        """Hold the scrubber's hashing; released at cleanup."""
        scrubber = db.storage._shared.scrubber
        scrubber.gate.clear()
        self.addCleanup(scrubber.gate.set)
        return scrubber


class ScrubTests(ScrubTestCase):

    def test_a_large_blob_gets_its_digest_from_the_scrubber(self):
        db = self.open_db()
        data = os.urandom(commit.INLINE_LIMIT + 1)   # not inline
        oid, tid = self.commit(db, 'large', data)
        self.assertEqual(self.wait_for_digest(db, oid, tid), blake3_of(data))
        self.assertEqual(db.storage._shared.scrubber.hashed, 1)

    @mock.patch.object(commit, 'INLINE_LIMIT', 1000)
    def test_commit_does_not_wait_for_hashing(self):
        db = self.open_db()
        scrubber = self.hold(db)
        data = os.urandom(5000)
        started = time.monotonic()
        oid, tid = self.commit(db, 'large', data)
        self.assertLess(time.monotonic() - started, DEADLINE)
        # The scrubber has read the row and waits to hash it.
        self.assertTrue(scrubber.held.wait(DEADLINE))
        self.assertIsNone(self.digest(db, oid, tid))
        self.assertIsNone(raw_digest(self.blob_dir, oid, tid))
        scrubber.gate.set()
        self.assertEqual(self.wait_for_digest(db, oid, tid), blake3_of(data))

    @mock.patch.object(commit, 'INLINE_LIMIT', 1000)
    def test_inline_blobs_keep_their_digest_from_commit(self):
        db = self.open_db()
        scrubber = self.hold(db)
        oid, tid = self.commit(db, 'small', b'small')
        self.assertEqual(self.digest(db, oid, tid), blake3_of(b'small'))
        self.assertEqual(scrubber.hashed, 0)

    def test_adopted_rows_are_hashed(self):
        stock = ZODB.DB(ZODB.blob.BlobStorage(
            self.blob_dir, ZODB.FileStorage.FileStorage(self.data_fs)))
        contents = {'a': b'a' * 1000, 'b': b'b', 'c': os.urandom(3000)}
        with stock.transaction() as conn:
            for key, data in contents.items():
                conn.root()[key] = Blob(data)
        stock.close()
        with self.assertLogs('zodbblob.storage', logging.WARNING):
            db = self.open_db()   # adopted: rows from a scan, no digests
        with db.transaction() as conn:
            oids = {key: conn.root()[key]._p_oid for key in contents}
        journal = db.storage._shared.journal
        for key, data in contents.items():
            [tid] = journal.revisions(oids[key])
            self.assertEqual(self.wait_for_digest(db, oids[key], tid),
                             blake3_of(data))
        self.assertEqual(db.storage._shared.scrubber.hashed, 3)

    @mock.patch.object(commit, 'INLINE_LIMIT', 1000)
    def test_a_digest_recorded_meanwhile_is_kept(self):
        # verify --checksum recorded one while the scrubber hashed.
        db = self.open_db()
        scrubber = self.hold(db)
        oid, tid = self.commit(db, 'large', os.urandom(5000))
        self.assertTrue(scrubber.held.wait(DEADLINE))
        journal = db.storage._shared.journal
        self.assertEqual(journal.record_digests([(b'v' * 32, oid, tid)]), 1)
        scrubber.gate.set()
        self.wait_until(lambda: scrubber.scrubbed == 1,
                        'the scrubber did not get to the row')
        self.assertEqual(self.digest(db, oid, tid), b'v' * 32)
        self.assertEqual(scrubber.hashed, 0)

    @mock.patch.object(commit, 'INLINE_LIMIT', 1000)
    def test_close_while_held_is_prompt_and_the_next_open_resumes(self):
        db = self.open_db()
        scrubber = self.hold(db)
        data = os.urandom(5000)
        oid, tid = self.commit(db, 'large', data)
        self.assertTrue(scrubber.held.wait(DEADLINE))
        started = time.monotonic()
        db.close()
        self.assertLess(time.monotonic() - started, 2)
        self.assertFalse(scrubber.alive)
        self.assertIsNone(raw_digest(self.blob_dir, oid, tid))
        db = self.open_db()
        self.assertEqual(self.wait_for_digest(db, oid, tid), blake3_of(data))

    @mock.patch.object(commit, 'INLINE_LIMIT', 1000)
    def test_a_file_pack_removed_is_skipped(self):
        db = self.open_db()
        scrubber = self.hold(db)
        oid, first = self.commit(db, 'large', os.urandom(5000))
        self.assertTrue(scrubber.held.wait(DEADLINE))   # read its row
        data = os.urandom(5000)
        oid, second = self.commit(db, 'large', data)
        path = db.storage.fshelper.getBlobFilename(oid, first)
        time.sleep(0.01)   # a pack time after the second commit
        db.pack()
        self.assertFalse(os.path.exists(path))
        with self.assertNoLogs('zodbblob.storage.scrub', logging.WARNING):
            scrubber.gate.set()
            self.assertEqual(self.wait_for_digest(db, oid, second),
                             blake3_of(data))
        self.assertEqual(scrubber.skipped, 1)
        self.assertTrue(scrubber.alive)

    @mock.patch.object(commit, 'INLINE_LIMIT', 1000)
    def test_a_fifo_or_symlink_under_a_blob_name_is_not_followed(self):
        db = self.open_db()
        scrubber = self.hold(db)
        target = os.path.join(self.dir, 'target')
        with open(target, 'wb') as f:
            f.write(b'target')
        oid, tid = self.commit(db, 'fifo', os.urandom(5000))
        oid2, tid2 = self.commit(db, 'link', os.urandom(5000))
        self.assertTrue(scrubber.held.wait(DEADLINE))
        fifo = db.storage.fshelper.getBlobFilename(oid, tid)
        os.remove(fifo)
        os.mkfifo(fifo)
        link = db.storage.fshelper.getBlobFilename(oid2, tid2)
        os.remove(link)
        os.symlink(target, link)
        with self.assertLogs('zodbblob.storage.scrub', logging.WARNING) as logs:
            scrubber.gate.set()
            self.wait_until(lambda: scrubber.skipped == 2,
                            'the scrubber did not skip both')
        # Logged once per kind of error, not per file.
        self.assertEqual(len(logs.output), 1, logs.output)
        self.assertIn('no regular file', logs.output[0].replace(
            'not a regular file', 'no regular file'))
        self.assertIsNone(self.digest(db, oid, tid))
        self.assertIsNone(self.digest(db, oid2, tid2))
        self.assertTrue(scrubber.alive)

    @mock.patch.object(commit, 'INLINE_LIMIT', 1000)
    def test_the_hashing_runs_at_the_lowest_priority(self):
        db = self.open_db()
        scrubber = db.storage._shared.scrubber
        data = os.urandom(5000)
        oid, tid = self.commit(db, 'large', data)
        self.assertEqual(self.wait_for_digest(db, oid, tid), blake3_of(data))
        if not hasattr(os, 'SCHED_IDLE'):
            self.skipTest('no SCHED_IDLE here')
        # A process of its own: a thread of this one at SCHED_IDLE would
        # hold the GIL off-CPU, and every commit would wait for it.
        self.assertEqual(scrubber.priority, 'SCHED_IDLE')
        self.assertEqual(os.sched_getscheduler(scrubber.child.pid),
                         os.SCHED_IDLE)
        self.assertNotEqual(os.sched_getscheduler(0), os.SCHED_IDLE)
        child = scrubber.child
        db.close()
        # Ended at close, reaped, its pipes closed.
        self.assertIsNotNone(child.poll())
        self.assertTrue(child.stdin.closed and child.stdout.closed)

    def test_read_only_and_scrub_off_storages_have_no_scrubber(self):
        self.open_db().close()
        storage = BlobStorage(self.blob_dir, ZODB.FileStorage.FileStorage(
            self.data_fs, read_only=True))
        self.addCleanup(storage.close)
        self.assertIsNone(storage._shared.scrubber)
        storage.close()
        db = self.open_db(scrub=False)
        self.assertIsNone(db.storage._shared.scrubber)

    def test_scrub_off_in_the_config_section(self):
        import ZODB.config
        for value, expected in (('off', False), ('on', True)):
            storage = ZODB.config.storageFromString(f'''
                %import zodbblob
                <zodbblob>
                  blob-dir {self.blob_dir}
                  scrub {value}
                  <filestorage>
                    path {self.data_fs}
                  </filestorage>
                </zodbblob>''')
            try:
                self.assertEqual(storage._shared.scrubber is not None,
                                 expected, value)
            finally:
                storage.close()

    def test_the_tools_open_without_it(self):
        from zodbblob.cli.arguments import open_storage
        self.open_db().close()
        args = mock.Mock(config=None, data=self.data_fs,
                         blob_dir=self.blob_dir)
        storage = open_storage(args, read_only=False)
        try:
            self.assertIsNone(storage._shared.scrubber)
        finally:
            storage.close()


# A program that opens a storage whose every file is hashed by the
# scrubber (INLINE_LIMIT 1000), commits one blob and waits for its digest,
# says "ready", reads stdin (where a Ctrl-C interrupts it, and it goes on
# as an interactive session does), then commits a second and prints
# whether it got its digest, and how often the hashing process failed.
PROGRAM = r"""
import json, os, signal, sys, time
# As an interactive session has it (a shell's background job, as the
# tests may run in, starts with SIGINT ignored, and so would its child).
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path[0:0] = json.loads(sys.argv[2])
import ZODB, ZODB.FileStorage
from ZODB.blob import Blob
from zodbblob import BlobStorage
from zodbblob.storage import commit
commit.INLINE_LIMIT = 1000
directory = sys.argv[1]
db = ZODB.DB(BlobStorage(os.path.join(directory, 'blobs'),
    ZODB.FileStorage.FileStorage(os.path.join(directory, 'Data.fs'))))
journal = db.storage._shared.journal

def committed(key):
    with db.transaction() as conn:
        conn.root()[key] = Blob(os.urandom(5000))
    with db.transaction() as conn:
        oid = conn.root()[key]._p_oid
    tid = journal.revisions(oid)[-1]
    deadline = time.monotonic() + 60
    while journal.digest(oid, tid) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return journal.digest(oid, tid) is not None

first = committed('first')
try:
    # Said inside the try: the test's Ctrl-C may come before readline.
    print('first', first, flush=True)
    sys.stdin.readline()
except KeyboardInterrupt:
    print('interrupted', flush=True)
print('second', committed('second'),
      'restarts', db.storage._shared.scrubber.restarts, flush=True)
db.close()
"""


class HashingProcessTests(ScrubTestCase):
    """The hashing process: started where the eggs are only on sys.path,
    out of a Ctrl-C's reach, and started again when it dies."""

    def run_program(self, python, interrupt=False):
        program = subprocess.Popen(
            [python, '-c', PROGRAM, self.dir, json.dumps(sys.path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.addCleanup(program.kill)
        first = program.stdout.readline()
        self.assertEqual(first, 'first True\n', program.stderr.read()
                         if not first else first)
        if interrupt:
            # What a Ctrl-C at the terminal does: SIGINT to the group.
            os.killpg(program.pid, signal.SIGINT)
            self.assertEqual(program.stdout.readline(), 'interrupted\n')
        else:
            program.stdin.write('\n')
            program.stdin.flush()
        out, err = program.communicate(timeout=120)
        self.assertEqual(program.returncode, 0, err)
        return out

    def test_eggs_only_on_sys_path_are_found(self):
        # As a buildout's script runs: an interpreter without the eggs in
        # its site-packages, which the script puts on sys.path itself.
        base = getattr(sys, '_base_executable', None)
        if not base or subprocess.run(
                [base, '-c', 'import blake3'], capture_output=True,
                env={}).returncode == 0:
            self.skipTest('no interpreter without blake3 in its own '
                          'site-packages (not run from a venv)')
        self.assertEqual(self.run_program(base),
                         'second True restarts 0\n')

    def test_a_ctrl_c_does_not_stop_the_hashing(self):
        self.assertEqual(self.run_program(sys.executable, interrupt=True),
                         'second True restarts 0\n')

    @mock.patch.object(commit, 'INLINE_LIMIT', 1000)
    def test_a_hashing_process_that_died_is_started_again(self):
        db = self.open_db()
        oid, tid = self.commit(db, 'one', os.urandom(5000))
        self.wait_for_digest(db, oid, tid)
        scrubber = db.storage._shared.scrubber
        scrubber.child.kill()
        scrubber.child.wait()
        with self.assertLogs('zodbblob.storage.scrub', logging.WARNING) as logs:
            data = os.urandom(5000)
            oid, tid = self.commit(db, 'two', data)
            deadline = time.monotonic() + DEADLINE + 2
            while self.digest(db, oid, tid) is None:
                self.assertLess(time.monotonic(), deadline,
                                'the scrubber recorded no digest')
                time.sleep(0.01)
        self.assertEqual(self.digest(db, oid, tid), blake3_of(data))
        self.assertEqual(scrubber.restarts, 1)
        self.assertIn('the hashing process ended', logs.output[0])
        self.assertIn('exit status -9', logs.output[0])
        self.assertIn('starting it again in 1 s', logs.output[0])


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
