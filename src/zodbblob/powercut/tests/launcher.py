"""Workload processes forked by one launcher (``workload.serve``).

A new interpreter and ZODB's imports for every cut would cost more than
most cuts do: the launcher has them once, and forks a child per workload.
"""

import atexit
import json
import os
import select
import subprocess
import sys
import tempfile
import time

# Generous: the machine is busy, and FUSE in Python is slow.
ANSWER_TIMEOUT = 120.0


class Lines:
    """Lines read from a file descriptor, with a timeout (the launcher's
    orders, and its answers)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffered = b''
        self.ended = False

    def fill(self, timeout: float | None) -> bool:
        """Whether a whole line is in, reading for up to `timeout` seconds
        (None: until one is, or the input ends)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b'\n' not in self.buffered and not self.ended:
            wait = (None if deadline is None
                    else max(0.0, deadline - time.monotonic()))
            if not select.select([self.fd], [], [], wait)[0]:
                return False
            data = os.read(self.fd, 4096)
            self.ended = not data
            self.buffered += data
        return b'\n' in self.buffered

    def next(self, timeout: float | None) -> str | None:
        """The next line; '' when none came in `timeout`; None at the end."""
        if not self.fill(timeout):
            return None if self.ended else ''
        line, self.buffered = self.buffered.split(b'\n', 1)
        return line.decode().strip()


class Launcher:
    """The launcher process, and its answers read line by line."""

    def __init__(self):
        # Its own errors (a workload's go to the log the test names).
        self.errors = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'zodbblob.powercut.tests.workload',
             '--serve'], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.errors)
        self.lines = Lines(self.process.stdout.fileno())
        atexit.register(self.close)

    def alive(self) -> bool:
        return self.process.poll() is None

    def order(self, line: str) -> None:
        self.process.stdin.write(line.encode() + b'\n')
        self.process.stdin.flush()

    def start(self, argv: list[str], log_path: str) -> int:
        self.order(json.dumps([argv, log_path]))
        return self.answer('pid', ANSWER_TIMEOUT)

    def exit_code(self, timeout: float) -> int:
        return self.answer('exit', timeout)

    def answered(self) -> bool:
        """Whether a line is waiting (reads what has arrived)."""
        return self._fill(0)

    def answer(self, tag: str, timeout: float) -> int:
        """The number of the next answer, which must be `tag`'s."""
        if not self._fill(timeout):
            raise AssertionError('the workload launcher did not answer in '
                                 '%d s' % timeout)
        line = self.lines.next(0)
        words = line.split()
        if len(words) != 2 or words[0] != tag:
            raise AssertionError('the workload launcher answered %r, not '
                                 'its %s' % (line, tag))
        return int(words[1])

    def _fill(self, timeout: float) -> bool:
        if self.lines.fill(timeout):
            return True
        if self.lines.ended:
            self.process.wait()
            self.errors.seek(0)
            raise AssertionError('the workload launcher ended: %s' % (
                self.errors.read()[-2000:].decode(errors='replace')
                or 'no output'))
        return False

    def close(self) -> None:
        # Its input ends: it kills its child, if one runs, and ends.
        self.process.stdin.close()
        self.process.wait()
        self.process.stdout.close()
        self.errors.close()


class Workload:
    """A running workload: ``workload.main(argv)``, output to `log_path`."""

    launcher: Launcher | None = None

    def __init__(self, argv: list[str], log_path: str):
        if Workload.launcher is None or not Workload.launcher.alive():
            Workload.launcher = Launcher()
        self.launcher = Workload.launcher
        self.pid = self.launcher.start(argv, log_path)
        self.exitcode: int | None = None

    def ended(self) -> bool:
        if self.exitcode is None and self.launcher.answered():
            self.exitcode = self.launcher.exit_code(0)
        return self.exitcode is not None

    def kill(self) -> int:
        """SIGKILL (if it still runs); its exit code once it has ended.

        The launcher sends the signal: the child is its own, not reaped
        before the launcher has answered, so no other process can have
        its pid.
        """
        if not self.ended():
            self.launcher.order('kill')
            self.exitcode = self.launcher.exit_code(ANSWER_TIMEOUT)
        return self.exitcode
