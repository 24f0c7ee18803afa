"""A storage killed while its scrubber starts the hashing process.

From its fork to its exec, a new process holds a copy of every descriptor
of its parent, the flocks of ``Data.fs.lock`` and of the blob directory's
lock included.  A storage process killed in that moment leaves both locks
held until the exec: an open at once meets them held.  These tests make
that moment as long as they need (the new process waits for a file before
its exec) and check the two answers: a kill point waits for the spawn to
end, and the crash tests' reopen (``open_after_kill``) waits for the locks.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import zc.lockfile
import ZODB
import ZODB.FileStorage

from zodbblob import BlobStorage
from zodbblob.storage.killpoints import KILL_POINT_VARIABLE
from zodbblob.storage.lock import LOCK_NAME
from zodbblob.storage.catalog import STATE_DIR
from zodbblob.storage.tests.test_crash import open_after_kill

DEADLINE = 60   # seconds: every wait here is bounded

# Opens a storage whose every blob the scrubber hashes, with the hashing
# process's start held between its fork and its exec until the file
# ``release`` exists (it says ``forked`` in a file first), and commits a
# blob.  With ``killpoint``, the committing thread then reaches a kill
# point (its second hit: the commit made the first) and says ``killing``
# before it; otherwise it waits to be killed from outside.
PROGRAM = r"""
import json, os, subprocess, sys, time
sys.path[0:0] = json.loads(sys.argv[2])
directory, mode = sys.argv[1], sys.argv[3]
import ZODB, ZODB.FileStorage
from ZODB.blob import Blob
from zodbblob import BlobStorage
from zodbblob.storage import commit
from zodbblob.storage.killpoints import kill_point
commit.INLINE_LIMIT = -1

def held():
    open(os.path.join(directory, 'forked'), 'w').close()
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(directory, 'release')):
        if time.monotonic() > deadline:
            os._exit(3)
        time.sleep(0.01)

real_popen = subprocess.Popen

class HeldPopen(real_popen):
    def __init__(self, *args, **kw):
        super().__init__(*args, preexec_fn=held, **kw)

subprocess.Popen = HeldPopen
db = ZODB.DB(BlobStorage(os.path.join(directory, 'blobs'),
    ZODB.FileStorage.FileStorage(os.path.join(directory, 'Data.fs'))))
with db.transaction() as conn:
    conn.root()['blob'] = Blob(b'hashed later' * 100)
while not os.path.exists(os.path.join(directory, 'forked')):
    time.sleep(0.01)
if mode == 'killpoint':
    print('killing', flush=True)
    kill_point('after_store_blob')
time.sleep(120)
"""


class SpawnKillTests(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-spawn-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.data_fs = os.path.join(self.dir, 'Data.fs')
        self.blob_dir = os.path.join(self.dir, 'blobs')
        # The held process goes on at cleanup, whatever the test did.
        self.addCleanup(self.release)

    def release(self):
        open(os.path.join(self.dir, 'release'), 'w').close()

    def start(self, mode):
        env = dict(os.environ)
        env.pop(KILL_POINT_VARIABLE, None)
        if mode == 'killpoint':
            env[KILL_POINT_VARIABLE] = 'after_store_blob:2'
        program = subprocess.Popen(
            [sys.executable, '-c', PROGRAM, self.dir, json.dumps(sys.path),
             mode], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.addCleanup(program.stderr.close)
        self.addCleanup(program.stdout.close)
        self.addCleanup(program.kill)
        return program

    def wait_for_fork(self, program):
        deadline = time.monotonic() + DEADLINE
        while not os.path.exists(os.path.join(self.dir, 'forked')):
            if program.poll() is not None:
                self.fail('the program ended: %s' % program.stderr.read())
            self.assertLess(time.monotonic(), deadline,
                            'the hashing process was never started')
            time.sleep(0.01)

    def lock_paths(self):
        return (self.data_fs + '.lock',
                os.path.join(self.blob_dir, STATE_DIR, LOCK_NAME))

    def assert_locks_free(self):
        for path in self.lock_paths():
            zc.lockfile.LockFile(path).close()   # LockError if held

    def test_a_kill_point_waits_until_the_new_process_has_let_go(self):
        program = self.start('killpoint')
        self.wait_for_fork(program)
        self.assertEqual(program.stdout.readline(), 'killing\n')
        try:
            # Without the wait, the process dies now, its half-started
            # child holding the locks until the release.
            returncode = program.wait(5)
        except subprocess.TimeoutExpired:
            self.release()
            returncode = program.wait(DEADLINE)
        self.assertEqual(returncode, -signal.SIGKILL)
        self.assert_locks_free()

    def test_a_reopen_after_a_kill_from_outside_waits_for_the_locks(self):
        program = self.start('outside')
        self.wait_for_fork(program)
        program.kill()
        program.wait(DEADLINE)
        # The half-started child holds the locks: a plain open is refused.
        with self.assertRaises(zc.lockfile.LockError):
            ZODB.FileStorage.FileStorage(self.data_fs)
        opened = []

        def open_storage():
            if not opened:   # the first try: released only now
                opened.append(1)
                self.release()
            return BlobStorage(self.blob_dir,
                               ZODB.FileStorage.FileStorage(self.data_fs))

        db = ZODB.DB(open_after_kill(open_storage))
        try:
            with db.transaction() as conn, conn.root()['blob'].open() as f:
                self.assertEqual(f.read(), b'hashed later' * 100)
        finally:
            db.close()

def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
