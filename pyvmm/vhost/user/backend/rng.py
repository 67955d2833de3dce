"""virtio-rng (virtio id 4) as a vhost-user back-end: entropy from the host.

One queue; each request is a chain of device-writable buffers, which the
device fills from os.urandom(), up to MAX_PER_REQUEST bytes (the device
may fill less than the buffers: virtio 1.x 5.4.6.1; a guest must not have
it make gigabytes in one piece). A readable buffer in a request has
nothing to say to an entropy source: such a request comes back with
nothing written.
"""

import os

from pyvmm.vhost.user.backend.device import BackendDevice
from pyvmm.virtio import spec
from pyvmm.virtio.device_ring import pieces

MAX_PER_REQUEST = 64 << 10


class Rng(BackendDevice):
    device_id = spec.VIRTIO_ID_RNG
    name = "rng"
    num_queues = 1

    def handle_queue(self, index, ring, memory):
        while (chain := ring.pop()) is not None:
            written = 0
            if all(buf.writable for buf in chain.buffers):
                for addr, length in pieces(chain.buffers, 0, MAX_PER_REQUEST):
                    memory.write(addr, os.urandom(length))
                    written += length
            ring.push(chain.head, written)
