"""The guest-less driver: guest memory, buffers in it, and one back-end's
queues, started through QueueBackend (devices/virtio/device.py), the
interface pyvmm's own devices use, so that the same driver serves the
kernel's vhost-net and any vhost-user back-end.

    with vhost_user("/tmp/vub.sock") as d:
        q = d.start(queues=[(0, 128)])[0]
        status, data = blk_read(d, q, sector=0, length=4096)   # devices.py
"""

import os

from pyvmm.devices.virtio.device import Queue
from pyvmm.driver.queue import DriverError, DriverQueue
from pyvmm.memory import GuestMemory
from pyvmm.virtio import spec
from pyvmm.virtio.splitring import DriverRing
from pyvmm.vhost.user.frontend import SUPPORTED_PROTOCOL_FEATURES

MiB = 1 << 20
# What the driver implements: the device type's own bits (0-23), any layout,
# indirect descriptors, EVENT_IDX and VERSION_1. Not packed or in-order rings,
# an IOMMU or dirty logging (VHOST_F_LOG_ALL): a back-end offering those gets
# a driver that does not ack them.
DRIVER_FEATURES = (1 << 24) - 1 | spec.bits(spec.VIRTIO_F_ANY_LAYOUT,
                                            spec.VIRTIO_RING_F_INDIRECT_DESC,
                                            spec.VIRTIO_RING_F_EVENT_IDX,
                                            spec.VIRTIO_F_VERSION_1)
RINGS = 0x10000                 # rings from here, one per 64 KiB
SCRATCH = 4 * MiB               # request buffers from here


class Driver:
    def __init__(self, backend, mem_size=32 * MiB, memory=None, timeout=5.0):
        """backend: a QueueBackend (now the driver's: close() closes it);
        memory: a GuestMemory to use (now the driver's) instead of mem_size
        bytes of a new one; timeout: what the device helpers wait by default."""
        self.backend = backend
        self.memory = GuestMemory(mem_size) if memory is None else memory
        self.queues = {}
        self.features = None
        self.timeout = timeout
        self.where = None            # vhost-user: the back-end's socket path, for reconnect()
        self._next = SCRATCH

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self, features=None, queues=((0, 256),)):
        """DRIVER_OK: these (index, size) queues with these feature bits (default:
        every bit the back-end offers that the driver implements); {index: DriverQueue}."""
        if features is None:
            features = self.backend.features() & DRIVER_FEATURES
        self.features = features
        for index, size in queues:
            self.make_queue(index, size)
        described = []
        for q in self.queues.values():
            described.append(Queue(q.index, q.size, True, q.ring.desc_addr, q.ring.avail_addr,
                                   q.ring.used_addr, q.kick, q.call, q.err))
        self.backend.start(self.memory, self.features, described)
        return self.queues

    def make_queue(self, index, size):
        """A DriverQueue in this memory, not yet handed to the back-end (start()
        does that; a test of the protocol may set it up message by message)."""
        if DriverRing.ring_size(size) > 0x10000:
            raise DriverError(f"queue {index}: {size} entries do not fit in 64 KiB")
        self.queues[index] = DriverQueue(self.memory, index, RINGS + index * 0x10000, size)
        return self.queues[index]

    def reconnect(self, where=None, timeout=None, protocol=SUPPORTED_PROTOCOL_FEATURES):
        """vhost-user: after the back-end went (killed, restarted), take the
        next one at where (a socket path or a Connection; default: the path
        the driver was made with) and replay the device on it as pyvmm run's
        reconnect=S does: handshake, features, memory table, the kept inflight
        area, each started queue from its used index, a kick. Requests in
        flight stay in flight, for the new back-end to complete."""
        from pyvmm.vhost.user.channel import Connection
        from pyvmm.vhost.user.frontend import VhostUserFrontend
        where = self.where if where is None else where
        if where is None:
            raise DriverError("reconnect: give the back-end's socket path or a Connection")
        timeout = self.timeout if timeout is None else timeout
        if isinstance(where, Connection):
            frontend = VhostUserFrontend(where)
        else:
            frontend = VhostUserFrontend.connect(where, "the back-end", timeout)
        try:
            frontend.negotiate(want_protocol=protocol)
            self.backend.replace(frontend)
        except BaseException:
            frontend.close()
            raise

    def alloc(self, size, align=64):
        """size bytes of guest memory for a request's buffers, within one region."""
        gpa = (self._next + align - 1) & ~(align - 1)
        region = next((r for r in self.memory.regions if r.guest_phys_addr <= gpa < r.end), None)
        if region is not None and gpa + size > region.end:
            gpa = region.end                 # buffers never straddle two regions
            region = next((r for r in self.memory.regions if r.guest_phys_addr == gpa), None)
        if region is None:
            if all(not q.in_flight for q in self.queues.values()):
                self._next = SCRATCH         # nothing in flight: start over
                return self.alloc(size, align)
            raise DriverError(f"no room for {size} more bytes of buffers")
        self._next = gpa + size
        return gpa

    def seek(self, gpa):
        """The next buffers from guest address gpa on (at or above SCRATCH)."""
        self._next = max(gpa, SCRATCH)

    def write(self, gpa, data):
        self.memory.write(gpa, data)

    def read(self, gpa, length):
        return self.memory.read(gpa, length)

    def close(self):
        try:
            self.backend.stop()
            self.backend.close()
        finally:
            for q in self.queues.values():
                q.close()
            self.memory.close()


def vhost_user(where, config_size=0, timeout=10.0, memory=None,
               protocol=SUPPORTED_PROTOCOL_FEATURES):
    """A Driver on a vhost-user back-end (negotiated): where is the path it
    listens on, or a Connection already made to it (which the driver then owns);
    memory: a GuestMemory to use; protocol: the protocol features to ack
    where the back-end offers them."""
    from pyvmm.devices.virtio.vhost_user import VhostUserBackend
    from pyvmm.vhost.user.channel import Connection
    from pyvmm.vhost.user.frontend import VhostUserFrontend
    if isinstance(where, Connection):
        frontend, name = VhostUserFrontend(where), where.name
    else:
        frontend, name = VhostUserFrontend.connect(where, "the back-end", timeout), str(where)
    try:
        frontend.negotiate(want_protocol=protocol)
        backend = VhostUserBackend(frontend, f"the vhost-user back-end at {name}",
                                   config_size=config_size)
    except BaseException:
        frontend.close()
        if memory is not None:
            memory.close()
        raise
    driver = Driver(backend, memory=memory, timeout=timeout)
    if not isinstance(where, Connection):
        driver.where = str(where)
    return driver


def vhost_net(tap_name, address=None):
    """A Driver on the kernel's vhost-net with tap tap_name (created, up;
    address, an ipaddress.ip_interface, on the host side if given)."""
    from pyvmm.devices.virtio.vhost_kernel import VhostKernelNetBackend
    from pyvmm.sys.tap import Tap
    from pyvmm.vhost.kernel import VhostKernelNet
    vhost = VhostKernelNet()
    try:
        tap = Tap(tap_name)
    except BaseException:
        vhost.close()
        raise
    try:
        if address is not None:
            tap.configure(address)
        else:
            tap.up()
        backend = VhostKernelNetBackend([vhost], tap)
    except BaseException:
        tap.close()
        vhost.close()
        raise
    return Driver(backend)


def vhost_scsi(image=None, wwpn=None, tpgt=1):
    """A Driver on the kernel's vhost-scsi: on a target made in configfs with
    image as LUN 0 of target tpgt (taken away at close), or on the existing
    target wwpn. Start it with queues 0, 1 and 2 (control, events, requests)."""
    from pyvmm.devices.virtio.vhost_kernel import VhostKernelScsiBackend
    return Driver(VhostKernelScsiBackend.open(image, wwpn, tpgt,
                                              name=f"pyvmm{os.getpid()}_driver"))


__all__ = ["Driver", "DriverError", "vhost_net", "vhost_scsi", "vhost_user"]
