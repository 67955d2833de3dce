"""pyvmm.vhost.kernel with no VM: rings built by hand in a memfd, frames through a tap.

This is what a guest's virtio-net driver and pyvmm do together, done by a
test: DriverRing plays the driver, VhostKernelNet the VMM, and an AF_PACKET
socket on the tap plays the host's network stack.
"""

import os
import select
import socket
import struct

import pytest

from pyvmm.memory import GuestMemory
from pyvmm.sys.tap import Tap
from pyvmm.vhost import VhostError, VringAddr
from pyvmm.vhost.kernel import VhostKernelNet
from pyvmm.virtio import spec
from pyvmm.virtio.splitring import DriverRing

pytestmark = pytest.mark.testbed

ETH_P_EXPERIMENTAL = 0x88B5       # IEEE 802 local experimental ethertype
RX, TX = 0, 1
VNET_HDR = bytes(12)              # struct virtio_net_hdr_mrg_rxbuf, no offloads
RING_GPA = {RX: 0x10000, TX: 0x20000}
TX_BUF, RX_BUF = 0x100000, 0x200000


def frame(payload):
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ETH_P_EXPERIMENTAL) + payload


def wait_readable(fd, timeout=30):
    assert select.select([fd], [], [], timeout)[0], f"fd {fd} stayed silent for {timeout} s"


@pytest.fixture
def rig():
    mem = GuestMemory(16 << 20)
    tap = Tap("vhtest%d")
    with open(f"/proc/sys/net/ipv6/conf/{tap.name}/disable_ipv6", "w") as f:
        f.write("1")   # no router solicitations landing in our receive ring
    tap.set_vnet_hdr_size(len(VNET_HDR))
    tap.up()
    vhost = VhostKernelNet()
    vhost.set_owner()
    assert vhost.get_features() & spec.bit(spec.VIRTIO_F_VERSION_1)
    vhost.set_features(spec.bit(spec.VIRTIO_F_VERSION_1))
    vhost.set_mem_table(mem)
    rings, kicks, calls, errs = {}, {}, {}, {}
    for q in (RX, TX):
        rings[q] = DriverRing(mem, RING_GPA[q], 64)
        kicks[q], calls[q], errs[q] = (os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3))
        vhost.start_vring(q, 64, VringAddr(rings[q].desc_addr, rings[q].avail_addr,
                                           rings[q].used_addr), kicks[q], calls[q], errs[q])
        vhost.set_backend(q, tap.fd)
    packet = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_EXPERIMENTAL))
    packet.bind((tap.name, ETH_P_EXPERIMENTAL))
    vhost.errs = errs
    yield mem, rings, kicks, calls, packet, vhost
    packet.close()
    for q in (RX, TX):
        vhost.set_backend(q, None)
    vhost.close()
    tap.close()
    for fd in [*kicks.values(), *calls.values(), *errs.values()]:
        os.close(fd)
    mem.close()


def test_guest_transmit_reaches_the_host(rig):
    mem, rings, kicks, calls, packet, vhost = rig
    sent = frame(b"to the host " * 10)
    mem.write(TX_BUF, VNET_HDR + sent)
    head = rings[TX].add([(TX_BUF, len(VNET_HDR) + len(sent), False)])
    os.eventfd_write(kicks[TX], 1)           # what the guest's QueueNotify write does
    wait_readable(packet)
    assert packet.recv(4096) == sent
    wait_readable(calls[TX])                  # the "interrupt"
    assert rings[TX].pop_used() == [(head, 0)]
    assert vhost.get_vring_base(TX) == 1      # stops the queue; it took one entry


def test_host_transmit_reaches_the_guest(rig):
    mem, rings, kicks, calls, packet, vhost = rig
    head = rings[RX].add([(RX_BUF, 2048, True)])
    os.eventfd_write(kicks[RX], 1)
    sent = frame(b"to the guest " * 10)
    packet.send(sent)
    wait_readable(calls[RX])
    [(used_head, length)] = rings[RX].pop_used()
    assert used_head == head
    assert mem.read(RX_BUF + len(VNET_HDR), length - len(VNET_HDR)) == sent


def test_ring_outside_guest_memory_is_refused_before_the_ioctl(rig):
    mem, rings, kicks, calls, packet, vhost = rig
    with pytest.raises(VhostError, match="not inside guest RAM"):
        vhost.set_vring_addr(RX, VringAddr(16 << 20, RING_GPA[RX] + 1024, RING_GPA[RX] + 2048))
    with pytest.raises(VhostError, match="not 16-byte aligned"):
        vhost.set_vring_addr(RX, VringAddr(RING_GPA[RX] + 8, RING_GPA[RX] + 1024,
                                           RING_GPA[RX] + 2048))


def test_broken_descriptor_is_reported_on_the_err_eventfd(rig):
    """A guest's descriptor pointing outside its memory: vhost refuses and says so."""
    mem, rings, kicks, calls, packet, vhost = rig
    rings[TX].add([(64 << 20, 100, False)])   # 64 MiB, beyond the 16 MiB of RAM
    os.eventfd_write(kicks[TX], 1)
    wait_readable(vhost.errs[TX])
    assert os.eventfd_read(vhost.errs[TX]) >= 1
