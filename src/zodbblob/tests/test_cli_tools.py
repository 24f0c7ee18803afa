"""``zodbblob verify`` and ``zodbblob recover``, run as a user runs them;
the progress display of the tools."""

import os
import pty
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest

import ZODB
import ZODB.FileStorage
from ZODB.blob import Blob

from zodbblob import BlobStorage
from zodbblob.tests.test_crash import run_child


def zodbblob(*args, cwd=None):
    return subprocess.run(
        [sys.executable, '-m', 'zodbblob.cli'] + list(args),
        capture_output=True, text=True, cwd=cwd, timeout=120)


def on_a_terminal(*args):
    """`zodbblob` with its stderr on a pseudo-terminal: (status, what the
    terminal showed)."""
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, '-m', 'zodbblob.cli'] + list(args),
            stdout=subprocess.DEVNULL, stderr=terminal, timeout=120)
        os.close(terminal)
        terminal = None
        shown = b''
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:   # EIO: everything written has been read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if terminal is not None:
            os.close(terminal)
        os.close(controller)
    return result.returncode, shown.decode()


def tree(path):
    return sorted((dirpath, sorted(files))
                  for dirpath, dirs, files in os.walk(path))


class ToolTests(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-cli-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.data = os.path.join(self.dir, 'Data.fs')
        self.blob_dir = os.path.join(self.dir, 'blobs')

    def make_store(self):
        db = ZODB.DB(BlobStorage(self.blob_dir,
                                 ZODB.FileStorage.FileStorage(self.data)))
        with db.transaction() as conn:
            for i in range(3):
                conn.root()['b%d' % i] = Blob(b'%d' % i * 100)
        with db.transaction() as conn:
            blob = conn.root()['b1']
            blob._p_activate()
            path = db.storage.loadBlob(blob._p_oid, blob._p_serial)
        db.close()
        return path

    def test_verify_clean_store_exits_0(self):
        self.make_store()
        result = zodbblob('verify', '--data', self.data, '--blob-dir',
                          self.blob_dir, '--checksum')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('3 blob records, 3 blob files, clean', result.stdout)

    def test_verify_reports_a_missing_file_and_exits_1(self):
        path = self.make_store()
        os.remove(path)
        result = zodbblob('verify', '--data', self.data, '--blob-dir',
                          self.blob_dir, '--quiet')
        self.assertEqual(result.returncode, 1)
        self.assertIn('missing: blob file of oid', result.stdout)
        self.assertIn(path, result.stdout)

    def test_verify_reads_a_zope_conf(self):
        self.make_store()
        conf = os.path.join(self.dir, 'zope.conf')
        with open(conf, 'w') as f:
            f.write('%%define INSTANCE %s\n'
                    '%%import zodbblob\n'
                    '<zodb_db main>\n'
                    '  mount-point /\n'
                    '  <zodbblob>\n'
                    '    blob-dir $INSTANCE/blobs\n'
                    '    <filestorage>\n'
                    '      path $INSTANCE/Data.fs\n'
                    '    </filestorage>\n'
                    '  </zodbblob>\n'
                    '</zodb_db>\n' % self.dir)
        result = zodbblob('verify', '--config', conf)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('clean', result.stdout)

    def test_verify_of_a_missing_storage_names_it_and_creates_nothing(self):
        before = tree(self.dir)
        result = zodbblob('verify', '--data', self.data, '--blob-dir',
                          self.blob_dir)
        self.assertEqual(result.returncode, 2)
        self.assertIn(self.data, result.stderr)
        self.assertEqual(tree(self.dir), before)

    def test_recover_replays_a_crash_and_twice_is_harmless(self):
        result = run_child(self.dir, '20', kill_point='after_journal_begin:3')
        self.assertEqual(result.returncode, -signal.SIGKILL)
        first = zodbblob('recover', '--data', self.data, '--blob-dir',
                         self.blob_dir)
        self.assertEqual(first.returncode, 0, first.stderr)
        self.assertIn('rolled back the blob files of interrupted '
                      'transaction', first.stdout)
        second = zodbblob('recover', '--data', self.data, '--blob-dir',
                          self.blob_dir)
        self.assertEqual(second.returncode, 0, second.stderr)
        self.assertIn('nothing left to recover', second.stdout)
        check = zodbblob('verify', '--data', self.data, '--blob-dir',
                         self.blob_dir)
        self.assertEqual(check.returncode, 0, check.stdout)

    def test_progress_shows_on_a_terminal_unless_quiet(self):
        self.make_store()
        storage = ('--data', self.data, '--blob-dir', self.blob_dir)
        runs = [(('verify', *storage), 'verify', '3/3'),
                (('migrate', self.blob_dir, os.path.join(self.dir, 'flat'),
                  '--layout', 'flat'), 'migrate', '3/3')]
        for args, label, total in runs:
            with self.subTest(label):
                status, shown = on_a_terminal(*args)
                self.assertEqual(status, 0, shown)
                self.assertIn(f'\r{label} [', shown)
                self.assertTrue(shown.rstrip().endswith(f'100% {total}'),
                                shown)
        status, shown = on_a_terminal('verify', *storage, '--quiet')
        self.assertEqual((status, shown), (0, ''))

    def test_recover_refuses_a_storage_in_use(self):
        self.make_store()
        holder = subprocess.Popen(
            [sys.executable, '-c',
             'import sys, ZODB.FileStorage, zodbblob\n'
             's = zodbblob.BlobStorage(sys.argv[2], '
             'ZODB.FileStorage.FileStorage(sys.argv[1]))\n'
             'print("open", flush=True)\n'
             'sys.stdin.read()\n', self.data, self.blob_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(holder.wait)
        self.addCleanup(holder.stdin.close)
        self.assertEqual(holder.stdout.readline().strip(), b'open')
        holder.stdout.close()
        result = zodbblob('recover', '--data', self.data, '--blob-dir',
                          self.blob_dir)
        self.assertEqual(result.returncode, 2)
        self.assertIn('in use', result.stderr)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
