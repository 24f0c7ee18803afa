"""A filesystem for power-cut tests, and its harness.

A process killed with SIGKILL loses nothing it wrote (the kernel's page
cache keeps it), so crash tests that kill processes never exercise an
``fsync``.  The power-cut filesystem is a FUSE passthrough (``daemon.py``,
its own process) over a backing directory that remembers what has not
been made durable (``model.py``) and, on a power cut, discards exactly
that, as a disk that lost power would; ``harness.py`` mounts it, cuts
its power and mounts it again for the tests in ``tests/``; ``block.py``
puts ext4 on a loop device over it, for cuts under a real filesystem.

It imports nothing of zodbblob: it tests any program that writes files.
"""

from .harness import PowerCutError, PowerCutMount, mount, unavailable

__all__ = ['PowerCutError', 'PowerCutMount', 'mount', 'unavailable']
