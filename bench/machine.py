"""What the benchmark scripts say about the machine they ran on."""

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return 'not installed'


def hardware(root: str) -> str:
    """CPUs, memory, and the filesystem `root` is on, in one line."""
    cpu = 'unknown CPU'
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    with open('/proc/meminfo') as f:
        memory_kib = int(f.readline().split()[1])
    device, filesystem = subprocess.run(
        ['df', '-T', root], capture_output=True, text=True, check=True
    ).stdout.splitlines()[-1].split()[:2]
    return (f'{len(os.sched_getaffinity(0))} CPUs (nproc; {cpu}), '
            f'{memory_kib / 1024 ** 2:.1f} GiB memory, {root} on '
            f'{filesystem} ({device}), Linux {platform.release()}')
