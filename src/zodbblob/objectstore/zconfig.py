"""The ``<s3>`` ZConfig section: `ObjectStoreSettings` from a config file.

::

    <s3>
      bucket zodb-blobs
      prefix site/
      endpoint-url http://minio.example:9000
      region us-east-1
    </s3>

It may appear once in ``<zodbblob>`` (the storage keeps its committed
blobs in the bucket) and once in ``<zodbblobclient>`` (the client reads
them from it).  Each key is the `ObjectStoreSettings` field of its name;
a wrong value is refused while the configuration loads, in one line that
names the key.  Without ``access-key-id`` and ``secret-access-key``,
boto3's credential chain applies (``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY`` in the environment, ``~/.aws``, a role): the
reason to leave them out of a file.
"""

from __future__ import annotations

import math

import ZConfig.datatypes
from ZConfig import ConfigurationError

from zodbblob.objectstore.settings import ADDRESSING_STYLES
from zodbblob.objectstore.settings import ObjectStoreSettings
from zodbblob.objectstore.settings import normalise_prefix

_TIME_INTERVAL = ZConfig.datatypes.Registry().get('time-interval')

# ZConfig key -> ObjectStoreSettings field.
KEYS = {field.replace('_', '-'): field for field in (
    'bucket', 'prefix', 'endpoint_url', 'region', 'access_key_id',
    'secret_access_key', 'addressing_style', 'connect_timeout',
    'read_timeout', 'attempts')}


def positive_seconds(name: str, value: str) -> float:
    """Positive seconds written as a number (``0.5``, ``300``) or as
    ZConfig's time-interval (``5m``, ``1h``); ValueError naming the key
    `name` otherwise."""
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = float(_TIME_INTERVAL(value))
        except ValueError:
            seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(
            f'{name} {value!r}: expected a positive number of seconds '
            f'(such as 300 or 0.5) or a time interval (such as 5m or 1h)')
    return seconds


def connect_timeout(value: str) -> float:
    return positive_seconds('connect-timeout', value)


def read_timeout(value: str) -> float:
    return positive_seconds('read-timeout', value)


def prefix(value: str) -> str:
    try:
        return normalise_prefix(value)
    except ValueError:
        raise ValueError(
            f'prefix {value!r}: must not start with / nor have a .. part '
            f'(tools that mirror a bucket would read such keys as paths '
            f'outside the prefix)') from None


def addressing_style(value: str) -> str:
    if value not in ADDRESSING_STYLES:
        raise ValueError(f'addressing-style {value!r}: expected one of '
                         f'{", ".join(ADDRESSING_STYLES)}')
    return value


def attempts(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f'attempts {value!r}: expected a whole number of '
                         f'tries, 1 or more (the first try included)')
    return number


def object_store(section) -> ObjectStoreSettings:
    """ZConfig datatype of ``<s3>``: its `ObjectStoreSettings`.

    The keys that make sense only together are checked here, with the
    names they have in the file; anything else `ObjectStoreSettings`
    refuses is a ConfigurationError of one line too.
    """
    values = {field: getattr(section, field) for field in KEYS.values()
              if getattr(section, field) is not None}
    where = f'<s3> (bucket {section.bucket!r})'
    given = [key for key in ('access-key-id', 'secret-access-key')
             if KEYS[key] in values]
    if len(given) == 1:
        other = ({'access-key-id', 'secret-access-key'} - set(given)).pop()
        raise ConfigurationError(
            f'{where}: {given[0]} given without {other}; give both, or '
            f'neither to use boto3\'s credential chain (AWS_ACCESS_KEY_ID '
            f'and AWS_SECRET_ACCESS_KEY in the environment, ~/.aws, a role)')
    try:
        return ObjectStoreSettings(**values)
    except ValueError as e:
        raise ConfigurationError(f'{where}: {e}') from None
