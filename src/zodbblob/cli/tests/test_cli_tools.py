"""``zodbblob verify`` and ``zodbblob recover``, run as a user runs them;
the progress display of the tools."""

import contextlib
import io
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import ZODB
import ZODB.FileStorage
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob

from zodbblob import BlobStorage, cli
from zodbblob.cli import verify as verify_command
from zodbblob.storage.commitlog import commit_log_path, unfinished_records
from zodbblob.storage.tests.test_crash import run_child


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


class StoreTestCase(unittest.TestCase):

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


class ToolTests(StoreTestCase):

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

    def test_interrupted_verify_exits_130_in_one_line(self):
        self.make_store()
        out, err = io.StringIO(), io.StringIO()
        with mock.patch.object(verify_command, 'check_blob_files',
                               side_effect=KeyboardInterrupt), \
                contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            try:
                status = cli.main(['verify', '--data', self.data,
                                   '--blob-dir', self.blob_dir])
            except KeyboardInterrupt:
                status = 'a traceback'
        self.assertEqual(status, 130)
        self.assertEqual(out.getvalue(), '')
        self.assertEqual(err.getvalue(), 'zodbblob verify: interrupted\n')

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


# Opens the storage, commits blob transactions, says so, and then either
# waits (a live storage) or ends without closing it, as a SIGTERM to
# Zope's runwsgi does.
HOLDER = """
import os, sys, transaction, ZODB, ZODB.FileStorage, zodbblob
from ZODB.blob import Blob
db = ZODB.DB(zodbblob.BlobStorage(
    sys.argv[2], ZODB.FileStorage.FileStorage(sys.argv[1])))
# 5 transactions of one blob; or one of 64, a batch of catalog rows,
# which the storage writes at once.
for n in range(int(sys.argv[4])):
    with db.transaction() as conn:
        for m in range(int(sys.argv[5])):
            conn.root()['held%d.%d' % (n, m)] = Blob(b'held' * (n + 1))
print('committed', flush=True)
if sys.argv[3] == 'exit':
    os._exit(0)
sys.stdin.read()
"""


class VerifyTellsTheTruthTests(StoreTestCase):
    """verify reports a transaction unfinished only when recovery would
    change its files or rows: not beside a live storage, not after a
    process that ended without closing the storage."""

    def hold(self, how, transactions=5, blobs=1):
        holder = subprocess.Popen(
            [sys.executable, '-c', HOLDER, self.data, self.blob_dir, how,
             str(transactions), str(blobs)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(holder.wait)
        self.addCleanup(holder.stdin.close)
        self.assertEqual(holder.stdout.readline().strip(), b'committed')
        holder.stdout.close()
        return holder

    def verify(self):
        return zodbblob('verify', '--data', self.data, '--blob-dir',
                        self.blob_dir, '--checksum')

    def test_verify_beside_a_live_storage_is_clean(self):
        self.make_store()
        self.hold('wait')
        result = self.verify()
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn('8 blob records, 8 blob files, clean', result.stdout)
        self.assertNotIn('unfinished', result.stdout)

    def recover(self):
        result = zodbblob('recover', '--data', self.data, '--blob-dir',
                          self.blob_dir)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def unfinished(self, output):
        """The tids of verify's unfinished lines, and their direction."""
        return sorted(re.match(r'unfinished: transaction (\S+) .* roll its '
                               r'blob files (back|forward):', line).groups()
                      for line in output.splitlines()
                      if line.startswith('unfinished:'))

    def rolled(self, output):
        """The tids of recover's output, and their direction."""
        return sorted((line.split()[-1], line.split()[-8])
                      for line in output.splitlines()
                      if 'of interrupted transaction' in line)

    def test_tools_beside_a_new_live_store_say_nothing_of_its_index(self):
        # A new FileStorage saves the index of its empty file at once:
        # beside it, read-only opens find that index and ignore it.
        os.mkdir(os.path.join(self.dir, 'var'))
        data = os.path.join(self.dir, 'var', 'Data.fs')
        blob_dir = os.path.join(self.dir, 'var', 'blobs')
        db = ZODB.DB(BlobStorage(blob_dir, ZODB.FileStorage.FileStorage(data)))
        self.addCleanup(db.close)
        with db.transaction() as conn:
            conn.root()['b'] = Blob(b'live')
        storage = ('--data', data, '--blob-dir', blob_dir)
        for argv in [('verify', *storage),
                     ('backup', '--quiet', *storage,
                      os.path.join(self.dir, 'backups')),
                     ('export', '--quiet', *storage,
                      os.path.join(self.dir, 'root.zexp'))]:
            with self.subTest(argv[0]):
                result = zodbblob(*argv)
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertEqual(result.stderr, '')

    def test_verify_after_a_process_that_did_not_close_is_clean(self):
        self.make_store()
        holder = self.hold('exit', transactions=1, blobs=64)
        self.assertEqual(holder.wait(), 0)
        self.assertTrue(unfinished_records(commit_log_path(self.blob_dir)))
        check = self.verify()
        self.assertEqual(check.returncode, 0, check.stdout)
        self.assertIn('67 blob records, 67 blob files, clean', check.stdout)
        self.assertEqual(self.rolled(self.recover()), [])

    def rows_written(self, output):
        """How many transactions' rows recover wrote from the log."""
        match = re.search(r'wrote the catalog rows of (\d+) committed '
                          r'transactions from the commit log', output)
        return int(match.group(1)) if match else 0

    def pending(self, output):
        """How many transactions verify notes as having rows in the log."""
        match = re.search(r'^note: (\d+) committed transactions have their '
                          r'catalog rows in the commit log only', output,
                          re.MULTILINE)
        return int(match.group(1)) if match else 0

    def test_catalog_rows_left_unwritten_are_a_note_not_a_problem(self):
        self.make_store()
        holder = self.hold('exit')
        self.assertEqual(holder.wait(), 0)
        check = self.verify()
        # Its last catalog rows were still in memory: any open writes them
        # from the commit log and changes nothing else, so the store is
        # healthy (Zope ends this way on every SIGTERM).
        self.assertEqual(check.returncode, 0, check.stdout)
        self.assertEqual(self.unfinished(check.stdout), [])
        self.assertEqual(self.pending(check.stdout), 5, check.stdout)
        self.assertIn('8 blob records, 8 blob files, clean', check.stdout)
        # recover writes them, and calls no transaction interrupted.
        recovered = self.recover()
        self.assertEqual(self.rolled(recovered), [])
        self.assertEqual(self.rows_written(recovered), 5, recovered)
        self.assertIn('recovered (1 actions)', recovered)
        after = self.verify()
        self.assertEqual(after.returncode, 0, after.stdout)
        self.assertEqual(self.pending(after.stdout), 0, after.stdout)
        self.assertIn('8 blob records, 8 blob files, clean', after.stdout)

    def test_verify_after_a_sigkill_agrees_with_recover(self):
        result = run_child(self.dir, '30',
                           kill_point='after_journal_commit:12')
        self.assertEqual(result.returncode, -signal.SIGKILL)
        check = self.verify()
        # Every transaction finished: at most catalog rows are left, and
        # those are a note.
        self.assertEqual(check.returncode, 0, check.stdout)
        self.assertEqual(self.unfinished(check.stdout), [])
        recovered = self.recover()
        self.assertEqual(self.rolled(recovered), [])
        self.assertEqual(self.rows_written(recovered),
                         self.pending(check.stdout))
        self.assertEqual(self.verify().returncode, 0)

    def test_verify_names_the_transactions_recovery_would_change(self):
        # Killed with the 3rd transaction's files published and the base
        # not committed: verify names it, recover rolls it back.
        result = run_child(self.dir, '20', kill_point='after_publish:3')
        self.assertEqual(result.returncode, -signal.SIGKILL)
        check = self.verify()
        self.assertEqual(check.returncode, 1, check.stdout)
        unfinished = self.unfinished(check.stdout)
        last = [line for line in check.stdout.splitlines()
                if line.startswith('unfinished:')][-1]
        self.assertIn('was interrupted; recovery would roll its blob files '
                      'back', last)
        self.assertIn(unfinished[-1][0], last)
        recovered = self.recover()
        self.assertEqual(self.rolled(recovered), unfinished)
        self.assertEqual(self.rows_written(recovered),
                         self.pending(check.stdout))
        self.assertEqual(self.verify().returncode, 0)

    def test_verify_notes_rows_of_a_transaction_killed_after_the_base(self):
        # Killed with the base committed, its catalog rows not written:
        # the store is healthy, and the next open writes the rows.
        result = run_child(self.dir, '20', kill_point='after_base_finish:3')
        self.assertEqual(result.returncode, -signal.SIGKILL)
        check = self.verify()
        self.assertEqual(check.returncode, 0, check.stdout)
        self.assertEqual(self.unfinished(check.stdout), [])
        self.assertGreaterEqual(self.pending(check.stdout), 1, check.stdout)
        recovered = self.recover()
        self.assertEqual(self.rolled(recovered), [])
        self.assertEqual(self.rows_written(recovered),
                         self.pending(check.stdout))
        after = self.verify()
        self.assertEqual(after.returncode, 0, after.stdout)
        self.assertEqual(self.pending(after.stdout), 0, after.stdout)


class ImportDedupTests(StoreTestCase):
    """``zodbblob import --dedup``: the imported copies are links to the
    equal content the store holds; refused, changing nothing, with
    --config (whose file says whether dedup is on)."""

    CONTENT = b'one content, imported twice' * 100

    def setUp(self):
        super().setUp()
        db = ZODB.DB(BlobStorage(self.blob_dir,
                                 ZODB.FileStorage.FileStorage(self.data),
                                 dedup=True))
        with db.transaction() as conn:
            conn.root()['existing'] = Blob(self.CONTENT)
            conn.root()['folder'] = folder = PersistentMapping()
            folder['a'] = Blob(self.CONTENT)
        db.close()
        self.storage = ['--data', self.data, '--blob-dir', self.blob_dir]
        self.zexp = os.path.join(self.dir, 'folder.zexp')
        result = zodbblob('export', *self.storage, '--path', '/folder',
                          '--quiet', self.zexp)
        self.assertEqual(result.returncode, 0, result.stderr)

    def files(self, *keys):
        """``{key: os.stat of its committed file}``; each reads back."""
        db = ZODB.DB(BlobStorage(self.blob_dir,
                                 ZODB.FileStorage.FileStorage(self.data)))
        try:
            with db.transaction() as conn:
                found = {}
                for key in keys:
                    obj = conn.root()
                    for step in key.split('/'):
                        obj = obj[step]
                    with obj.open() as f:
                        self.assertEqual(f.read(), self.CONTENT)
                    found[key] = os.stat(obj.committed())
                return found
        finally:
            db.close()

    def test_import_with_dedup_links_the_copy(self):
        result = zodbblob('import', *self.storage, '--dedup', '--name',
                          'copy', '--quiet', self.zexp)
        self.assertEqual(result.returncode, 0, result.stderr)
        files = self.files('existing', 'folder/a', 'copy/a')
        self.assertEqual({info.st_ino for info in files.values()},
                         {files['existing'].st_ino})
        self.assertEqual(files['existing'].st_nlink, 3)

    def test_import_without_dedup_writes_a_copy(self):
        result = zodbblob('import', *self.storage, '--name', 'copy',
                          '--quiet', self.zexp)
        self.assertEqual(result.returncode, 0, result.stderr)
        files = self.files('existing', 'copy/a')
        self.assertNotEqual(files['copy/a'].st_ino,
                            files['existing'].st_ino)
        self.assertEqual(files['copy/a'].st_nlink, 1)

    def test_dedup_with_a_config_file_is_refused(self):
        config = os.path.join(self.dir, 'zodb.conf')
        with open(config, 'w') as f:
            f.write(f"""
%import zodbblob
<zodbblob>
  blob-dir {self.blob_dir}
  <filestorage>
    path {self.data}
  </filestorage>
</zodbblob>
""")
        before = tree(self.dir)
        with open(self.data, 'rb') as f:
            data = f.read()
        result = zodbblob('import', '--config', config, '--dedup',
                          self.zexp)
        self.assertEqual(result.returncode, 2)
        self.assertIn('--dedup goes with --data and --blob-dir',
                      result.stderr)
        self.assertEqual(tree(self.dir), before)
        with open(self.data, 'rb') as f:
            self.assertEqual(f.read(), data)
