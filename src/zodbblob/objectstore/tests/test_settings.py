"""ObjectStoreSettings and the key layout: wrong values are refused by
name, before any request; keys go to (oid, tid) and back."""

import os
import subprocess
import sys
import unittest

from zodbblob.objectstore import (
    ObjectStoreSettings,
    blob_key,
    content_key,
    parse_blob_key,
    parse_content_key,
)

OID = bytes.fromhex('00000000000000a1')
TID = bytes.fromhex('03f1c2d4e5f60718')


class SettingsTests(unittest.TestCase):

    def test_prefix_is_normalised_to_end_in_a_slash(self):
        self.assertEqual(ObjectStoreSettings('b', prefix='zodb').prefix,
                         'zodb/')
        self.assertEqual(ObjectStoreSettings('b', prefix='a/b/').prefix,
                         'a/b/')
        self.assertEqual(ObjectStoreSettings('b').prefix, '')

    def test_prefix_with_a_dotdot_part_is_refused_by_name(self):
        for prefix in ('..', 'a/../b', 'a/..'):
            with self.assertRaises(ValueError) as raised:
                ObjectStoreSettings('b', prefix=prefix)
            self.assertIn(repr(prefix), str(raised.exception))
            self.assertIn('..', str(raised.exception))
        # Two dots inside a name are no part of their own.
        self.assertEqual(ObjectStoreSettings('b', prefix='a..b').prefix,
                         'a..b/')

    def test_prefix_with_a_leading_slash_is_refused(self):
        with self.assertRaises(ValueError) as raised:
            ObjectStoreSettings('b', prefix='/zodb')
        self.assertIn("'/zodb'", str(raised.exception))

    def test_one_key_without_the_other_is_refused(self):
        with self.assertRaises(ValueError) as raised:
            ObjectStoreSettings('b', access_key_id='AKIA')
        self.assertIn('access_key_id given without the other',
                      str(raised.exception))
        with self.assertRaises(ValueError) as raised:
            ObjectStoreSettings('b', secret_access_key='s3cr3t')
        self.assertIn('secret_access_key given', str(raised.exception))
        self.assertNotIn('s3cr3t', str(raised.exception))

    def test_other_wrong_values_are_refused_by_name(self):
        for field, value in (('bucket', ''), ('addressing_style', 'dns'),
                             ('connect_timeout', 0), ('read_timeout', -1),
                             ('attempts', 0), ('attempts', 1.5)):
            values = {'bucket': 'b', field: value}
            with self.assertRaises(ValueError) as raised:
                ObjectStoreSettings(**values)
            self.assertIn(field.replace('_', ' ') if field == 'bucket'
                          else field, str(raised.exception))

    def test_repr_never_shows_the_secret(self):
        settings = ObjectStoreSettings(
            'b', access_key_id='AKIA', secret_access_key='s3cr3t')
        self.assertNotIn('s3cr3t', repr(settings))
        self.assertNotIn('s3cr3t', str(settings))
        self.assertIn("access_key_id='AKIA'", repr(settings))
        self.assertIn('secret_access_key=<hidden>', repr(settings))

    def test_settings_are_frozen(self):
        settings = ObjectStoreSettings('b')
        with self.assertRaises(AttributeError):
            settings.bucket = 'other'

    def test_an_endpoint_makes_auto_addressing_path_style(self):
        self.assertEqual(ObjectStoreSettings(
            'b', endpoint_url='http://minio:9000').effective_addressing_style,
            'path')
        self.assertEqual(
            ObjectStoreSettings('b').effective_addressing_style, 'auto')
        self.assertEqual(ObjectStoreSettings(
            'b', endpoint_url='http://minio:9000',
            addressing_style='virtual').effective_addressing_style,
            'virtual')

    def test_defaults(self):
        settings = ObjectStoreSettings('b')
        self.assertEqual(
            (settings.connect_timeout, settings.read_timeout,
             settings.attempts, settings.endpoint_url, settings.region),
            (10, 60, 4, None, None))


class KeyTests(unittest.TestCase):

    def test_blob_key_is_readable_oid_then_tid(self):
        self.assertEqual(blob_key('zodb/', OID, TID),
                         'zodb/00000000000000a1/03f1c2d4e5f60718.blob')

    def test_blob_key_round_trip(self):
        for prefix in ('', 'zodb/', 'a/b/'):
            for oid, tid in ((OID, TID), (b'\0' * 8, b'\xff' * 8)):
                key = blob_key(prefix, oid, tid)
                self.assertEqual(parse_blob_key(prefix, key), (oid, tid))

    def test_oid_or_tid_not_8_bytes_is_refused(self):
        for oid, tid in ((b'\0' * 7, TID), (OID, b'\0' * 9),
                         ('0' * 8, TID), (OID, None)):
            with self.assertRaises(ValueError) as raised:
                blob_key('', oid, tid)
            self.assertIn('exactly 8 bytes', str(raised.exception))

    def test_parse_blob_key_refuses_other_keys(self):
        good = blob_key('zodb/', OID, TID)
        for key in (good.upper(), 'other/' + good, good + '.tmp',
                    'zodb/00000000000000a1/03f1c2d4e5f6071.blob',
                    'zodb/00000000000000a1/../03f1c2d4e5f60718.blob',
                    'zodb/x/00000000000000a1/03f1c2d4e5f60718.blob',
                    content_key('zodb/', b'\1' * 32)):
            self.assertIsNone(parse_blob_key('zodb/', key), key)

    def test_content_key_and_back(self):
        digest = bytes(range(32))
        key = content_key('zodb/', digest)
        self.assertEqual(key, 'zodb/contents/00/' + digest.hex())
        self.assertEqual(parse_content_key('zodb/', key), digest)
        self.assertIsNone(parse_content_key(
            'zodb/', 'zodb/contents/01/' + digest.hex()))
        self.assertIsNone(parse_content_key(
            'zodb/', blob_key('zodb/', OID, TID)))
        with self.assertRaises(ValueError):
            content_key('zodb/', digest[:31])


class ImportTests(unittest.TestCase):

    def run_python(self, code):
        return subprocess.run([sys.executable, '-c', code],
                              capture_output=True, text=True,
                              env={**os.environ, 'PYTHONWARNINGS': ''})

    def test_importing_zodbblob_does_not_import_boto3(self):
        done = self.run_python(
            'import sys, zodbblob, zodbblob.objectstore, zodbblob.testing\n'
            'print("boto3" in sys.modules)')
        self.assertEqual((done.stdout, done.stderr), ('False\n', ''))

    def test_without_boto3_the_bucket_says_how_to_install_it(self):
        # A None in sys.modules is how Python marks a module absent.
        done = self.run_python(
            'import sys\nsys.modules["boto3"] = None\n'
            'from zodbblob.objectstore import Bucket')
        self.assertNotEqual(done.returncode, 0)
        last = done.stderr.strip().splitlines()[-1]
        self.assertTrue(last.startswith('ImportError: The object store '
                                        'needs boto3'), last)
        self.assertIn('pip install zodbblob[s3]', last)
