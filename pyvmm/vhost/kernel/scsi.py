"""vhost-scsi: the kernel's SCSI target (LIO) serves a guest's virtio-scsi
queues.

drivers/vhost/scsi.c. The target is made beforehand in configfs (a
backstore, /sys/kernel/config/target/vhost/WWPN/tpgt_N with a nexus and
LUNs; scsi_target.py does it for `--scsi vhost-kernel,image=PATH`).
VHOST_SCSI_SET_ENDPOINT then binds the device to every TPG under WWPN,
once its rings are set up (the kernel checks each ring it will serve).
The guest device's queues are 0 control, 1 events, 2 and on requests, all
of them served by vhost-scsi; the guest addresses target tpgt, LUN N.
"""

import ctypes
import errno

from pyvmm.sys.ioctl import ioctl
from pyvmm.vhost.backend import VhostError
from pyvmm.vhost.kernel import uapi
from pyvmm.vhost.kernel.base import VhostKernelBackend
from pyvmm.vhost.kernel.scsi_target import TARGET


def scsi_target(wwpn):
    """struct vhost_scsi_target for wwpn (at most 223 bytes, NUL-terminated)."""
    name = wwpn.encode()
    if not name or len(name) >= 224 or b"\0" in name:
        raise VhostError(f"wwpn {wwpn!r}: give a name of 1 to 223 bytes, e.g. naa.500140512345678")
    return uapi.vhost_scsi_target(abi_version=uapi.VHOST_SCSI_ABI_VERSION, vhost_wwpn=name)


class VhostKernelScsi(VhostKernelBackend):
    device = "/dev/vhost-scsi"
    module = "vhost_scsi"

    def get_abi_version(self):
        """VHOST_SCSI_GET_ABI_VERSION: the kernel's (1 since 2013)."""
        version = ctypes.c_int()
        self._ioctl(uapi.VHOST_SCSI_GET_ABI_VERSION, version, "VHOST_SCSI_GET_ABI_VERSION")
        return version.value

    def set_endpoint(self, wwpn):
        """VHOST_SCSI_SET_ENDPOINT: serve the guest from the TPGs under wwpn."""
        try:
            ioctl(self.fd, uapi.VHOST_SCSI_SET_ENDPOINT, scsi_target(wwpn),
                  name="VHOST_SCSI_SET_ENDPOINT")
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.EEXIST):
                # No TPG matched: the kernel does not say why (ENODEV in
                # Linux 6.1, EEXIST in older kernels).
                raise VhostError(
                    f"vhost-scsi target {wwpn}: no usable TPG (is there "
                    f"{TARGET}/vhost/{wwpn}/tpgt_N with a nexus, not in use by another VM?)"
                ) from None
            raise VhostError(f"{self.path}: {e.strerror} (target {wwpn})") from None

    def clear_endpoint(self, wwpn):
        """VHOST_SCSI_CLEAR_ENDPOINT: let the target go (closing the fd does too)."""
        self._ioctl(uapi.VHOST_SCSI_CLEAR_ENDPOINT, scsi_target(wwpn),
                    "VHOST_SCSI_CLEAR_ENDPOINT")
