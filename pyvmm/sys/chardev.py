"""Opening the kernel's character devices (/dev/kvm, /dev/vhost-*, /dev/net/tun)."""

import os


def open_chardev(path, error, missing, no_permission, flags=0):
    """os.open(path) read-write, or raise error(message) saying what to do.

    missing and no_permission finish the sentences "PATH does not exist: ..."
    and "no permission to open PATH: ...".
    """
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC | flags)
    except FileNotFoundError:
        raise error(f"{path} does not exist: {missing}") from None
    except PermissionError:
        raise error(f"no permission to open {path}: {no_permission}") from None
