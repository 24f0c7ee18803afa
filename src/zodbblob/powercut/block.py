"""Power cuts under a real filesystem: ext4 on a loop device.

The FUSE filesystem judges a program by POSIX's rules read strictly; a
real filesystem keeps more (ext4's journal commits every earlier change
with any ``fsync``) and has calls FUSE cannot serve (``syncfs``).  Here
the power-cut filesystem holds one file, a disk image; a loop device
turns it into a block device, and ext4 is made on it and mounted.  Every
write the kernel sends the disk arrives as a write to the image, every
cache flush as its ``fsync``, so a power cut leaves the image as a disk
that lost power would be: what ext4 flushed, nothing else.  Mounting it
again replays ext4's journal, as a boot would.

``ExtDisk(mount, directory)`` makes the image on the power-cut mount
`mount` and mounts ext4 at `directory`; ``remount()`` (after the power
went and the writers are dead) detaches ext4 and the loop device,
reverts the image (``PowerCutMount.remount``) and mounts it all again;
``close()`` takes it all down.  Cuts are armed on the power-cut mount as
ever: ``write`` counts the disk's writes, ``fsync`` its cache flushes.
"""

import os
import shutil
import subprocess
import tempfile

from .harness import PowerCutError, PowerCutMount

IMAGE = 'ext4.img'
SIZE = 256 << 20


def _run(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True,
                              check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PowerCutError('%s: %s' % (argv[0], error)) from None
    if done.returncode:
        raise PowerCutError('%s failed: %s' % (' '.join(argv),
                                                done.stderr.strip()[-300:]))
    return done.stdout.strip()


class ExtDisk:

    def __init__(self, mount: PowerCutMount, directory: str,
                 size: int = SIZE, commit_interval: int | None = 600):
        self.mount = mount
        self.commit_interval = commit_interval
        self.directory = os.path.abspath(directory)
        self.image = os.path.join(mount.mountpoint, IMAGE)
        self.loop: str | None = None
        with open(self.image, 'wb') as f:
            f.truncate(size)
        _run('mkfs.ext4', '-q', '-F', '-E',
             'lazy_itable_init=0,lazy_journal_init=0', self.image)
        # A new disk: everything on it is durable.
        for path in (self.image, mount.mountpoint):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.makedirs(self.directory, exist_ok=True)
        self._attach()

    def __enter__(self) -> 'ExtDisk':  # noqa: PYI034 (3.10)
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _attach(self) -> None:
        self.loop = _run('losetup', '--find', '--show', self.image)
        try:
            # By default commit=600: ext4 writes its journal when asked to
            # (an fsync, a syncfs), not every 5 s by itself, so that what
            # survives a cut is what the program synced.  None: ext4's own
            # interval, as on a real machine, where a journal commit may
            # run while the program syncs.
            options = ([] if self.commit_interval is None
                       else ['-o', 'commit=%d' % self.commit_interval])
            _run('mount', '-t', 'ext4', *options, self.loop, self.directory)
        except PowerCutError:
            self._detach()
            raise

    def _detach(self) -> None:
        if self.loop is None:
            return
        # Lazily: ext4 over a disk without power cannot write back.
        subprocess.run(['umount', '-l', self.directory], capture_output=True,
                       check=False)
        subprocess.run(['losetup', '-d', self.loop], capture_output=True,
                       check=False)
        self.loop = None

    # The power-cut mount's controls, so that an ExtDisk stands in for it.

    def arm(self, kind: str, count: int) -> None:
        self.mount.arm(kind, count)

    def cut(self) -> None:
        self.mount.cut()

    def wait_cut(self, timeout: float) -> bool:
        return self.mount.wait_cut(timeout)

    def stats(self) -> dict:
        return self.mount.stats()

    def remount(self) -> dict:
        """The power went: take ext4 down, revert the disk, boot again."""
        self.mount.cut()
        self._detach()
        undone = self.mount.remount()
        self._attach()
        return undone

    def close(self) -> None:
        self._detach()


_unavailable: list[str | None] = []


def unavailable() -> str | None:
    """Why this machine cannot make an ExtDisk, or None if it can.

    Tried once per process, with a real loop device and ext4 on it (on
    the local disk): after that, an ExtDisk that fails is a failure.
    """
    if not _unavailable:
        missing = [tool for tool in ('losetup', 'mkfs.ext4', 'mount')
                   if shutil.which(tool) is None]
        if missing:
            reason = 'no %s' % ', '.join(missing)
        elif not os.path.exists('/dev/loop-control'):
            reason = 'no loop devices (/dev/loop-control)'
        else:
            reason = _probe()
        _unavailable.append(reason)
    return _unavailable[0]


def _probe() -> str | None:
    top = tempfile.mkdtemp(prefix='powercut-ext4-probe-')
    image, directory = os.path.join(top, IMAGE), os.path.join(top, 'ext4')
    os.mkdir(directory)
    loop = None
    try:
        with open(image, 'wb') as f:
            f.truncate(16 << 20)
        _run('mkfs.ext4', '-q', '-F', image)
        loop = _run('losetup', '--find', '--show', image)
        _run('mount', '-t', 'ext4', loop, directory)
        _run('umount', directory)
        return None
    except PowerCutError as error:
        return str(error)
    finally:
        if loop is not None:
            subprocess.run(['losetup', '-d', loop], capture_output=True,
                           check=False)
        shutil.rmtree(top, ignore_errors=True)
