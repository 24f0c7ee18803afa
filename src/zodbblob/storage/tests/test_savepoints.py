"""Blob savepoints read and commit what the user last saw.

Stock ZODB 6.4 names a blob's savepoint file the same at every savepoint,
so rolling back to an earlier savepoint reads (and commits) a later one's
bytes.  Here, any sequence of writes, savepoints and rollbacks, generated
by hypothesis, is checked against a model dict after every step and after
commit.
"""

import os
import shutil
import tempfile
import unittest

import transaction
import ZODB
import ZODB.FileStorage
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from ZODB.blob import Blob

from zodbblob import BlobStorage


KEYS = ('a', 'b', 'c')
# More examples for a deeper search: ZODBBLOB_EXAMPLES=2000.
EXAMPLES = int(os.environ.get('ZODBBLOB_EXAMPLES', '300'))

operations = st.lists(
    st.one_of(
        st.tuples(st.just('write'), st.sampled_from(KEYS),
                  st.binary(max_size=64)),
        st.tuples(st.just('savepoint')),
        st.tuples(st.just('rollback'), st.integers(0, 10)),
        st.tuples(st.just('touch')),
    ),
    max_size=25)


class SavepointTestCase(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-savepoint-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.blob_dir = os.path.join(self.dir, 'blobs')
        self.db = ZODB.DB(BlobStorage(self.blob_dir,
                                      ZODB.FileStorage.FileStorage(
                                          os.path.join(self.dir, 'Data.fs'))))
        self.addCleanup(self.db.close)
        self.addCleanup(transaction.abort)

    def read_all(self, root):
        result = {}
        for key in KEYS:
            if key in root:
                with root[key].open() as f:
                    result[key] = f.read()
        return result

    def committed(self):
        with self.db.transaction() as conn:
            return self.read_all(conn.root())


class SavepointTests(SavepointTestCase):

    def test_rollback_before_the_blob_was_saved_reads_the_committed_one(self):
        with self.db.transaction() as conn:
            conn.root()['a'] = Blob(b'committed')
        conn = self.db.open()
        conn.root()['other'] = 1   # the Connection is in the savepoint
        first = transaction.savepoint()
        with conn.root()['a'].open('w') as f:
            f.write(b'later')
        transaction.savepoint()
        first.rollback()
        with conn.root()['a'].open() as f:
            self.assertEqual(f.read(), b'committed')
        transaction.commit()
        conn.close()
        self.assertEqual(self.committed(), {'a': b'committed'})

    def rollback_to_first_of_two(self, touch_first):
        with self.db.transaction() as conn:
            conn.root()['a'] = Blob(b'committed')
        conn = self.db.open()
        root = conn.root()
        if touch_first:
            root['other'] = 1   # the Connection joins before our manager
        with root['a'].open('w') as f:
            f.write(b'savepoint 1')
        first = transaction.savepoint()
        with root['a'].open('w') as f:
            f.write(b'savepoint 2')
        transaction.savepoint()
        first.rollback()
        with root['a'].open() as f:
            self.assertEqual(f.read(), b'savepoint 1')
        transaction.commit()
        conn.close()
        self.assertEqual(self.committed(), {'a': b'savepoint 1'})

    def test_rollback_to_the_first_of_two_savepoints(self):
        self.rollback_to_first_of_two(touch_first=False)

    def test_rollback_to_the_first_when_the_connection_joined_first(self):
        self.rollback_to_first_of_two(touch_first=True)

    def test_snapshots_are_links_not_copies(self):
        with self.db.transaction() as conn:
            conn.root()['a'] = Blob(b'committed')
        conn = self.db.open()
        with conn.root()['a'].open('w') as f:
            f.write(b'x' * 100000)
        transaction.savepoint()
        with conn.root()['a'].open('w') as f:
            f.write(b'y')
        transaction.savepoint()
        transaction.savepoint()   # takes the state of the one before
        manager = self.db.storage._shared.directories.manager_of(
            transaction.get())
        snapshots = os.path.join(manager.directory, '.snapshots')
        kept = {os.stat(os.path.join(snapshots, name)).st_ino
                for name in os.listdir(snapshots)}
        saved = [os.path.join(dirpath, name) for dirpath, dirs, files
                 in os.walk(manager.directory) for name in files
                 if name.endswith('.spb')]
        # The second savepoint's file is kept by a link to the same inode,
        # and the first one's (overwritten) survives as a snapshot.
        self.assertEqual(len(saved), 1)
        self.assertIn(os.stat(saved[0]).st_ino, kept)
        self.assertEqual(len(kept), 2)
        transaction.abort()
        conn.close()
        self.assertFalse(os.path.exists(manager.directory))


class SavepointModelTests(SavepointTestCase):

    @settings(max_examples=EXAMPLES, deadline=None, database=None)
    @given(touch_first=st.booleans(), steps=operations)
    def test_any_sequence_reads_and_commits_what_the_user_saw(
            self, touch_first, steps):
        with self.db.transaction() as conn:
            root = conn.root()
            for key in KEYS:
                root.pop(key, None)
            root['a'] = Blob(b'committed a')
        model = self.committed()
        conn = self.db.open()
        root = conn.root()
        if touch_first:
            root['counter'] = root.get('counter', 0) + 1
        savepoints = []   # (savepoint, model at that point)
        try:
            for step in steps:
                if step[0] == 'write':
                    key, data = step[1], step[2]
                    if key in root:
                        with root[key].open('w') as f:
                            f.write(data)
                    else:
                        root[key] = Blob(data)
                    model[key] = data
                elif step[0] == 'savepoint':
                    savepoints.append((transaction.savepoint(),
                                       dict(model)))
                elif step[0] == 'rollback' and savepoints:
                    index = step[1] % len(savepoints)
                    savepoint, saved = savepoints[index]
                    savepoint.rollback()
                    del savepoints[index + 1:]
                    model = dict(saved)
                elif step[0] == 'touch':
                    root['counter'] = root.get('counter', 0) + 1
                self.assertEqual(self.read_all(root), model, steps)
            transaction.commit()
        finally:
            transaction.abort()
            conn.close()
        self.assertEqual(self.committed(), model, steps)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
