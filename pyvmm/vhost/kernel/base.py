"""The ioctls every /dev/vhost-* driver shares (drivers/vhost/vhost.c).

Each wrapper is one ioctl; its docstring says what the kernel does with it.
"""

import ctypes
import os

from pyvmm.sys.chardev import open_chardev
from pyvmm.sys.ioctl import ioctl
from pyvmm.vhost.backend import VhostBackend, VhostError
from pyvmm.vhost.kernel import uapi


class VhostKernelBackend(VhostBackend):
    #: the character device, e.g. /dev/vhost-net; the module that provides it
    device = None
    module = None

    def __init__(self, device=None):
        super().__init__()
        self.path = path = device or self.device
        self.fd = open_chardev(path, VhostError,
                               missing=f"load the driver with 'modprobe {self.module}'",
                               no_permission="run as root, or give your user access to it")

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _ioctl(self, request, arg, name):
        try:
            return ioctl(self.fd, request, arg, name=name)
        except OSError as e:
            raise VhostError(f"{self.path}: {e.strerror}") from None

    def set_owner(self):
        """VHOST_SET_OWNER: bind the device to this process (and its memory map)."""
        self._ioctl(uapi.VHOST_SET_OWNER, 0, "VHOST_SET_OWNER")

    def get_features(self):
        """VHOST_GET_FEATURES: the virtio (and vhost) feature bits the driver offers."""
        features = ctypes.c_uint64()
        self._ioctl(uapi.VHOST_GET_FEATURES, features, "VHOST_GET_FEATURES")
        return features.value

    def set_features(self, features):
        """VHOST_SET_FEATURES: the bits the guest acked (ring layout, header size...)."""
        self._ioctl(uapi.VHOST_SET_FEATURES, ctypes.c_uint64(features), "VHOST_SET_FEATURES")

    def _set_mem_table(self, regions):
        """VHOST_SET_MEM_TABLE: how to turn guest-physical addresses into ours."""
        table = uapi.vhost_memory(len(regions))(nregions=len(regions))
        for i, r in enumerate(regions):
            table.regions[i] = uapi.vhost_memory_region(
                guest_phys_addr=r.guest_phys_addr, memory_size=r.size,
                userspace_addr=r.host_addr)
        self._ioctl(uapi.VHOST_SET_MEM_TABLE, table, "VHOST_SET_MEM_TABLE")

    def _set_vring_num(self, index, num):
        """VHOST_SET_VRING_NUM: the queue's size."""
        self._ioctl(uapi.VHOST_SET_VRING_NUM, uapi.vhost_vring_state(index, num),
                    "VHOST_SET_VRING_NUM")

    def set_vring_base(self, index, base):
        """VHOST_SET_VRING_BASE: the next available-ring index the device will read."""
        self._ioctl(uapi.VHOST_SET_VRING_BASE, uapi.vhost_vring_state(index, base),
                    "VHOST_SET_VRING_BASE")

    def get_vring_base(self, index):
        """VHOST_GET_VRING_BASE: stop the queue; where the device got to."""
        state = uapi.vhost_vring_state(index, 0)
        self._ioctl(uapi.VHOST_GET_VRING_BASE, state, "VHOST_GET_VRING_BASE")
        return state.num

    def _set_vring_addr(self, index, desc, avail, used, log):
        """VHOST_SET_VRING_ADDR: the rings, as addresses in our own address space."""
        addr = uapi.vhost_vring_addr(
            index=index, flags=(1 << uapi.VHOST_VRING_F_LOG) if log is not None else 0,
            desc_user_addr=desc, used_user_addr=used, avail_user_addr=avail,
            log_guest_addr=log or 0)
        self._ioctl(uapi.VHOST_SET_VRING_ADDR, addr, "VHOST_SET_VRING_ADDR")

    def _set_vring_file(self, request, name, index, fd):
        self._ioctl(request, uapi.vhost_vring_file(index, uapi.VHOST_FILE_UNBIND if fd is None
                                                    else fd), name)

    def set_vring_kick(self, index, fd):
        """VHOST_SET_VRING_KICK: the eventfd that says "look at the avail ring"."""
        self._set_vring_file(uapi.VHOST_SET_VRING_KICK, "VHOST_SET_VRING_KICK", index, fd)

    def set_vring_call(self, index, fd):
        """VHOST_SET_VRING_CALL: the eventfd the driver signals after using buffers."""
        self._set_vring_file(uapi.VHOST_SET_VRING_CALL, "VHOST_SET_VRING_CALL", index, fd)

    def set_vring_err(self, index, fd):
        """VHOST_SET_VRING_ERR: the eventfd signalled when the guest's ring is broken."""
        self._set_vring_file(uapi.VHOST_SET_VRING_ERR, "VHOST_SET_VRING_ERR", index, fd)

    def set_log_base(self, address):
        """VHOST_SET_LOG_BASE: the dirty-page bitmap (for migration)."""
        self._ioctl(uapi.VHOST_SET_LOG_BASE, ctypes.c_uint64(address), "VHOST_SET_LOG_BASE")

    def set_log_fd(self, fd):
        """VHOST_SET_LOG_FD: the eventfd signalled when the log bitmap was written."""
        self._ioctl(uapi.VHOST_SET_LOG_FD, ctypes.c_int(fd), "VHOST_SET_LOG_FD")

