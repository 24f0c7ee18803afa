"""Serving zodbblob through real ZEO server processes on 127.0.0.1.

Stock ``ZEO.ClientStorage`` clients, each with a blob cache of its own,
talk to ``runzeo -C zeo.conf`` and to ``zodbblob serve``.
"""

import io
import logging
import os
import shutil
import signal
import sys
import tempfile
import unittest

import ZConfig
import ZEO
import ZODB
import ZODB.FileStorage

import zodbblob
from zodbblob.cli import main, make_parser
from zodbblob.cli.serve import parse_address, s3_settings, serve_config
from zodbblob.objectstore import ObjectStoreSettings
from zodbblob.storage.catalog import Journal
from zodbblob.testing import (
    ZEO_SERVER,
    ServerProcess,
    ServerStartError,
    free_port,
    serve_command,
)
from zodbblob.tests.test_config import blob_files, commit_blob, read_blob


class TemporaryDirectory:

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix='zodbblob-serve-')
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)

    def path(self, *names):
        return os.path.join(self.directory, *names)

    def client(self, address, name):
        """A stock ZEO client database with a blob cache of its own."""
        db = ZEO.DB(address, blob_dir=self.path(name + '-cache'))
        # Looked up when called: DB.close replaces itself once closed.
        self.addCleanup(lambda: db.close())
        return db

    def start(self, argv, address, cwd=None):
        server = ServerProcess(argv, address, cwd=cwd or self.directory,
                               log_path=self.path('server.log'))
        server.start()
        self.addCleanup(server.stop)
        return server

    def assertSecondClientReadsBlobOfFirst(self, address, data):
        writer = self.client(address, 'writer')
        commit_blob(writer, data)
        reader = self.client(address, 'reader')
        self.assertEqual(read_blob(reader), data)
        writer.close()
        reader.close()

    def assertReopensCleanlyWithBlob(self, blob_dir, data_fs, data):
        """The served storage was closed, not just left behind: its
        journal says so, it reopens without recovering or rebuilding
        anything, and the blob is there."""
        journal = Journal(blob_dir, read_only=True)
        try:
            self.assertEqual(journal.get_meta('state'), 'closed')
        finally:
            journal.close()
        warnings = io.StringIO()
        handler = logging.StreamHandler(warnings)
        handler.setLevel(logging.WARNING)
        logging.getLogger('zodbblob').addHandler(handler)
        try:
            db = ZODB.DB(zodbblob.BlobStorage(
                blob_dir, ZODB.FileStorage.FileStorage(data_fs)))
        finally:
            logging.getLogger('zodbblob').removeHandler(handler)
        try:
            self.assertEqual(read_blob(db), data)
        finally:
            db.close()
        self.assertEqual(warnings.getvalue(), '')


class RunzeoTests(TemporaryDirectory, unittest.TestCase):

    def test_runzeo_serves_a_zodbblob_storage_to_stock_clients(self):
        address = ('127.0.0.1', free_port())
        with open(self.path('zeo.conf'), 'w') as f:
            f.write(f"""\
%import zodbblob

<zeo>
  address 127.0.0.1:{address[1]}
</zeo>

<zodbblob 1>
  blob-dir {self.path('blobs')}
  <filestorage>
    path {self.path('Data.fs')}
  </filestorage>
</zodbblob>
""")
        server = self.start(
            [sys.executable, '-m', 'ZEO.runzeo', '-C', self.path('zeo.conf')],
            address)
        self.assertSecondClientReadsBlobOfFirst(address, b'via runzeo')
        self.assertEqual(blob_files(self.path('blobs')), [b'via runzeo'])
        self.assertEqual(server.stop(), 0, server.output())
        self.assertReopensCleanlyWithBlob(
            self.path('blobs'), self.path('Data.fs'), b'via runzeo')


class ServeTests(TemporaryDirectory, unittest.TestCase):

    def test_serve_keeps_data_in_var_of_the_working_directory(self):
        address = ('127.0.0.1', free_port())
        server = self.start(serve_command(
            '--address', f'127.0.0.1:{address[1]}'), address)
        data_fs = self.path('var', 'filestorage', 'Data.fs')
        blob_dir = self.path('var', 'blobstorage')
        self.assertTrue(os.path.isfile(data_fs))
        with open(os.path.join(blob_dir, '.layout')) as marker:
            self.assertEqual(marker.read().strip(), 'bushy')
        self.assertSecondClientReadsBlobOfFirst(address, b'served')
        self.assertEqual(blob_files(blob_dir), [b'served'])
        self.assertEqual(server.stop(), 0, server.output())
        self.assertIn(f'Serving ZEO on 127.0.0.1:{address[1]}',
                      server.output())
        self.assertIn(f"storage '1': database {data_fs}, blobs in "
                      f"{blob_dir}\n", server.output())
        self.assertReopensCleanlyWithBlob(blob_dir, data_fs, b'served')

    def test_ctrl_c_stops_serve_cleanly(self):
        address = ('127.0.0.1', free_port())
        var = self.path('data')
        server = self.start(serve_command(
            '--address', f'127.0.0.1:{address[1]}', '--var', var,
            '--layout', 'lawn'), address)
        writer = self.client(address, 'writer')
        commit_blob(writer, b'before ctrl-c')
        writer.close()
        self.assertEqual(server.stop(signal.SIGINT), 0, server.output())
        self.assertIn('terminated by SIGINT', server.output())
        # Nothing after the last word: no traceback of an event loop left
        # to the garbage collector at exit (seen from the zodbblob script
        # after an idle while; this run does not always provoke it).
        self.assertTrue(server.output().rstrip().endswith(
            "Stopped; closed storages '1'"), server.output())
        self.assertNotIn('Traceback', server.output())
        self.assertReopensCleanlyWithBlob(
            os.path.join(var, 'blobstorage'),
            os.path.join(var, 'filestorage', 'Data.fs'), b'before ctrl-c')

    def test_serve_config_runs_that_file_at_the_given_address(self):
        address = ('127.0.0.1', free_port())
        with open(self.path('zeo.conf'), 'w') as f:
            # The address here is taken; --address must win over it.
            f.write(f"""\
%import zodbblob
<zeo>
  address 127.0.0.1:1
</zeo>
<zodbblob>
  blob-dir {self.path('blobs')}
  <mappingstorage/>
</zodbblob>
""")
        server = self.start(serve_command(
            '--config', self.path('zeo.conf'),
            '--address', f'127.0.0.1:{address[1]}'), address)
        self.assertSecondClientReadsBlobOfFirst(address, b'in memory')
        self.assertEqual(blob_files(self.path('blobs')), [b'in memory'])
        self.assertEqual(server.stop(), 0, server.output())

    def test_serve_with_a_bad_config_says_why_and_creates_nothing(self):
        with open(self.path('zeo.conf'), 'w') as f:
            f.write(f"""\
%import zodbblob
<zeo>
  address 127.0.0.1:{free_port()}
</zeo>
<zodbblob>
  blob-dir {self.path('blobs')}
  layout leaves
  <filestorage>
    path {self.path('Data.fs')}
  </filestorage>
</zodbblob>
""")
        server = ServerProcess(
            serve_command('--config', self.path('zeo.conf')),
            ('127.0.0.1', 1), cwd=self.directory,
            log_path=os.path.join(tempfile.gettempdir(),
                                  os.path.basename(self.directory) + '.log'))
        self.addCleanup(os.remove, server.log_path)
        with self.assertRaises(ServerStartError) as caught:
            server.start()
        self.assertIn("layout 'leaves' is not a blob directory layout",
                      str(caught.exception))
        self.assertEqual(sorted(os.listdir(self.directory)), ['zeo.conf'])


class ServeArgumentTests(TemporaryDirectory, unittest.TestCase):

    def setUp(self):
        super().setUp()
        here = os.getcwd()
        os.chdir(self.directory)
        self.addCleanup(os.chdir, here)

    def test_default_config_serves_loopback_port_8100_from_var(self):
        os.makedirs('var/filestorage')  # as serve makes it, before loading
        schema = ZConfig.loadSchema(
            os.path.join(os.path.dirname(ZEO.__file__), 'schema.xml'))
        config, _ = ZConfig.loadConfigFile(schema, io.StringIO(
            serve_config()))
        self.assertEqual(config.zeo.address.address, ('127.0.0.1', 8100))
        [storage] = config.storages
        self.assertEqual(storage.name, '1')
        self.assertEqual(storage.config.blob_dir,
                         self.path('var', 'blobstorage'))
        self.assertEqual(storage.config.base.config.path,
                         self.path('var', 'filestorage', 'Data.fs'))
        self.assertEqual(storage.config.layout, 'automatic')

    def test_dollar_in_var_reaches_the_storage_unchanged(self):
        schema = ZConfig.loadSchema(
            os.path.join(os.path.dirname(ZEO.__file__), 'schema.xml'))
        var = tempfile.mkdtemp(prefix='price$HOME-')
        self.addCleanup(shutil.rmtree, var)
        os.mkdir(os.path.join(var, 'filestorage'))
        config, _ = ZConfig.loadConfigFile(schema, io.StringIO(
            serve_config(var=var)))
        self.assertEqual(config.storages[0].config.blob_dir,
                         os.path.join(var, 'blobstorage'))

    def test_bare_port_means_loopback(self):
        self.assertEqual(parse_address('8200'), ('127.0.0.1', 8200))
        self.assertEqual(parse_address('0.0.0.0:8200'), ('0.0.0.0', 8200))
        self.assertEqual(parse_address('[::1]:8200'), ('::1', 8200))

    def test_malformed_addresses_are_refused(self):
        for text in (':8200', 'localhost:http', '127.0.0.1:70000', '::1:82'):
            with self.subTest(address=text):
                with self.assertRaises(SystemExit) as caught, \
                        _quiet_stderr() as stderr:
                    main(['serve', '--address', text])
                self.assertEqual(caught.exception.code, 2)
                self.assertIn(repr(text), stderr.getvalue())

    def s3_config(self, *argv):
        """The zeo.conf `serve ARGV` would run, loaded by ZEO's schema."""
        args = make_parser().parse_args(['serve', *argv])
        os.makedirs('var/filestorage', exist_ok=True)
        schema = ZConfig.loadSchema(
            os.path.join(os.path.dirname(ZEO.__file__), 'schema.xml'))
        text = serve_config(object_store=s3_settings(args),
                            cache_size=args.s3_cache_size)
        config, _ = ZConfig.loadConfigFile(schema, io.StringIO(text))
        [storage] = config.storages
        return storage.config

    def test_s3_options_reach_the_s3_section_of_the_served_config(self):
        config = self.s3_config(
            '--s3-bucket', 'zodb-blobs', '--s3-prefix', 'site$1',
            '--s3-endpoint-url', 'http://minio.example:9000',
            '--s3-region', 'eu-west-1', '--s3-cache-size', '2GB')
        self.assertEqual(config.object_store, ObjectStoreSettings(
            'zodb-blobs', prefix='site$1/',
            endpoint_url='http://minio.example:9000', region='eu-west-1'))
        self.assertEqual(config.cache_size, 2 << 30)

    def test_s3_bucket_alone_gives_a_section_of_the_bucket(self):
        config = self.s3_config('--s3-bucket', 'zodb-blobs')
        self.assertEqual(config.object_store,
                         ObjectStoreSettings('zodb-blobs'))
        self.assertIsNone(config.cache_size)

    def test_without_s3_options_the_config_has_no_s3_section(self):
        config = self.s3_config()
        self.assertIsNone(config.object_store)
        self.assertIsNone(config.cache_size)

    def test_s3_options_without_s3_bucket_are_refused(self):
        for option, value in [('--s3-prefix', 'zodb'),
                              ('--s3-endpoint-url', 'http://minio:9000'),
                              ('--s3-region', 'eu-west-1'),
                              ('--s3-cache-size', '1GB')]:
            with self.subTest(option=option):
                # Parsed, not run: without the refusal, main() would serve.
                with self.assertRaises(SystemExit) as caught, \
                        _quiet_stderr() as stderr:
                    s3_settings(make_parser().parse_args(
                        ['serve', '--var', 'served', option, value]))
                self.assertEqual(caught.exception.code, 2)
                [line] = stderr.getvalue().splitlines()
                self.assertIn(f'{option} needs --s3-bucket', line)
                self.assertFalse(os.path.exists('served'))

    def test_wrong_s3_values_are_refused_in_one_line(self):
        for option, value in [('--s3-prefix', '/zodb'),
                              ('--s3-prefix', 'a/../b'),
                              ('--s3-cache-size', 'lots'),
                              ('--s3-cache-size', '-1')]:
            with self.subTest(option=option, value=value):
                with self.assertRaises(SystemExit) as caught, \
                        _quiet_stderr() as stderr:
                    s3_settings(make_parser().parse_args(
                        ['serve', '--var', 'served', '--s3-bucket', 'b',
                         option, value]))
                self.assertEqual(caught.exception.code, 2)
                [line] = stderr.getvalue().splitlines()
                self.assertIn(option, line)
                self.assertIn(repr(value), line)
                self.assertFalse(os.path.exists('served'))

    def test_s3_options_with_config_are_refused(self):
        with self.assertRaises(SystemExit) as caught, \
                _quiet_stderr() as stderr:
            main(['serve', '--config', 'zeo.conf', '--s3-bucket', 'b'])
        self.assertEqual(caught.exception.code, 2)
        self.assertIn('--s3-*', stderr.getvalue())

    def test_help_says_credentials_come_from_the_environment(self):
        text = make_parser()._subparsers._group_actions[0].choices[
            'serve'].format_help()
        self.assertIn('AWS_ACCESS_KEY_ID', ' '.join(text.split()))
        self.assertNotIn('--s3-secret', text)

    def test_var_with_config_is_refused(self):
        with self.assertRaises(SystemExit) as caught, \
                _quiet_stderr() as stderr:
            main(['serve', '--config', 'zeo.conf', '--var', 'elsewhere'])
        self.assertEqual(caught.exception.code, 2)
        self.assertIn('--var', stderr.getvalue())
        self.assertFalse(os.path.exists('elsewhere'))


class _quiet_stderr:

    def __enter__(self):
        self.saved, sys.stderr = sys.stderr, io.StringIO()
        return sys.stderr

    def __exit__(self, *exc_info):
        sys.stderr = self.saved


# A stand-in server, misbehaving as told: `stubborn` ignores SIGTERM,
# `failing` exits with status 3 on it, `silent` never listens.
STAND_IN_SERVER = """
import signal, socket, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
if mode == 'stubborn':
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == 'failing':
    signal.signal(signal.SIGTERM, lambda *args: sys.exit(3))
print('stand-in server up', flush=True)
if mode != 'silent':
    listener = socket.create_server(('127.0.0.1', port))
time.sleep(60)
"""


class ServerProcessTests(TemporaryDirectory, unittest.TestCase):

    def stand_in(self, mode):
        port = free_port()
        return ServerProcess(
            [sys.executable, '-c', STAND_IN_SERVER, mode, str(port)],
            ('127.0.0.1', port), cwd=self.directory,
            log_path=self.path('server.log'))

    def test_server_that_ignores_sigterm_is_killed_and_says_so(self):
        server = self.stand_in('stubborn')
        server.start()
        self.assertEqual(server.stop(timeout=0.5), -signal.SIGKILL)

    def test_stop_reports_the_exit_status_of_the_server(self):
        server = self.stand_in('failing')
        server.start()
        self.assertEqual(server.stop(), 3)

    def test_server_that_never_listens_fails_start_with_its_output(self):
        server = self.stand_in('silent')
        with self.assertRaises(ServerStartError) as caught:
            server.start(timeout=0.5)
        self.assertIn('did not listen', str(caught.exception))
        self.assertIn('stand-in server up', str(caught.exception))
        self.assertIsNone(server.process)


class ZEOServerLayerTests(TemporaryDirectory, unittest.TestCase):

    layer = ZEO_SERVER

    def test_layer_server_serves_blobs_to_stock_clients(self):
        self.assertSecondClientReadsBlobOfFirst(self.layer.address,
                                                b'from the layer')
        self.assertIn(b'from the layer', blob_files(self.layer.blob_dir))

    def test_second_server_on_the_layer_var_is_refused_with_its_output(self):
        # Its log names no storage it closed: it had none open.
        address = ('127.0.0.1', free_port())
        server = ServerProcess(
            serve_command('--address', f'127.0.0.1:{address[1]}',
                          '--var', self.layer.var),
            address, cwd=self.directory, log_path=self.path('second.log'))
        with self.assertRaises(ServerStartError) as caught:
            server.start()
        message = str(caught.exception)
        self.assertIn('exited with status 2', message)
        # The storage locks its blob directory before it opens Data.fs.
        self.assertIn(os.path.join(self.layer.blob_dir, '.zodbblob', 'lock'),
                      message)
        self.assertNotIn('Stopped; closed storages', message)
