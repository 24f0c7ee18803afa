"""The progress display of the ``zodbblob`` tools.

Tool modules (migrate, verify, zexp, backup) take a ``progress(done,
total)`` callable; their commands in ``zodbblob.cli`` pass a `Progress`.
It lives with the tools, not the command line, so that a script calling
a tool can show the same bar.
"""

from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    """A one-line progress display on a terminal; silent elsewhere."""

    def __init__(self, label: str, stream: TextIO | None = None,
                 quiet: bool = False):
        self.stream = stream or sys.stderr
        self.enabled = not quiet and self.stream.isatty()
        self.label = label
        self.shown = -1

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or not total:
            return
        percent = done * 100 // total
        if percent != self.shown:
            self.shown = percent
            bar = '#' * (percent // 4)
            self.stream.write(f'\r{self.label} [{bar:<25}] {percent:3d}% '
                              f'{done}/{total}')
            if done == total:
                self.stream.write('\n')
            self.stream.flush()
