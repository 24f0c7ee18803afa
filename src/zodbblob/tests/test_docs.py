"""Every page in doc/ is an executed doctest: the docs cannot rot."""

import doctest
import glob
import importlib.util
import os
import shutil
import tempfile
import unittest

import manuel.codeblock
import manuel.doctest
import manuel.testing
import transaction

from zodbblob.testing import S3_MISSING, S3_SERVER


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


# Pages that run the buildout recipe, which needs zc.buildout: the [test]
# extra leaves it out, [recipe] brings it.
NEEDS_BUILDOUT = ('recipe.rst',)


class RecipePageSkipped(unittest.TestCase):

    @unittest.skip('zc.buildout is not installed: pip install '
                   '".[test,recipe]" to run doc/recipe.rst')
    def test_recipe_page(self):
        """Stands for doc/recipe.rst in the counts, as skipped."""


# Pages that talk to an S3-API server: they run in the S3_SERVER layer
# (moto's server, a process), and are skipped without moto and boto3.
NEEDS_S3 = ('objectstore.rst',)


class ObjectStorePageSkipped(unittest.TestCase):

    @unittest.skipIf(S3_MISSING, S3_MISSING)
    def test_objectstore_page(self):
        """Stands for doc/objectstore.rst in the counts, as skipped."""


def test_suite():
    pages = sorted(glob.glob(os.path.join(os.path.abspath(DOC_DIR), '*.rst')))
    suite = unittest.TestSuite()
    if importlib.util.find_spec('zc.buildout') is None:
        pages = [page for page in pages
                 if os.path.basename(page) not in NEEDS_BUILDOUT]
        suite.addTest(RecipePageSkipped('test_recipe_page'))
    s3_pages = [page for page in pages
                if os.path.basename(page) in NEEDS_S3]
    pages = [page for page in pages if page not in s3_pages]
    m = manuel.doctest.Manuel(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    m += manuel.codeblock.Manuel()
    suite.addTest(manuel.testing.TestSuite(m, *pages, setUp=setUp,
                                           tearDown=tearDown))
    if S3_MISSING:
        suite.addTest(ObjectStorePageSkipped('test_objectstore_page'))
    else:
        s3_suite = manuel.testing.TestSuite(m, *s3_pages, setUp=setUp,
                                            tearDown=tearDown)
        s3_suite.layer = S3_SERVER
        suite.addTest(s3_suite)
    return suite
