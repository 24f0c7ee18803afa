"""Tokens: who owns a download, an eviction or the prune lease.

A token is ``<host>-<pid>-<incarnation>-<thread>-<nonce>``: the processes
sharing a directory run on one host, so an owner is judged alive by its
pid (``kill(pid, 0)``), and the incarnation tells this process from an
earlier one that had the same pid.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import threading

from zodbblob.layout import process_alive

# Tells this process from an earlier one that had the same pid (a restarted
# container): a token of this pid and another incarnation is a dead one.
INCARNATION = secrets.token_hex(4)


def parse_token(token: str) -> tuple[str, int, str] | None:
    """``(host, pid, incarnation)`` of a token; None for another name."""
    parts = token.rsplit('-', 4)
    if len(parts) != 5 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


class Owners:
    """The tokens of this process, and the judge of other tokens' owners."""

    def __init__(self):
        self.host = re.sub(r'[^A-Za-z0-9.]', '_', socket.gethostname())

    def new_token(self) -> str:
        return (f'{self.host}-{os.getpid()}-{INCARNATION}-'
                f'{threading.get_ident()}-{secrets.token_hex(6)}')

    def dead(self, token: str) -> bool:
        """True only if the process that made `token` has surely ended."""
        owner = parse_token(token)
        if owner is None or owner[0] != self.host:
            return False
        _, pid, incarnation = owner
        if pid == os.getpid():
            return incarnation != INCARNATION
        return not process_alive(pid)
