"""What the commands say: an error on one line, and what a library
logged, collected to be said in the command's own words."""

from __future__ import annotations

import logging


class Collect(logging.Handler):
    """Keeps the messages of the records it handles, for the command to
    say them itself: as its result, or in its one line of error."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        # Which commit protocol a storage uses is said at every open: not
        # something a command did.
        if getattr(record, 'commit_protocol', None) is None:
            self.messages.append(record.getMessage())


def one_line(error: BaseException) -> str:
    """`error`'s message on one line, for stderr."""
    text = ' '.join(str(error).split())
    return text or type(error).__name__
