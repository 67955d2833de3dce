"""virtio-vsock: the model the guest sees; its streams go through a back-end
(vhost_kernel.py: the kernel's vhost-vsock).

The guest gets AF_VSOCK sockets with address `cid`; the host reaches it with
AF_VSOCK and that CID, and the guest reaches the host at CID 2. The back-end
serves the receive and transmit queues; the event queue (2) stays with
pyvmm, which has no transport events to send.
"""

from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.virtio import spec

RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2


class VirtioVsock(VirtioDevice):
    device_id = spec.VIRTIO_ID_VSOCK
    num_queues = 3
    queue_max_size = 256

    def __init__(self, backend, cid, name="virtio-vsock"):
        super().__init__(backend, name)
        self.cid = cid

    def vhost_queues(self):
        return (RX_QUEUE, TX_QUEUE)

    def config(self):
        # struct virtio_vsock_config: guest_cid (le64)
        return self.cid.to_bytes(8, "little")
