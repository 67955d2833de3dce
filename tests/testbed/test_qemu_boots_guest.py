"""QEMU boots the tiny guest under real KVM: proof of the images, and the baseline.

Runs inside scripts/testbed. Each boot takes about 10 s there.
"""

import subprocess

import pytest

from pyvmm import guest

pytestmark = pytest.mark.testbed


def qemu_microvm(kernel, *append, devices=(), timeout=120):
    """Boot the tiny guest with QEMU -M microvm; return the CompletedProcess."""
    cmd = [
        "qemu-system-x86_64", "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host",
        "-m", "256M", "-smp", "2", "-nodefaults", "-no-reboot", "-display", "none",
        "-serial", "stdio", "-device", f"isa-debug-exit,iobase={guest.EXIT_PORT:#x},iosize=4",
        "-kernel", str(kernel), "-initrd", str(guest.INITRAMFS),
        "-append", " ".join([guest.BASE_CMDLINE, *append]), *devices,
    ]
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)


def qemu_exit_status(guest_status):
    """isa-debug-exit makes QEMU exit with (status << 1) | 1."""
    return (guest_status << 1) | 1


@pytest.mark.parametrize("kernel", [guest.BZIMAGE, guest.VMLINUX], ids=["bzImage", "vmlinux"])
def test_command_runs_and_its_status_comes_back(kernel):
    script = "test $(nproc) = 2 && echo \"hello 'from' guest\" && exit 7"
    r = qemu_microvm(kernel, guest.command_arg(["sh", "-c", script]))
    assert r.returncode == qemu_exit_status(7), r.stdout.decode(errors="replace")
    assert b"hello 'from' guest\n" in r.stdout
    assert b"\r" not in r.stdout.split(b"hello")[1]  # plain line endings for commands


def test_virtio_mmio_net_device_is_configured_from_the_command_line():
    # A virtio-mmio NIC backed by a tap-less "user" netdev: nothing leaves the testbed.
    script = "ip -o addr show eth0 && cat /sys/class/net/eth0/address"
    r = qemu_microvm(guest.BZIMAGE, guest.command_arg(script),
                     guest.net_arg("eth0", "10.0.2.15/24", "10.0.2.2"),
                     devices=["-netdev", "user,id=n0",
                              "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56"])
    out = r.stdout.decode(errors="replace")
    assert r.returncode == qemu_exit_status(0), out
    assert "inet 10.0.2.15/24" in out
    assert "52:54:00:12:34:56" in out
