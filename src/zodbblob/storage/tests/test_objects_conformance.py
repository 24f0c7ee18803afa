"""ZODB's own blob suite against a storage whose blobs live in a bucket
(moto's S3 server, a real process on 127.0.0.1): blob commits, packing,
undo, recovery, savepoints, what a ZODB user does with blobs; by oid
and tid, and by content (dedup).

ZODB's class-based FileStorage suites (BasicStorage, undo, pack, MVCC
and the rest) store no blobs: on a bucket they ran what
``test_conformance`` runs, at 30 s more a run, and were dropped.
"""

import doctest
import os
import unittest

import ZODB.tests.testblob
import ZODB.tests.util

import zodbblob
from zodbblob.storage.tests.test_conformance import _adapt
from zodbblob.testing import S3_MISSING, S3_SERVER

# One bucket per blob directory: a test that reopens its storage finds
# its blobs again.
_buckets = {}


def settings_for(blob_dir):
    key = os.path.realpath(blob_dir)
    if key not in _buckets:
        _buckets[key] = S3_SERVER.make_bucket(prefix='blobs')
    return _buckets[key]


def object_store_file_storage(name, blob_dir):
    return zodbblob.open_filestorage(
        name + '.fs', blob_dir=blob_dir,
        object_store=settings_for(blob_dir))


def object_store_dedup_file_storage(name, blob_dir):
    """Each content once (dedup): pointers at the revisions' keys."""
    return zodbblob.open_filestorage(
        name + '.fs', blob_dir=blob_dir,
        object_store=settings_for(blob_dir), dedup=True)


def _without(suite, name):
    """`suite` without the doctest `name` (its examples take a new
    second per transaction: the dedup run leaves blob_packing.txt to the
    run by oid and tid, and pack by content to test_objects_dedup, for
    the suite's 15 minutes on two busy cores)."""
    kept = unittest.TestSuite()
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            test = _without(test, name)
        elif (isinstance(test, doctest.DocTestCase)
              and test._dt_test.name == name):
            continue
        kept.addTest(test)
    if getattr(suite, 'layer', None) is not None:
        kept.layer = suite.layer
    return kept


def _on_bucket(suite):
    """Ask the bucket where stock's examples look at files.

    ``blob_packing.txt`` checks which revisions' files a pack removed:
    here, which revisions' objects are in the bucket (a HEAD each), the
    same question.  Its last example (the oid's directory is gone) and
    ``loadblob_tmpstore``'s read through a storage already closed ask
    about stock's directory and a closed storage's paths: on a bucket
    there is no directory, and a closed storage has no client.
    """
    adapted = unittest.TestSuite()
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            test = _on_bucket(test)
        elif isinstance(test, doctest.DocTestCase):
            name = test._dt_test.name
            if name.endswith('loadblob_tmpstore'):
                continue
            if name == 'blob_packing.txt':
                examples = []
                for example in test._dt_test.examples:
                    if 'os.path.split(fns[0])' in example.source:
                        continue
                    example.source = example.source.replace(
                        '[ os.path.exists(x) for x in fns ]',
                        '[blob_storage.object_store.size(oid, x) is not None'
                        ' for x in tids]')
                    examples.append(example)
                test._dt_test.examples = examples
        adapted.addTest(test)
    if getattr(suite, 'layer', None) is not None:
        adapted.layer = suite.layer
    return adapted


def test_suite():
    suite = unittest.TestSuite()
    if S3_MISSING:
        return suite
    for name, factory in [
            ('zodbblob.ObjectStoreFileStorage', object_store_file_storage),
            ('zodbblob.ObjectStoreDedupFileStorage',
             object_store_dedup_file_storage)]:
        blobs = _on_bucket(_adapt(ZODB.tests.testblob.storage_reusable_suite(
            name, factory, test_blob_storage_recovery=True,
            test_packing=True, test_undo=True)))
        if factory is object_store_dedup_file_storage:
            blobs = _without(blobs, 'blob_packing.txt')
        blobs.layer = S3_SERVER
        suite.addTest(blobs)
    return suite
