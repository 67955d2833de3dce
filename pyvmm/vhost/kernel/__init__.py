"""Back-ends served by the kernel's vhost drivers, driven through ioctls."""

from pyvmm.vhost.kernel.net import VhostKernelNet
from pyvmm.vhost.kernel.scsi import VhostKernelScsi
from pyvmm.vhost.kernel.vsock import VhostKernelVsock

__all__ = ["VhostKernelNet", "VhostKernelScsi", "VhostKernelVsock"]
