"""TAP network devices (<linux/if_tun.h>): the host end of a guest's NIC.

A tap opened with IFF_VNET_HDR prefixes every frame with a virtio-net
header, exactly what vhost-net moves to and from the guest's rings; with
TUNSETOFFLOAD it accepts and produces checksum-less and GSO frames, which
is what lets one interrupt carry 64 KiB instead of 1.5.

A multiqueue tap (IFF_MULTI_QUEUE) is one interface opened several times:
each fd is one queue. For frames to the guest the kernel picks the queue
per flow: the one the flow's frames from the guest came on, else by its
hash. TUNSETQUEUE detaches a queue (no frames for it) and attaches it
again. One vhost-net device serves each, for one queue pair of the guest.

The host side's address is added through rtnetlink; the link is brought up
with the classic interface ioctl. On a tap that outlives pyvmm (a
persistent one, named with tap=), what pyvmm added is taken away again at
the end, and nothing else.
"""

import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct

from pyvmm.errors import PyvmmError
from pyvmm.sys import netlink
from pyvmm.sys.chardev import open_chardev
from pyvmm.sys.ioctl import _IOR, _IOW

log = logging.getLogger("pyvmm.tap")

TUNSETIFF = _IOW(ord("T"), 202, ctypes.c_int)
TUNGETFEATURES = _IOR(ord("T"), 207, ctypes.c_uint)
TUNGETIFF = _IOR(ord("T"), 210, ctypes.c_uint)
TUNSETOFFLOAD = _IOW(ord("T"), 208, ctypes.c_uint)
TUNSETVNETHDRSZ = _IOW(ord("T"), 216, ctypes.c_int)
TUNSETQUEUE = _IOW(ord("T"), 217, ctypes.c_int)
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE, IFF_DETACH_QUEUE = 0x0200, 0x0400
IFF_NO_PI = 0x1000
IFF_PERSIST = 0x0800
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO = 0x01, 0x02, 0x04, 0x08, 0x10

# <linux/sockios.h>, <linux/if.h>
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP = 0x1
IFNAMSIZ = 16


class TapError(PyvmmError):
    pass


def _ifreq(name, payload=b""):
    """struct ifreq: the interface name, then a 24-byte union."""
    return struct.pack(f"{IFNAMSIZ}s24s", name.encode(), payload)


class Tap:
    def __init__(self, name="pyvmm%d", queues=1):
        """Create (or attach to) tap `name`; a %d in it lets the kernel number it.
        queues > 1: a multiqueue tap, one fd per queue (fds; fd is the first)."""
        if len(name.encode()) >= IFNAMSIZ:
            raise TapError(f"tap name {name!r} is longer than {IFNAMSIZ - 1} bytes")
        self.fds = []
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
        try:
            for _ in range(queues):
                self.fds.append(self._open(name, flags, queues))
                name = self.name                 # the next queues join the one made
        except BaseException:
            for fd in self.fds:
                os.close(fd)
            raise
        self.fd = self.fds[0]
        flags = struct.unpack_from("H", fcntl.ioctl(self.fd, TUNGETIFF, _ifreq("")), IFNAMSIZ)[0]
        # A tap that stays after pyvmm closes it gets back the state it had.
        self.persistent = bool(flags & IFF_PERSIST)
        self._added_addresses = []
        self._brought_up = False

    def _open(self, name, flags, queues):
        """One fd of tap name (TUNSETIFF); sets self.name to what the kernel chose."""
        fd = open_chardev("/dev/net/tun", TapError, missing="load the driver with 'modprobe tun'",
                          no_permission="taps need root or CAP_NET_ADMIN", flags=os.O_NONBLOCK)
        try:
            req = fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, struct.pack("H", flags)))
        except OSError as e:
            os.close(fd)
            if e.errno == errno.EBUSY:
                hint = " (it may exist already, owned by someone else)"
            elif e.errno == errno.EINVAL and queues > 1:
                hint = (f" (it exists and is not multiqueue: queues={queues} needs one made "
                        f"with 'ip tuntap add {name} mode tap multi_queue vnet_hdr')")
            else:
                hint = ""
            raise TapError(f"cannot create tap {name!r}: {e.strerror}{hint}") from None
        self.name = req[:IFNAMSIZ].rstrip(b"\0").decode()
        return fd

    def set_queue_attached(self, queue, attached):
        """TUNSETQUEUE: a detached queue gets no frames (a queue pair the guest
        does not use); only for a multiqueue tap."""
        flag = IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE
        try:
            fcntl.ioctl(self.fds[queue], TUNSETQUEUE, _ifreq("", struct.pack("H", flag)))
        except OSError as e:
            raise TapError(f"tap {self.name}: cannot {'attach' if attached else 'detach'} "
                           f"queue {queue}: {e.strerror}") from None

    def close(self):
        if self.fd is None:
            return
        if self.persistent:
            self._undo()
        for fd in self.fds:
            os.close(fd)
        self.fd, self.fds = None, []

    def _undo(self):
        """Take away what pyvmm added to a persistent tap."""
        try:
            for address in self._added_addresses:
                netlink.del_address(self.name, address)
            if self._brought_up:
                self._set_flags(0, IFF_UP)
        except OSError as e:
            log.warning("tap %s: could not undo pyvmm's changes: %s", self.name, e.strerror)

    def set_vnet_hdr_size(self, size):
        """TUNSETVNETHDRSZ: 10 bytes (legacy) or 12 (VERSION_1 or MRG_RXBUF)."""
        fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", size))

    def set_offload(self, flags):
        """TUNSETOFFLOAD: which TUN_F_* frames the guest can take from the host."""
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    def configure(self, address):
        """Give the host side address (an ip_interface, e.g. 10.10.0.1/30) and bring it up."""
        address = ipaddress.ip_interface(address)
        try:
            netlink.add_address(self.name, address)
            self._added_addresses.append(address)
        except FileExistsError:
            pass   # it had it already: not ours to take away later
        except OSError as e:
            raise TapError(f"cannot give {self.name} the address {address}: {e.strerror}") from None
        self.up()

    def up(self):
        if self._set_flags(IFF_UP, 0):
            self._brought_up = True

    def _set_flags(self, set_bits, clear_bits):
        """SIOCSIFFLAGS; True if that changed anything."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            flags = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(self.name)),
                                       IFNAMSIZ)[0]
            new = (flags | set_bits) & ~clear_bits
            if new != flags:
                fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(self.name, struct.pack("H", new)))
            return new != flags
