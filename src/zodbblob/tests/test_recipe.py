"""The ``zodbblob`` buildout recipe, and the storage-wrapper snippet for
plone.recipe.zope2instance that doc/recipe.rst gives.

The options are checked on `Recipe` directly; real buildout runs (level 2)
install the part, run its ``bin/`` script as a ZEO server and commit a
blob through the ``client.conf`` it wrote.

They need zc.buildout, which the ``[test]`` extra leaves out (it upgrades
pip and setuptools where it is installed): without it they are skipped,
saying so.  README's test command installs ``.[test,recipe]``.
"""

import importlib.util
import io
import os
import re
import shutil
import signal
import tempfile
import textwrap
import types
import unittest

import ZConfig
import ZEO.runzeo
import ZODB
import ZODB.config
import ZODB.FileStorage

import zodbblob
import zodbblob.zeo
from zodbblob.testing import ServerProcess, free_port
from zodbblob.tests.test_config import blob_files, commit_blob, read_blob

if importlib.util.find_spec('zc.buildout') is None:
    NO_BUILDOUT = ('zc.buildout is not installed: pip install '
                   '".[test,recipe]" to run the recipe tests')
else:
    NO_BUILDOUT = None
    import zc.buildout
    import zc.buildout.configparser
    import zc.buildout.easy_install
    import zc.buildout.testing

    from zodbblob.recipe import Recipe

needs_buildout = unittest.skipIf(NO_BUILDOUT is not None, NO_BUILDOUT)

DOC = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir,
                   os.pardir, 'doc', 'recipe.rst')


def code_blocks(path, language):
    """The ``.. code-block:: LANGUAGE`` blocks of an rst file, dedented."""
    with open(path) as f:
        text = f.read()
    blocks = []
    pattern = re.compile(
        rf'^\.\. code-block:: {language}\n\n((?:(?:[ \t]+.*)?\n)+)',
        re.MULTILINE)
    for match in pattern.finditer(text):
        blocks.append(textwrap.dedent(match.group(1)).strip('\n') + '\n')
    return blocks


def the_block(path, language, containing):
    found = [block for block in code_blocks(path, language)
             if containing in block]
    assert len(found) == 1, (path, language, containing, found)
    return found[0]


def config_lines(text):
    """Lines that matter to ZConfig: blank lines and trailing space go."""
    return [line.rstrip() for line in text.splitlines() if line.strip()]


# What plone.recipe.zope2instance (9.1.0, recipe.py) writes into zope.conf
# for the main database, copied from it so that these tests need no Plone:
# its templates, its `indent`, and the steps of `build_zope_conf` and
# `render_file_storage` that lead from the file-storage, blob-storage and
# storage-wrapper options to the <zodb_db main> section (no zeo-client,
# no demo or before storage, no zlib, no RelStorage).

P_R_Z_FILE_STORAGE_TEMPLATE = """
    # FileStorage database
    <filestorage>
      path %s
    </filestorage>
"""

P_R_Z_BLOB_STORAGE_TEMPLATE = """
    # Blob-enabled FileStorage database
    <blobstorage>
      blob-dir %s
%s
    </blobstorage>
"""

P_R_Z_ZODB_DB_TEMPLATE = """\
<zodb_db main>
    # Main database
    %(zodb_cache_size)s
    %(zodb_cache_size_bytes)s
%(storage_snippet)s
    mount-point /
</zodb_db>
"""


def p_r_z_indent(snippet, amount):
    ws = " " * amount
    return "\n".join(ws + s if s else "" for s in snippet.split("\n"))


def p_r_z_zodb_db_main(options, base_dir):
    """The <zodb_db main> section plone.recipe.zope2instance writes for
    the part `options` of a buildout in `base_dir`."""
    var_dir = options.get("var", os.path.join(base_dir, "var"))
    default_blob = os.path.join(var_dir, "blobstorage")
    default_file = os.path.sep.join(("filestorage", "Data.fs"))
    blob_storage = options.get("blob-storage", default_blob)
    file_storage = options.get("file-storage", default_file)
    # render_file_storage
    file_storage = os.path.join(var_dir, file_storage)
    os.makedirs(os.path.dirname(file_storage), exist_ok=True)
    storage = P_R_Z_FILE_STORAGE_TEMPLATE % file_storage
    if blob_storage:
        blob_storage = os.path.join(base_dir, blob_storage)
        os.makedirs(blob_storage, 0o700, exist_ok=True)
        storage = P_R_Z_BLOB_STORAGE_TEMPLATE % (blob_storage,
                                                 p_r_z_indent(storage, 2))
    storage_snippet = storage
    # build_zope_conf
    if options.get("storage-wrapper"):
        storage_snippet = p_r_z_indent(
            options["storage-wrapper"] % storage_snippet, 4)
    zodb_cache_size = options.get("zodb-cache-size", "30000")
    return P_R_Z_ZODB_DB_TEMPLATE % {
        "zodb_cache_size": f"cache-size {zodb_cache_size}",
        "zodb_cache_size_bytes": "",
        "storage_snippet": storage_snippet}


# The <zodb_db> section of Zope's schema (Zope's wsgischema.xml), on top
# of ZODB's component: enough of a zope.conf for its databases.
ZOPE_CONF_SCHEMA = """\
<schema>
  <import package="ZODB"/>
  <sectiontype name="zodb_db" extends="zodb" implements="ZODB.database"
               datatype="ZODB.config.ZODBDatabase">
    <multikey name="mount-point" attribute="mount_points" required="yes"/>
  </sectiontype>
  <multisection type="ZODB.database" name="+" attribute="databases"/>
</schema>
"""


def open_zope_conf_database(text):
    schema = ZConfig.loadSchemaFile(io.StringIO(ZOPE_CONF_SCHEMA))
    root, _ = ZConfig.loadConfigFile(schema, io.StringIO(text))
    [database] = root.databases
    return database.open()


def instance_options(buildout_cfg, directory):
    """The options of the part [instance] of `buildout_cfg`, as buildout
    gives them to its recipe when the buildout is in `directory`: parsed
    by buildout's own parser (which dedents values), with
    ``${buildout:directory}`` substituted."""
    sections = zc.buildout.configparser.parse(
        io.StringIO(buildout_cfg), 'buildout.cfg')
    options = {}
    for name, value in sections['instance'].items():
        value = value.replace('${buildout:directory}', directory)
        assert '${' not in value, (name, value)
        options[name] = value
    return options


class TemporaryDirectory:

    def setUp(self):
        self.directory = os.path.realpath(
            tempfile.mkdtemp(prefix='zodbblob-recipe-'))
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)

    def path(self, *names):
        return os.path.join(self.directory, *names)


@needs_buildout
class StorageWrapperTests(TemporaryDirectory, unittest.TestCase):
    """doc/recipe.rst's storage-wrapper, filled in as
    plone.recipe.zope2instance fills it."""

    def zope_conf(self, buildout_cfg):
        options = instance_options(buildout_cfg, self.directory)
        return p_r_z_zodb_db_main(options, self.directory)

    def test_documented_snippet_gives_documented_zope_conf(self):
        zope_conf = self.zope_conf(the_block(DOC, 'ini', 'storage-wrapper'))
        documented = the_block(DOC, 'text', '# Main database')
        self.assertEqual(
            config_lines(zope_conf),
            config_lines(documented.replace('/srv/plone', self.directory)))

    def test_documented_snippet_opens_and_keeps_blobs(self):
        zope_conf = self.zope_conf(the_block(DOC, 'ini', 'storage-wrapper'))
        db = open_zope_conf_database(zope_conf)
        try:
            self.assertIsInstance(db.storage, zodbblob.BlobStorage)
            commit_blob(db, b'wrapped by plone')
        finally:
            db.close()
        db = open_zope_conf_database(zope_conf)
        try:
            self.assertEqual(read_blob(db), b'wrapped by plone')
        finally:
            db.close()
        self.assertEqual(blob_files(self.path('var', 'blobstorage')),
                         [b'wrapped by plone'])

    def test_wrapper_around_default_blob_storage_is_refused(self):
        # Without `blob-storage =`, the recipe writes a <blobstorage>:
        # stock blob support, which <zodbblob> will not wrap.
        buildout_cfg = the_block(DOC, 'ini', 'storage-wrapper')
        buildout_cfg = re.sub(r'(?m)^blob-storage =.*\n', '', buildout_cfg)
        zope_conf = self.zope_conf(buildout_cfg)
        self.assertIn('<blobstorage>', zope_conf)
        with self.assertRaises(ZConfig.ConfigurationError) as raised:
            open_zope_conf_database(zope_conf)
        documented = the_block(DOC, 'text', 'blob support of its own')
        self.assertIn(
            ' '.join(documented.replace('/srv/plone', self.directory).split()),
            str(raised.exception))
        self.assertFalse(os.path.exists(
            self.path('var', 'filestorage', 'Data.fs')))


@needs_buildout
class RecipeTests(TemporaryDirectory, unittest.TestCase):
    """The recipe called as buildout calls it, for a buildout in a
    temporary directory."""

    def make(self, name='zeoserver', **options):
        buildout = {'buildout': {
            'directory': self.directory,
            'parts-directory': self.path('parts'),
            'bin-directory': self.path('bin'),
        }}
        options = {key.replace('_', '-'): value
                   for key, value in options.items()}
        return Recipe(buildout, name, options)

    def assertUserError(self, option, value, **options):
        with self.assertRaises(zc.buildout.UserError) as raised:
            self.make(**options)
        self.assertIn(f'[zeoserver] {option} = {value!r}: ',
                      str(raised.exception))
        return str(raised.exception)

    def write_zeo_conf(self, recipe):
        os.makedirs(os.path.dirname(recipe.file_storage), exist_ok=True)
        path = self.path('zeo.conf')
        with open(path, 'w') as f:
            f.write(recipe.zeo_conf())
        return path

    def load_zeo_conf(self, path):
        options = ZEO.runzeo.ZEOOptions()
        options.load_schema()
        root, _ = ZConfig.loadConfig(options.schema, path)
        return root

    def load_client_conf(self, text):
        path = self.path('client.conf')
        with open(path, 'w') as f:
            f.write(text)
        root, _ = ZConfig.loadConfigFile(
            ZODB.config.getDbSchema(),
            io.StringIO(f'<zodb>\n  %include {path}\n</zodb>\n'))
        return root.database[0].config.storage.config

    def test_defaults_are_absolute_paths_under_the_buildout_directory(self):
        recipe = self.make()
        self.assertEqual(recipe.file_storage,
                         self.path('var', 'filestorage', 'Data.fs'))
        self.assertEqual(recipe.blob_storage, self.path('var', 'blobstorage'))
        self.assertEqual(recipe.client_blob_dir,
                         self.path('var', 'blobcache'))
        self.assertEqual(recipe.address, ('127.0.0.1', 8100))
        self.assertEqual(recipe.layout, 'automatic')
        self.assertEqual(recipe.options['zeo-conf'],
                         self.path('parts', 'zeoserver', 'zeo.conf'))
        self.assertEqual(recipe.options['client-conf'],
                         self.path('parts', 'zeoserver', 'client.conf'))
        self.assertEqual(recipe.options['script'],
                         self.path('bin', 'zeoserver'))

    def test_relative_paths_are_made_absolute_and_absolute_ones_kept(self):
        recipe = self.make(file_storage='data/Main.fs',
                           blob_storage='/srv/blobs',
                           client_blob_dir='~/cache')
        self.assertEqual(recipe.file_storage, self.path('data', 'Main.fs'))
        self.assertEqual(recipe.blob_storage, '/srv/blobs')
        self.assertEqual(recipe.client_blob_dir,
                         os.path.expanduser('~/cache'))
        self.assertIn(f'path {self.path("data", "Main.fs")}\n',
                      recipe.zeo_conf())
        self.assertIn('blob-dir /srv/blobs\n', recipe.zeo_conf())

    def test_bare_port_listens_on_loopback_only(self):
        recipe = self.make(zeo_address='8200')
        self.assertIn('address 127.0.0.1:8200\n', recipe.zeo_conf())
        self.assertIn('server 127.0.0.1:8200\n', recipe.client_conf())

    def test_clients_reach_wildcard_server_on_loopback(self):
        for address, server in (('0.0.0.0:8100', '127.0.0.1:8100'),
                                ('[::]:8100', '[::1]:8100'),
                                ('zeo.example.com:8100',
                                 'zeo.example.com:8100')):
            with self.subTest(address=address):
                recipe = self.make(zeo_address=address)
                self.assertIn(f'address {address}\n', recipe.zeo_conf())
                self.assertIn(f'server {server}\n', recipe.client_conf())

    def test_zeo_address_that_is_not_host_and_port_is_refused(self):
        for value in ('zeo.example.com', 'zeo.example.com:', ':8100',
                      'localhost:http', 'localhost:0', 'localhost:65536',
                      '1.2.3.4:8100:1', 'a b:8100', ''):
            with self.subTest(value=value):
                self.assertUserError('zeo-address', value, zeo_address=value)

    def test_unknown_layout_is_refused_naming_the_known_ones(self):
        message = self.assertUserError('layout', 'tree', layout='tree')
        self.assertIn('bushy, chunky, flat, lawn, or automatic', message)

    def test_every_layout_is_written(self):
        for layout in ('bushy', 'chunky', 'flat', 'lawn', 'automatic'):
            with self.subTest(layout=layout):
                self.assertIn(f'  layout {layout}\n',
                              self.make(layout=layout).zeo_conf())

    def test_dedup_on_is_written_and_reaches_the_storage(self):
        for value in ('on', 'true', 'Yes'):
            with self.subTest(value=value):
                recipe = self.make(dedup=value)
                self.assertIn('  layout automatic\n  dedup on\n',
                              recipe.zeo_conf())
                root = self.load_zeo_conf(self.write_zeo_conf(recipe))
                self.assertIs(root.storages[0].config.dedup, True)
        for options in ({'dedup': 'off'}, {'dedup': 'no'}, {}):
            with self.subTest(options=options):
                recipe = self.make(**options)
                self.assertNotIn('dedup', recipe.zeo_conf())
                root = self.load_zeo_conf(self.write_zeo_conf(recipe))
                self.assertIs(root.storages[0].config.dedup, False)

    def test_dedup_that_is_not_a_boolean_is_refused(self):
        for value in ('maybe', '2', 'on off'):
            with self.subTest(value=value):
                message = self.assertUserError('dedup', value, dedup=value)
                self.assertEqual(len(message.splitlines()), 1)
                self.assertFalse(os.path.exists(self.path('parts')))

    def test_bad_blob_cache_size_is_refused(self):
        self.assertUserError('blob-cache-size', 'lots',
                             blob_cache_size='lots')
        self.assertUserError('blob-cache-size', '-1GB',
                             blob_cache_size='-1GB')

    def test_size_error_says_which_units_client_conf_accepts(self):
        # client.conf's blob-cache-size is ZConfig's byte-size: KB, MB and
        # GB only, though `zodbblob cache prune --size` takes TB and KiB.
        for value in ('2TB', '1KiB', '1.5GB'):
            with self.subTest(value=value):
                message = self.assertUserError(
                    'blob-cache-size', value, blob_cache_size=value)
                self.assertIn('KB, MB or GB', message)
                self.assertIn('not TB, KiB', message)
        for value, written in (('2GB', '2GB'), ('2 gb', '2 gb'),
                               ('1048576', '1048576')):
            with self.subTest(value=value):
                self.assertIn(f'  blob-cache-size {written}\n',
                              self.make(blob_cache_size=value).client_conf())

    def test_bad_blob_cache_size_check_is_refused(self):
        for value in ('100', '-5', 'ten', '10.5'):
            with self.subTest(value=value):
                self.assertUserError('blob-cache-size-check', value,
                                     blob_cache_size_check=value)

    def test_client_cache_in_server_blob_directory_is_refused(self):
        message = self.assertUserError(
            'client-blob-dir', 'var/blobs/', blob_storage='var/blobs',
            client_blob_dir='var/blobs/')
        self.assertIn(self.path('var', 'blobs'), message)

    def test_empty_or_multiline_path_is_refused(self):
        self.assertUserError('file-storage', ' ', file_storage=' ')
        self.assertUserError('blob-storage', 'a\nb', blob_storage='a\nb')

    def test_zeo_conf_loads_with_zeo_schema_and_opens_the_storage(self):
        recipe = self.make(zeo_address='127.0.0.1:8123', layout='chunky')
        root = self.load_zeo_conf(self.write_zeo_conf(recipe))
        self.assertEqual(root.zeo.address.address, ('127.0.0.1', 8123))
        [factory] = root.storages
        self.assertEqual(factory.name, '1')
        db = ZODB.DB(factory.open())
        try:
            self.assertIsInstance(db.storage, zodbblob.BlobStorage)
            self.assertEqual(db.storage.fshelper.layout_name, 'chunky')
            commit_blob(db, b'served by buildout')
            self.assertEqual(read_blob(db), b'served by buildout')
        finally:
            db.close()
        self.assertEqual(blob_files(recipe.blob_storage),
                         [b'served by buildout'])
        self.assertTrue(os.path.isfile(recipe.file_storage))

    def test_dollar_in_path_reaches_the_storage_as_written(self):
        recipe = self.make(blob_storage='var/$HOME-blobs')
        root = self.load_zeo_conf(self.write_zeo_conf(recipe))
        self.assertEqual(root.storages[0].config.blob_dir,
                         self.path('var', '$HOME-blobs'))

    def test_client_conf_is_a_zodbblobclient_for_the_server(self):
        recipe = self.make(zeo_address='127.0.0.1:8123',
                           client_blob_dir='cache', blob_cache_size='2GB',
                           blob_cache_size_check='10')
        client = self.load_client_conf(recipe.client_conf())
        self.assertEqual(client.getSectionType(), 'zodbblobclient')
        self.assertEqual([server.address for server in client.server],
                         [('127.0.0.1', 8123)])
        self.assertEqual(client.storage, '1')
        self.assertEqual(client.blob_dir, self.path('cache'))
        self.assertEqual(client.blob_cache_size, 2 * 1024 ** 3)
        self.assertEqual(client.blob_cache_size_check, 10)

    def test_client_conf_without_cache_size_leaves_it_unbounded(self):
        client = self.load_client_conf(self.make().client_conf())
        self.assertIsNone(client.blob_cache_size)
        self.assertIsNone(client.blob_cache_size_check)

    def test_zeo_conf_additional_is_appended(self):
        recipe = self.make(zeo_conf_additional=(
            '\n<eventlog>\n  <logfile>\n    path STDOUT\n  </logfile>\n'
            '</eventlog>'))
        self.assertTrue(recipe.zeo_conf().endswith(
            '</zodbblob>\n\n<eventlog>\n  <logfile>\n    path STDOUT\n'
            '  </logfile>\n</eventlog>\n'))
        root = self.load_zeo_conf(self.write_zeo_conf(recipe))
        self.assertIsNotNone(root.eventlog)

    def test_install_refuses_zeo_conf_additional_that_does_not_load(self):
        recipe = self.make(zeo_conf_additional='no-such-key 1')
        with self.assertRaises(zc.buildout.UserError) as raised:
            recipe.install()
        message = str(raised.exception)
        self.assertIn(self.path('parts', 'zeoserver', 'zeo.conf'), message)
        self.assertIn('no-such-key', message)
        self.assertFalse(os.path.exists(self.path('bin', 'zeoserver')))

    def test_install_refuses_layout_that_the_blob_directory_contradicts(self):
        db = ZODB.DB(zodbblob.BlobStorage(
            self.path('var', 'blobstorage'),
            ZODB.FileStorage.FileStorage(self.path('Data.fs')), 'bushy'))
        db.close()
        recipe = self.make(layout='lawn')
        with self.assertRaises(zc.buildout.UserError) as raised:
            recipe.install()
        self.assertIn("layout 'lawn' selected for blob-dir "
                      f"{self.path('var', 'blobstorage')}, but its marker",
                      str(raised.exception))


BUILDOUT_CFG = """\
[buildout]
parts = zeoserver

[zeoserver]
recipe = zodbblob
zeo-address = 127.0.0.1:{port}
blob-cache-size = 100MB
zeo-conf-additional =
    <eventlog>
      <logfile>
        path {log}
      </logfile>
    </eventlog>
"""


@needs_buildout
class BuildoutTests(unittest.TestCase):
    """Real buildout runs in zc.buildout.testing's sample buildout: no
    network, the eggs of this Python's environment."""

    level = 2

    def setUp(self):
        # buildoutSetUp points buildout at an empty index for good.
        self.addCleanup(setattr, zc.buildout.easy_install,
                        'default_index_url',
                        zc.buildout.easy_install.default_index_url)
        self.addCleanup(os.environ.pop, 'buildout_testing_index_url', None)
        self.test = types.SimpleNamespace(globs={})
        zc.buildout.testing.buildoutSetUp(self.test)
        self.addCleanup(zc.buildout.testing.buildoutTearDown, self.test)
        zc.buildout.testing.install_develop('zodbblob', self.test)
        self.sample = self.test.globs['sample_buildout']

    def path(self, *names):
        return os.path.join(self.sample, *names)

    def buildout(self, buildout_cfg):
        with open(self.path('buildout.cfg'), 'w') as f:
            f.write(buildout_cfg)
        return zc.buildout.testing.system(self.test.globs['buildout'])

    def test_installed_script_serves_blobs_to_the_client_conf(self):
        port = free_port()
        output = self.buildout(BUILDOUT_CFG.format(
            port=port, log=self.path('var', 'zeoserver.log')))
        self.assertIn('Installing zeoserver.', output)
        self.assertIn(f"Generated script '{self.path('bin', 'zeoserver')}'",
                      output)
        options = ZEO.runzeo.ZEOOptions()
        options.load_schema()
        root, _ = ZConfig.loadConfig(
            options.schema, self.path('parts', 'zeoserver', 'zeo.conf'))
        self.assertEqual(root.zeo.address.address, ('127.0.0.1', port))
        self.assertEqual(root.storages[0].config.blob_dir,
                         self.path('var', 'blobstorage'))

        server = ServerProcess([self.path('bin', 'zeoserver')],
                               ('127.0.0.1', port), cwd=self.sample,
                               log_path=self.path('server.out'))
        server.start()
        self.addCleanup(server.stop)
        client_conf = self.path('parts', 'zeoserver', 'client.conf')
        zodb_conf = f'<zodb>\n  %include {client_conf}\n</zodb>\n'
        db = ZODB.config.databaseFromString(zodb_conf)
        try:
            self.assertIsInstance(db.storage, zodbblob.zeo.ClientStorage)
            commit_blob(db, b'from bin/zeoserver')
        finally:
            db.close()
        db = ZODB.config.databaseFromString(zodb_conf)
        try:
            self.assertEqual(read_blob(db), b'from bin/zeoserver')
        finally:
            db.close()
        self.assertEqual(blob_files(self.path('var', 'blobstorage')),
                         [b'from bin/zeoserver'])
        self.assertTrue(os.path.isdir(self.path('var', 'blobcache')))

        self.assertEqual(server.stop(signal.SIGTERM), 0, server.output())
        with open(self.path('var', 'zeoserver.log')) as f:
            log = f.read()
        self.assertIn(f'Serving ZEO on 127.0.0.1:{port}', log)
        self.assertIn('terminated by SIGTERM', log)
        self.assertIn("Stopped; closed storages '1'", log)

    def test_documented_checkout_buildout_installs_as_written(self):
        # doc/recipe.rst's form for a checkout: only the path is this one.
        checkout = os.path.realpath(os.path.join(os.path.dirname(DOC),
                                                 os.pardir))
        buildout_cfg = the_block(DOC, 'ini', 'develop = /path/to/zodbblob')
        port = free_port()
        output = self.buildout(
            buildout_cfg.replace('/path/to/zodbblob', checkout)
            .replace('127.0.0.1:8100', f'127.0.0.1:{port}'))
        self.assertIn('Installing zeoserver.', output)
        self.assertNotIn("Couldn't find a distribution", output)
        self.assertTrue(os.path.isfile(self.path('bin', 'zeoserver')))
        with open(self.path('parts', 'zeoserver', 'client.conf')) as f:
            self.assertIn(f'server 127.0.0.1:{port}\n', f.read())

    def test_bad_option_stops_the_buildout_naming_it(self):
        output = self.buildout(BUILDOUT_CFG.format(
            port='http', log='STDOUT'))
        self.assertIn(
            "Error: [zeoserver] zeo-address = '127.0.0.1:http': ", output)
        self.assertFalse(os.path.exists(self.path('bin', 'zeoserver')))
        self.assertFalse(os.path.exists(self.path('parts', 'zeoserver')))

    def test_uninstalling_the_part_keeps_the_data(self):
        self.buildout(BUILDOUT_CFG.format(port=free_port(), log='STDOUT'))
        self.assertTrue(os.path.isfile(self.path('bin', 'zeoserver')))
        data_fs = self.path('var', 'filestorage', 'Data.fs')
        db = ZODB.config.databaseFromString(
            f'%import zodbblob\n<zodb>\n  <zodbblob>\n'
            f'    blob-dir {self.path("var", "blobstorage")}\n'
            f'    <filestorage>\n      path {data_fs}\n    </filestorage>\n'
            f'  </zodbblob>\n</zodb>\n')
        commit_blob(db, b'kept')
        db.close()
        output = self.buildout('[buildout]\nparts =\n')
        self.assertIn('Uninstalling zeoserver.', output)
        self.assertFalse(os.path.exists(self.path('bin', 'zeoserver')))
        self.assertFalse(os.path.exists(self.path('parts', 'zeoserver')))
        self.assertTrue(os.path.isfile(data_fs))
        self.assertEqual(blob_files(self.path('var', 'blobstorage')),
                         [b'kept'])
