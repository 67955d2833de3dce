"""virtio-vsock as <linux/virtio_vsock.h> defines it (virtio 1.x 5.10).

Three queues: rx (packets to the guest), tx (packets from it), event. A
packet is a header, struct virtio_vsock_hdr (44 bytes, packed), then `len`
bytes of payload (RW packets only).
"""

import struct

RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2

VMADDR_CID_HOST = 2

# struct virtio_vsock_hdr: src_cid, dst_cid, src_port, dst_port, len, type,
# op, flags, buf_alloc, fwd_cnt
HDR = struct.Struct("<QQIIIHHIII")

VIRTIO_VSOCK_TYPE_STREAM = 1

VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7

OP_NAMES = {1: "REQUEST", 2: "RESPONSE", 3: "RST", 4: "SHUTDOWN", 5: "RW",
            6: "CREDIT_UPDATE", 7: "CREDIT_REQUEST"}

# SHUTDOWN flags
VIRTIO_VSOCK_SHUTDOWN_RCV = 1       # the sender will receive no more
VIRTIO_VSOCK_SHUTDOWN_SEND = 2      # the sender will send no more

# struct virtio_vsock_config: guest_cid
CONFIG = struct.Struct("<Q")
