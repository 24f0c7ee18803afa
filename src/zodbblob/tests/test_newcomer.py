"""What a newcomer meets first, tried as written: every literal block of
README.rst (run, or loaded and opened for real), doc/recipe.rst's
zope.conf for cookiecutter-zope-instance, ``zodbblob serve`` from an empty
directory and beside a database in the places it no longer uses, and the
mode of an exported file.
"""

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import unittest

import ZConfig
import ZODB
import ZODB.config
import ZODB.FileStorage

import zodbblob
import zodbblob.zeo
from zodbblob.testing import (BLOB_STORAGE, S3_MISSING, S3_SERVER,
                              ServerProcess, free_port,
                              serve_command)
from zodbblob.tests.test_config import blob_files, commit_blob, read_blob

if not S3_MISSING:
    from zodbblob.objectstore import Bucket

TOP = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir,
                   os.pardir)
README = os.path.join(TOP, 'README.rst')
RECIPE_DOC = os.path.join(TOP, 'doc', 'recipe.rst')

# Zope's zope.conf schema, cut down to what concerns databases, for when
# Zope is not installed: <zodb_db> extends ZODB's <zodb> with Zope's keys.
ZOPE_SCHEMA = """\
<schema>
  <import package="ZODB"/>
  <sectiontype name="zodb_db" implements="ZODB.database" extends="zodb">
    <multikey name="mount-point" required="yes" attribute="mount_points"/>
    <key name="container-class"/>
  </sectiontype>
  <key name="instancehome" required="yes"/>
  <multisection type="ZODB.database" name="*" attribute="databases"/>
</schema>
"""


def literal_blocks(path):
    """The literal blocks of an rst file (after ``::`` or a
    ``code-block``), dedented, with the line each starts on."""
    with open(path) as f:
        lines = f.read().split('\n')
    blocks = []
    for number, line in enumerate(lines):
        if not (line.endswith('::') or line.startswith('.. code-block::')):
            continue
        body, at = [], number + 1
        while at < len(lines) and not lines[at].strip():
            at += 1
        start = at
        while at < len(lines) and (not lines[at].strip()
                                   or lines[at].startswith(' ')):
            body.append(lines[at])
            at += 1
        if body:
            blocks.append((start + 1,
                           textwrap.dedent('\n'.join(body)).strip() + '\n'))
    return blocks


def kind(block):
    """What a README block is: 'shell', 'zope.conf', 'zodb', 'zeo.conf'
    or 'python'."""
    if block.startswith('python3 -m venv'):
        return 'shell'
    if '%import zodbblob' in block:
        if '<zodb_db ' in block:
            return 'zope.conf'
        if '<zeo>' in block:
            return 'zeo.conf'
        if '<zodb>' in block:
            return 'zodb'
        return 'unknown config'
    return 'python'


def readme_blocks(wanted, containing=''):
    return [block for _, block in literal_blocks(README)
            if kind(block) == wanted and containing in block]


def with_port(text, port):
    return text.replace('8100', str(port))


def zope_schema():
    """Zope's own zope.conf schema if Zope is installed, else the cut-down
    one above."""
    try:
        import Zope2.Startup
    except ImportError:
        return ZConfig.loadSchemaFile(io.StringIO(ZOPE_SCHEMA))
    return ZConfig.loadSchema(os.path.join(
        os.path.dirname(Zope2.Startup.__file__), 'wsgischema.xml'))


def zope_conf_databases(text, instancehome):
    """The database factories of a zope.conf (or of its database part:
    a real zope.conf always has instancehome, which such a part lacks)."""
    if not re.search(r'(?m)^\s*instancehome\s', text):
        text = f'instancehome {instancehome}\n' + text
    root, _ = ZConfig.loadConfigFile(zope_schema(), io.StringIO(text))
    return root.databases


class InEmptyDirectory:

    def setUp(self):
        self.directory = os.path.realpath(
            tempfile.mkdtemp(prefix='zodbblob-newcomer-'))
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        here = os.getcwd()
        os.chdir(self.directory)
        self.addCleanup(os.chdir, here)

    def path(self, *names):
        return os.path.join(self.directory, *names)


class ReadmeBlocksTests(InEmptyDirectory, unittest.TestCase):

    def test_every_block_is_a_command_python_or_a_known_config(self):
        kinds = [kind(block) for _, block in literal_blocks(README)]
        self.assertNotIn('unknown config', kinds)
        self.assertEqual(kinds[:2], ['shell', 'shell'])
        for number, block in literal_blocks(README):
            if kind(block) == 'python':
                with self.subTest(line=number):
                    compile(block, f'README.rst line {number}', 'exec')
        # The configs the README promises, each tried below.
        self.assertEqual(
            sorted(k for k in kinds if k not in ('shell', 'python')),
            ['zeo.conf', 'zodb', 'zodb', 'zope.conf', 'zope.conf',
             'zope.conf', 'zope.conf'])

    def test_readme_starts_with_the_serve_and_the_test_command(self):
        commands = readme_blocks('shell')
        self.assertEqual(len(commands), 2)
        self.assertTrue(commands[0].strip().endswith('.venv/bin/zodbblob '
                                                     'serve'))
        self.assertIn(".[test,recipe]", commands[1])
        self.assertTrue(commands[1].strip().endswith(
            '--test-path=src --all'))

    def test_python_wrapper_runs_in_an_empty_directory(self):
        [block] = readme_blocks('python', 'zodbblob.BlobStorage(')
        exec(compile(block, 'README.rst', 'exec'), {})
        db = ZODB.DB(zodbblob.BlobStorage(
            'var/blobstorage',
            ZODB.FileStorage.FileStorage('var/filestorage/Data.fs')))
        commit_blob(db, b'wrapped as the README says')
        db.close()
        self.assertEqual(blob_files(self.path('var', 'blobstorage')),
                         [b'wrapped as the README says'])

    def test_storage_configs_open_in_an_empty_directory(self):
        blocks = [(k, block) for _, block in literal_blocks(README)
                  for k in [kind(block)]
                  if k in ('zope.conf', 'zodb') and '<zodbblob>' in block
                  and '<s3>' not in block]   # BucketReadmeTests
        self.assertEqual(len(blocks), 3)
        for number, (config_kind, block) in enumerate(blocks):
            with self.subTest(config_kind, block=number):
                instance = self.path(str(number))
                os.makedirs(instance)
                os.chdir(instance)
                block = block.replace('/srv/plone/instance', instance)
                # As the README says: FileStorage makes no directories.
                os.makedirs(os.path.join(instance, 'var', 'filestorage'))
                if config_kind == 'zodb':
                    db = ZODB.config.databaseFromString(block)
                else:
                    [factory] = zope_conf_databases(block, instance)
                    self.assertEqual(factory.config.mount_points, ['/'])
                    db = factory.open()
                try:
                    self.assertIsInstance(db.storage, zodbblob.BlobStorage)
                    commit_blob(db, b'from the README')
                finally:
                    db.close()
                self.assertEqual(
                    blob_files(os.path.join(instance, 'var', 'blobstorage')),
                    [b'from the README'])

    def test_zodb_db_block_is_a_zope_conf_not_a_zodb_config(self):
        # Why the README shows two forms: ZODB's own schema knows no
        # <zodb_db> (nor mount-point).
        block = readme_blocks('zope.conf', '<zodbblob>')[0]
        os.makedirs('var/filestorage')
        with self.assertRaises(ZConfig.ConfigurationError) as raised:
            ZODB.config.databaseFromString(block)
        self.assertIn('zodb_db', str(raised.exception))

    def test_testing_layer_example_passes_in_its_layer(self):
        [block] = readme_blocks('python', 'layer = BLOB_STORAGE')
        namespace = {'__name__': 'readme_example'}
        exec(compile(block, 'README.rst', 'exec'), namespace)
        test = namespace['ImageTests']('test_thumbnail_is_stored_as_a_blob')
        result = unittest.TestResult()
        BLOB_STORAGE.testSetUp()
        try:
            test.run(result)
            blob_dir = BLOB_STORAGE.blob_dir
            with BLOB_STORAGE.db.transaction() as connection:
                with connection.root()['thumb'].open() as f:
                    self.assertEqual(f.read(), b'...')
        finally:
            BLOB_STORAGE.testTearDown()
        self.assertEqual((result.testsRun, result.errors, result.failures),
                         (1, [], []))
        self.assertFalse(os.path.exists(blob_dir))


@unittest.skipIf(S3_MISSING, S3_MISSING)
class BucketReadmeTests(InEmptyDirectory, unittest.TestCase):
    """README's zope.conf on a bucket, pointed at moto's S3 server (a
    real process on 127.0.0.1) instead of MinIO: it opens, and a blob
    committed through it lands in the bucket under its prefix."""

    layer = S3_SERVER

    def test_the_zope_conf_on_a_bucket(self):
        [block] = readme_blocks('zope.conf', '<s3>')
        settings = S3_SERVER.make_bucket()
        block = block.replace('https://minio.example.com',
                              S3_SERVER.endpoint_url)
        block = block.replace('bucket site-blobs', f'bucket {settings.bucket}')
        # Credentials from boto3's chain, as the README says.
        for name, value in (('AWS_ACCESS_KEY_ID', 'testing'),
                            ('AWS_SECRET_ACCESS_KEY', 'testing'),
                            ('AWS_DEFAULT_REGION', 'us-east-1')):
            self.addCleanup(os.environ.pop, name, None)
            os.environ[name] = value
        os.makedirs('var/filestorage')
        [factory] = zope_conf_databases(block, self.directory)
        db = factory.open()
        try:
            self.assertIsNotNone(db.storage.object_store)
            commit_blob(db, b'from the README, on a bucket')
        finally:
            db.close()
        bucket = Bucket(settings)
        self.addCleanup(bucket.client.close)
        [writer, marker, (key, size)] = bucket.iter_keys('')
        self.assertEqual(writer[0], 'plone/.writer.zodbblob.json')
        self.assertEqual(marker[0], 'plone/.zodbblob.json')
        self.assertTrue(key.startswith('plone/'), key)
        self.assertEqual(size, len(b'from the README, on a bucket'))


class ReadmeServerTests(InEmptyDirectory, unittest.TestCase):
    """README's zeo.conf, served from an empty directory by ``zodbblob
    serve --config``, and its clients, Python and configured, on it."""

    def test_readme_zeo_conf_and_clients_work_from_an_empty_directory(self):
        port = free_port()
        [zeo_conf] = readme_blocks('zeo.conf')
        with open('zeo.conf', 'w') as f:
            f.write(with_port(zeo_conf, port))
        server = ServerProcess(serve_command('--config', 'zeo.conf'),
                               ('127.0.0.1', port), cwd=self.directory,
                               log_path=self.path('server.log'))
        server.start()
        self.addCleanup(server.stop)
        self.assertIn(
            f"storage '1': database "
            f"{self.path('var', 'filestorage', 'Data.fs')}, blobs in "
            f"{self.path('var', 'blobstorage')}\n", server.output())

        stock_client = readme_blocks('python', 'ZEO.ClientStorage')[0]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(with_port(stock_client, port), 'README.rst',
                         'exec'), {})
        self.assertEqual(printed.getvalue(), "b'%PDF-1.7 ...'\n")
        [zodbblob_client] = readme_blocks('python', 'from zodbblob.zeo')
        exec(compile(with_port(zodbblob_client, port), 'README.rst', 'exec'),
             {})

        for number, block in enumerate(
                readme_blocks('zope.conf', '<zodbblobclient>')
                + readme_blocks('zodb', '<zodbblobclient>')):
            with self.subTest(block=number):
                block = with_port(block, port).replace(
                    'var/blobcache', f'var/blobcache-{number}')
                if '<zodb_db ' in block:
                    [factory] = zope_conf_databases(block, self.directory)
                    db = factory.open()
                else:
                    db = ZODB.config.databaseFromString(block)
                try:
                    self.assertIsInstance(db.storage,
                                          zodbblob.zeo.ClientStorage)
                    commit_blob(db, b'configured client', f'c{number}')
                    self.assertEqual(read_blob(db, f'c{number}'),
                                     b'configured client')
                finally:
                    db.close()

        self.assertEqual(server.stop(signal.SIGINT), 0, server.output())
        files = blob_files(self.path('var', 'blobstorage'))
        self.assertIn(b'%PDF-1.7 ...', files)
        self.assertEqual(files.count(b'configured client'), 2)


class CookiecutterZopeConfTests(InEmptyDirectory, unittest.TestCase):
    """doc/recipe.rst: the zope.conf cookiecutter-zope-instance writes,
    and the same wrapped in <zodbblob>."""

    def blocks(self):
        return [block for _, block in literal_blocks(RECIPE_DOC)
                if 'cookiecutter-zope-instance' in block]

    def test_written_zope_conf_loads_and_its_wrapped_form_keeps_blobs(self):
        written, wrapped = self.blocks()
        instance = self.directory
        os.makedirs(self.path('var', 'filestorage'))
        [stock] = zope_conf_databases(
            written.replace('/srv/plone/instance', instance), instance)
        self.assertEqual(stock.config.storage.config.blob_dir,
                         self.path('var', 'blobs'))
        [factory] = zope_conf_databases(
            wrapped.replace('/srv/plone/instance', instance), instance)
        db = factory.open()
        try:
            self.assertIsInstance(db.storage, zodbblob.BlobStorage)
            commit_blob(db, b'baked by cookiecutter')
        finally:
            db.close()
        self.assertEqual(blob_files(self.path('var', 'blobs')),
                         [b'baked by cookiecutter'])

    def test_unwrapped_blob_dir_is_refused_naming_where_it_is(self):
        written, wrapped = self.blocks()
        os.makedirs(self.path('var', 'filestorage'))
        # Wrapping without moving blob-dir out of <filestorage>.
        both = wrapped.replace(
            '<filestorage>\n',
            '<filestorage>\n        blob-dir /srv/plone/instance/var/blobs\n',
            1)
        with self.assertRaises(ZConfig.ConfigurationError) as raised:
            zope_conf_databases(both.replace('/srv/plone/instance',
                                             self.directory), self.directory)
        self.assertIn('remove blob-dir from <filestorage>',
                      str(raised.exception))


def zodbblob_command(*args, cwd):
    return subprocess.run([sys.executable, '-m', 'zodbblob.cli', *args],
                          cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def listing(top):
    return sorted((dirpath, sorted(dirnames), sorted(filenames))
                  for dirpath, dirnames, filenames in os.walk(top))


class ServeOldPlacesTests(InEmptyDirectory, unittest.TestCase):
    """A --var with a database where serve kept it before is refused:
    serving it would start an empty database beside it."""

    def assertRefused(self, var, named):
        before = listing(self.directory)
        result = zodbblob_command('serve', '--var', var, '--address',
                                  '127.0.0.1:0', cwd=self.directory)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn('error:', result.stderr)
        self.assertIn(named, result.stderr)
        self.assertIn(os.path.join(var, 'filestorage', 'Data.fs'),
                      result.stderr)
        self.assertEqual(listing(self.directory), before)

    def test_var_with_data_fs_at_its_top_is_refused_changing_nothing(self):
        var = self.path('var')
        os.mkdir(var)
        db = ZODB.DB(ZODB.FileStorage.FileStorage(os.path.join(var,
                                                               'Data.fs')))
        db.close()
        self.assertRefused(var, os.path.join(var, 'Data.fs'))

    def test_var_with_blobs_directory_is_refused_changing_nothing(self):
        var = self.path('old')
        os.makedirs(os.path.join(var, 'blobs'))
        self.assertRefused(var, os.path.join(var, 'blobs'))


EXPORT_UNDER_UMASK = """
import os, sys, ZODB, ZODB.FileStorage, zodbblob, persistent.mapping
from ZODB.blob import Blob
from zodbblob.cli import main
os.umask(0o027)
db = ZODB.DB(zodbblob.BlobStorage(
    'blobs', ZODB.FileStorage.FileStorage('Data.fs')))
with db.transaction() as conn:
    conn.root()['docs'] = persistent.mapping.PersistentMapping(
        report=Blob(b'data'))
with db.transaction() as conn:
    conn.exportFile(conn.root()['docs']._p_oid, 'stock.zexp')
db.close()
status = main(['export', '--data', 'Data.fs', '--blob-dir', 'blobs',
               '--path', '/docs', 'ours.zexp'])
assert status == 0, status
for name in ('stock.zexp', 'ours.zexp'):
    print(name, oct(os.stat(name).st_mode & 0o777))
"""


class ExportModeTests(InEmptyDirectory, unittest.TestCase):

    def test_exported_file_follows_the_umask_as_stock_export_does(self):
        result = subprocess.run(
            [sys.executable, '-c', EXPORT_UNDER_UMASK], cwd=self.directory,
            capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        modes = dict(line.split() for line in result.stdout.splitlines()
                     if line.endswith(('0o640', '0o600', '0o644')))
        self.assertEqual(modes, {'stock.zexp': '0o640', 'ours.zexp': '0o640'},
                         result.stdout)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
