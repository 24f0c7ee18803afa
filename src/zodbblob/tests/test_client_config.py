"""The <zodbblobclient> ZConfig section, parsed by ZConfig and opened
against real ZEO server processes."""

import io
import os
import shutil
import tempfile
import unittest

import ZConfig
import ZEO
import ZODB.config
from ZODB.blob import Blob

import zodbblob.config
import zodbblob.zeo
from zodbblob.cli import format_address
from zodbblob.tests import test_config as config_tests
from zodbblob.testing import (ZEO_SERVER, ServerProcess, free_port,
                              serve_command)

MB = 1024 * 1024
ZEO_TESTS = os.path.join(os.path.dirname(ZEO.__file__), 'tests')
CLIENT_SSL = f"""
    certificate {os.path.join(ZEO_TESTS, 'client.pem')}
    key {os.path.join(ZEO_TESTS, 'client_key.pem')}
    authenticate {os.path.join(ZEO_TESTS, 'server.pem')}
    server-hostname zodb.org
"""
SERVER_SSL = f"""
    certificate {os.path.join(ZEO_TESTS, 'server.pem')}
    key {os.path.join(ZEO_TESTS, 'server_key.pem')}
    authenticate {os.path.join(ZEO_TESTS, 'client.pem')}
"""

# Zope's zope.conf schema, cut down to what concerns storages.
ZOPE_SCHEMA = """\
<schema>
  <import package="ZODB"/>
  <sectiontype name="zodb_db" implements="ZODB.database" extends="zodb">
    <multikey name="mount-point" required="yes" attribute="mount_points"/>
  </sectiontype>
  <key name="instancehome" required="yes"/>
  <multisection type="ZODB.database" name="*" attribute="databases"/>
</schema>
"""


def section_type(name, *packages):
    """Section type `name` as ZConfig reads it from `packages`' components."""
    imports = ''.join(f'<import package="{package}"/>'
                      for package in packages)
    schema = ZConfig.loadSchemaFile(io.StringIO(f'<schema>{imports}</schema>'))
    return schema.gettype(name)


def keys_of(sectiontype):
    """``{key name: key info}`` of a section type, sections left out."""
    return {info.name: info for _, info in sectiontype
            if not info.issection()}


def sections_of(sectiontype):
    """``{attribute: section info}`` of a section type's subsections."""
    return {info.attribute: info for _, info in sectiontype
            if info.issection()}


ZEOCLIENT = section_type('zeoclient', 'ZODB')
CLIENTSTORAGE = section_type('clientstorage', 'ZODB', 'ZEO')
ZODBBLOBCLIENT = section_type('zodbblobclient', 'ZODB', 'zodbblob')


def default_text(keyinfo):
    default = keyinfo.getdefault()
    if isinstance(default, list):
        return [value.value for value in default]
    return None if default is None else default.value


def sample_values(address, directory):
    """A working value for every key of ZODB's <zeoclient> and ZEO's
    <clientstorage> (sections aside), none of them its default."""
    return {
        'server': format_address(address),
        'blob-dir': os.path.join(directory, 'blob-cache'),
        'shared-blob-dir': 'off',
        'blob-cache-size': '10MB',
        'blob-cache-size-check': '20',
        'storage': '1',
        'cache-size': '5MB',
        'name': 'configured-client',
        'client': 'zodbblob-test',
        'var': directory,
        'min-disconnect-poll': '1',
        'max-disconnect-poll': '2',
        'wait': 'on',
        'read-only': 'off',
        'read-only-fallback': 'on',
        'username': 'alice',
        'password': 'secret',
        'realm': 'zodb',
        'drop-cache-rather-verify': 'on',
        'client-label': 'config-test',
        # <clientstorage> only
        'cache-path': os.path.join(directory, 'client.zec'),
        'server-sync': 'on',
        'wait-timeout': '7',
    }


def section_text(sectiontype, values, keys):
    lines = [f'  {key} {values[key]}' for key in keys]
    return '\n'.join([f'<{sectiontype}>', *lines, f'</{sectiontype}>'])


def commit_blob(db, data, key):
    with db.transaction() as connection:
        connection.root()[key] = Blob(data)


def read_blob(db, key):
    """``(data, path of the committed file it was read from)``."""
    with db.transaction() as connection:
        blob = connection.root()[key]
        with blob.open() as blob_file:
            return blob_file.read(), blob.committed()


def listing(directory):
    return sorted(os.path.relpath(os.path.join(dirpath, name), directory)
                  for dirpath, dirnames, filenames in os.walk(directory)
                  for name in dirnames + filenames)


class TemporaryDirectory(config_tests.TemporaryDirectory):

    prefix = 'zodbblob-client-config-'


class SectionKeysTests(unittest.TestCase):
    """<zodbblobclient> takes what ZEO's two client sections take."""

    def assertSameKey(self, ours, theirs):
        self.assertEqual(
            (ours.datatype, default_text(ours), ours.minOccurs,
             ours.maxOccurs, ours.attribute),
            (theirs.datatype, default_text(theirs), theirs.minOccurs,
             theirs.maxOccurs, theirs.attribute), ours.name)

    def test_every_key_of_zodbs_zeoclient_section_is_taken_as_it_is(self):
        ours = keys_of(ZODBBLOBCLIENT)
        self.assertGreaterEqual(len(keys_of(ZEOCLIENT)), 20)
        for name, info in keys_of(ZEOCLIENT).items():
            with self.subTest(key=name):
                self.assertIn(name, ours)
                self.assertSameKey(ours[name], info)

    def test_every_key_and_section_of_zeos_clientstorage_is_taken(self):
        ours = keys_of(ZODBBLOBCLIENT)
        for name, info in keys_of(CLIENTSTORAGE).items():
            with self.subTest(key=name):
                self.assertIn(name, ours)
                if name != 'server':  # a multikey of either section
                    self.assertSameKey(ours[name], info)
        our_sections = sections_of(ZODBBLOBCLIENT)
        for attribute, info in sections_of(CLIENTSTORAGE).items():
            with self.subTest(section=attribute):
                self.assertIn(attribute, our_sections)
                ssl = our_sections[attribute].sectiontype
                self.assertEqual(ssl.datatype, info.sectiontype.datatype)
                self.assertEqual(set(keys_of(ssl)),
                                 set(keys_of(info.sectiontype)))
                for name, key in keys_of(info.sectiontype).items():
                    self.assertSameKey(keys_of(ssl)[name], key)

    def test_the_same_text_parses_to_the_same_values_as_in_zeoclient(self):
        directory = tempfile.mkdtemp(prefix='zodbblob-client-config-')
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        values = sample_values(('127.0.0.1', 8100), directory)
        keys = list(keys_of(ZEOCLIENT))
        self.assertEqual(set(keys) - set(values), set(),
                         "ZODB's zeoclient has keys that "
                         'ClientStorageConfig.open and this test do not know')
        schema = ZODB.config.getStorageSchema()
        parsed = {}
        for name in ('zeoclient', 'zodbblobclient'):
            text = '%import zodbblob\n' + section_text(name, values, keys)
            root, _ = ZConfig.loadConfigFile(schema, io.StringIO(text))
            parsed[name] = root.storage.config
        for key in keys:
            with self.subTest(key=key):
                attribute = keys_of(ZEOCLIENT)[key].attribute
                ours = getattr(parsed['zodbblobclient'], attribute)
                theirs = getattr(parsed['zeoclient'], attribute)
                if key == 'server':
                    ours = [server.address for server in ours]
                    theirs = [server.address for server in theirs]
                self.assertEqual(ours, theirs)

    def test_blob_download_timeout_is_seconds_or_a_time_interval(self):
        schema = ZODB.config.getStorageSchema()
        for text, seconds in [(None, 300.0), ('0.5', 0.5), ('300', 300.0),
                              ('45s', 45.0), ('5m', 300.0), ('2h', 7200.0)]:
            with self.subTest(value=text):
                key = '' if text is None else f'blob-download-timeout {text}'
                root, _ = ZConfig.loadConfigFile(schema, io.StringIO(f"""
                    %import zodbblob
                    <zodbblobclient>
                      server 127.0.0.1:8100
                      {key}
                    </zodbblobclient>
                    """))
                self.assertEqual(root.storage.config.blob_download_timeout,
                                 seconds)

    def test_zeo_conf_with_server_ssl_still_imports_zodbblob(self):
        # ZEO's component cannot be imported into a zeo.conf (its client
        # <ssl> type clashes with the server's); ours can.
        schema = ZConfig.loadSchema(
            os.path.join(os.path.dirname(ZEO.__file__), 'schema.xml'))
        root, _ = ZConfig.loadConfigFile(schema, io.StringIO(f"""
            %import zodbblob
            <zeo>
              address 127.0.0.1:8100
              <ssl>
                {SERVER_SSL}
              </ssl>
            </zeo>
            <zodbblobclient 1>
              server 127.0.0.1:8101
              <zodbblob-ssl>
                {CLIENT_SSL}
              </zodbblob-ssl>
            </zodbblobclient>
            """))
        [client] = root.storages
        self.assertIsInstance(client, zodbblob.config.ClientStorageConfig)
        context, hostname = client.config.ssl
        self.assertEqual(hostname, 'zodb.org')
        self.assertTrue(context.check_hostname)


class ConfigErrorTests(TemporaryDirectory, unittest.TestCase):
    """A bad <zodbblobclient> fails at load, naming the key and the value,
    before anything is created or any server contacted."""

    def setUp(self):
        super().setUp()
        os.mkdir(self.path('mount'))
        with open(self.path('mount', '.layout'), 'w') as marker:
            marker.write('bushy')
        with open(self.path('file'), 'w') as f:
            f.write('not a directory')
        os.mkdir(self.path('unmarked'))
        with open(self.path('unmarked', '0x00'), 'w') as f:
            f.write('a file of some other directory')
        os.mkdir(self.path('marked-unknown'))
        with open(self.path('marked-unknown', '.layout'), 'w') as marker:
            marker.write('hedge')

    def assertRefused(self, lines, *names):
        before = listing(self.directory)
        body = '\n'.join(f'    {line}' for line in lines)
        # Port 1: a client that got as far as connecting would fail
        # another way, after wait-timeout.
        text = (f'%import zodbblob\n<zodb>\n  <zodbblobclient>\n'
                f'    server 127.0.0.1:1\n    wait-timeout 1\n{body}\n'
                f'  </zodbblobclient>\n</zodb>\n')
        with self.assertRaises(ZConfig.ConfigurationError) as caught:
            self.open_db(text)
        message = str(caught.exception)
        for name in names:
            self.assertIn(name, message)
        self.assertEqual(listing(self.directory), before)
        return message

    def test_read_only_blob_dir_with_shared_blob_dir_is_refused(self):
        self.assertRefused(
            [f'blob-dir {self.path("cache")}', 'shared-blob-dir on',
             f'read-only-blob-dir {self.path("mount")}'],
            'read-only-blob-dir', self.path('mount'), 'shared-blob-dir')

    def test_read_only_blob_dir_without_blob_dir_is_refused(self):
        self.assertRefused([f'read-only-blob-dir {self.path("mount")}'],
                           'read-only-blob-dir', self.path('mount'),
                           'needs a blob-dir')

    def test_missing_read_only_blob_dir_is_refused(self):
        self.assertRefused(
            [f'blob-dir {self.path("cache")}',
             f'read-only-blob-dir {self.path("gone")}'],
            'read-only-blob-dir', self.path('gone'), 'does not exist')

    def test_read_only_blob_dir_that_is_a_file_is_refused(self):
        self.assertRefused(
            [f'blob-dir {self.path("cache")}',
             f'read-only-blob-dir {self.path("file")}'],
            'read-only-blob-dir', self.path('file'), 'not a directory')

    def test_read_only_blob_dir_with_files_and_no_marker_is_refused(self):
        self.assertRefused(
            [f'blob-dir {self.path("cache")}',
             f'read-only-blob-dir {self.path("unmarked")}'],
            'read-only-blob-dir', self.path('unmarked'), '.layout marker')

    def test_read_only_blob_dir_marked_with_an_unknown_layout_is_refused(
            self):
        self.assertRefused(
            [f'blob-dir {self.path("cache")}',
             f'read-only-blob-dir {self.path("marked-unknown")}'],
            'read-only-blob-dir', self.path('marked-unknown'), "'hedge'")

    def test_blob_dir_inside_read_only_blob_dir_is_refused(self):
        self.assertRefused(
            [f'blob-dir {self.path("mount", "cache")}',
             f'read-only-blob-dir {self.path("mount")}'],
            'blob-dir', self.path('mount', 'cache'), 'read-only-blob-dir')

    def test_blob_dir_that_is_a_file_is_refused(self):
        self.assertRefused([f'blob-dir {self.path("file")}'],
                           'blob-dir', self.path('file'), 'not a directory')

    def test_blob_dir_marked_as_a_servers_blob_directory_is_refused(self):
        self.assertRefused([f'blob-dir {self.path("mount")}'],
                           'blob-dir', self.path('mount'), "'bushy'")

    def test_shared_blob_dir_may_be_a_servers_blob_directory(self):
        root, _ = ZConfig.loadConfigFile(
            ZODB.config.getStorageSchema(), io.StringIO(f"""
                %import zodbblob
                <zodbblobclient>
                  server 127.0.0.1:1
                  blob-dir {self.path("mount")}
                  shared-blob-dir on
                </zodbblobclient>
                """))
        self.assertTrue(root.storage.config.shared_blob_dir)

    def test_bad_blob_download_timeouts_are_refused(self):
        for value in ['0', '-5', 'soon', 'nan', 'inf', '5y']:
            with self.subTest(value=value):
                self.assertRefused(
                    [f'blob-dir {self.path("cache")}',
                     f'blob-download-timeout {value}'],
                    'blob-download-timeout', repr(value))

    def test_blob_cache_size_check_outside_a_percent_is_refused(self):
        for value in ['100', '-1']:
            with self.subTest(value=value):
                self.assertRefused(
                    [f'blob-dir {self.path("cache")}',
                     'blob-cache-size 1MB',
                     f'blob-cache-size-check {value}'],
                    f'blob-cache-size-check {value}')

    def test_negative_blob_cache_size_is_refused(self):
        self.assertRefused(
            [f'blob-dir {self.path("cache")}', 'blob-cache-size -1'],
            'blob-cache-size -1')


class ClientConfigTests(TemporaryDirectory, unittest.TestCase):
    """Configured clients of one real ZEO server commit and read blobs."""

    layer = ZEO_SERVER

    def client_text(self, *lines, section='zodb'):
        body = '\n'.join(f'    {line}' for line in lines)
        return (f'%import zodbblob\n<{section}>\n  <zodbblobclient>\n'
                f'    server {format_address(self.layer.address)}\n{body}\n'
                f'  </zodbblobclient>\n</{section}>\n')

    def test_configured_client_commits_a_blob_another_one_downloads(self):
        writer = self.open_db(self.client_text(
            f'blob-dir {self.path("writer")}', 'blob-cache-size 3MB',
            'blob-cache-size-check 25', 'blob-download-timeout 2.5'))
        storage = writer.storage
        self.assertIsInstance(storage, zodbblob.zeo.ClientStorage)
        self.assertEqual(storage.blob_dir, self.path('writer'))
        self.assertIsNone(storage.read_only_blob_dir)
        self.assertEqual(storage.blob_cache.directory, self.path('writer'))
        self.assertEqual(storage.blob_cache.size_limit, 3 * MB)
        self.assertEqual(storage.blob_cache.check_percent, 25)
        self.assertEqual(storage.blob_cache.download_timeout, 2.5)
        commit_blob(writer, b'configured', 'downloaded')

        reader = self.open_db(self.client_text(
            f'blob-dir {self.path("reader")}'))
        self.assertEqual(reader.storage.blob_cache.size_limit, None)
        self.assertEqual(reader.storage.blob_cache.download_timeout, 300)
        data, path = read_blob(reader, 'downloaded')
        self.assertEqual(data, b'configured')
        self.assertTrue(path.startswith(self.path('reader') + os.sep), path)

    def test_read_only_blob_dir_serves_committed_blobs(self):
        writer = self.open_db(self.client_text(
            f'blob-dir {self.path("writer")}'))
        commit_blob(writer, b'on the server', 'mounted')

        reader = self.open_db(self.client_text(
            f'blob-dir {self.path("reader")}',
            f'read-only-blob-dir {self.layer.blob_dir}'))
        self.assertEqual(reader.storage.read_only_blob_dir,
                         self.layer.blob_dir)
        data, path = read_blob(reader, 'mounted')
        self.assertEqual(data, b'on the server')
        self.assertTrue(path.startswith(self.layer.blob_dir + os.sep), path)

    def test_every_zeoclient_key_reaches_a_working_client(self):
        values = sample_values(self.layer.address, self.directory)
        keys = list(keys_of(ZEOCLIENT))
        db = self.open_db('%import zodbblob\n<zodb>\n'
                          + section_text('zodbblobclient', values, keys)
                          + '\n</zodb>\n')
        storage = db.storage
        self.assertIsInstance(storage, zodbblob.zeo.ClientStorage)
        self.assertTrue(storage.is_connected())  # wait on
        self.assertEqual(storage._storage, '1')
        self.assertEqual(storage.__name__, 'configured-client')
        self.assertEqual(storage._cache.path,
                         self.path('zodbblob-test-1.zec'))  # client, var
        self.assertEqual(storage._cache.maxsize, 5 * MB)
        self.assertEqual(storage._client_label, 'config-test')
        self.assertTrue(storage._read_only_fallback)
        self.assertFalse(storage.shared_blob_dir)
        self.assertEqual(storage.blob_cache.directory,
                         self.path('blob-cache'))
        self.assertEqual(storage.blob_cache.size_limit, 10 * MB)
        self.assertEqual(storage.blob_cache.check_percent, 20)
        commit_blob(db, b'every zeoclient key', 'zeoclient')
        self.assertEqual(read_blob(db, 'zeoclient')[0],
                         b'every zeoclient key')

    def test_keys_only_zeos_clientstorage_has_reach_a_working_client(self):
        values = sample_values(self.layer.address, self.directory)
        keys = list(keys_of(CLIENTSTORAGE))
        db = self.open_db('%import zodbblob\n<zodb>\n'
                          + section_text('zodbblobclient', values, keys)
                          + '\n</zodb>\n')
        storage = db.storage
        self.assertEqual(storage._cache.path, self.path('client.zec'))
        self.assertTrue(storage.server_sync)
        self.assertEqual(storage._server.timeout, 7)
        commit_blob(db, b'every clientstorage key', 'clientstorage')
        self.assertEqual(read_blob(db, 'clientstorage')[0],
                         b'every clientstorage key')

    def test_zope_conf_database_opens_a_configured_client(self):
        with open(self.path('zopeschema.xml'), 'w') as f:
            f.write(ZOPE_SCHEMA)
        with open(self.path('zope.conf'), 'w') as f:
            f.write(f"""\
%define INSTANCE {self.directory}
%import zodbblob

instancehome $INSTANCE

<zodb_db main>
  mount-point /
  <zodbblobclient>
    server {format_address(self.layer.address)}
    blob-dir $INSTANCE/var/blob-cache
    blob-download-timeout 1m
  </zodbblobclient>
</zodb_db>
""")
        schema = ZConfig.loadSchema(self.path('zopeschema.xml'))
        config, _ = ZConfig.loadConfig(schema, self.path('zope.conf'))
        [factory] = config.databases
        db = factory.open()
        self.addCleanup(db.close)
        self.assertIsInstance(db.storage, zodbblob.zeo.ClientStorage)
        self.assertEqual(db.storage.blob_cache.download_timeout, 60)
        commit_blob(db, b'from zope.conf', 'zope')
        data, path = read_blob(db, 'zope')
        self.assertEqual(data, b'from zope.conf')
        self.assertTrue(path.startswith(self.path('var', 'blob-cache')))


class SSLServerLayer:
    """A ``zodbblob serve --config`` process whose <zeo> wants SSL.

    A class, as zope.testrunner takes layers (it runs no setUpClass).
    """

    directory = address = server = None

    @classmethod
    def setUp(cls):
        cls.directory = tempfile.mkdtemp(prefix='zodbblob-ssl-')
        var = os.path.join(cls.directory, 'var')
        os.mkdir(var)
        cls.address = ('127.0.0.1', free_port())
        with open(os.path.join(cls.directory, 'zeo.conf'), 'w') as f:
            f.write(f"""\
%import zodbblob
<zeo>
  address {format_address(cls.address)}
  <ssl>
    {SERVER_SSL}
  </ssl>
</zeo>
<zodbblob 1>
  blob-dir {var}/blobs
  <filestorage>
    path {var}/Data.fs
  </filestorage>
</zodbblob>
""")
        cls.server = ServerProcess(
            serve_command('--config', 'zeo.conf'), cls.address,
            cwd=cls.directory,
            log_path=os.path.join(cls.directory, 'server.log'))
        try:
            cls.server.start()
        except BaseException:
            shutil.rmtree(cls.directory, ignore_errors=True)
            raise

    @classmethod
    def tearDown(cls):
        try:
            status = cls.server.stop()
            if status != 0:
                raise RuntimeError(
                    f'SSL ZEO server exited with status {status}; its '
                    f'output:\n{cls.server.output()}')
        finally:
            shutil.rmtree(cls.directory, ignore_errors=True)
            cls.directory = cls.address = cls.server = None


class SSLClientConfigTests(TemporaryDirectory, unittest.TestCase):
    """<zodbblob-ssl> takes a client to a server that wants SSL."""

    layer = SSLServerLayer

    def test_ssl_section_connects_commits_and_downloads(self):
        def client(blob_dir):
            return self.open_db(f"""
                %import zodbblob
                <zodb>
                  <zodbblobclient>
                    server {format_address(self.layer.address)}
                    blob-dir {blob_dir}
                    wait-timeout 5
                    <zodbblob-ssl>
                      {CLIENT_SSL}
                    </zodbblob-ssl>
                  </zodbblobclient>
                </zodb>
                """)

        commit_blob(client(self.path('writer')), b'over ssl', 'ssl')
        data, path = read_blob(client(self.path('reader')), 'ssl')
        self.assertEqual(data, b'over ssl')
        self.assertTrue(path.startswith(self.path('reader') + os.sep), path)
