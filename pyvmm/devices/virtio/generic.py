"""Any device type a vhost-user back-end serves, for which pyvmm has no model.

The device id, queue count and queue size come from the command line; the
config space is the back-end's own (GET_CONFIG, cached, refreshed when it
says it changed) and guest writes to it go to the back-end (SET_CONFIG).
The feature bits offered are the back-end's: its device-specific bits
(0-23 and 41 up) as they are, and of the transport's (24-40) only those
pyvmm's transports serve.
"""

from pyvmm.devices.virtio.device import RING_FEATURES, VirtioDevice

# Bits 24 to 40 belong to the transport and the ring (virtio 1.x 6).
TRANSPORT_BITS = ((1 << 41) - 1) & ~((1 << 24) - 1)
PASSED_ON = ~TRANSPORT_BITS | RING_FEATURES


class VirtioGeneric(VirtioDevice):
    def __init__(self, backend, device_id, num_queues, queue_size, name):
        super().__init__(backend, name)
        self.device_id = device_id
        self.num_queues = num_queues
        self.queue_max_size = queue_size
        self.backend_features = PASSED_ON & ((1 << 64) - 1)

    def config(self):
        return self.backend.config_space

    def write_config(self, offset, data):
        self.backend.write_config(offset, data)
