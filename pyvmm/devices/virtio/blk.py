"""virtio-blk: a disk whose requests a back-end serves (vhost_user.py).

The model knows the feature bits of <linux/virtio_blk.h> and the layout of
struct virtio_blk_config; the back-end decides which bits it offers and
fills the config space (capacity, block size, queue count, ...), which the
model reads from a cache the back-end keeps (and refreshes when it says
the config changed).
"""

import struct

from pyvmm.devices.virtio.device import RING_FEATURES, VirtioDevice
from pyvmm.virtio import spec

# <linux/virtio_blk.h>
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# For --trace: the device-specific bits by name.
BLK_FEATURE_NAMES = {
    VIRTIO_BLK_F_SIZE_MAX: "SIZE_MAX", VIRTIO_BLK_F_SEG_MAX: "SEG_MAX",
    VIRTIO_BLK_F_GEOMETRY: "GEOMETRY", VIRTIO_BLK_F_RO: "RO", VIRTIO_BLK_F_BLK_SIZE: "BLK_SIZE",
    VIRTIO_BLK_F_FLUSH: "FLUSH", VIRTIO_BLK_F_TOPOLOGY: "TOPOLOGY",
    VIRTIO_BLK_F_CONFIG_WCE: "CONFIG_WCE", VIRTIO_BLK_F_MQ: "MQ", VIRTIO_BLK_F_DISCARD: "DISCARD",
    VIRTIO_BLK_F_WRITE_ZEROES: "WRITE_ZEROES",
}

# Passed on when the back-end offers them. Not CONFIG_WCE: it makes a config
# field writable, and pyvmm never talks to a back-end while a vCPU waits.
BLK_BACKEND_FEATURES = RING_FEATURES | spec.bits(
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES)

# struct virtio_blk_config, up to write_zeroes_may_unmap and its padding.
VIRTIO_BLK_CONFIG_SIZE = 60
CAPACITY = struct.Struct("<Q")       # at 0, in 512-byte sectors
BLK_SIZE_OFFSET = 20                 # u32
NUM_QUEUES_OFFSET = 34               # u16
SECTOR = 512
VIRTIO_BLK_S_IOERR = 1


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
            self.num_queues = max(1, min(asked, max_queues))

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
