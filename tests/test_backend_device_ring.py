"""DeviceRing (pyvmm/virtio/device_ring.py) against indirect tables a guest
can write, at the unit level (issue 19, item 16; the 4 GiB chain needs
guest memory that big: tests/test_backend_refusals.py). No KVM."""

import struct

import pytest

from pyvmm.virtio.device_ring import MAX_INDIRECT, DeviceRing
from pyvmm.virtio.splitring import VIRTQ_DESC_F_INDIRECT, DriverRing, RingError

NUM = 8


def ring_with_head(memory, addr, length, flags):
    """A ring whose head 0 is made available as (addr, length, flags)."""
    driver = DriverRing(memory, 0x10000, NUM)
    head = driver.add([(0x20000, 16, False)])
    memory.write(driver.desc_addr + 16 * head, struct.pack("<QIHH", addr, length, flags, 0))
    return DeviceRing(memory, NUM, driver.desc_addr, driver.avail_addr, driver.used_addr), driver


def test_the_descriptor_table_as_an_indirect_table_is_still_a_table_in_a_table(memory16):
    """The head names the ring's own descriptor table as its indirect table,
    whose entry 0 is indirect again: two levels, which the spec forbids."""
    device, driver = ring_with_head(memory16, 0x10000, 32, VIRTQ_DESC_F_INDIRECT)
    assert driver.desc_addr == 0x10000
    memory16.write(0x10000, struct.pack("<QIHH", 0x30000, 16, VIRTQ_DESC_F_INDIRECT, 0))
    with pytest.raises(RingError, match="an indirect descriptor inside"):
        device.pop()


def test_an_indirect_table_is_at_most_65536_descriptors(memory16):
    device, _ = ring_with_head(memory16, 0, 16 * (MAX_INDIRECT + 1), VIRTQ_DESC_F_INDIRECT)
    with pytest.raises(RingError, match="65537 descriptors"):
        device.pop()
    device, _ = ring_with_head(memory16, 0x30000, 16 * MAX_INDIRECT, VIRTQ_DESC_F_INDIRECT)
    assert device.pop().buffers[0].length == 0        # zeros: one empty buffer, taken
