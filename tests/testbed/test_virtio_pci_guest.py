"""What only virtio-pci has, with a real guest: MSI-X vectors the guest moves.

(The device suites run on both transports: the transport fixture in tests/conftest.py.)
"""

import pytest
from guestvm import data_path_exits, finish, start

pytestmark = pytest.mark.testbed

HOST_IP = "10.10.0.1"


def per_cpu_interrupts(text, name):
    """[count on CPU0, CPU1, ...] of the MSI-X vector called name in one /proc/interrupts."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[-1] == name:
            return [int(f) for f in fields[1:] if f.isdigit()]
    raise AssertionError(f"no {name} in:\n{text}")


def test_a_vector_the_guest_moves_to_another_cpu_keeps_its_interrupts_coming():
    """Linux moves an MSI-X vector by masking its entry, writing the new
    message and unmasking it: pyvmm reroutes the GSI (KVM_SET_GSI_ROUTING)
    and sends one interrupt at the unmask in case one was dropped. The
    replies to the pings after the move arrive on CPU 1, with no exits."""
    script = (
        f"ping -c 1 {HOST_IP} >/dev/null && "
        "irq=$(grep virtio0-input.0 /proc/interrupts | cut -d: -f1 | tr -d ' ') && "
        "echo 2 > /proc/irq/$irq/smp_affinity && "
        "echo ==before && cat /proc/interrupts && "
        f"ping -c 5 {HOST_IP} && echo ==after && cat /proc/interrupts")
    proc = start("--transport", "pci", "--cpus", "2", "--net", "vhost-kernel", "--stats",
                 guest_cmd=script)
    rc, out, err = finish(proc)
    assert rc == 0, out + err
    assert "5 packets received" in out
    before = per_cpu_interrupts(out.split("==before")[1].split("==after")[0], "virtio0-input.0")
    after = per_cpu_interrupts(out.split("==after")[1], "virtio0-input.0")
    assert after[1] - before[1] >= 5, (before, after)
    assert data_path_exits(err, "virtio-net0", "pci") == {}


def test_the_guest_sees_each_device_as_a_modern_virtio_pci_function():
    script = ("for d in /sys/bus/pci/devices/*; do "
              "echo $(basename $d) $(cat $d/vendor $d/device $d/class $d/revision); done")
    proc = start("--transport", "pci", "--net", "vhost-kernel", "--vsock", "vhost-kernel",
                 guest_cmd=script)
    rc, out, err = finish(proc)
    assert rc == 0, out + err
    assert "0000:00:00.0 0x8086 0x0d57 0x060000 0x00" in out          # the host bridge
    assert "0000:00:01.0 0x1af4 0x1041 0x020000 0x01" in out          # virtio-net
    assert "0000:00:02.0 0x1af4 0x1053 0x078000 0x01" in out          # virtio-vsock
