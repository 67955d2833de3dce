"""QEMU boots the tiny guest under real KVM: proof of the images, and the baseline.

Runs inside scripts/testbed. Each boot takes about 10 s there.
"""

import pytest
from guestvm import qemu_exit_status, qemu_microvm

from pyvmm import guest

pytestmark = pytest.mark.testbed


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
