"""``zodbblob cache``: show or prune a ZEO client's blob cache directory.

The cache is `zodbblob.cache.BlobCache`, opened here as a client opens
it; this refuses any other directory before it is touched, and says
what a prune did in the tools' words and exit statuses.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from zodbblob.cli.arguments import ToolError
from zodbblob.cli.messages import Collect, one_line

SIZE_UNITS = {'': 1, 'b': 1, 'kb': 1024, 'kib': 1024, 'mb': 1024 ** 2,
              'mib': 1024 ** 2, 'gb': 1024 ** 3, 'gib': 1024 ** 3,
              'tb': 1024 ** 4, 'tib': 1024 ** 4}


def parse_size(text: str) -> int:
    """Bytes in ``500MB``, ``2GB``, ``1.5GiB`` or ``1048576``.

    KB, MB, GB and TB count in 1024s, as ZConfig's byte sizes (and so
    ``blob-cache-size``) do.
    """
    text = text.strip()
    unit = text.lstrip('0123456789. ')
    number = text[:len(text) - len(unit)].strip()
    unit = unit.lower()
    if unit not in SIZE_UNITS or not number.replace('.', '', 1).isdigit():
        raise argparse.ArgumentTypeError(
            f'size {text!r}: expected bytes, or a number with KB, MB, GB, '
            f'TB (or KiB, MiB, GiB, TiB)')
    return int(float(number) * SIZE_UNITS[unit])


def format_size(size: int) -> str:
    for unit in ('bytes', 'KiB', 'MiB', 'GiB'):
        if size < 1024:
            break
        size /= 1024
    else:
        unit = 'TiB'
    return f'{size} bytes' if unit == 'bytes' else f'{size:.1f} {unit}'


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Show or prune a ZEO client blob cache directory.  Safe while '
        'clients use it: both go through the cache index, files being '
        'downloaded are never pruned, and those used in the last seconds '
        'go last.')
    actions = parser.add_subparsers(dest='action', metavar='ACTION',
                                    required=True)
    stats = actions.add_parser(
        'stats', help='files, bytes, oldest access and hit ratio')
    prune = actions.add_parser(
        'prune', help='evict the least recently used files down to a size')
    for action in (stats, prune):
        action.add_argument('directory', metavar='DIR',
                            help='the blob cache directory')
        action.add_argument('--quiet', action='store_true',
                            help='only the numbers (stats) or nothing '
                                 '(prune)')
    prune.add_argument('--size', type=parse_size, required=True,
                       metavar='SIZE',
                       help='bytes to keep at most, e.g. 500MB, 2GB, 1.5GiB')
    prune.add_argument('--check-percent', type=float, default=0,
                       metavar='PERCENT',
                       help='go this percent of SIZE further below it '
                            '(default 0)')


def check_cache_directory(directory: str) -> None:
    """Raise ToolError unless `directory` is a ZEO client's blob cache.

    Opening anything else would make it one (a marker written, an
    index created): refused before anything touches it.
    """
    from zodbblob.cache import LAYOUT
    from zodbblob.layout import LAYOUT_MARKER, LAYOUTS, read_marker
    if not os.path.exists(directory):
        raise ToolError(f"{directory} does not exist (expected a ZEO "
                        f"client's blob cache directory)")
    if not os.path.isdir(directory):
        raise ToolError(f"{directory} is not a directory (expected a ZEO "
                        f"client's blob cache directory)")
    try:
        marked = read_marker(directory)
    except UnicodeDecodeError:
        raise ToolError(f"{directory} is not a ZEO client's blob cache (its "
                        f"{LAYOUT_MARKER} marker is not text)") from None
    if marked == LAYOUT:
        return
    if marked in LAYOUTS:
        raise ToolError(f"{directory} is a storage's blob directory (layout "
                        f"{marked}), not a ZEO client's blob cache")
    if marked is None:
        raise ToolError(f"{directory} is not a ZEO client's blob cache (no "
                        f"{LAYOUT_MARKER} marker for layout {LAYOUT})")
    raise ToolError(f"{directory} is not a ZEO client's blob cache (its "
                    f"{LAYOUT_MARKER} marker names {marked!r}, not {LAYOUT})")


def cache_command(args: argparse.Namespace) -> int:
    from zodbblob.cache import BlobCache
    check_cache_directory(args.directory)
    # Opened without a size: pruned here, at once, not in the background.
    blob_cache = BlobCache(args.directory,
                           check_percent=getattr(args, 'check_percent', 0))
    # What the prune could not do is said in the outcome's one line, not
    # also as the library's warnings before it.
    collect = Collect()
    collect.setLevel(logging.WARNING)
    cache_logger = logging.getLogger('zodbblob.cache')
    try:
        if args.action == 'prune':
            cache_logger.addHandler(collect)
            try:
                files, removed = blob_cache.prune(args.size)
            finally:
                cache_logger.removeHandler(collect)
        stats = blob_cache.stats()
    finally:
        blob_cache.close()
    if args.action == 'stats':
        print_cache_stats(blob_cache.directory, stats, args.quiet)
        return 0
    target = args.size - int(args.size * args.check_percent / 100)
    if not args.quiet:
        print(f'{blob_cache.directory}: removed {files} files, '
              f'{format_size(removed)}; {stats["files"]} files, '
              f'{format_size(stats["bytes"])} left')
    if stats['bytes'] <= target:
        for message in collect.messages:
            print(message, file=sys.stderr)
        return 0
    if collect.messages:
        why = one_line(collect.messages[0])
        if len(collect.messages) > 1:
            why += f' (and {len(collect.messages) - 1} more)'
    else:
        why = ('another process is pruning it, or its files are being '
               'downloaded')
    print(f'{blob_cache.directory}: still above {format_size(target)}: '
          f'{why}', file=sys.stderr)
    return 1


def print_cache_stats(directory: str, stats: dict, quiet: bool) -> None:
    import datetime
    if quiet:
        print(stats['files'], stats['bytes'])
        return
    print(f'{directory}:')
    print(f'  files: {stats["files"]}')
    readable = format_size(stats['bytes'])
    print(f'  bytes: {stats["bytes"]}'
          + (f' ({readable})' if stats['bytes'] >= 1024 else ''))
    if stats['oldest_access'] is not None:
        oldest = datetime.datetime.fromtimestamp(stats['oldest_access'])
        print(f'  oldest access: {oldest:%Y-%m-%d %H:%M:%S}')
    lookups = stats['hits'] + stats['misses']
    if lookups:
        print(f'  hits: {stats["hits"]}, misses: {stats["misses"]} '
              f'(hit ratio {stats["hits"] / lookups:.1%})')
