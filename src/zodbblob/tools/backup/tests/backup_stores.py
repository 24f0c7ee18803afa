"""The stores that the backup tests back up, and how they run the commands.

Shared by the ``test_backup*`` modules: the commands are run as a user
runs them (``zodbblob.cli.main``, or ``python -m zodbblob.cli`` where a
process must die), and a restored store is read back to compare.
"""

import contextlib
import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

import ZEO
import ZODB
import ZODB.FileStorage
from ZODB.blob import Blob

from zodbblob import BlobStorage
from zodbblob.cli import main
from zodbblob.tools.backup import (
    COLLECT_KILL_VARIABLE,
    KILL_VARIABLE,
    PLACING_KILL_VARIABLE,
    RESTORE_KILL_VARIABLE,
    Manifest,
    snapshots,
)


def run(*argv):
    """``zodbblob ARGV`` in this process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(arg) for arg in argv])
    return status, out.getvalue(), err.getvalue()


def run_process(*argv, env=None):
    """``python -m zodbblob.cli ARGV`` in a child process."""
    environment = dict(os.environ)
    environment.pop(KILL_VARIABLE, None)
    environment.pop(COLLECT_KILL_VARIABLE, None)
    environment.pop(RESTORE_KILL_VARIABLE, None)
    environment.pop(PLACING_KILL_VARIABLE, None)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, '-m', 'zodbblob.cli'] + [str(a) for a in argv],
        capture_output=True, text=True, env=environment, timeout=120)


def open_db(directory, layout='automatic', read_only=False, dedup=False):
    base = ZODB.FileStorage.FileStorage(
        os.path.join(directory, 'Data.fs'), read_only=read_only)
    return ZODB.DB(BlobStorage(os.path.join(directory, 'blobs'), base,
                               layout, dedup=dedup))


def blob_bytes(seed, size=100):
    return random.Random(seed).randbytes(size)


def read_blobs(root):
    """name -> bytes of every blob in `root`."""
    result = {}
    for name, value in root.items():
        if isinstance(value, Blob):
            with value.open('r') as f:
                result[name] = f.read()
    return result


def read_store(directory, dedup=False):
    db = open_db(directory, read_only=True, dedup=dedup)
    try:
        with db.transaction() as conn:
            return read_blobs(conn.root())
    finally:
        db.close()


def files_below(top, suffix=''):
    """Path below `top` -> inode, for every file whose name ends so."""
    result = {}
    for dirpath, dirs, names in os.walk(top):
        for name in names:
            if name.endswith(suffix):
                path = os.path.join(dirpath, name)
                result[os.path.relpath(path, top)] = os.stat(path).st_ino
    return result


def pool_files(destination):
    """Path below the pool -> inode, for every content in it."""
    return {path: inode for path, inode in files_below(
        os.path.join(destination, '.contents')).items()
        if not path.startswith('.incoming')}


def directories(top):
    return {dirpath for dirpath, dirs, names in os.walk(top)}


def listed(snapshot):
    """sha256 of every content the manifest of `snapshot` lists."""
    manifest = Manifest(snapshot, read_only=True)
    try:
        return {sha256 for *_, sha256, state in manifest.blobs()
                if sha256 is not None}
    finally:
        manifest.close()


def pooled(destination):
    """sha256 of every content in the pool of `destination`."""
    return {bytes.fromhex(os.path.basename(path))
            for path in pool_files(destination)}


def tree(path):
    return sorted((dirpath, sorted(files))
                  for dirpath, dirs, files in os.walk(path))


class StoreTestCase(unittest.TestCase):

    layout = 'automatic'
    dedup = False

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-backup-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.source = os.path.join(self.dir, 'source')
        os.mkdir(self.source)
        self.data = os.path.join(self.source, 'Data.fs')
        self.blob_dir = os.path.join(self.source, 'blobs')
        self.dest = os.path.join(self.dir, 'backups')
        self.expected = {}

    def commit(self, changes):
        """Set the blobs in `changes` (name -> bytes), in one transaction."""
        db = open_db(self.source, self.layout, dedup=self.dedup)
        try:
            with db.transaction() as conn:
                root = conn.root()
                for name, data in changes.items():
                    if name in root:
                        with root[name].open('w') as f:
                            f.write(data)
                    else:
                        root[name] = Blob(data)
        finally:
            db.close()
        self.expected.update(changes)

    def make_store(self, count):
        self.commit({f'b{i}': blob_bytes(i) for i in range(count)})

    def pack(self):
        db = open_db(self.source, self.layout)
        try:
            db.pack(time.time() + 1)
        finally:
            db.close()

    def backup(self, *options):
        status, out, err = run('backup', '--data', self.data, '--blob-dir',
                               self.blob_dir, *options, self.dest)
        self.assertEqual(status, 0, out + err)
        return out

    def restore(self, snapshot, name='restored', *options):
        target = os.path.join(self.dir, name)
        status, out, err = run('restore', *options, snapshot, target)
        self.assertEqual(status, 0, out + err)
        return target

    def assertVerifies(self, directory):
        status, out, err = run(
            'verify', '--checksum', '--data',
            os.path.join(directory, 'Data.fs'), '--blob-dir',
            os.path.join(directory, 'blobs'))
        self.assertEqual(status, 0, out + err)
        self.assertIn('clean', out)

    def assertChecks(self, snapshot):
        status, out, err = run('restore', '--check', snapshot)
        self.assertEqual(status, 0, out + err)

    def snapshot_paths(self):
        return [s.path for s in snapshots(self.dest)]


class ServedDatabaseTestCase(unittest.TestCase):
    """A ZEO client of the layer's server, and a backup destination."""

    prefix = 'zodbblob-backup-live-'

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix=self.prefix)
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.db = ZEO.DB(self.layer.address,
                         blob_dir=os.path.join(self.dir, 'cache'))
        self.addCleanup(lambda: self.db.close())
        self.dest = os.path.join(self.dir, 'backups')
