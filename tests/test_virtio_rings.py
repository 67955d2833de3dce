"""The split ring from both sides on one GuestMemory: DriverRing (the guest's
part) and DeviceRing (a back-end's part), and every way a driver can break
the ring, refused by the device side."""

import struct

import pytest

from pyvmm.virtio.device_ring import Buffer, DeviceRing
from pyvmm.virtio.splitring import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, DriverRing,
                                    RingError)

pytestmark = pytest.mark.usefixtures("ring_walk")   # C and Python (conftest)

MiB = 1 << 20
NUM = 8


@pytest.fixture
def rings(memory16):
    driver = DriverRing(memory16, 0x10000, NUM)
    device = DeviceRing(memory16, NUM, driver.desc_addr, driver.avail_addr, driver.used_addr)
    return memory16, driver, device


def write_desc(memory, table, index, addr, length, flags, nxt=0):
    memory.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))


def test_chains_go_round_trip(rings):
    memory, driver, device = rings
    assert device.pop() is None
    heads = [driver.add([(0x20000, 16, False), (0x21000, 512, True)]) for _ in range(3)]
    chains = [device.pop() for _ in range(3)]
    assert device.pop() is None
    assert [c.head for c in chains] == heads
    assert chains[0].buffers == (Buffer(0x20000, 16, False), Buffer(0x21000, 512, True))
    for chain in reversed(chains):                 # completed out of order
        device.push(chain.head, 512)
    assert driver.pop_used() == [(h, 512) for h in reversed(heads)]


def test_many_rounds_wrap_the_indexes(rings):
    memory, driver, device = rings
    for _ in range(70000 // NUM):                  # past 65535: the u16 indexes wrap
        for _ in range(NUM):
            driver.add([(0x20000, 8, True)])
        for _ in range(NUM):
            device.push(device.pop().head, 8)
        assert len(driver.pop_used()) == NUM


def test_an_indirect_table(rings):
    memory, driver, device = rings
    table = 0x30000
    write_desc(memory, table, 0, 0x20000, 16, VIRTQ_DESC_F_NEXT, 1)
    write_desc(memory, table, 1, 0x21000, 1, 2)    # device-writable
    head = driver.add([(table, 32, False)])
    write_desc(memory, driver.desc_addr, head, table, 32, VIRTQ_DESC_F_INDIRECT)
    assert device.pop().buffers == (Buffer(0x20000, 16, False), Buffer(0x21000, 1, True))


def broken(memory, driver, break_it):
    head = driver.add([(0x20000, 16, False), (0x21000, 16, True)])
    break_it(memory, driver, head)
    device = DeviceRing(memory, NUM, driver.desc_addr, driver.avail_addr, driver.used_addr)
    return device


@pytest.mark.parametrize("break_it,message", [
    (lambda m, d, h: m.write(d.avail_addr + 2, struct.pack("<H", NUM + 1)), "ahead"),
    (lambda m, d, h: m.write(d.avail_addr + 4, struct.pack("<H", NUM)), "outside a table"),
    (lambda m, d, h: write_desc(m, d.desc_addr, h, 0x20000, 16, VIRTQ_DESC_F_NEXT, h), "a loop"),
    (lambda m, d, h: write_desc(m, d.desc_addr, h, 16 * MiB - 8, 16, 0), "not inside guest RAM"),
    (lambda m, d, h: write_desc(m, d.desc_addr, h, 0x20000, 16, 2 | VIRTQ_DESC_F_NEXT,
                                (h + 1) % NUM) or
     write_desc(m, d.desc_addr, (h + 1) % NUM, 0x21000, 16, 0), "readable buffer after"),
    (lambda m, d, h: write_desc(m, d.desc_addr, h, 0x30000, 24, VIRTQ_DESC_F_INDIRECT),
     "not whole descriptors"),
    (lambda m, d, h: (write_desc(m, 0x30000, 0, 0x30000, 16, VIRTQ_DESC_F_INDIRECT),
                      write_desc(m, d.desc_addr, h, 0x30000, 16, VIRTQ_DESC_F_INDIRECT)),
     "an indirect descriptor inside"),
])
def test_broken_rings_are_refused(memory16, break_it, message):
    driver = DriverRing(memory16, 0x10000, NUM)
    device = broken(memory16, driver, break_it)
    with pytest.raises(RingError, match=message):
        device.pop()


def test_the_device_asks_to_be_notified_of_what_comes_next(rings):
    """avail_event (EVENT_IDX): a driver that honours it kicks for the next chain."""
    memory, driver, device = rings
    driver.add([(0x20000, 8, True)])
    driver.add([(0x20000, 8, True)])
    while device.pop() is not None:
        pass
    avail_event = struct.unpack("<H", memory.read(driver.used_addr + 4 + 8 * NUM, 2))[0]
    assert avail_event == 2
