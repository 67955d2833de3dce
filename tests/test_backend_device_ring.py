"""DeviceRing (pyvmm/virtio/device_ring.py) against indirect tables a guest
can write, at the unit level (issue 19, item 16; the 4 GiB chain needs
guest memory that big: tests/test_backend_refusals.py). No KVM."""

import struct

import pytest
from backends import mapped_memory

from pyvmm.virtio.device_ring import MAX_INDIRECT, DeviceRing
from pyvmm.virtio.splitring import VIRTQ_DESC_F_INDIRECT, DriverRing, RingError

pytestmark = pytest.mark.usefixtures("ring_walk")   # C and Python (conftest)

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


# --- where the ring is mapped, learnt once (issue 23) ---------------------------

def test_a_ring_follows_a_new_memory_table_to_its_new_mappings(memory16):
    """The ring learns where its table and rings are mapped once; a new table
    (SET_MEM_TABLE: every old mapping closed) has it look them up again."""
    memory = mapped_memory(memory16, [(0, 16 << 20, 0)])
    driver = DriverRing(memory16, 0x10000, NUM)
    device = DeviceRing(memory, NUM, driver.desc_addr, driver.avail_addr, driver.used_addr)
    head = driver.add([(0x20000, 16, False), (0x30000, 8, True)])
    device.push(device.pop().head, 8)
    generation = memory.generation
    memory.replace([])                                    # no regions at all ...
    assert memory.generation > generation
    with pytest.raises(RingError):                        # ... then the ring is outside memory
        device.pop()
    memory = mapped_memory(memory16, [(0, 16 << 20, 0)])
    device.memory = memory               # the same rings in another memory, at its generation 2
    head2 = driver.add([(0x20000, 16, False)])
    assert device.pop().head == head2
    assert driver.pop_used() == [(head, 8)]


def test_buffers_in_two_regions_and_across_their_border(memory16):
    """The walk keeps the bounds of the region the last buffer was in; a buffer
    in the other region is looked up, one across both is refused."""
    memory = mapped_memory(memory16, [(0, 8 << 20, 0), (8 << 20, 8 << 20, 8 << 20)])
    driver = DriverRing(memory16, 0x10000, NUM)
    device = DeviceRing(memory, NUM, driver.desc_addr, driver.avail_addr, driver.used_addr)
    driver.add([(0x20000, 16, False), (9 << 20, 4096, True), (0x30000, 1, True)])
    chain = device.pop()
    assert [b.addr for b in chain.buffers] == [0x20000, 9 << 20, 0x30000]
    assert (chain.readable_len, chain.writable_len, chain.n_readable) == (16, 4097, 1)
    assert chain.readable == chain.buffers[:1] and chain.writable == chain.buffers[1:]
    driver.add([(0x20000, 16, False), ((8 << 20) - 4096, 8192, True)])
    with pytest.raises(RingError, match="not inside guest RAM"):
        device.pop()


def test_views_of_ranges_in_two_regions(memory16):
    from pyvmm.vhost.user.backend.memory import OutsideMemory
    memory = mapped_memory(memory16, [(0, 8 << 20, 0), (8 << 20, 8 << 20, 8 << 20)])
    memory16.write(0x1000, b"abcd")
    memory16.write(9 << 20, b"wxyz")
    views = memory.views([(0x1000, 4), (9 << 20, 4), (0x1002, 2)])
    assert [bytes(v) for v in views] == [b"abcd", b"wxyz", b"cd"]
    for v in views:
        v.release()
    with pytest.raises(OutsideMemory):
        memory.views([(0x1000, 4), ((8 << 20) - 2, 4)])
    memory.clear()                 # no view left behind: every mapping closes
