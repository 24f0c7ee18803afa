"""zope.testrunner layers for the test suites of zodbblob's users.

Three layers, all reached from a test as ``self.layer``:

`BLOB_STORAGE` gives every test a fresh `zodbblob.BlobStorage` over a
FileStorage in a temporary directory, and a database on it::

    class ImageTests(unittest.TestCase):
        layer = zodbblob.testing.BLOB_STORAGE

        def test_thumbnail_is_a_blob(self):
            connection = self.layer.db.open()
            ...                      # also: self.layer.storage, .blob_dir

`ZEO_SERVER` runs one real ``zodbblob serve`` process on a free port of
127.0.0.1 for all the tests of the layer; tests connect stock ZEO clients
to ``self.layer.address``.  The server's data outlives each test (it is one
database); only the layer's tear-down removes it::

    class SharedImageTests(unittest.TestCase):
        layer = zodbblob.testing.ZEO_SERVER

        def test_two_clients_see_one_blob(self):
            db = ZEO.DB(self.layer.address, blob_dir=...)

`S3_SERVER` runs one real S3-API server process (moto's standalone
server, ``python -m moto.server``) on a free port of 127.0.0.1 for all
the tests of the layer; ``self.layer.make_bucket()`` creates a fresh
bucket and returns the `zodbblob.objectstore.ObjectStoreSettings` that
reach it (``endpoint_url``, dummy keys: moto takes any).  Buckets live
in the server's memory until the layer's tear-down stops it.  It needs
``moto[server]`` and boto3 (the ``[test]`` extra has them); without
them `S3_MISSING` says why, for a ``unittest.skipIf``::

    @unittest.skipIf(S3_MISSING, S3_MISSING)
    class UploadTests(unittest.TestCase):
        layer = zodbblob.testing.S3_SERVER

        def test_upload(self):
            bucket = Bucket(self.layer.make_bucket())
            ...

All are instances.  Make your own with other settings, named for the
variable that holds it (zope.testrunner finds layers by that name)::

    LAWN_STORAGE = BlobStorageLayer(layout='lawn', name='LAWN_STORAGE',
                                    module=__name__)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import importlib.util
import itertools
import uuid
from collections.abc import Mapping, Sequence

import transaction
import ZODB
import ZODB.FileStorage

from zodbblob.cli import BLOB_DIR, DATA_FS, format_address
from zodbblob.objectstore.settings import ObjectStoreSettings
from zodbblob.storage import BlobStorage


class FailingVote:
    """A resource manager whose vote fails after the storage's (it sorts
    last): join it to a transaction to test what an abort after the
    storage voted leaves behind.  `error` is what its vote raises."""

    def __init__(self, error: BaseException | None = None):
        self.error = error if error is not None else ValueError(
            'the other resource refused')

    def sortKey(self):
        return '~last'

    def tpc_vote(self, transaction):
        raise self.error

    def tpc_begin(self, transaction):
        pass

    commit = tpc_abort = abort = tpc_finish = tpc_begin


def free_port(host: str = '127.0.0.1') -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class _Layer:
    """What zope.testrunner needs of a layer object besides its hooks.

    The runner names a layer ``__module__.__name__`` and may import it by
    that name (to run layers in subprocesses): give every layer the name
    of the module variable that holds it.
    """

    def __init__(self, name: str, module: str):
        self.__bases__ = ()
        self.__name__ = name
        self.__module__ = module

    def __repr__(self):
        return f'<{self.__module__}.{self.__name__}>'

    def setUp(self):
        pass

    def tearDown(self):
        pass

    def testSetUp(self):
        pass

    def testTearDown(self):
        pass


class BlobStorageLayer(_Layer):
    """A fresh blob storage and database for every test.

    During a test: ``storage`` (the `zodbblob.BlobStorage`), ``db`` (a
    ``ZODB.DB`` on it), ``blob_dir`` and ``directory`` (the temporary
    directory holding ``Data.fs`` and ``blobs/``).  A test may close
    ``db`` itself (to reopen the files, say); the tear-down closes it
    anyway, aborts the thread's transaction and removes ``directory``.
    """

    def __init__(self, *, name: str, module: str,
                 layout: str = 'automatic'):
        super().__init__(name, module)
        self.layout = layout
        self.directory = self.blob_dir = self.storage = self.db = None

    def testSetUp(self):
        self.directory = tempfile.mkdtemp(prefix='zodbblob-test-')
        self.blob_dir = os.path.join(self.directory, 'blobs')
        try:
            base = ZODB.FileStorage.FileStorage(
                os.path.join(self.directory, 'Data.fs'))
            self.storage = BlobStorage(self.blob_dir, base, self.layout)
            self.db = ZODB.DB(self.storage)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def testTearDown(self):
        transaction.abort()
        try:
            if self.db is not None:
                self.db.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = self.blob_dir = self.storage = self.db = None


class ServerStartError(RuntimeError):
    """A ZEO server process did not come up; the message has its output."""


class ServerProcess:
    """A ZEO server running as a child process, with its output in a file.

    `argv` is the whole command line; the server is expected to listen on
    `address`.  The output goes to a file, not a pipe: nobody reads a pipe
    while the tests run, and a full pipe would stall the server.  `env`,
    if given, is added to this process's environment for the server.
    """

    def __init__(self, argv: Sequence[str], address: tuple[str, int],
                 cwd: str, log_path: str,
                 env: Mapping[str, str] | None = None):
        self.argv = list(argv)
        self.address = address
        self.cwd = cwd
        self.log_path = log_path
        self.env = dict(env) if env else None
        self.process: subprocess.Popen | None = None

    def output(self) -> str:
        try:
            with open(self.log_path, errors='replace') as log:
                return log.read()
        except FileNotFoundError:
            return ''

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and return once it accepts connections."""
        env = None if self.env is None else {**os.environ, **self.env}
        with open(self.log_path, 'ab') as log:
            self.process = subprocess.Popen(
                self.argv, cwd=self.cwd, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            status = self.process.poll()
            if status is not None:
                self.process = None
                raise ServerStartError(
                    f'ZEO server {self.argv} exited with status {status} '
                    f'before listening on {self.address}; its output:\n'
                    f'{self.output()}')
            # Alive and accepting: a server that failed to bind (the port
            # was taken meanwhile) exits, which the poll above catches.
            if self._accepts() and self.process.poll() is None:
                return
            if time.monotonic() > deadline:
                self.stop(timeout=5)
                raise ServerStartError(
                    f'ZEO server {self.argv} did not listen on '
                    f'{self.address} within {timeout} seconds; its output:\n'
                    f'{self.output()}')
            time.sleep(0.05)

    def _accepts(self) -> bool:
        try:
            socket.create_connection(self.address, timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the server to stop (SIGTERM, or SIGINT for a Ctrl-C);
        kill it after `timeout`.  Return its exit status.

        A server that had to be killed gets ``-SIGKILL``: whoever stops it
        can tell a clean shutdown from a forced one.
        """
        process, self.process = self.process, None
        if process is None:
            return 0
        process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return -signal.SIGKILL


def start_server(argv: Sequence[str], address: tuple[str, int],
                 directory: str, log_name: str, timeout: float,
                 env: Mapping[str, str] | None = None) -> ServerProcess:
    """A started `ServerProcess` in `directory`, its output in
    `log_name` there; `directory` is removed if it does not start."""
    server = ServerProcess(argv, address, cwd=directory,
                           log_path=os.path.join(directory, log_name),
                           env=env)
    try:
        server.start(timeout)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return server


def serve_command(*args: str) -> list[str]:
    """The command line of ``zodbblob serve ARGS`` with this interpreter.

    ``python -m zodbblob.cli`` runs what the ``zodbblob`` script runs,
    whether or not the script is on the PATH of the test run.
    """
    return [sys.executable, '-m', 'zodbblob.cli', 'serve', *args]


class ZEOServerLayer(_Layer):
    """A ``zodbblob serve`` process for the tests of the layer.

    During the layer: ``address`` (``('127.0.0.1', port)``, for
    ``ZEO.client`` / ``ZEO.DB``), ``var`` (the server's directory),
    ``data_fs`` and ``blob_dir`` (the server's FileStorage and blob
    directory, ``var/filestorage/Data.fs`` and ``var/blobstorage``, as
    ``zodbblob serve`` keeps them) and ``server`` (the `ServerProcess`,
    whose ``output()`` is the server log).
    """

    def __init__(self, *, name: str, module: str, layout: str = 'automatic',
                 start_timeout: float = 30.0, stop_timeout: float = 10.0):
        super().__init__(name, module)
        self.layout = layout
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.directory = self.var = self.data_fs = self.blob_dir = None
        self.address = self.server = None

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix='zodbblob-zeo-')
        self.var = os.path.join(self.directory, 'var')
        self.data_fs = os.path.join(self.var, DATA_FS)
        self.blob_dir = os.path.join(self.var, BLOB_DIR)
        self.address = ('127.0.0.1', free_port())
        self.server = start_server(
            serve_command('--address', format_address(self.address),
                          '--var', self.var, '--layout', self.layout),
            self.address, self.directory, 'server.log', self.start_timeout)

    def tearDown(self):
        try:
            status = self.server.stop(timeout=self.stop_timeout)
            if status != 0:
                raise RuntimeError(
                    f'ZEO server {self.server.argv} did not stop cleanly '
                    f'(exit status {status}); its output:\n'
                    f'{self.server.output()}')
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = self.var = self.data_fs = self.blob_dir = None
            self.address = self.server = None


def s3_missing() -> str | None:
    """Why `S3ServerLayer` cannot run here, or None if it can."""
    for module, extra in (('boto3', 'zodbblob[s3]'),
                          ('moto', "'moto[server]'"),
                          ('flask', "'moto[server]'")):
        if importlib.util.find_spec(module) is None:
            return (f'{module} is not installed: pip install {extra} '
                    f'(or zodbblob[test]) to run the object store tests')
    return None


S3_MISSING = s3_missing()
REGION = 'us-east-1'


class S3ServerLayer(_Layer):
    """An S3-API server process (moto's) for the tests of the layer.

    During the layer: ``endpoint_url`` (``http://127.0.0.1:PORT``),
    ``address`` and ``server`` (the `ServerProcess`, whose ``output()``
    is the server's log); `make_bucket`.  With `refuse_credentials` the
    server checks every request's keys against its IAM users, of which
    it has none: every request is refused, as a server refuses wrong
    keys.  Without boto3 or moto (`S3_MISSING`) the layer starts nothing;
    its tests are to be skipped.
    """

    def __init__(self, *, name: str, module: str,
                 refuse_credentials: bool = False,
                 start_timeout: float = 60.0, stop_timeout: float = 10.0):
        super().__init__(name, module)
        self.refuse_credentials = refuse_credentials
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.directory = self.address = self.endpoint_url = None
        self.server = None
        self._numbers = itertools.count(1)

    def setUp(self):
        if S3_MISSING:
            return
        self.directory = tempfile.mkdtemp(prefix='zodbblob-s3-')
        self.address = ('127.0.0.1', free_port())
        self.endpoint_url = 'http://%s:%d' % self.address
        # moto's server lets every request through unless it counts
        # requests made without IAM checks: from 0, none is.
        env = ({'INITIAL_NO_AUTH_ACTION_COUNT': '0'}
               if self.refuse_credentials else None)
        self.server = start_server(
            [sys.executable, '-m', 'moto.server',
             '-H', self.address[0], '-p', str(self.address[1])],
            self.address, self.directory, 'moto.log', self.start_timeout,
            env)

    def tearDown(self):
        if self.server is None:
            return
        try:
            # moto's server (werkzeug) dies of SIGTERM without cleaning
            # up: any end will do, its buckets are in its memory.
            self.server.stop(timeout=self.stop_timeout)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = self.address = self.endpoint_url = None
            self.server = None

    def settings(self, bucket: str, **overrides) -> ObjectStoreSettings:
        """Settings that reach `bucket` on this server (dummy keys)."""
        values = dict(bucket=bucket, endpoint_url=self.endpoint_url,
                      region=REGION, access_key_id='testing',
                      secret_access_key='testing')
        values.update(overrides)
        return ObjectStoreSettings(**values)

    def make_bucket(self, name: str | None = None,
                    **overrides) -> ObjectStoreSettings:
        """Create the bucket `name` (a fresh name if None) and return the
        settings that reach it; `overrides` are more settings."""
        import boto3.session
        if name is None:
            name = (f'zodbblob-test-{next(self._numbers)}-'
                    f'{uuid.uuid4().hex[:8]}')
        settings = self.settings(name, **overrides)
        client = boto3.session.Session().client(
            's3', endpoint_url=self.endpoint_url, region_name=REGION,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key)
        client.create_bucket(Bucket=name)
        client.close()
        return settings


BLOB_STORAGE = BlobStorageLayer(name='BLOB_STORAGE', module=__name__)
ZEO_SERVER = ZEOServerLayer(name='ZEO_SERVER', module=__name__)
S3_SERVER = S3ServerLayer(name='S3_SERVER', module=__name__)
