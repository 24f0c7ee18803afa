"""Workload processes forked by one launcher (``workload.serve``).

A new interpreter and ZODB's imports for every cut would cost more than
most cuts do: the launcher has them once, and forks a child per workload.
"""

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import time

# Generous: the machine is busy, and FUSE in Python is slow.
ANSWER_TIMEOUT = 120.0


class Launcher:
    """The launcher process, and its answers read line by line."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'zodbblob.powercut.tests.workload',
             '--serve'], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL)
        self.buffered = b''
        self.running: Workload | None = None
        atexit.register(self.close)

    def alive(self) -> bool:
        return self.process.poll() is None

    def ask(self, argv: list[str], log_path: str) -> int:
        self.process.stdin.write(json.dumps([argv, log_path]).encode()
                                 + b'\n')
        self.process.stdin.flush()
        return int(self.answer(ANSWER_TIMEOUT))

    def answered(self) -> bool:
        """Whether a line is waiting (reads what has arrived)."""
        return self._fill(0)

    def answer(self, timeout: float) -> str:
        if not self._fill(timeout):
            raise AssertionError('the workload launcher did not answer in '
                                 '%d s' % timeout)
        line, self.buffered = self.buffered.split(b'\n', 1)
        return line.decode()

    def _fill(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b'\n' not in self.buffered:
            wait = max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], wait)[0]:
                return False
            data = os.read(fd, 4096)
            if not data:
                raise AssertionError('the workload launcher ended')
            self.buffered += data
        return True

    def close(self) -> None:
        if self.running is not None:
            self.running.kill()
        self.process.stdin.close()
        self.process.wait()
        self.process.stdout.close()


class Workload:
    """A running workload: ``workload.main(argv)``, output to `log_path`."""

    launcher: Launcher | None = None

    def __init__(self, argv: list[str], log_path: str):
        if Workload.launcher is None or not Workload.launcher.alive():
            Workload.launcher = Launcher()
        self.launcher = Workload.launcher
        self.pid = self.launcher.ask(argv, log_path)
        self.launcher.running = self
        self.exitcode: int | None = None

    def ended(self) -> bool:
        if self.exitcode is None and self.launcher.answered():
            self._ended(int(self.launcher.answer(0)))
        return self.exitcode is not None

    def kill(self) -> int:
        """SIGKILL (if it still runs); its exit code once it has ended."""
        if not self.ended():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._ended(int(self.launcher.answer(ANSWER_TIMEOUT)))
        return self.exitcode

    def _ended(self, exitcode: int) -> None:
        self.exitcode = exitcode
        self.launcher.running = None
