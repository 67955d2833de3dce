"""virtio-rng (virtio id 4) as a vhost-user back-end: entropy from the host.

One queue; each request is a chain of device-writable buffers, which the
device fills from os.urandom(). A readable buffer in a request has nothing
to say to an entropy source: such a request comes back with nothing
written.
"""

import os

from pyvmm.vhost.user.backend.device import BackendDevice
from pyvmm.virtio import spec


class Rng(BackendDevice):
    device_id = spec.VIRTIO_ID_RNG
    name = "rng"
    num_queues = 1

    def handle_queue(self, index, ring, memory):
        while (chain := ring.pop()) is not None:
            written = 0
            if all(buf.writable for buf in chain.buffers):
                for buf in chain.buffers:
                    memory.write(buf.addr, os.urandom(buf.length))
                    written += buf.length
            ring.push(chain.head, written)
