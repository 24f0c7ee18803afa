"""ZODB's own storage test suites, run against zodbblob.BlobStorage, and
ZEO's blob cache test against zodbblob.zeo.ClientStorage.

The mix-in classes and the reusable blob suite come from ``ZODB.tests``;
this module only says how to open our wrapper over FileStorage,
MappingStorage and an MVCC storage.
"""

import doctest
import os
import unittest

import ZEO.tests.forker
import ZODB
import ZODB.FileStorage
import ZODB.MappingStorage
import ZODB.tests.testblob
import ZODB.tests.util
from ZODB.tests import BasicStorage
from ZODB.tests import ConflictResolution
from ZODB.tests import HistoryStorage
from ZODB.tests import IteratorStorage
from ZODB.tests import MTStorage
from ZODB.tests import PackableStorage
from ZODB.tests import PersistentStorage
from ZODB.tests import ReadOnlyStorage
from ZODB.tests import RecoveryStorage
from ZODB.tests import RevisionStorage
from ZODB.tests import StorageTestBase
from ZODB.tests import Synchronization
from ZODB.tests import TransactionalUndoStorage
from ZODB.tests.MVCCMappingStorage import MVCCMappingStorage

import zope.testing.setupstack

import zodbblob
import zodbblob.zeo
from zodbblob import BlobStorage


class BlobFileStorageTests(
    StorageTestBase.StorageTestBase,
    BasicStorage.BasicStorage,
    TransactionalUndoStorage.TransactionalUndoStorage,
    RevisionStorage.RevisionStorage,
    PackableStorage.PackableStorageWithOptionalGC,
    PackableStorage.PackableUndoStorage,
    Synchronization.SynchronizedStorage,
    ConflictResolution.ConflictResolvingStorage,
    ConflictResolution.ConflictResolvingTransUndoStorage,
    HistoryStorage.HistoryStorage,
    IteratorStorage.IteratorStorage,
    IteratorStorage.ExtendedIteratorStorage,
    PersistentStorage.PersistentStorage,
    MTStorage.MTStorage,
    ReadOnlyStorage.ReadOnlyStorage,
):
    """The FileStorage suites, through the wrapper."""

    use_extension_bytes = True

    def open(self, **kwargs):
        self._storage = BlobStorage(
            'blobs', ZODB.FileStorage.FileStorage('Data.fs', **kwargs))

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self.open(create=1)


class OneSyncFileStorageTests(BlobFileStorageTests):
    """The FileStorage suites, through a wrapper that opened its base
    itself and commits with one sync."""

    def open(self, **kwargs):
        self._storage = zodbblob.open_filestorage(
            'Data.fs', blob_dir='blobs', **kwargs)
        assert self._storage.commit_protocol == (
            'serial' if kwargs.get('read_only') else 'one sync')


class BlobMappingStorageTests(
    StorageTestBase.StorageTestBase,
    BasicStorage.BasicStorage,
    HistoryStorage.HistoryStorage,
    IteratorStorage.ExtendedIteratorStorage,
    IteratorStorage.IteratorStorage,
    MTStorage.MTStorage,
    PackableStorage.PackableStorageWithOptionalGC,
    RevisionStorage.RevisionStorage,
    Synchronization.SynchronizedStorage,
):
    """The MappingStorage suites, through the wrapper."""

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self._storage = BlobStorage('blobs',
                                    ZODB.MappingStorage.MappingStorage())

    # Left out as ZODB's own MappingStorage tests leave them out: said
    # as skipped, not passed.
    @unittest.skip('MappingStorage has no metadata size limit')
    def testOversizeNote(self):
        """BasicStorage's test of a transaction note's size limit."""

    @unittest.skip('MappingStorage has no undo')
    def testLoadBeforeUndo(self):
        """An undo's loadBefore."""
    testUndoZombie = testLoadBeforeUndo


class BlobFileStorageRecoveryTests(
    StorageTestBase.StorageTestBase,
    RecoveryStorage.RecoveryStorage,
):
    """copyTransactionsFrom and restore between two wrapped storages."""

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self._storage = BlobStorage('source-blobs', ZODB.FileStorage
                                    .FileStorage('Source.fs', create=True))
        self._dst = BlobStorage('dest-blobs', ZODB.FileStorage
                                .FileStorage('Dest.fs', create=True))

    def tearDown(self):
        self._dst.close()
        StorageTestBase.StorageTestBase.tearDown(self)

    def new_dest(self):
        return BlobStorage('dest-blobs', ZODB.FileStorage.FileStorage(
            'Dest.fs'))


def blob_file_storage(name, blob_dir):
    return BlobStorage(blob_dir, ZODB.FileStorage.FileStorage(name + '.fs'))


def one_sync_file_storage(name, blob_dir):
    return zodbblob.open_filestorage(name + '.fs', blob_dir=blob_dir)


def blob_mapping_storage(name, blob_dir):
    return BlobStorage(blob_dir, ZODB.MappingStorage.MappingStorage(name))


def blob_mvcc_mapping_storage(name, blob_dir):
    return BlobStorage(blob_dir, MVCCMappingStorage(name))


def _adapt(suite):
    """Drop the few stock examples that cannot hold here, saying why.

    - ``commit_from_wrong_partition`` breaks every ``os.rename`` and
      expects a DEBUG line on the ``ZODB.blob.copied`` logger.  We log a
      rename that has to copy at WARNING on our own logger (a deliberate
      improvement); ``test_storage`` proves the cross-device copy and the
      WARNING.
    - Under root (CI and developer machines here), opening a committed
      blob file for writing succeeds whatever its mode, so the example of
      ``blob_transaction.txt`` expecting PermissionError cannot hold, for
      stock ZODB either.  ``test_blob_file_permissions`` still checks the
      mode bits.
    - ``blob_transaction.txt`` looks for savepoint directories directly in
      ``<blob_dir>/tmp``; ours are in the transaction's directory below
      ``tmp/proc-<pid>-<n>/`` (so that files of a process that died can
      be told from a live one's, and each transaction owns its files), so
      those examples look for them anywhere below ``tmp``.
    """
    adapted = unittest.TestSuite()
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            test = _adapt(test)
        elif isinstance(test, doctest.DocTestCase):
            name = test._dt_test.name
            if name.endswith('.commit_from_wrong_partition'):
                continue
            if name == 'blob_transaction.txt':
                examples = test._dt_test.examples
                if os.geteuid() == 0:
                    examples = [
                        example for example in examples
                        if "open(blob.committed(), 'w')" not in example.source]
                for example in examples:
                    example.source = example.source.replace(
                        "os.listdir(os.path.join(blob_dir, 'tmp'))",
                        "[name_ for _, names_, _ in os.walk("
                        "os.path.join(blob_dir, 'tmp')) for name_ in names_]")
                test._dt_test.examples = examples
        adapted.addTest(test)
    if getattr(suite, 'layer', None) is not None:
        adapted.layer = suite.layer
    return adapted


def zodbblob_zeo_DB(addr, **options):
    """``ZEO.DB``, with zodbblob's client storage."""
    return ZODB.DB(zodbblob.zeo.ClientStorage(addr, **options))


def _zeo_blob_cache_setup(test):
    ZEO.tests.forker.setUp(test)
    test.globs['zodbblob_zeo_DB'] = zodbblob_zeo_DB


def zeo_blob_cache_suite():
    """ZEO's ``zeo_blob_cache.test``, its examples and expectations as
    they are, against stock ZEO servers in processes of their own; only
    the client each ``ZEO.DB(...)`` call opens is ours.  It ends at less
    than 5,000 bytes in the cache with a size of 3,000."""
    suite = doctest.DocFileSuite(
        'zeo_blob_cache.test', package=ZEO.tests,
        setUp=_zeo_blob_cache_setup,
        tearDown=zope.testing.setupstack.tearDown)
    for test in suite:
        for example in test._dt_test.examples:
            example.source = example.source.replace('ZEO.DB(',
                                                    'zodbblob_zeo_DB(')
    suite.layer = ZODB.tests.util.MininalTestLayer(
        'zodbblob.conformance.zeo')
    return suite


def test_suite():
    suite = unittest.TestSuite()
    for klass in (BlobFileStorageTests, OneSyncFileStorageTests,
                  BlobMappingStorageTests, BlobFileStorageRecoveryTests):
        suite.addTest(unittest.defaultTestLoader.loadTestsFromTestCase(klass))
    suite.layer = ZODB.tests.util.MininalTestLayer('zodbblob.conformance')
    suite.addTest(ZODB.tests.testblob.storage_reusable_suite(
        'zodbblob.FileStorage', blob_file_storage,
        test_blob_storage_recovery=True, test_packing=True, test_undo=True))
    suite.addTest(ZODB.tests.testblob.storage_reusable_suite(
        'zodbblob.OneSyncFileStorage', one_sync_file_storage,
        test_blob_storage_recovery=True, test_packing=True, test_undo=True))
    # MappingStorage has neither undo nor a history-keeping pack, as in
    # ZODB's own run of this suite against its MVCC mapping storage.
    suite.addTest(ZODB.tests.testblob.storage_reusable_suite(
        'zodbblob.MappingStorage', blob_mapping_storage, test_undo=False))
    suite.addTest(ZODB.tests.testblob.storage_reusable_suite(
        'zodbblob.MVCCMappingStorage', blob_mvcc_mapping_storage,
        test_undo=False))
    # deleteObject (IExternalGC) of blob objects, then pack.
    suite.addTest(PackableStorage.IExternalGC_suite(
        lambda: BlobStorage('blobs', ZODB.FileStorage.FileStorage(
            'data.fs', pack_gc=False))))
    suite = _adapt(suite)
    suite.addTest(zeo_blob_cache_suite())
    return suite
