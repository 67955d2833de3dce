"""The back-end library, driven by pyvmm's own front-end over a socketpair:
the rng device gives entropy, and rings the guest broke fail cleanly
(the error eventfd, never a crash or a hang of the back-end). No KVM."""

import os
import socket
import struct
import threading

import pytest
from backends import LibraryRig

from pyvmm.vhost.user.backend.daemon import serve_connection
from pyvmm.vhost.user.backend.rng import Rng
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


@pytest.mark.parametrize("breakage", ["outside RAM", "loop", "oversize"])
def test_a_broken_chain_breaks_the_ring_not_the_back_end(rig, breakage):
    head = rig.ring.add([(BUF, 16, True)])
    d = rig.ring.desc_addr
    if breakage == "outside RAM":
        write_desc(rig.memory, d, head, 64 << 20, 16, 2)
    elif breakage == "loop":
        write_desc(rig.memory, d, head, BUF, 16, 2 | VIRTQ_DESC_F_NEXT, head)
    else:
        write_desc(rig.memory, d, head, BUF, 0xFFFF_FFFF, 2)
    os.eventfd_write(rig.kick, 1)
    assert rig.wait(rig.err) == 1                          # reported, as vhost-net does
    assert rig.ring.pop_used() == []
    assert rig.fe.get_features() & VERSION_1               # and the back-end still answers


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
