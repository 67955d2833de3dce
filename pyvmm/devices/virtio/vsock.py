"""virtio-vsock whose data path is the kernel's vhost-vsock.

The guest gets AF_VSOCK sockets with address `cid`; the host reaches it with
AF_VSOCK and that CID, and the guest reaches the host at CID 2. vhost-vsock
serves the receive and transmit queues; the event queue (2) stays with
pyvmm, which has no transport events to send.
"""

import logging

from pyvmm.devices.virtio.device import DeviceError, VirtioDevice
from pyvmm.vhost.backend import VhostError, VringAddr
from pyvmm.vhost.kernel import VhostKernelVsock
from pyvmm.virtio import spec

log = logging.getLogger("pyvmm.virtio.vsock")

RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2


class VhostKernelVsockDevice(VirtioDevice):
    device_id = spec.VIRTIO_ID_VSOCK
    num_queues = 3
    queue_max_size = 256

    def __init__(self, cid, name="virtio-vsock"):
        self.name = name
        self.cid = cid
        self.vhost = VhostKernelVsock()
        try:
            self.vhost.set_owner()
            self.vhost.set_guest_cid(cid)
        except VhostError:
            self.vhost.close()
            raise
        self.vhost_features = self.vhost.get_features()
        self._features = self.vhost_features & spec.bits(
            spec.VIRTIO_F_VERSION_1, spec.VIRTIO_RING_F_INDIRECT_DESC, spec.VIRTIO_RING_F_EVENT_IDX)
        self._started = []

    @property
    def features(self):
        return self._features

    def vhost_queues(self):
        return (RX_QUEUE, TX_QUEUE)

    def config(self):
        # struct virtio_vsock_config: guest_cid (le64)
        return self.cid.to_bytes(8, "little")

    def activate(self, memory, features, queues):
        try:
            self.vhost.set_features(features & self.vhost_features)
            self.vhost.set_mem_table(memory)
            for q in queues:
                if q.index not in self.vhost_queues():
                    continue
                self.vhost.start_vring(q.index, q.size, VringAddr(q.desc, q.avail, q.used),
                                       q.kick_fd, q.call_fd, q.err_fd)
                self._started.append(q.index)
            self.vhost.set_running(True)
        except VhostError as e:
            self.reset()
            raise DeviceError(str(e)) from None
        log.debug("%s: vhost-vsock running as CID %d", self.name, self.cid)

    def reset(self):
        if self._started:
            try:
                self.vhost.set_running(False)
                for index in self._started:
                    self.vhost.get_vring_base(index)
            except VhostError as e:
                log.warning("%s: stopping: %s", self.name, e)
        self._started = []

    def close(self):
        self.reset()
        self.vhost.close()
