"""virtio-fs requests as <linux/fuse.h> lays them out (virtio 1.x 5.11):
each request is a FUSE message, a device-readable part (fuse_in_header and
the opcode's arguments) then a device-writable part (fuse_out_header and
the reply). Queue 0 is hiprio, requests go on queue 1 and up.
"""

import struct

HIPRIO_QUEUE, REQUEST_QUEUE = 0, 1

FUSE_LOOKUP = 1
FUSE_GETATTR = 3
FUSE_INIT = 26

FUSE_ROOT_ID = 1
FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION = 7, 31

# struct fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
# struct fuse_out_header: len, error (a negative errno), unique
OUT_HEADER = struct.Struct("<IiQ")
# struct fuse_init_in (its first four fields): major, minor, max_readahead, flags
INIT_IN = struct.Struct("<IIII")
# struct fuse_entry_out begins with nodeid
ENTRY_NODEID = struct.Struct("<Q")
