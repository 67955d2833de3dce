"""virtio-fs: a shared file system (virtio 1.x 5.11) whose FUSE requests a
back-end such as virtiofsd serves.

The config space is pyvmm's to give, since virtiofsd has none: the tag the
guest mounts (`mount -t virtiofs TAG /mnt`) and how many request queues
there are. Queue 0 is the high-priority queue (FUSE_INTERRUPT, FORGET),
queues 1..N carry requests; the back-end serves them all.
"""

import struct

from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.virtio import spec

# struct virtio_fs_config: tag[36], num_request_queues (le32)
TAG_BYTES = 36
CONFIG = struct.Struct(f"<{TAG_BYTES}sI")


class VirtioFs(VirtioDevice):
    device_id = spec.VIRTIO_ID_FS
    queue_max_size = 256

    def __init__(self, backend, tag, request_queues=1, name="virtio-fs"):
        super().__init__(backend, name)
        self.tag = tag
        self.request_queues = request_queues
        self.num_queues = 1 + request_queues

    def config(self):
        return CONFIG.pack(self.tag.encode(), self.request_queues)
