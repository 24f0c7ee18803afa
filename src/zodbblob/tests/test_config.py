"""The <zodbblob> ZConfig section, parsed by ZConfig and opened for real."""

import io
import os
import shutil
import tempfile
import unittest

import transaction
import ZConfig
import ZEO
import ZODB.config
import ZODB.FileStorage
from ZODB.blob import Blob
from ZODB.MappingStorage import MappingStorage

import zodbblob
from zodbblob.layout import LAYOUTS
from zodbblob.testing import BLOB_STORAGE, BlobStorageLayer

# Zope's zope.conf schema, cut down to what concerns storages: a
# <zodb_db> section extends ZODB's <zodb> and is found by its abstract
# type, so %import-ed storage sections nest inside it.
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


def commit_blob(db, data, key='blob'):
    with db.transaction() as connection:
        connection.root()[key] = Blob(data)


def read_blob(db, key='blob'):
    with (db.transaction() as connection,
          connection.root()[key].open() as blob_file):
        return blob_file.read()


def blob_files(blob_dir):
    """The committed blob files below `blob_dir`, by content."""
    found = []
    for dirpath, dirnames, filenames in os.walk(blob_dir):
        dirnames[:] = [d for d in dirnames if d != 'tmp']
        for name in filenames:
            if name.endswith('.blob'):
                with open(os.path.join(dirpath, name), 'rb') as f:
                    found.append(f.read())
    return found


def listing(directory):
    """Every entry below `directory` with its size and change time."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            entries[os.path.relpath(path, directory)] = (
                info.st_size, info.st_mtime_ns)
    return entries


class TemporaryDirectory:

    prefix = 'zodbblob-config-'

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix=self.prefix)
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        self.addCleanup(transaction.abort)

    def path(self, *names):
        return os.path.join(self.directory, *names)

    def open_db(self, text):
        db = ZODB.config.databaseFromString(text)
        # Looked up when called: DB.close replaces itself once closed.
        self.addCleanup(lambda: db.close())
        return db


class OpenTests(TemporaryDirectory, unittest.TestCase):
    """Each shape of configuration opens a working zodbblob storage."""

    def test_zodb_section_commits_and_reads_a_blob_over_filestorage(self):
        db = self.open_db(f"""
            %import zodbblob
            <zodb>
              <zodbblob>
                blob-dir {self.path('blobs')}
                <filestorage>
                  path {self.path('Data.fs')}
                </filestorage>
              </zodbblob>
            </zodb>
            """)
        self.assertIsInstance(db.storage, zodbblob.BlobStorage)
        self.assertIsInstance(db.storage.base, ZODB.FileStorage.FileStorage)
        commit_blob(db, b'through a zodb section')
        self.assertEqual(read_blob(db), b'through a zodb section')
        self.assertEqual(blob_files(self.path('blobs')),
                         [b'through a zodb section'])

    def test_storage_section_commits_and_reads_a_blob_over_mappingstorage(
            self):
        storage = ZODB.config.storageFromString(f"""
            %import zodbblob
            <zodbblob>
              blob-dir {self.path('blobs')}
              <mappingstorage/>
            </zodbblob>
            """)
        self.assertIsInstance(storage.base, MappingStorage)
        db = ZODB.DB(storage)
        self.addCleanup(db.close)
        commit_blob(db, b'over memory')
        self.assertEqual(read_blob(db), b'over memory')
        self.assertEqual(blob_files(self.path('blobs')), [b'over memory'])

    def test_relative_blob_dir_is_resolved_against_the_working_directory(
            self):
        here = os.getcwd()
        os.chdir(self.directory)
        self.addCleanup(os.chdir, here)
        storage = ZODB.config.storageFromString("""
            %import zodbblob
            <zodbblob>
              blob-dir var/blobs
              <mappingstorage/>
            </zodbblob>
            """)
        self.addCleanup(storage.close)
        self.assertEqual(storage.fshelper.base_dir,
                         self.path('var', 'blobs') + os.sep)

    def test_layout_key_selects_each_registered_layout(self):
        for name in sorted(LAYOUTS):
            with self.subTest(layout=name):
                blob_dir = self.path(name)
                db = self.open_db(f"""
                    %import zodbblob
                    <zodb>
                      <zodbblob>
                        blob-dir {blob_dir}
                        layout {name}
                        <mappingstorage/>
                      </zodbblob>
                    </zodb>
                    """)
                commit_blob(db, name.encode())
                with open(os.path.join(blob_dir, '.layout')) as marker:
                    self.assertEqual(marker.read().strip(), name)
                self.assertEqual(blob_files(blob_dir), [name.encode()])
                oid = db.open().root()['blob']._p_oid
                self.assertTrue(os.path.exists(
                    db.storage.fshelper.getBlobFilename(
                        oid, db.storage.lastTransaction())))

    def test_zope_conf_database_opens_with_blob_support(self):
        os.mkdir(self.path('var'))
        with open(self.path('zopeschema.xml'), 'w') as f:
            f.write(ZOPE_SCHEMA)
        with open(self.path('zope.conf'), 'w') as f:
            f.write(f"""\
%define INSTANCE {self.directory}
%import zodbblob

instancehome $INSTANCE

<zodb_db main>
  mount-point /
  cache-size 1000
  <zodbblob>
    blob-dir $INSTANCE/var/blobs
    layout lawn
    <filestorage>
      path $INSTANCE/var/Data.fs
    </filestorage>
  </zodbblob>
</zodb_db>
""")
        schema = ZConfig.loadSchema(self.path('zopeschema.xml'))
        config, _ = ZConfig.loadConfig(schema, self.path('zope.conf'))
        [factory] = config.databases
        self.assertEqual(factory.config.mount_points, ['/'])
        db = factory.open()
        self.addCleanup(db.close)
        commit_blob(db, b'from zope.conf')
        self.assertEqual(read_blob(db), b'from zope.conf')
        self.assertEqual(db.storage.fshelper.layout_name, 'lawn')
        self.assertEqual(blob_files(self.path('var', 'blobs')),
                         [b'from zope.conf'])

    def test_zeo_server_schema_loads_a_zodbblob_storage(self):
        # The in-process half of serving it; test_serve runs the server.
        schema = ZConfig.loadSchema(
            os.path.join(os.path.dirname(ZEO.__file__), 'schema.xml'))
        config, _ = ZConfig.loadConfigFile(schema, io.StringIO(f"""
            %import zodbblob
            <zeo>
              address 127.0.0.1:8100
            </zeo>
            <zodbblob 1>
              blob-dir {self.path('blobs')}
              <filestorage>
                path {self.path('Data.fs')}
              </filestorage>
            </zodbblob>
            """))
        [factory] = config.storages
        self.assertEqual(factory.name, '1')
        storage = factory.open()
        self.addCleanup(storage.close)
        self.assertIsInstance(storage, zodbblob.BlobStorage)


class RefusedConfigTests(TemporaryDirectory, unittest.TestCase):
    """A bad configuration fails while loading and touches nothing."""

    def assertRefused(self, text, *fragments):
        before = listing(self.directory)
        with self.assertRaises(ZConfig.ConfigurationError) as caught:
            ZODB.config.storageFromString(text)
        message = str(caught.exception)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertEqual(listing(self.directory), before)
        return message

    def filestorage_config(self, zodbblob_keys, base_keys=''):
        return f"""
            %import zodbblob
            <zodbblob>
              {zodbblob_keys}
              <filestorage>
                path {self.path('Data.fs')}
                {base_keys}
              </filestorage>
            </zodbblob>
            """

    def test_missing_blob_dir_is_refused(self):
        self.assertRefused(self.filestorage_config('layout bushy'),
                           'blob-dir')

    def test_unknown_layout_is_refused_naming_the_known_ones(self):
        message = self.assertRefused(
            self.filestorage_config(
                f'blob-dir {self.path("blobs")}\nlayout leaves'),
            'layout', "'leaves'", 'automatic', *sorted(LAYOUTS))
        self.assertIn('line 5', message)  # the line of `layout leaves`

    def test_blob_dir_that_is_a_regular_file_is_refused(self):
        with open(self.path('blobs'), 'w') as f:
            f.write('not a directory')
        self.assertRefused(
            self.filestorage_config(f'blob-dir {self.path("blobs")}'),
            'blob-dir', self.path('blobs'), 'is not a directory')

    def test_blob_dir_below_a_regular_file_is_refused(self):
        with open(self.path('var'), 'w') as f:
            f.write('not a directory')
        self.assertRefused(
            self.filestorage_config(
                f'blob-dir {self.path("var", "blobs")}'),
            'blob-dir', self.path('var'), 'is not a directory')

    def test_base_storage_with_its_own_blob_dir_is_refused(self):
        self.assertRefused(
            self.filestorage_config(f'blob-dir {self.path("blobs")}',
                                    f'blob-dir {self.path("fsblobs")}'),
            '<filestorage>', 'blob-dir', self.path('fsblobs'))

    def test_blob_dir_deeper_in_the_base_storage_is_refused(self):
        self.assertRefused(f"""
            %import zodbblob
            <zodbblob>
              blob-dir {self.path('blobs')}
              <demostorage>
                <filestorage base>
                  path {self.path('Data.fs')}
                  blob-dir {self.path('fsblobs')}
                </filestorage>
              </demostorage>
            </zodbblob>
            """, '<filestorage base> in <demostorage>', self.path('fsblobs'))

    def test_zodbblob_inside_zodbblob_is_refused(self):
        self.assertRefused(f"""
            %import zodbblob
            <zodbblob>
              blob-dir {self.path('outer')}
              <zodbblob>
                blob-dir {self.path('inner')}
                <mappingstorage/>
              </zodbblob>
            </zodbblob>
            """, '<zodbblob>', self.path('inner'))

    def test_missing_base_storage_is_refused(self):
        self.assertRefused(f"""
            %import zodbblob
            <zodbblob>
              blob-dir {self.path('blobs')}
            </zodbblob>
            """, 'zodb.storage', 'required')

    def test_two_base_storages_are_refused(self):
        self.assertRefused(f"""
            %import zodbblob
            <zodbblob>
              blob-dir {self.path('blobs')}
              <mappingstorage one/>
              <mappingstorage two/>
            </zodbblob>
            """, 'zodb.storage')

    def test_marker_naming_an_unknown_layout_is_refused(self):
        os.mkdir(self.path('blobs'))
        with open(self.path('blobs', '.layout'), 'w') as f:
            f.write('leaves')
        self.assertRefused(
            self.filestorage_config(f'blob-dir {self.path("blobs")}'),
            self.path('blobs', '.layout'), "'leaves'", *sorted(LAYOUTS))


class BlobDirValueTests(TemporaryDirectory, unittest.TestCase):
    """A blob-dir value no storage can use fails while the configuration
    loads, in one line naming it, and creates nothing anywhere."""

    # The schemas are read once, as the user running the tests: a test
    # that looks as another user must not need to read the checkout, which
    # may sit in a directory only its owner can enter.
    _schema = None

    @classmethod
    def schema(cls):
        if cls._schema is None:
            cls._schema = ZConfig.loadSchemaFile(io.StringIO("""
                <schema>
                  <import package="ZODB"/>
                  <import package="zodbblob"/>
                  <section type="ZODB.storage" name="*" attribute="storage"/>
                </schema>"""))
        return cls._schema

    def assertRefused(self, value, *fragments):
        text = f"""
            <zodbblob>
              blob-dir {value}
              <filestorage>
                path {self.path('Data.fs')}
              </filestorage>
            </zodbblob>
            """
        before = listing(self.directory)
        with self.assertRaises(ZConfig.ConfigurationError) as caught:
            config, _ = ZConfig.loadConfigFile(self.schema(),
                                               io.StringIO(text))
            config.storage.open()
        message = str(caught.exception)
        self.assertEqual(len(message.splitlines()), 1, message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertEqual(listing(self.directory), before)
        return message

    def test_empty_blob_dir_is_refused_not_the_working_directory(self):
        here = os.getcwd()
        os.chdir(self.directory)
        self.addCleanup(os.chdir, here)
        self.assertRefused('', 'blob-dir is empty')

    def test_blob_dir_with_a_nul_byte_is_refused(self):
        self.assertRefused(self.path('bl\0obs'), 'blob-dir',
                           'cannot hold a NUL byte')

    def test_over_long_blob_dirs_are_refused(self):
        # Too long a name where the path exists up to it, and beyond.
        self.assertRefused(self.path('x' * 300), 'blob-dir',
                           self.path('x' * 10), 'too long')
        self.assertRefused(self.path('x' * 300, 'blobs'), 'blob-dir',
                           self.path('x' * 10), 'too long')
        deep = self.path(*['y' * 200] * 25)   # 5000 bytes, short names
        message = self.assertRefused(deep, 'blob-dir', 'File name too long')
        self.assertLess(len(message), 400)

    def test_unreadable_blob_dirs_are_refused(self):
        if os.geteuid() != 0:
            self.skipTest('needs root, to look as another user')
        os.chmod(self.directory, 0o755)
        private = self.path('private')
        os.mkdir(private, 0o700)
        os.mkdir(self.path('readable'), 0o755)
        os.mkdir(self.path('readable', 'closed'), 0o700)
        os.seteuid(65534)   # nobody: root reads everything
        try:
            self.assertRefused(os.path.join(private, 'blobs'), 'blob-dir',
                               private, 'Permission denied')
            self.assertRefused(self.path('readable', 'closed'),
                               'blob-dir', 'cannot be read')
            self.assertRefused(self.path('readable', 'new'), 'blob-dir',
                               'cannot be created', 'not writable')
        finally:
            os.seteuid(0)


class ExistingBlobDirectoryTests(unittest.TestCase):
    """Configurations over a blob directory that a storage already made."""

    layer = BLOB_STORAGE

    def config(self, layout='automatic', path=None):
        return f"""
            %import zodbblob
            <zodbblob>
              blob-dir {self.layer.blob_dir}
              layout {layout}
              <filestorage>
                path {path or os.path.join(self.layer.directory, 'Data.fs')}
              </filestorage>
            </zodbblob>
            """

    def test_config_reopens_the_blobs_of_a_closed_storage(self):
        commit_blob(self.layer.db, b'kept across opens')
        self.layer.db.close()
        db = ZODB.DB(ZODB.config.storageFromString(self.config()))
        self.addCleanup(db.close)
        self.assertEqual(read_blob(db), b'kept across opens')

    def test_layout_other_than_the_marker_is_refused_at_load(self):
        commit_blob(self.layer.db, b'bushy')
        before = listing(self.layer.directory)
        with self.assertRaises(ZConfig.ConfigurationError) as caught:
            ZODB.config.storageFromString(self.config(layout='lawn'))
        message = str(caught.exception)
        for fragment in ("'lawn'", "'bushy'",
                         os.path.join(self.layer.blob_dir, '.layout')):
            self.assertIn(fragment, message)
        self.assertEqual(listing(self.layer.directory), before)

    def test_blob_dir_in_use_fails_at_open_and_closes_the_base(self):
        other = os.path.join(self.layer.directory, 'Other.fs')
        try:
            ZODB.config.storageFromString(self.config(path=other))
        except zodbblob.BlobStorageError as error:
            # Its traceback keeps the opener's frame, and so the base,
            # alive: only closing releases the base's lock now.
            raised = error
        else:
            self.fail('a second storage opened an in-use blob directory')
        self.assertIn(self.layer.blob_dir, str(raised))
        ZODB.FileStorage.FileStorage(other).close()


class BlobStorageLayerTests(unittest.TestCase):

    def test_each_test_gets_a_new_storage_which_teardown_removes(self):
        layer = BlobStorageLayer(name='FRESH', module=__name__)
        layer.testSetUp()
        first = layer.directory
        commit_blob(layer.db, b'first test')
        self.assertEqual(blob_files(layer.blob_dir), [b'first test'])
        layer.testTearDown()
        self.assertFalse(os.path.exists(first))
        layer.testSetUp()
        try:
            self.assertNotEqual(layer.directory, first)
            self.assertIsInstance(layer.storage, zodbblob.BlobStorage)
            self.assertIs(layer.db.storage, layer.storage)
            with layer.db.transaction() as connection:
                self.assertNotIn('blob', connection.root())
        finally:
            layer.testTearDown()

    def test_teardown_aborts_what_the_test_left_uncommitted(self):
        layer = BlobStorageLayer(name='FRESH', module=__name__)
        layer.testSetUp()
        joined = _AbortRecorder()
        transaction.get().join(joined)
        layer.testTearDown()
        self.assertTrue(joined.aborted)


class _AbortRecorder:
    """A data manager that only notes being aborted."""

    aborted = False
    transaction_manager = transaction.manager

    def abort(self, txn):
        self.aborted = True

    def sortKey(self):
        return 'zodbblob.tests._AbortRecorder'
