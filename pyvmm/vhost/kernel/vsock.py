"""vhost-vsock: the kernel is the host end of a guest's AF_VSOCK sockets.

drivers/vhost/vsock.c. The guest device has three queues: 0 receive,
1 transmit (both served by vhost), 2 events (the VMM's; pyvmm sends none).
"""

import ctypes
import errno

from pyvmm.sys.ioctl import ioctl
from pyvmm.vhost.backend import VhostError
from pyvmm.vhost.kernel import uapi
from pyvmm.vhost.kernel.base import VhostKernelBackend

# CIDs 0-2 are reserved: hypervisor, local, host (linux/vm_sockets.h).
VMADDR_CID_HOST = 2


class VhostKernelVsock(VhostKernelBackend):
    device = "/dev/vhost-vsock"
    module = "vhost_vsock"

    def set_guest_cid(self, cid):
        """VHOST_VSOCK_SET_GUEST_CID: the address this guest answers to."""
        if not VMADDR_CID_HOST < cid < 0xFFFF_FFFF:
            raise VhostError(f"vsock CID {cid}: use a number from 3 to 4294967294")
        try:
            ioctl(self.fd, uapi.VHOST_VSOCK_SET_GUEST_CID, ctypes.c_uint64(cid),
                  name="VHOST_VSOCK_SET_GUEST_CID")
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise VhostError(f"vsock CID {cid} is already taken by another VM; "
                                 f"pick another with --vsock vhost-kernel,cid=N") from None
            raise VhostError(f"{self.path}: {e.strerror}") from None

    def set_running(self, running):
        """VHOST_VSOCK_SET_RUNNING: start (1) or stop (0) moving packets."""
        self._ioctl(uapi.VHOST_VSOCK_SET_RUNNING, ctypes.c_int(1 if running else 0),
                    "VHOST_VSOCK_SET_RUNNING")
