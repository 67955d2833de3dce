"""The back-end library, driven by pyvmm's own front-end over a socketpair:
the rng device gives entropy, and rings the guest broke fail cleanly
(the error eventfd, never a crash or a hang of the back-end). No KVM."""

import os
import select
import socket
import struct
import threading
import time

import pytest
from backends import LibraryRig

from pyvmm.vhost.user.backend.blk import Blk
from pyvmm.vhost.user.backend.daemon import serve_connection
from pyvmm.vhost.user.backend.rng import Rng
from pyvmm.vhost.user.backend.vsock import Vsock
from pyvmm.vhost.user.channel import Connection
from pyvmm.vhost.user.frontend import VhostUserFrontend
from pyvmm.virtio.splitring import VIRTQ_DESC_F_NEXT

BUF = 0x100000
VERSION_1 = 1 << 32


@pytest.fixture
def rig(memory16):
    r = LibraryRig(memory16, Rng())
    yield r
    r.close()


def test_rng_fills_the_guests_buffers(rig):
    rig.memory.write(BUF, bytes(64))
    head = rig.ring.add([(BUF, 32, True), (BUF + 32, 32, True)])
    os.eventfd_write(rig.kick, 1)
    rig.wait(rig.call)
    assert rig.ring.pop_used() == [(head, 64)]
    assert rig.memory.read(BUF, 64) != bytes(64)
    assert rig.fe.get_vring_base(0) == 1                   # where it stopped


def test_a_readable_buffer_gets_nothing_written(rig):
    head = rig.ring.add([(BUF, 16, False)])
    os.eventfd_write(rig.kick, 1)
    rig.wait(rig.call)
    assert rig.ring.pop_used() == [(head, 0)]


def write_desc(memory, table, index, addr, length, flags, nxt=0):
    memory.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))


def make_device(kind, tmp_path):
    """Each of pyvmm's back-ends, and the queue its requests come on."""
    if kind == "rng":
        return Rng(), 0
    if kind == "blk":
        image = tmp_path / "disk.img"
        image.write_bytes(bytes(1 << 20))
        return Blk(str(image)), 0
    return Vsock(3, str(tmp_path / "v.sock")), 1                # its tx queue


@pytest.mark.parametrize("kind", ["rng", "blk", "vsock"])
@pytest.mark.parametrize("breakage", ["outside RAM", "loop", "oversize", "wrong direction"])
def test_a_broken_chain_breaks_the_ring_not_the_back_end(memory16, tmp_path, kind, breakage):
    """BE-66. What the guest wrote is checked before use: a chain that points outside
    guest RAM, loops, claims 4 GiB, or puts a readable buffer after a writable
    one, is reported on the ring's error eventfd (as vhost-net does); nothing
    is used, and the back-end still answers."""
    device, queue = make_device(kind, tmp_path)
    rig = LibraryRig(memory16, device, queues=device.num_queues)
    try:
        ring = rig.rings[queue]
        head = ring.add([(BUF, 16, False), (BUF + 16, 16, True)])
        d, second = ring.desc_addr, ring._chains[head][1]
        if breakage == "outside RAM":
            write_desc(rig.memory, d, head, 64 << 20, 16, VIRTQ_DESC_F_NEXT, second)
        elif breakage == "loop":
            write_desc(rig.memory, d, second, BUF, 16, 2 | VIRTQ_DESC_F_NEXT, head)
        elif breakage == "oversize":
            write_desc(rig.memory, d, head, BUF, 0xFFFF_FFFF, VIRTQ_DESC_F_NEXT, second)
        else:
            write_desc(rig.memory, d, second, BUF + 16, 16, 0)     # readable, after
            write_desc(rig.memory, d, head, BUF, 16, 2 | VIRTQ_DESC_F_NEXT, second)  # writable
        os.eventfd_write(rig.kicks[queue], 1)
        assert rig.wait(rig.errs[queue]) == 1
        assert ring.pop_used() == []
        assert rig.fe.get_features() & VERSION_1
    finally:
        rig.close()
        device.close()


def test_event_idx_interrupts_only_when_the_driver_asks(memory16):
    """BE-65. With VIRTIO_RING_F_EVENT_IDX the driver's used_event says which used
    entry it wants an interrupt for; the back-end signals the call eventfd
    for that one and not for others."""
    rig = LibraryRig(memory16, Rng(), features=VERSION_1 | 1 << 29)
    try:
        ring = rig.ring
        used_event = ring.avail_addr + 4 + 2 * ring.num
        rig.memory.write(used_event, struct.pack("<H", 5))        # interrupt me at entry 5
        for i in range(5):
            ring.add([(BUF + 64 * i, 64, True)])
            os.eventfd_write(rig.kick, 1)
            deadline = time.monotonic() + 5
            while ring.used_idx() != i + 1:
                assert time.monotonic() < deadline, "the request was not served"
                time.sleep(0.01)
        assert not select.select([rig.call], [], [], 0.2)[0]       # entries 0-4: no interrupt
        ring.add([(BUF, 64, True)])
        os.eventfd_write(rig.kick, 1)
        assert rig.wait(rig.call) == 1                             # entry 5: one
    finally:
        rig.close()


def test_a_front_end_breaking_the_protocol_is_refused_with_the_rule(memory16):
    """The back-end's session checks the front-end: SET_VRING_ADDR before any
    memory table is FE-50; the back-end closes the connection."""
    from pyvmm.vhost.user.messages import FrontendReq, VringAddress
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=serve_connection,
                              args=(Rng(), Connection(theirs, "pyvmm")), daemon=True)
    thread.start()
    fe = VhostUserFrontend(Connection(ours, "the back-end", timeout=2))
    fe.negotiate()
    raw = fe.session.request(FrontendReq.SET_VRING_ADDR, VringAddress(0, 0, 0x1000, 0x3000,
                                                                      0x2000))
    from pyvmm.vhost.user.wire import encode
    fe.conn.send(encode(raw.request, raw.flags, raw.payload.pack()))
    thread.join(5)
    assert not thread.is_alive()                           # connection closed, no hang
    fe.close()
