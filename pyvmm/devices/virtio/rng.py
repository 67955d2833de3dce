"""virtio-rng: the entropy device (virtio 1.x 5.4). One queue of
device-writable buffers that the back-end fills with random bytes; no
config space, no feature bits of its own. Linux's virtio_rng makes it
/dev/hwrng.
"""

from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.virtio import spec


class VirtioRng(VirtioDevice):
    device_id = spec.VIRTIO_ID_RNG
    num_queues = 1

    def config(self):
        return b""
