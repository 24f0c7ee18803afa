"""``zodbblob migrate``: its arguments, and the command.

The migration itself is `zodbblob.tools.migrate.migrate`; this says what
it did, or why it could not, in the tools' words and exit statuses.
"""

from __future__ import annotations

import argparse
import os
import sys

from zodbblob.cli.arguments import add_layout_argument
from zodbblob.layout import LAYOUT_MARKER
from zodbblob.storage import BlobStorageError
from zodbblob.objectstore import ObjectStoreSettings
from zodbblob.tools.bucketmove import BucketMoveError, from_bucket, to_bucket
from zodbblob.tools.migrate import MigrationError, migrate
from zodbblob.tools.progress import Progress

S3_SCHEME = 's3://'


def add_migrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Copy blob directory SRC into DST, a new blob directory of another '
        'layout: hard links where both are on one filesystem, copies '
        'otherwise.  SRC is a blob directory of any layout, or a ZEO client '
        'blob cache (zeocache); it is only read.  DST gets its .layout '
        'marker last, after a check that it holds every blob file of SRC '
        'with its size.  Running an interrupted migration again resumes '
        'it.  Refuses to run while a storage uses SRC or DST.  '
        'With DST s3://BUCKET/PREFIX, the blob files of blob directory SRC '
        'move into that bucket (SRC keeps its catalog, and is opened with '
        'an <s3> section from then on); with SRC s3://BUCKET/PREFIX, they '
        'move back into blob directory DST, the one that was moved.  '
        'Credentials come from boto3\'s chain (AWS_ACCESS_KEY_ID and '
        'AWS_SECRET_ACCESS_KEY, a profile), never from the command line.')
    parser.add_argument('source', metavar='SRC',
                        help='the blob directory to migrate, or '
                             's3://BUCKET/PREFIX')
    parser.add_argument('destination', metavar='DST',
                        help='the new blob directory (new or empty, or an '
                             'unfinished migration of SRC), or '
                             's3://BUCKET/PREFIX')
    add_layout_argument(parser, 'layout of DST (not for a bucket)')
    parser.add_argument('--s3-endpoint-url', metavar='URL',
                        help='the S3-API server (MinIO, Ceph RGW); '
                             'default: AWS')
    parser.add_argument('--s3-region', metavar='REGION')
    parser.add_argument('--dedup', action='store_true',
                        help='with DST s3://BUCKET/PREFIX: keep each '
                             'content once in the bucket, a pointer at each '
                             'blob\'s key (the storage then opens it with '
                             'dedup on)')
    parser.add_argument('--quiet', action='store_true',
                        help='no progress, only the result')


def bucket_settings(url: str, args: argparse.Namespace):
    """The settings of ``s3://BUCKET/PREFIX``; None for another path."""
    if not url.startswith(S3_SCHEME):
        return None
    bucket, _, prefix = url[len(S3_SCHEME):].partition('/')
    try:
        return ObjectStoreSettings(bucket, prefix=prefix,
                                   endpoint_url=args.s3_endpoint_url,
                                   region=args.s3_region)
    except ValueError as e:
        args.parser.error(f'{url}: {e}')


def bucket_command(args: argparse.Namespace, source, destination) -> int:
    """A blob directory moved into its bucket, or back."""
    prog = args.parser.prog
    if source is not None and destination is not None:
        args.parser.error('one of SRC and DST is a blob directory')
    if args.layout is not None:
        args.parser.error('--layout is for a blob directory, not a bucket '
                          '(the blob directory keeps its layout)')
    if args.dedup and destination is None:
        args.parser.error('--dedup is for a move into a bucket (DST '
                          's3://BUCKET/PREFIX); a move back keeps what the '
                          'bucket was bound with')
    progress = Progress('migrate', quiet=args.quiet)
    try:
        if destination is not None:
            report = to_bucket(args.source, destination, progress=progress,
                               dedup=args.dedup)
            said = report.summary('moved into')
        else:
            report = from_bucket(args.destination, source, progress=progress)
            said = report.summary('moved back from')
    except KeyboardInterrupt:
        newline = '\n' if progress.enabled else ''
        print(f'{newline}{prog}: interrupted; run the same command again '
              f'to finish the move', file=sys.stderr)
        return 130
    except (BucketMoveError, BlobStorageError, OSError) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    print(said)
    return 0


def migrate_command(args: argparse.Namespace) -> int:
    source = bucket_settings(args.source, args)
    destination = bucket_settings(args.destination, args)
    if source is not None or destination is not None:
        return bucket_command(args, source, destination)
    if args.dedup:
        args.parser.error('--dedup is for a move into a bucket (DST '
                          's3://BUCKET/PREFIX)')
    if args.layout is None:
        args.parser.error('the following arguments are required: --layout')
    progress = Progress('migrate', quiet=args.quiet)
    prog = args.parser.prog
    try:
        report = migrate(args.source, args.destination, args.layout,
                         progress=progress)
    except KeyboardInterrupt:
        # Below the progress bar's line, not on it.
        newline = '\n' if progress.enabled else ''
        print(f'{newline}{prog}: interrupted: '
              f'{os.path.abspath(args.destination)} is not finished (no '
              f'{LAYOUT_MARKER} marker); run the same command again to '
              f'resume', file=sys.stderr)
        return 130
    except (MigrationError, BlobStorageError, OSError) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    print(report.summary())
    for line in report.problems():
        print(line)
    return 1 if report.not_files else 0
