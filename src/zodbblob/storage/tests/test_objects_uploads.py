"""How a storage on a bucket sends a transaction's files: a lone file
from the voting thread, several through the upload pool; every file one
PutObject below the multipart threshold (``objects.py``, ``bucket.py``).
"""

import threading
import unittest

from ZODB.blob import Blob

from zodbblob.storage.tests.test_objects import ObjectStoreTestCase
from zodbblob.testing import S3_MISSING


def upload_threads():
    return {thread for thread in threading.enumerate()
            if thread.name.startswith('zodbblob-upload')}


@unittest.skipIf(S3_MISSING, S3_MISSING)
class UploadTests(ObjectStoreTestCase):

    def test_a_lone_file_goes_up_from_the_voting_thread(self):
        db = self.open_db()
        requests = self.counted(db.storage)
        before = upload_threads()
        for number in range(3):
            with db.transaction() as connection:
                connection.root()[number] = Blob(b'one %d' % number)
        # No pool thread was started: each vote sent its file itself.
        self.assertEqual(upload_threads(), before)
        self.assertEqual(requests['PutObject'], 3)
        with db.transaction() as connection:
            connection.root()['a'] = Blob(b'a')
            connection.root()['b'] = Blob(b'b')
        self.assertGreater(upload_threads(), before)
        self.assertEqual(requests['PutObject'], 5)
        self.assertEqual(len(self.keys()), 5)
        with db.transaction() as connection:
            for number in range(3):
                with connection.root()[number].open() as f:
                    self.assertEqual(f.read(), b'one %d' % number)

    def test_a_10_MiB_file_is_one_put_object(self):
        db = self.open_db()
        requests = self.counted(db.storage)
        data = b'0123456789' * (1 << 20)
        with db.transaction() as connection:
            connection.root()['large'] = Blob(data)
        self.assertEqual(dict(requests), {'PutObject': 1})
        size = self.bucket.head(self.keys()[0])
        self.assertEqual(size, len(data))
