"""The guest-less driver on the kernel's vhost-net: the same Driver that
drives vhost-user back-ends pushes an ARP request through /dev/vhost-net to
a tap, and the host kernel's answer comes back on the receive queue."""

import ipaddress
import socket
import struct

import pytest

from pyvmm.driver import vhost_net
from pyvmm.driver.devices import net_post, net_receive, net_send
from pyvmm.virtio import spec

pytestmark = pytest.mark.testbed

MAC = bytes.fromhex("020000000099")


def test_an_arp_request_through_vhost_net_is_answered_by_the_host():
    with vhost_net("pyvmmdrv%d", ipaddress.ip_interface("10.99.0.1/30")) as d:
        queues = d.start(features=spec.bit(spec.VIRTIO_F_VERSION_1), queues=[(0, 64), (1, 64)])
        rx, tx = queues[0], queues[1]
        posted = net_post(d, rx)
        arp = (b"\xff" * 6 + MAC + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
               + MAC + socket.inet_aton("10.99.0.2") + bytes(6) + socket.inet_aton("10.99.0.1"))
        net_send(d, tx, arp)
        replies = []
        for _ in range(10):                      # IPv6 chatter may come first
            replies += [f for f in net_receive(d, rx, posted, timeout=10)
                        if f[12:14] == b"\x08\x06"]
            if replies:
                break
    reply = replies[0]
    assert reply[:6] == MAC and reply[20:22] == b"\x00\x02"          # an ARP reply to us
    assert socket.inet_ntoa(reply[28:32]) == "10.99.0.1"             # from the tap's address
