"""Every page in doc/ is an executed doctest: the docs cannot rot."""

import doctest
import glob
import os
import shutil
import tempfile

import manuel.codeblock
import manuel.doctest
import manuel.testing
import transaction


DOC_DIR = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir,
                       os.pardir, 'doc')


def setUp(test):
    test.globs['__here'] = os.getcwd()
    test.globs['__tmp'] = tempfile.mkdtemp(prefix='zodbblob-doc-')
    os.chdir(test.globs['__tmp'])
    transaction.abort()


def tearDown(test):
    transaction.abort()
    for name in ('db', 'storage'):
        closeable = test.globs.get(name)
        if closeable is not None:
            try:
                closeable.close()
            except Exception:
                pass
    os.chdir(test.globs['__here'])
    shutil.rmtree(test.globs['__tmp'], ignore_errors=True)


def test_suite():
    pages = sorted(glob.glob(os.path.join(os.path.abspath(DOC_DIR), '*.rst')))
    m = manuel.doctest.Manuel(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    m += manuel.codeblock.Manuel()
    return manuel.testing.TestSuite(m, *pages, setUp=setUp,
                                    tearDown=tearDown)
