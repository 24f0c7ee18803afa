"""The crash tests' kill points: where a child process dies on purpose.

Kept apart from the catalog that held them first: every step of commit,
pack and recovery names its point here, and the crash tests
(``storage/tests/test_crash.py``) kill a child at each.
"""

from __future__ import annotations

import os
import signal
import threading

KILL_POINT_VARIABLE = 'ZODBBLOB_KILL_POINT'
KILL_POINTS = (
    'after_store_blob', 'after_base_vote', 'after_staging_fsync',
    'after_journal_begin', 'mid_publish', 'after_publish',
    'after_base_finish', 'after_journal_commit', 'mid_recovery',
    'mid_checkpoint', 'after_base_pack', 'mid_pack_removal',
    # One sync: the base has finished, the record's sync may not have.
    'after_base_finish_before_log_sync', 'after_log_sync',
    # Dedup: a committed file linked under a temporary name, not yet
    # renamed over the final one.
    'mid_dedup_link',
    # On a bucket (``objects.py``): the record durable, no upload yet;
    # an upload done; all done; a delete acknowledged.
    'after_upload_record', 'mid_upload', 'after_uploads',
    'after_object_delete',
    # Moving a blob directory into a bucket and back (tools/bucketmove.py).
    'mid_bucket_move', 'after_bucket_bind',
)


def _kill_point_setting() -> tuple[str | None, int]:
    value = os.environ.get(KILL_POINT_VARIABLE)
    if not value:
        return None, 0
    name, _, count = value.partition(':')
    if name not in KILL_POINTS:
        raise ValueError('%s names unknown kill point %r; known: %s'
                         % (KILL_POINT_VARIABLE, name, ', '.join(KILL_POINTS)))
    return name, int(count or 1)


_kill_point, _kill_at = _kill_point_setting()
_kill_hits: dict[str, int] = {}

# Held while a thread of this process starts a child process (the
# scrubber's hashing process).  From its fork to its exec the child holds
# a copy of every descriptor, the flocks of ``Data.fs.lock`` and of the
# blob directory's lock included; a process killed in that moment leaves
# both held until the child's exec.  A kill point waits for it: the crash
# tests kill at the steps of a protocol, not inside a spawn, and reopen at
# once.
SPAWNING = threading.Lock()


def kill_point(name: str) -> None:
    """Die here (SIGKILL) if ZODBBLOB_KILL_POINT names this point.

    The crash tests set ``ZODBBLOB_KILL_POINT=name`` or ``name:N`` (the
    Nth time the point is reached) in a child process, to prove that a
    crash at every step of commit, pack and recovery loses nothing
    committed and leaves nothing uncommitted.  Unset, this is one compare.
    """
    if name != _kill_point:
        return
    _kill_hits[name] = _kill_hits.get(name, 0) + 1
    if _kill_hits[name] >= _kill_at:
        SPAWNING.acquire()   # never let go: this process dies now
        os.kill(os.getpid(), signal.SIGKILL)
