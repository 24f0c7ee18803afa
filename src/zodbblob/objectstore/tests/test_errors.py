"""A store that refuses, is not there or does not answer gives one line
after the bounded tries, never a hang."""

import socket
import threading
import unittest

from zodbblob.objectstore import ObjectStoreSettings
from zodbblob.testing import S3_MISSING, S3ServerLayer, free_port

if not S3_MISSING:
    from zodbblob.objectstore import Bucket, ObjectStoreError

# A real moto server that checks every request's keys against its IAM
# users, of which it has none: the dummy keys are wrong credentials.
REFUSING_S3_SERVER = S3ServerLayer(
    name='REFUSING_S3_SERVER', module=__name__, refuse_credentials=True)


def count_tries(bucket):
    """A list that gets one item for every request sent, retries too."""
    sent = []
    bucket.client.meta.events.register(
        'before-send.s3', lambda request, **kwargs: sent.append(request.url))
    return sent


@unittest.skipIf(S3_MISSING, S3_MISSING)
class WrongCredentialsTests(unittest.TestCase):

    layer = REFUSING_S3_SERVER

    def test_check_with_wrong_credentials_says_access_denied(self):
        bucket = Bucket(self.layer.settings('blobs'))
        sent = count_tries(bucket)
        with self.assertRaises(ObjectStoreError) as raised:
            bucket.check()
        self.assertEqual(
            str(raised.exception),
            f"cannot reach bucket 'blobs' at {self.layer.endpoint_url}: "
            f"access denied (wrong credentials?)")
        # A refusal is an answer: it is not tried again.
        self.assertEqual(len(sent), 1)

    def test_a_listing_with_wrong_credentials_says_access_denied(self):
        bucket = Bucket(self.layer.settings('blobs'))
        with self.assertRaises(ObjectStoreError) as raised:
            list(bucket.iter_keys())
        self.assertIn('cannot list bucket', str(raised.exception))
        self.assertIn('access denied (wrong credentials?)',
                      str(raised.exception))


@unittest.skipIf(S3_MISSING, S3_MISSING)
class UnreachableTests(unittest.TestCase):

    def test_unreachable_endpoint_fails_after_the_bounded_tries(self):
        endpoint = f'http://127.0.0.1:{free_port()}'
        bucket = Bucket(ObjectStoreSettings(
            'blobs', endpoint_url=endpoint, region='us-east-1',
            access_key_id='testing', secret_access_key='testing',
            attempts=3))
        sent = count_tries(bucket)
        with self.assertRaises(ObjectStoreError) as raised:
            bucket.check()
        self.assertEqual(
            str(raised.exception),
            f"cannot reach bucket 'blobs' at {endpoint}: "
            f"cannot connect to {endpoint} after 3 tries")
        self.assertEqual(len(sent), 3)

    def test_a_server_that_never_answers_times_out(self):
        # A listener that accepts and never says a word: the read
        # timeout, not the connection, is what ends each try.
        listener = socket.create_server(('127.0.0.1', 0))
        accepted = []

        def accept():
            while True:
                try:
                    accepted.append(listener.accept()[0])
                except OSError:
                    return
        thread = threading.Thread(target=accept, daemon=True)
        thread.start()

        def stop():
            # A close alone does not wake a thread blocked in accept().
            listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            thread.join()
            for connection in accepted:
                connection.close()
        self.addCleanup(stop)
        endpoint = 'http://127.0.0.1:%d' % listener.getsockname()[1]
        bucket = Bucket(ObjectStoreSettings(
            'blobs', endpoint_url=endpoint, region='us-east-1',
            access_key_id='testing', secret_access_key='testing',
            attempts=2, read_timeout=0.5))
        sent = count_tries(bucket)
        with self.assertRaises(ObjectStoreError) as raised:
            bucket.head('zodb/k')
        self.assertEqual(
            str(raised.exception),
            f"cannot look up key 'zodb/k' in bucket 'blobs' at {endpoint}: "
            f"timed out after 2 tries of 0.5 s each")
        self.assertEqual(len(sent), 2)


@unittest.skipIf(S3_MISSING, S3_MISSING)
class PickleTests(unittest.TestCase):
    """A ZEO server sends a client the error of its vote pickled: the
    client must get the same error, not an unpickling failure."""

    def test_errors_pickle_whole(self):
        import pickle

        from zodbblob.objectstore import ObjectMissing
        for error in (ObjectStoreError('upload /x to', 'blobs',
                                       'http://127.0.0.1:9', 'timed out',
                                       'site/k'),
                      ObjectMissing('download', 'blobs', 'http://h',
                                    'no such key', 'k')):
            copy = pickle.loads(pickle.dumps(error))
            self.assertIs(type(copy), type(error))
            self.assertEqual(str(copy), str(error))
            self.assertEqual((copy.bucket, copy.key, copy.cause),
                             (error.bucket, error.key, error.cause))
