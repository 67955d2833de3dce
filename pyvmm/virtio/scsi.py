"""virtio-scsi as <linux/virtio_scsi.h> defines it (virtio 1.2, 5.6): the
config space, the request and response of the request queues, and how a
LUN is written. The device model (devices/virtio/scsi.py) and the
guest-less driver both speak it; with vhost-scsi the kernel is the device.

A request is one chain: the driver's header (LUN, tag, task attributes, the
CDB) and any data to write, then the device's response (sense data,
residual, status) and any data to read.
"""

import struct

# Queues: 0 control (task management), 1 events (hot-plug), 2.. requests.
CONTROL_QUEUE, EVENT_QUEUE, FIRST_REQUEST_QUEUE = 0, 1, 2

# Feature bits
VIRTIO_SCSI_F_INOUT = 0          # one request may both write and read data
VIRTIO_SCSI_F_HOTPLUG = 1        # the event queue reports targets coming and going
VIRTIO_SCSI_F_CHANGE = 2
VIRTIO_SCSI_F_T10_PI = 3         # protection information with each request

# struct virtio_scsi_config: num_queues, seg_max, max_sectors, cmd_per_lun,
# event_info_size, sense_size, cdb_size, max_channel, max_target, max_lun.
# The driver may write sense_size and cdb_size; Linux writes the defaults.
CONFIG = struct.Struct("<IIIIIIIHHI")        # 36 bytes
VIRTIO_SCSI_CDB_SIZE = 32
VIRTIO_SCSI_SENSE_SIZE = 96
VIRTIO_SCSI_MAX_TARGET = 255                 # a target is one byte of the LUN field
VIRTIO_SCSI_MAX_LUN = 16383                  # a LUN is 14 bits of it

# struct virtio_scsi_cmd_req: lun[8], tag (le64), task_attr, prio, crn, cdb[32]
CMD_REQ = struct.Struct(f"<8sQBBB{VIRTIO_SCSI_CDB_SIZE}s")          # 51 bytes
# struct virtio_scsi_cmd_resp: sense_len, resid (le32), status_qualifier (le16),
# status, response, sense[96]
CMD_RESP = struct.Struct(f"<IIHBB{VIRTIO_SCSI_SENSE_SIZE}s")        # 108 bytes

VIRTIO_SCSI_S_SIMPLE = 0                     # task_attr

# response: how the transport fared (status is the SCSI status of the command)
VIRTIO_SCSI_S_OK = 0
RESPONSES = {0: "OK", 1: "OVERRUN", 2: "ABORTED", 3: "BAD_TARGET", 4: "RESET", 5: "BUSY",
             6: "TRANSPORT_FAILURE", 7: "TARGET_FAILURE", 8: "NEXUS_FAILURE", 9: "FAILURE"}
SAM_STAT_GOOD = 0x00
SAM_STAT_CHECK_CONDITION = 0x02


def lun_bytes(target, lun):
    """The 8-byte LUN field: 1, the target, then the LUN in SAM's flat
    addressing (0x40 | high 6 bits, low 8 bits), then zeros."""
    if not 0 <= target <= VIRTIO_SCSI_MAX_TARGET or not 0 <= lun <= VIRTIO_SCSI_MAX_LUN:
        raise ValueError(f"target {target}, LUN {lun}: out of range")
    return bytes([1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0])


def config(num_request_queues, queue_size):
    """The config space pyvmm offers (what QEMU's vhost-scsi offers, too)."""
    return CONFIG.pack(num_request_queues,
                       queue_size - 2,          # seg_max: the header and response take two
                       0xFFFF,                  # max_sectors
                       128,                     # cmd_per_lun
                       16,                      # event_info_size: struct virtio_scsi_event
                       VIRTIO_SCSI_SENSE_SIZE, VIRTIO_SCSI_CDB_SIZE,
                       0,                       # max_channel
                       VIRTIO_SCSI_MAX_TARGET, VIRTIO_SCSI_MAX_LUN)
