from setuptools import find_packages
from setuptools import setup


with open('README.rst') as f:
    long_description = f.read()
with open('CHANGES.rst') as f:
    long_description += '\n\n' + f.read()

# No zc.buildout here: it upgrades pip and setuptools in the environment
# it is installed into, which a project that only wants zodbblob.testing
# must not get.  The recipe's tests need it (``[recipe]``) and are skipped
# without it.
tests_require = [
    'zope.testrunner >= 6',
    'zope.testing',
    'manuel',
    'hypothesis',
    # The power-cut filesystem (zodbblob.powercut): FUSE through ctypes
    # over the system's libfuse3, no compiler.
    'mfusepy',
    # The object store (issue 16): its client, and a real S3-API server
    # process for the tests (moto's standalone server, never a mock).
    'boto3',
    'moto[server]',
]

setup(
    name='zodbblob',
    version='0.1.0.dev0',
    description='Safe, fast and manageable blobs for ZODB and ZEO',
    long_description=long_description,
    long_description_content_type='text/x-rst',
    license='ZPL-2.1',
    classifiers=[
        'Framework :: ZODB',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3.10',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
    ],
    packages=find_packages('src'),
    package_dir={'': 'src'},
    include_package_data=True,
    package_data={'zodbblob': ['component.xml']},
    zip_safe=False,
    python_requires='>=3.10',
    install_requires=[
        'setuptools',
        'ZODB >= 6',
        'ZEO >= 6',
        'ZConfig',
        'transaction >= 3.0',
        'persistent',
        'zope.interface',
        'blake3 >= 1.0.11',
    ],
    extras_require={
        's3': ['boto3'],
        'test': tests_require,
        'recipe': ['zc.buildout'],
        'test-recipe': tests_require + ['zc.buildout'],
    },
    entry_points={
        'console_scripts': ['zodbblob = zodbblob.cli:main'],
        'zc.buildout': ['default = zodbblob.recipe:Recipe'],
    },
)
