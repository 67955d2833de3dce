"""What the ring checks send, per device type: one harmless request, and
one whose execution can be seen (for "no side effects").

Each DataPath names the queues to start, the queue the ring checks
watch, and three actions on a started guest-less Driver:

    request(d)   one request on the watched queue, completed and checked
                 (Failed if the device's answer is wrong)
    post(d)      one request made available there, not kicked nor awaited
    marked(d)    one request whose execution is visible: (head, executed),
                 executed() true if the device did it (not merely took it)
"""

import itertools
import struct

from pyvmm.check.core import Failed
from pyvmm.driver import DriverError
from pyvmm.driver import devices as dev
from pyvmm.virtio import fs as fuse, vsock
from pyvmm.virtio.blk import VIRTIO_BLK_T_IN

MARK = b"\xa5" * 512


class DataPath:
    queues = ((0, 64),)
    queue = 0                # the queue the ring checks watch
    chains = 1               # chains one request() makes available on it
    config_size = 0

    def begin(self, d):
        """After DRIVER_OK: what the device needs before requests (buffers)."""

    def q(self, d):
        return d.queues[self.queue]

    def request(self, d):
        try:
            self._request(d)
        except DriverError as e:
            raise Failed(str(e)) from None


class Rng(DataPath):
    def _request(self, d):
        if len(dev.rng_read(d, self.q(d), 16, d.timeout)) != 16:
            raise Failed("asked for 16 random bytes; got fewer")

    def post(self, d):
        return dev.post(d, self.q(d), writable=[16], kick=False)[0]

    def marked(self, d):
        head, (data,) = dev.post(d, self.q(d), writable=[MARK], kick=False)
        return head, lambda: d.read(data, len(MARK)) != MARK


class Blk(DataPath):
    chains = 2               # a read and the write back
    config_size = 60

    def _request(self, d):
        q = self.q(d)
        status, data = dev.blk_read(d, q, 0, 512, d.timeout)
        if status != 0 or len(data) != 512:
            raise Failed(f"a 512-byte read of sector 0: status {status}, {len(data)} bytes")
        if dev.blk_write(d, q, 0, data, d.timeout) not in (0, 1):   # 1: read-only's IOERR
            raise Failed("writing sector 0 back: a status other than OK or IOERR")

    def post(self, d):
        return dev.blk_post(d, self.q(d), VIRTIO_BLK_T_IN, 0, data=512, kick=False)[0]

    def marked(self, d):
        head, (_, status) = dev.blk_post(d, self.q(d), VIRTIO_BLK_T_IN, 0, data=MARK,
                                         kick=False)
        return head, lambda: d.read(status, 1) == b"\0"


ARP_WHO_HAS = (b"\xff" * 6 + bytes.fromhex("020000c0ffee") + b"\x08\x06"
               + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + bytes.fromhex("020000c0ffee")
               + bytes([10, 0, 2, 15]) + bytes(6) + bytes([10, 0, 2, 2]))


class Answered(DataPath):
    """TX (queue 1) is watched; what a request did shows as an answer on RX
    (queue 0), which begin() gives buffers."""
    queue = 1

    def marked(self, d):
        rx = d.queues[0]
        before = rx.ring.used_idx()
        return self.post(d), lambda: rx.ring.used_idx() != before


class Net(Answered):
    """An ARP request from a made-up MAC. Whether it was sent shows only if
    the back-end answers it (dpdk-testpmd in icmpecho mode does)."""
    queues = ((0, 64), (1, 64))

    def begin(self, d):
        d.rx_posted = dev.net_post(d, d.queues[0])

    def _request(self, d):
        dev.net_send(d, self.q(d), ARP_WHO_HAS, d.timeout)

    def post(self, d):
        return dev.post(d, self.q(d), [dev.NET_HDR + ARP_WHO_HAS], kick=False)[0]


class Fs(DataPath):
    """The request queue (1): FUSE_INIT once per session, then lookups."""
    queues = ((0, 64), (1, 64))
    queue = 1
    config_size = 40

    def begin(self, d):
        error, version = dev.fuse_init(d, self.q(d), d.timeout)
        if error or not version or version[0] != fuse.FUSE_KERNEL_VERSION:
            raise Failed(f"FUSE_INIT: error {error}, version {version}")

    def _request(self, d):
        error, _ = dev.fuse_lookup(d, self.q(d), ".pyvmm-check-absent", timeout=d.timeout)
        if error not in (0, -2):                  # found, or ENOENT
            raise Failed(f"FUSE_LOOKUP in the root: error {error}")

    def _lookup(self, d):
        request = dev.fuse_message(fuse.FUSE_LOOKUP, 1 << 32, fuse.FUSE_ROOT_ID,
                                   b".pyvmm-check-absent\0")
        head, (out,) = dev.post(d, self.q(d), [request], [MARK], kick=False)
        return head, out

    def post(self, d):
        return self._lookup(d)[0]

    def marked(self, d):
        head, out = self._lookup(d)
        return head, lambda: d.read(out, len(MARK)) != MARK


class Vsock(Answered):
    """A connection request to a host port nobody listens on, which the
    device refuses with RST."""
    queues = ((0, 64), (1, 64), (2, 64))
    config_size = vsock.CONFIG.size
    PORT = 0x7ffe_c0de

    def __init__(self):
        self._ports = itertools.count(1024)

    def begin(self, d):
        d.rx_posted = dev.vsock_post(d, d.queues[0])

    @staticmethod
    def guest_cid(d):
        """The CID in the device's config space (GET_CONFIG at connect)."""
        if len(d.backend.config_space) != vsock.CONFIG.size:
            raise Failed("no vsock config space (guest_cid) from GET_CONFIG")
        return vsock.CONFIG.unpack(d.backend.config_space)[0]

    def _request(self, d):
        port = next(self._ports)                  # a fresh source port per request
        dev.vsock_send(d, self.q(d), self.guest_cid(d), vsock.VMADDR_CID_HOST, port, self.PORT,
                       vsock.VIRTIO_VSOCK_OP_REQUEST, timeout=d.timeout)
        for header, _ in dev.vsock_receive(d, d.queues[0], d.rx_posted, d.timeout):
            if header[2] == self.PORT and header[3] == port:
                if header[6] != vsock.VIRTIO_VSOCK_OP_RST:
                    raise Failed(f"a request to host port {self.PORT:#x}, where nothing "
                                 f"listens: answered {vsock.OP_NAMES.get(header[6])}")
                return
        raise Failed("a request to a host port nobody listens on: no RST")

    def post(self, d):
        packet = dev.vsock_packet(self.guest_cid(d), vsock.VMADDR_CID_HOST, 4000, self.PORT,
                                  vsock.VIRTIO_VSOCK_OP_REQUEST)
        return dev.post(d, self.q(d), [packet], kick=False)[0]


PATHS = {"blk": Blk, "rng": Rng, "net": Net, "fs": Fs, "vsock": Vsock}
