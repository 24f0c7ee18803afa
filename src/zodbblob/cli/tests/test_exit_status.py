"""Every ``zodbblob`` command that cannot run exits 2 with one line on
stderr naming the thing, and changes nothing on disk.

The table: each subcommand given bad arguments, a ZEO client blob cache
where a storage's blob directory belongs, a blob directory whose commit
log header is damaged, one whose ``.layout`` marker is damaged, and a
directory that does not exist.  Run as a user runs them, in processes.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import ZODB
import ZODB.FileStorage
from ZODB.blob import Blob

from zodbblob import BlobStorage
from zodbblob.cache import BlobCache
from zodbblob.cli import COMMANDS
from zodbblob.layout import LAYOUTS
from zodbblob.storage.commitlog import commit_log_path
from zodbblob.storage.tests.test_storage import restore_with_kind_swapped


def zodbblob(*args):
    return subprocess.run(
        [sys.executable, '-m', 'zodbblob.cli'] + [str(a) for a in args],
        capture_output=True, text=True, timeout=120)


def listing(top):
    """Every path below `top`, with its size and modification time."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            found[path] = (info.st_size, info.st_mtime_ns)
    return found


class ExitStatusTests(unittest.TestCase):

    level = 2   # forty processes

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zodbblob-status-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        store = self.path('store')
        os.mkdir(store)
        db = ZODB.DB(BlobStorage(
            os.path.join(store, 'blobs'),
            ZODB.FileStorage.FileStorage(os.path.join(store, 'Data.fs'))))
        with db.transaction() as conn:
            conn.root()['blob'] = Blob(b'data')
        db.close()
        for suffix in ('.lock', '.tmp'):
            os.remove(os.path.join(store, 'Data.fs' + suffix))
        # Each case a whole directory (Data.fs, blobs/), with the zeo.conf
        # that serves it.
        self.cases = {}
        for case in ('cache', 'commit-log', 'layout'):
            shutil.copytree(store, self.path(case))
            self.cases[case] = self.path(case)
            with open(self.path(case, 'zeo.conf'), 'w') as f:
                f.write(f'%import zodbblob\n'
                        f'<zeo>\n  address 127.0.0.1:0\n</zeo>\n'
                        f'<zodbblob 1>\n'
                        f'  blob-dir {self.path(case, "blobs")}\n'
                        f'  <filestorage>\n'
                        f'    path {self.path(case, "Data.fs")}\n'
                        f'  </filestorage>\n'
                        f'</zodbblob>\n')
        shutil.rmtree(self.path('cache', 'blobs'))
        BlobCache(self.path('cache', 'blobs')).close()
        with open(commit_log_path(self.path('commit-log', 'blobs')),
                  'r+b') as f:
            f.write(os.urandom(8192))   # both header slots
        with open(self.path('layout', 'blobs', '.layout'), 'wb') as f:
            f.write(b'\xff\xfe\0bushy?')
        self.cases['missing'] = self.path('missing')
        with open(self.path('empty.zexp'), 'wb'):
            pass

    def path(self, *names):
        return os.path.join(self.dir, *names)

    def storage(self, var):
        return ('--data', os.path.join(var, 'Data.fs'), '--blob-dir',
                os.path.join(var, 'blobs'))

    def argv(self, command, case):
        """The arguments that point `command` at `case`, and the path its
        error must name; None where the case means nothing to the
        command."""
        argv = self._argv(command, case)
        if argv is None:
            return None
        named = self.cases[case]
        if command == 'cache' and case == 'cache':
            named = self.path('store', 'blobs')
        return argv, named

    def _argv(self, command, case):
        var = self.cases[case]
        blobs = os.path.join(var, 'blobs')
        if command == 'takeover' and case != 'missing':
            return None   # opens the storage as recover does: one case
        if command in ('verify', 'recover', 'takeover'):
            return (command, *self.storage(var))
        if command == 'backup':
            return (command, *self.storage(var), self.path('backups'))
        if command == 'export':
            return (command, *self.storage(var), self.path('out.zexp'))
        if command == 'import':
            return (command, *self.storage(var), self.path('empty.zexp'))
        if command == 'migrate':
            if case == 'cache':   # a cache is a source: not as destination
                return (command, self.path('store', 'blobs'), blobs,
                        '--layout', 'lawn')
            return (command, blobs, self.path('migrated'), '--layout',
                    'lawn')
        if command == 'restore':
            if case in ('commit-log', 'layout'):
                return None   # no storage: a snapshot
            return (command, blobs, self.path('restored'))
        if command == 'cache':
            if case == 'cache':
                return (command, 'stats', self.path('store', 'blobs'))
            if case == 'commit-log':
                return None   # a cache has no commit log
            return (command, 'stats', blobs)
        if command == 'serve':
            return (command, '--config', os.path.join(var, 'zeo.conf'))
        raise AssertionError(f'no case for {command}')

    def assertCannotRun(self, argv, named=None):
        before = listing(self.dir)
        result = zodbblob(*argv)
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertNotIn('Traceback', result.stderr)
        lines = result.stderr.splitlines()
        if argv[0] == 'serve':
            # runzeo logs what it opens to stderr: the error is the last
            # line.
            lines = lines[-1:]
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn('error:', lines[0])
        if named is not None:
            self.assertIn(named, lines[0])
        self.assertEqual(result.stdout, '')
        self.assertEqual(listing(self.dir), before)

    def test_bad_arguments_exit_2_in_one_line(self):
        for command in COMMANDS:
            with self.subTest(command):
                self.assertCannotRun((command, '--no-such-option'))

    def test_a_bad_layout_exits_2_naming_the_registered_layouts(self):
        for command in COMMANDS:
            argv, _ = self.argv(command, 'missing')
            if command == 'serve':
                argv = (command, '--var', self.path('store'))
            with self.subTest(command):
                self.assertCannotRun((*argv, '--layout', 'tree'), '--layout')
                message = zodbblob(*argv, '--layout', 'tree').stderr
                if command in ('serve', 'migrate', 'restore'):
                    self.assertIn("argument --layout: invalid choice: "
                                  "'tree' (choose from ", message)
                    for layout in LAYOUTS:
                        self.assertIn(layout, message)
                else:
                    self.assertIn('unrecognized arguments: --layout tree',
                                  message)

    def test_the_wrong_kind_of_directory_and_damaged_state_exit_2(self):
        for case in ('cache', 'commit-log', 'layout', 'missing'):
            for command in COMMANDS:
                found = self.argv(command, case)
                if found is None:
                    continue
                with self.subTest(command=command, case=case):
                    self.assertCannotRun(*found)

    def test_a_storage_path_of_the_wrong_kind_says_what_it_is(self):
        # A device, a directory or a file where the other belongs: the
        # message says what the path is, not "no such file".
        data, blobs = self.storage(self.path('store'))[1::2]
        for option, path, problem in (
                ('--data', os.devnull,
                 'a character device, not a regular file'),
                ('--data', blobs, 'a directory, not a regular file'),
                ('--blob-dir', data, 'a regular file, not a directory'),
                ('--config', blobs, 'a directory, not a regular file')):
            if option == '--data':
                argv = ('--data', path, '--blob-dir', blobs)
            elif option == '--blob-dir':
                argv = ('--data', data, '--blob-dir', path)
            else:
                argv = ('--config', path)
            for command in ('verify', 'recover'):
                with self.subTest(command=command, option=option, path=path):
                    self.assertCannotRun((command, *argv),
                                         f'{option} {path}: {problem}')
        self.assertCannotRun(
            ('import', '--data', data, '--blob-dir', blobs, os.devnull),
            f'{os.devnull}: a character device, not a regular file')

    def test_a_directory_without_a_layout_marker_is_not_a_blob_directory(
            self):
        # recover would make it a new blob directory and find nothing to
        # do, verify would call every blob missing: both refuse.
        shutil.copytree(self.path('store'), self.path('unmarked'))
        os.remove(self.path('unmarked', 'blobs', '.layout'))
        shutil.copytree(self.path('store'), self.path('empty'))
        shutil.rmtree(self.path('empty', 'blobs'))
        os.mkdir(self.path('empty', 'blobs'))
        for case in ('unmarked', 'empty'):
            blobs = self.path(case, 'blobs')
            for command in ('verify', 'recover', 'backup'):
                argv = (command, *self.storage(self.path(case)))
                if command == 'backup':
                    argv += (self.path('backups'),)
                with self.subTest(command=command, case=case):
                    self.assertCannotRun(
                        argv, f'--blob-dir {blobs} is not a blob directory: '
                              f'no .layout marker')
        # A storage's own first open still makes a new blob directory.
        db = ZODB.DB(BlobStorage(
            self.path('empty', 'blobs'),
            ZODB.FileStorage.FileStorage(self.path('empty', 'new.fs'))))
        with db.transaction() as conn:
            conn.root()['blob'] = Blob(b'new')
        db.close()
        self.assertTrue(os.path.exists(self.path('empty', 'blobs', '.layout')))

    def test_state_files_of_the_wrong_kind_exit_2_naming_them(self):
        # .zodbblob a file, journal.sqlite, commit.log or .layout a
        # directory: each tool names the path, touches nothing (verify,
        # backup and export went on without the catalog; recover and
        # migrate gave an errno without the path).
        blobs = self.path('store', 'blobs')
        state = os.path.join(blobs, '.zodbblob')
        cases = {
            state: 'a regular file, not a directory',
            os.path.join(state, 'journal.sqlite'):
                'a directory, not a regular file',
            os.path.join(state, 'commit.log'):
                'a directory, not a regular file',
            os.path.join(blobs, '.layout'): 'a directory, not a regular file',
        }
        shutil.copytree(blobs, self.path('pristine'))
        for path, problem in cases.items():
            restore_with_kind_swapped(self.path('pristine'), blobs, path)
            for argv in (('verify', *self.storage(self.path('store'))),
                         ('recover', *self.storage(self.path('store'))),
                         ('backup', *self.storage(self.path('store')),
                          self.path('backups')),
                         ('export', *self.storage(self.path('store')),
                          self.path('out.zexp')),
                         ('migrate', blobs, self.path('migrated'),
                          '--layout', 'lawn')):
                with self.subTest(command=argv[0], path=path):
                    self.assertCannotRun(argv, f'{path} is {problem}')

    def test_a_config_naming_no_blob_directory_is_refused_too(self):
        # The same refusal with --config: a tool made the blob-dir of a
        # config a new, empty blob directory (or created it).
        shutil.copytree(self.path('store'), self.path('unmarked'))
        os.remove(self.path('unmarked', 'blobs', '.layout'))
        shutil.copytree(self.path('store'), self.path('empty'))
        shutil.rmtree(self.path('empty', 'blobs'))
        os.mkdir(self.path('empty', 'blobs'))
        shutil.copytree(self.path('store'), self.path('absent'))
        shutil.rmtree(self.path('absent', 'blobs'))
        for case, why in (('unmarked', 'no .layout marker'),
                          ('empty', 'no .layout marker'),
                          ('absent', 'no such directory')):
            blobs = self.path(case, 'blobs')
            config = self.path(f'{case}.conf')
            with open(config, 'w') as f:
                f.write(f'%import zodbblob\n'
                        f'<zodbblob>\n'
                        f'  blob-dir {blobs}\n'
                        f'  <filestorage>\n'
                        f'    path {self.path(case, "Data.fs")}\n'
                        f'  </filestorage>\n'
                        f'</zodbblob>\n')
            for command, *rest in (('verify',), ('recover',),
                                   ('backup', self.path('backups')),
                                   ('export', self.path('out.zexp')),
                                   ('import', self.path('empty.zexp'))):
                with self.subTest(command=command, case=case):
                    self.assertCannotRun(
                        (command, '--config', config, *rest),
                        f'--config {config}: blob-dir {blobs} is not a blob '
                        f'directory: {why}')
        # A storage's own first open, from the same config, still makes
        # the blob directory.
        from zodbblob.config import storage_from_file
        for case in ('empty', 'absent'):
            storage = storage_from_file(self.path(f'{case}.conf'))
            storage.close()
            self.assertTrue(os.path.exists(
                self.path(case, 'blobs', '.layout')))


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
