"""virtio-blk as <linux/virtio_blk.h> defines it: feature bits, the config
space and the request format. The device model (devices/virtio/blk.py)
and the back-end (vhost/user/backend/blk.py) both speak it.

A request is one chain: a 16-byte header the driver wrote (type, reserved,
sector), then the data (device-readable for OUT, device-writable for IN and
GET_ID), then one device-writable status byte.
"""

import struct

SECTOR = 512                         # capacity and sector numbers count these

# Feature bits
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

# struct virtio_blk_config, up to write_zeroes_may_unmap and its padding:
# capacity, size_max, seg_max, geometry (cylinders, heads, sectors), blk_size,
# topology (physical_block_exp, alignment_offset, min_io_size, opt_io_size),
# wce, unused0, num_queues, max_discard_sectors, max_discard_seg,
# discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
# write_zeroes_may_unmap.
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
VIRTIO_BLK_CONFIG_SIZE = CONFIG.size         # 60
CAPACITY = struct.Struct("<Q")               # at 0, in sectors
BLK_SIZE_OFFSET = 20                         # u32
NUM_QUEUES_OFFSET = 34                       # u16

# Request types
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
OUTHDR = struct.Struct("<IIQ")               # struct virtio_blk_outhdr: type, ioprio, sector
VIRTIO_BLK_ID_BYTES = 20

# struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags
DISCARD_SEGMENT = struct.Struct("<QII")
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

# Status
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
