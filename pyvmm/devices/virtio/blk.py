"""virtio-blk: a disk whose requests a back-end serves (vhost_user.py).

The model knows the feature bits and config layout (pyvmm/virtio/blk.py,
from <linux/virtio_blk.h>); the back-end decides which bits it offers and
fills the config space (capacity, block size, queue count, ...), which the
model reads from a cache the back-end keeps (and refreshes when it says
the config changed).
"""

import struct

from pyvmm.devices.virtio.device import MAX_QUEUES, RING_FEATURES, VirtioDevice
from pyvmm.virtio import spec
from pyvmm.virtio.blk import (  # noqa: F401  (names the model's users import from here)
    BLK_FEATURE_NAMES, BLK_SIZE_OFFSET, CAPACITY, NUM_QUEUES_OFFSET, SECTOR,
    VIRTIO_BLK_CONFIG_SIZE, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR)

# Passed on when the back-end offers them. Not CONFIG_WCE: it makes a config
# field writable, and pyvmm never talks to a back-end while a vCPU waits.
BLK_BACKEND_FEATURES = RING_FEATURES | spec.bits(
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES)


class VirtioBlk(VirtioDevice):
    device_id = spec.VIRTIO_ID_BLOCK
    queue_max_size = 256
    backend_features = BLK_BACKEND_FEATURES

    def __init__(self, backend, name="virtio-blk", max_queues=1):
        """backend: a QueueBackend with a config_space (a vhost-user back-end);
        max_queues: how many queues the back-end serves (GET_QUEUE_NUM)."""
        super().__init__(backend, name)
        offered = backend.features()
        self.num_queues = 1
        if offered & spec.bit(VIRTIO_BLK_F_MQ):
            asked = struct.unpack_from("<H", self._raw_config(), NUM_QUEUES_OFFSET)[0]
            self.num_queues = max(1, min(asked, max_queues, MAX_QUEUES))

    def _raw_config(self):
        return self.backend.config_space.ljust(VIRTIO_BLK_CONFIG_SIZE, b"\0")

    def config(self):
        data = bytearray(self._raw_config())
        if self.features & spec.bit(VIRTIO_BLK_F_MQ):
            struct.pack_into("<H", data, NUM_QUEUES_OFFSET, self.num_queues)
        return bytes(data)

    def fail_request(self, memory, chain):
        """VIRTIO_BLK_S_IOERR in the status byte: the last byte of the last buffer."""
        last = chain.buffers[-1] if chain.buffers else None
        if last is None or not last.writable or not last.length:
            return 0
        memory.write(last.addr + last.length - 1, bytes([VIRTIO_BLK_S_IOERR]))
        return 1

    @property
    def capacity(self):
        """The disk's size in bytes."""
        return CAPACITY.unpack_from(self._raw_config())[0] * SECTOR

    @property
    def block_size(self):
        if self.features & spec.bit(VIRTIO_BLK_F_BLK_SIZE):
            return struct.unpack_from("<I", self._raw_config(), BLK_SIZE_OFFSET)[0]
        return SECTOR

    @property
    def read_only(self):
        return bool(self.features & spec.bit(VIRTIO_BLK_F_RO))
