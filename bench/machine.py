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


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` shows them."""
    return ' '.join(f'{value:.2f}' for value in os.getloadavg())


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
    options = mount_options(device)
    return (f'{len(os.sched_getaffinity(0))} CPUs (nproc; {cpu}), '
            f'{memory_kib / 1024 ** 2:.1f} GiB memory, {root} on '
            f'{filesystem} ({device}{", " if options else ""}{options}), '
            f'Linux {platform.release()}')


def mount_options(device: str) -> str:
    """The mount options of `device` that change how fast files are
    written and removed (a journal's data mode, discard), from what the
    kernel shows for it; '' if it shows nothing."""
    name = os.path.basename(device)
    try:
        with open(f'/proc/fs/ext4/{name}/options') as f:
            shown = f.read().split()
    except OSError:
        try:
            with open('/proc/mounts') as f:
                shown = next((line.split()[3].split(',') for line in f
                              if line.split()[0] == device), [])
        except OSError:
            return ''
    kept = [option for option in shown
            if option.startswith('data=') or 'discard' in option]
    if shown and name and os.path.exists(f'/proc/fs/ext4/{name}') \
            and not any(option.startswith('data=') for option in shown):
        kept.append('no journal')
    return ' '.join(kept)
