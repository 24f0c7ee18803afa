"""Where the bucket is and how to reach it: `ObjectStoreSettings`.

Plain values, checked once here, so that a wrong one is refused with
its name before any request is made, and never half-applied.
"""

from __future__ import annotations

import dataclasses

ADDRESSING_STYLES = ('auto', 'path', 'virtual')


@dataclasses.dataclass(frozen=True)
class ObjectStoreSettings:
    """A bucket on an S3-API server, and how to talk to it.

    `prefix` is put before every key (``'zodb/'``: normalised to end in
    ``/`` when not empty).  `endpoint_url` None means boto3's default
    (AWS, or ``AWS_ENDPOINT_URL``); `access_key_id` and
    `secret_access_key` None mean boto3's credential chain (environment,
    ``~/.aws``, an instance role).  `attempts` counts every try of one
    request, the first included; `connect_timeout` and `read_timeout`
    are seconds per try.
    """

    bucket: str
    prefix: str = ''
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    addressing_style: str = 'auto'
    connect_timeout: float = 10
    read_timeout: float = 60
    attempts: int = 4

    def __post_init__(self):
        if not isinstance(self.bucket, str) or not self.bucket:
            raise ValueError(
                f'Object store bucket must be a non-empty name, '
                f'not {self.bucket!r}')
        object.__setattr__(self, 'prefix', normalise_prefix(self.prefix))
        if (self.access_key_id is None) != (self.secret_access_key is None):
            given = ('access_key_id' if self.access_key_id is not None
                     else 'secret_access_key')
            raise ValueError(
                f'Object store bucket {self.bucket!r}: {given} given '
                f'without the other; give access_key_id and '
                f'secret_access_key both, or neither (boto3\'s chain)')
        if self.addressing_style not in ADDRESSING_STYLES:
            raise ValueError(
                f'Object store addressing_style must be one of '
                f'{", ".join(ADDRESSING_STYLES)}, '
                f'not {self.addressing_style!r}')
        for name in ('connect_timeout', 'read_timeout'):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(
                    f'Object store {name} must be a positive number of '
                    f'seconds, not {value!r}')
        if (not isinstance(self.attempts, int) or isinstance(
                self.attempts, bool) or self.attempts < 1):
            raise ValueError(
                f'Object store attempts must be a whole number of 1 or '
                f'more, not {self.attempts!r}')

    @property
    def effective_addressing_style(self) -> str:
        """`addressing_style`, with ``auto`` made ``path`` when an
        endpoint is given: MinIO, Ceph RGW and moto serve buckets under
        the endpoint's path, not as host names."""
        if self.addressing_style == 'auto' and self.endpoint_url:
            return 'path'
        return self.addressing_style

    def __repr__(self):
        fields = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == 'secret_access_key' and value is not None:
                value = '<hidden>'
                fields.append(f'{field.name}={value}')
            else:
                fields.append(f'{field.name}={value!r}')
        return f'ObjectStoreSettings({", ".join(fields)})'


def normalise_prefix(prefix: str) -> str:
    """`prefix` ending in ``/`` (``''`` stays ``''``); ValueError for a
    leading ``/`` or a ``..`` part, which would make keys that some
    servers and every tool that mirrors a bucket to disk read as paths
    outside the prefix."""
    if not isinstance(prefix, str):
        raise ValueError(f'Object store prefix must be a string, '
                         f'not {prefix!r}')
    if not prefix:
        return ''
    if prefix.startswith('/'):
        raise ValueError(
            f'Object store prefix {prefix!r} must not start with /')
    if '..' in prefix.split('/'):
        raise ValueError(
            f'Object store prefix {prefix!r} must not have a .. part')
    return prefix if prefix.endswith('/') else prefix + '/'
