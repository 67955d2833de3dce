"""The in-kernel vhost user API (<linux/vhost.h>, <linux/vhost_types.h>), as ctypes."""

import ctypes
from ctypes import c_char, c_int, c_uint, c_uint32, c_uint64, c_ushort

from pyvmm.sys.ioctl import _IO, _IOR, _IOW, _IOWR

VHOST_VIRTIO = 0xAF
VHOST_FILE_UNBIND = -1
VHOST_VRING_F_LOG = 0

# Feature bits of the vhost layer itself (vhost_types.h)
VHOST_F_LOG_ALL = 26
VHOST_NET_F_VIRTIO_NET_HDR = 27


class vhost_vring_state(ctypes.Structure):
    _fields_ = [("index", c_uint), ("num", c_uint)]


class vhost_vring_file(ctypes.Structure):
    _fields_ = [("index", c_uint), ("fd", c_int)]


class vhost_vring_addr(ctypes.Structure):
    _fields_ = [("index", c_uint), ("flags", c_uint), ("desc_user_addr", c_uint64),
                ("used_user_addr", c_uint64), ("avail_user_addr", c_uint64),
                ("log_guest_addr", c_uint64)]


class vhost_memory_region(ctypes.Structure):
    _fields_ = [("guest_phys_addr", c_uint64), ("memory_size", c_uint64),
                ("userspace_addr", c_uint64), ("flags_padding", c_uint64)]


class vhost_scsi_target(ctypes.Structure):
    """What VHOST_SCSI_SET_ENDPOINT binds to: a vhost target's WWPN in configfs
    (/sys/kernel/config/target/vhost/WWPN). Since ABI 1 the kernel ignores
    vhost_tpgt and gives the guest every TPG under the WWPN."""
    _fields_ = [("abi_version", c_int), ("vhost_wwpn", c_char * 224),
                ("vhost_tpgt", c_ushort), ("reserved", c_ushort)]


VHOST_SCSI_ABI_VERSION = 1


def vhost_memory(n):
    """struct vhost_memory with room for n regions (a flexible array in C)."""
    class vhost_memory(ctypes.Structure):
        _fields_ = [("nregions", c_uint32), ("padding", c_uint32),
                    ("regions", vhost_memory_region * n)]
    return vhost_memory


VHOST_GET_FEATURES = _IOR(VHOST_VIRTIO, 0x00, c_uint64)
VHOST_SET_FEATURES = _IOW(VHOST_VIRTIO, 0x00, c_uint64)
VHOST_SET_OWNER = _IO(VHOST_VIRTIO, 0x01)
VHOST_RESET_OWNER = _IO(VHOST_VIRTIO, 0x02)
VHOST_SET_MEM_TABLE = _IOW(VHOST_VIRTIO, 0x03, vhost_memory(0))
VHOST_SET_LOG_BASE = _IOW(VHOST_VIRTIO, 0x04, c_uint64)
VHOST_SET_LOG_FD = _IOW(VHOST_VIRTIO, 0x07, c_int)
VHOST_SET_VRING_NUM = _IOW(VHOST_VIRTIO, 0x10, vhost_vring_state)
VHOST_SET_VRING_ADDR = _IOW(VHOST_VIRTIO, 0x11, vhost_vring_addr)
VHOST_SET_VRING_BASE = _IOW(VHOST_VIRTIO, 0x12, vhost_vring_state)
VHOST_GET_VRING_BASE = _IOWR(VHOST_VIRTIO, 0x12, vhost_vring_state)
VHOST_SET_VRING_KICK = _IOW(VHOST_VIRTIO, 0x20, vhost_vring_file)
VHOST_SET_VRING_CALL = _IOW(VHOST_VIRTIO, 0x21, vhost_vring_file)
VHOST_SET_VRING_ERR = _IOW(VHOST_VIRTIO, 0x22, vhost_vring_file)
VHOST_NET_SET_BACKEND = _IOW(VHOST_VIRTIO, 0x30, vhost_vring_file)
VHOST_VSOCK_SET_GUEST_CID = _IOW(VHOST_VIRTIO, 0x60, c_uint64)
VHOST_VSOCK_SET_RUNNING = _IOW(VHOST_VIRTIO, 0x61, c_int)
# vhost-scsi. GET_ABI_VERSION is declared _IOW though the kernel writes the
# int: "changing this breaks userspace" (vhost.h).
VHOST_SCSI_SET_ENDPOINT = _IOW(VHOST_VIRTIO, 0x40, vhost_scsi_target)
VHOST_SCSI_CLEAR_ENDPOINT = _IOW(VHOST_VIRTIO, 0x41, vhost_scsi_target)
VHOST_SCSI_GET_ABI_VERSION = _IOW(VHOST_VIRTIO, 0x42, c_int)
VHOST_SCSI_SET_EVENTS_MISSED = _IOW(VHOST_VIRTIO, 0x43, c_uint32)
VHOST_SCSI_GET_EVENTS_MISSED = _IOW(VHOST_VIRTIO, 0x44, c_uint32)
