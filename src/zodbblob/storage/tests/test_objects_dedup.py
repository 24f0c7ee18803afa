"""Dedup on a bucket: each content once under its digest, a pointer at
each revision's key; commit, read, pack, undo, abort, recovery, the
binding of the keys, and kills at each point, against moto's S3 server
(a real process on 127.0.0.1) and a real FileStorage."""

import os
import shutil
import time
import unittest

import transaction
from ZODB.blob import Blob
from ZODB.POSException import StorageError

from zodbblob.objectstore import blob_key, content_key
from zodbblob.storage import BlobStorageError
from zodbblob.storage.digest import digest_bytes
from zodbblob.storage.tests import test_objects
from zodbblob.storage.tests.test_objects import ObjectStoreTestCase
from zodbblob.testing import S3_MISSING, FailingVote


def read(blob):
    with blob.open() as f:
        return f.read()


class DedupTestCase(ObjectStoreTestCase):

    def open(self, **kw):
        kw.setdefault('dedup', True)
        return super().open(**kw)

    def pointers_and_contents(self):
        """``(blob keys, content keys)`` in the bucket."""
        keys = self.keys()
        contents = [key for key in keys
                    if key.startswith(self.settings.prefix + 'contents/')]
        return sorted(set(keys) - set(contents)), contents

    def expected_keys(self, storage):
        """The pointers and contents the catalog says the bucket holds."""
        rows = [row for batch in storage._shared.journal.rows(digests=True)
                for row in batch]
        return (sorted(blob_key(self.settings.prefix, oid, tid)
                       for oid, tid, size, *rest in rows),
                sorted({content_key(self.settings.prefix, rest[-1])
                        for oid, tid, size, *rest in rows}))

    def content(self, data):
        return content_key(self.settings.prefix, digest_bytes(data))


@unittest.skipIf(S3_MISSING, S3_MISSING)
class CommitTests(DedupTestCase):

    def test_each_content_is_stored_once(self):
        db = self.open_db()
        requests = self.counted(db.storage)
        connection = db.open()
        root = connection.root()
        root['a'] = Blob(b'same bytes')
        root['b'] = Blob(b'same bytes')
        root['c'] = Blob(b'other bytes')
        transaction.commit()
        self.assertEqual(requests['PutObject'], 2 + 3)   # contents, pointers
        requests.clear()
        root['d'] = Blob(b'same bytes')
        root['e'] = Blob(b'other bytes')
        transaction.commit()
        self.assertEqual(dict(requests), {'PutObject': 2})   # pointers only
        self.assertTrue(db.storage.dedup)
        pointers, contents = self.pointers_and_contents()
        self.assertEqual(len(pointers), 5)
        self.assertEqual(contents, sorted([self.content(b'same bytes'),
                                           self.content(b'other bytes')]))
        self.assertEqual((pointers, contents),
                         self.expected_keys(db.storage))
        self.assertEqual(db.storage.getSize() >= 4 * 10 + 2 * 11, True)
        connection.close()
        db.close()
        # Read back from the bucket alone: no local copies.
        shutil.rmtree(self.cache_dir())
        db = self.open_db()
        requests = self.counted(db.storage)
        root = db.open().root()
        for name, data in [('a', b'same bytes'), ('b', b'same bytes'),
                           ('c', b'other bytes'), ('d', b'same bytes'),
                           ('e', b'other bytes')]:
            self.assertEqual(read(root[name]), data, name)
        # The catalog names the content: no pointer is read.
        self.assertEqual(dict(requests), {'GetObject': 5})

    def test_a_damaged_content_is_not_handed_on(self):
        db = self.open_db()
        with db.transaction() as connection:
            connection.root()['a'] = Blob(b'good bytes')
        db.close()
        shutil.rmtree(self.cache_dir())
        self.bucket.put_bytes(self.content(b'good bytes'), b'EVIL BYTES')
        db = self.open_db()
        connection = db.open()
        with self.assertRaises(StorageError) as raised:
            read(connection.root()['a'])
        message = str(raised.exception)
        self.assertIn('do not hash to the digest', message)
        self.assertIn(self.content(b'good bytes'), message)
        self.assertNotIn('\n', message)
        connection.close()
        # Through the pointer too (what a ZEO client reading the bucket
        # does), with the storage's check.
        from zodbblob.objectstore import Bucket
        from zodbblob.storage.digest import has_digest
        bucket = Bucket(self.settings)
        self.addCleanup(bucket.client.close)
        bucket.check_content = has_digest
        [pointer] = self.pointers_and_contents()[0]
        target = os.path.join(self.dir, 'read')
        with self.assertRaises(Exception) as raised:
            bucket.download(pointer, target)
        self.assertIn('do not hash to the digest', str(raised.exception))
        self.assertFalse(os.path.exists(target))

    def test_a_failed_vote_deletes_only_the_new_contents(self):
        db = self.open_db()
        root = db.open().root()
        root['a'] = Blob(b'kept')
        transaction.commit()
        root['b'] = Blob(b'kept')
        root['c'] = Blob(b'new, then aborted')
        transaction.get().join(FailingVote())
        with self.assertRaises(ValueError):
            transaction.commit()
        transaction.abort()
        self.assertEqual(self.pointers_and_contents(),
                         self.expected_keys(db.storage))
        self.assertEqual(self.pointers_and_contents()[1],
                         [self.content(b'kept')])
        self.assertEqual(read(root['a']), b'kept')

    def test_undo_makes_a_pointer_and_copies_nothing(self):
        db = self.open_db()
        root = db.open().root()
        root['a'] = Blob(b'first')
        transaction.commit()
        with root['a'].open('w') as f:
            f.write(b'second')
        transaction.commit()
        requests = self.counted(db.storage)
        db.undo(db.undoInfo(0, 1)[0]['id'])
        transaction.commit()
        self.assertEqual(requests.get('CopyObject', 0), 0)
        self.assertEqual(requests['PutObject'], 1)
        connection = db.open()
        self.assertEqual(read(connection.root()['a']), b'first')
        connection.close()
        db.pack(time.time() + 1)
        self.assertEqual(self.pointers_and_contents(),
                         self.expected_keys(db.storage))
        self.assertEqual(self.pointers_and_contents()[1],
                         [self.content(b'first')])
        db.close()
        shutil.rmtree(self.cache_dir())
        db = self.open_db()
        self.assertEqual(read(db.open().root()['a']), b'first')


@unittest.skipIf(S3_MISSING, S3_MISSING)
class PackTests(DedupTestCase):

    def test_a_content_goes_with_its_last_revision(self):
        db = self.open_db()
        root = db.open().root()
        root['a'] = Blob(b'shared')
        root['b'] = Blob(b'shared')
        transaction.commit()
        del root['a']
        transaction.commit()
        db.pack(time.time() + 1)
        pointers, contents = self.pointers_and_contents()
        self.assertEqual(len(pointers), 1)
        self.assertEqual(contents, [self.content(b'shared')])
        del root['b']
        transaction.commit()
        db.pack(time.time() + 1)
        self.assertEqual(self.pointers_and_contents(), ([], []))

    def test_a_content_a_vote_counts_on_is_not_collected(self):
        # Vote decided "the bucket has it" (a row without a garbage mark
        # had it); a pack then marks that row garbage: the content stays
        # while the transaction counts on it, and goes after its end if
        # nothing else needs it.
        db = self.open_db()
        root = db.open().root()
        root['a'] = Blob(b'contended')
        transaction.commit()
        storage = db.storage
        contents = storage.object_store.contents
        journal = storage._shared.journal
        digest = digest_bytes(b'contended')
        self.assertEqual(contents.claim([digest]), set())
        oid, tid = root['a']._p_oid, storage.lastTransaction()
        journal.flush()   # as a pack's read of the rows does
        journal.mark_garbage([(oid, tid)])
        contents.collect([digest])
        self.assertEqual(self.pointers_and_contents()[1],
                         [self.content(b'contended')])
        contents.release([digest])
        contents.collect([digest])
        self.assertEqual(self.pointers_and_contents()[1], [])
        # and a claim now finds it gone: the next vote uploads it again.
        self.assertEqual(contents.claim([digest]), {digest})
        contents.release([digest])
        journal.forget_garbage([(oid, tid)])


@unittest.skipIf(S3_MISSING, S3_MISSING)
class BindingTests(DedupTestCase):

    def test_the_keys_of_a_prefix_are_bound(self):
        self.open(dedup=False).close()
        with self.assertRaises(BlobStorageError) as raised:
            self.open()
        self.assertIn('by oid and tid', str(raised.exception))
        self.assertNotIn('\n', str(raised.exception))
        shutil.rmtree(self.dir)
        os.mkdir(self.dir)
        self.settings = self.layer.make_bucket(prefix='site')
        self.open().close()
        with self.assertRaises(BlobStorageError) as raised:
            self.open(dedup=False)
        self.assertIn('by content', str(raised.exception))
        self.assertIn(os.path.join(self.dir, 'blobs'), str(raised.exception))

    def test_a_lost_catalog_is_rebuilt_with_its_digests(self):
        db = self.open_db()
        root = db.open().root()
        root['a'] = Blob(b'one')
        root['b'] = Blob(b'one')
        root['c'] = Blob(b'two')
        transaction.commit()
        expected = self.expected_keys(db.storage)
        db.close()
        os.remove(os.path.join(self.dir, 'blobs', '.zodbblob',
                               'journal.sqlite'))
        shutil.rmtree(self.cache_dir())
        db = self.open_db()
        self.assertEqual(self.expected_keys(db.storage), expected)
        root = db.open().root()
        self.assertEqual([read(root[name]) for name in 'abc'],
                         [b'one', b'one', b'two'])
        db.close()
        # Rebuilt again, with a stray object that is no pointer at a
        # blob key: left out, said; and the keys stay bound (dedup).
        os.remove(os.path.join(self.dir, 'blobs', '.zodbblob',
                               'journal.sqlite'))
        stray = blob_key(self.settings.prefix, b'\0' * 7 + b'\x99',
                         b'\x03' * 8)
        self.bucket.put_bytes(stray, b'not a pointer')
        with self.assertRaises(BlobStorageError) as raised:
            self.open(dedup=False)
        self.assertIn('by content', str(raised.exception))
        with self.assertLogs('zodbblob.storage.objects', 'WARNING') as said:
            db = self.open_db()
        self.assertIn(stray, '\n'.join(said.output))
        self.assertEqual(self.expected_keys(db.storage), expected)
        root = db.open().root()
        # A commit of a known content after the rebuild uploads none.
        requests = self.counted(db.storage)
        root['d'] = Blob(b'two')
        transaction.commit()
        self.assertEqual(dict(requests), {'PutObject': 1})


@unittest.skipIf(S3_MISSING, S3_MISSING)
class DedupKillTests(test_objects.KillTests):
    """SIGKILL at each named point with dedup on: after the next open,
    every acknowledged blob reads back byte-exact, and the bucket holds
    exactly the catalog's pointers and the contents its rows name."""

    dedup = True

    def open(self, **kw):
        kw.setdefault('dedup', True)
        return super().open(**kw)

    def check(self, pack=False):
        storage = self.open()
        try:
            pointers, contents = DedupTestCase.expected_keys(self, storage)
            self.assertEqual(self.keys(), sorted(pointers + contents))
        finally:
            storage.close()
        super().check(pack)

    def kill_at(self, point, *args):
        return super().kill_at(point, *args, '--dedup')

    def catalog_keys(self, storage):
        pointers, contents = DedupTestCase.expected_keys(self, storage)
        return sorted(pointers + contents)

    # By oid and tid in test_objects; by content here:
    test_the_parts_of_a_cut_multipart_upload_are_aborted = None

    def test_the_parts_of_a_cut_content_upload_are_aborted(self):
        self.kill_at('after_upload_record')
        from zodbblob.storage.commitlog import CommitLog
        log = CommitLog(os.path.join(self.dir, 'blobs', '.zodbblob',
                                     'commit.log'), read_only=True)
        try:
            record = log.records[-1]   # the killed transaction's
        finally:
            log.close()
        digests = {entry.digest for entry in record.entries}
        self.assertNotIn(None, digests)
        client = self.bucket.client
        keys = [content_key(self.settings.prefix, digest)
                for digest in digests]
        for key in keys:
            upload = client.create_multipart_upload(
                Bucket=self.settings.bucket, Key=key)
            client.upload_part(Bucket=self.settings.bucket, Key=key,
                               UploadId=upload['UploadId'], PartNumber=1,
                               Body=b'x' * (5 << 20))
        self.check()
        left = client.list_multipart_uploads(
            Bucket=self.settings.bucket).get('Uploads', [])
        # Aborted, but for a content a committed revision has (a kill
        # leaves only the contents nobody needs to abort).
        storage = self.open()
        try:
            needed = set(DedupTestCase.expected_keys(self, storage)[1])
        finally:
            storage.close()
        self.assertEqual({upload['Key'] for upload in left},
                         set(keys) & needed)

    # The points where dedup does something of its own (hashing before
    # the record, contents beside pointers, a content a pack collects);
    # every point by oid and tid is in test_objects.KillTests.
    def test_kill_at_each_upload_point(self):
        for point in ('after_upload_record', 'mid_upload:3',
                      'after_uploads', 'after_base_finish'):
            with self.subTest(point=point):
                self.kill_at(point)
                self.check()

    # Pack by content: test_kill_in_a_pack_beside_a_shared_content.
    test_kill_at_each_pack_point = None

    def test_kill_in_an_undo(self):
        self.kill_at('after_uploads:3', '--undo')
        self.check()

    def test_kill_in_a_pack_beside_a_shared_content(self):
        for point in ('after_object_delete', 'after_base_pack'):
            with self.subTest(point=point):
                self.kill_at(point, '--pack', '8')
                self.check(pack=True)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
