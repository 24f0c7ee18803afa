"""What goes wrong in a backup, check or restore, as exceptions.

They sit apart so that every module of the package raises the same
classes and the command line catches them in one place: a `BackupError`
is one line and exit status 2; `BackupInterrupted` is Ctrl-C with a
snapshot left to be resumed.
"""

from __future__ import annotations


class BackupError(Exception):
    """A backup, check or restore cannot go on, as the message says."""


class SourceChanged(BackupError):
    """Data.fs no longer holds the bytes a snapshot was planned from."""


class SourcePacked(BackupError):
    """A pack of the source ran during the snapshot, which was dropped."""

    def __init__(self, path: str):
        super().__init__(f'{path} was packed while the snapshot was taken; '
                         f'run backup again')


class BackupInterrupted(KeyboardInterrupt):
    """Ctrl-C during a backup; `snapshot` is left unfinished, resumable."""

    def __init__(self, snapshot: str):
        super().__init__(snapshot)
        self.snapshot = snapshot
