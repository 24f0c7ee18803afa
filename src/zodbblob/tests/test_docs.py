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


def test_suite():
    pages = sorted(glob.glob(os.path.join(os.path.abspath(DOC_DIR), '*.rst')))
    suite = unittest.TestSuite()
    if importlib.util.find_spec('zc.buildout') is None:
        pages = [page for page in pages
                 if os.path.basename(page) not in NEEDS_BUILDOUT]
        suite.addTest(RecipePageSkipped('test_recipe_page'))
    m = manuel.doctest.Manuel(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    m += manuel.codeblock.Manuel()
    suite.addTest(manuel.testing.TestSuite(m, *pages, setUp=setUp,
                                           tearDown=tearDown))
    return suite
