"""The contract between a VMM and the tiny guest in images/ (see guest/README.md).

The guest's init reads its instructions from the kernel command line and
reports back through two I/O ports, so the same image works under pyvmm and
under QEMU (whose isa-debug-exit device watches the exit port).
"""

import base64
import os.path
import shlex

# images/ in the checkout: the kernel and initramfs that pyvmm boots by default.
# (Plain strings: pathlib would cost a quarter of a second at each start in
# the testbed.)
IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "images")
VMLINUX = os.path.join(IMAGES, "vmlinux")
BZIMAGE = os.path.join(IMAGES, "bzImage")
INITRAMFS = os.path.join(IMAGES, "initramfs.cpio.gz")

# The init writes the command's exit status (one byte) here, then reboots.
# QEMU: -device isa-debug-exit,iobase=0xf4,iosize=4 exits with (status << 1) | 1.
EXIT_PORT = 0xF4
# The init writes one byte here as soon as userspace starts (the "debugcon"
# port, ignored where nothing listens): the VMM's "guest reached init" mark.
INIT_MARK_PORT = 0xE9

# Kernel command line for the tiny guest: serial console, no boot chatter,
# and a reboot that ends the VM (triple fault) when no exit port listens.
BASE_CMDLINE = "console=ttyS0 quiet reboot=t panic=-1"


def command_arg(command):
    """`pyvmm.cmd=...` for a command given as an argv list or a shell string.

    base64 keeps quotes, spaces and '=' intact on the kernel command line.
    """
    if not isinstance(command, str):
        command = shlex.join(command)
    return "pyvmm.cmd=" + base64.b64encode(command.encode()).decode()


def net_arg(dev, address, gateway=None):
    """`pyvmm.net=DEV,ADDR/PREFIX[,GATEWAY]`: one interface for the init to set up."""
    return "pyvmm.net=" + ",".join([dev, address] + ([gateway] if gateway else []))
