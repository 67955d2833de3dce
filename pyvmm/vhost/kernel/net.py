"""vhost-net: the kernel moves a virtio-net device's packets to and from a tap.

drivers/vhost/net.c. Queue 0 is receive (tap -> guest), queue 1 transmit.
The tap carries the virtio-net header itself (IFF_VNET_HDR), so vhost-net
is told nothing about headers (VHOST_NET_F_VIRTIO_NET_HDR stays off).
"""

from pyvmm.vhost.kernel import uapi
from pyvmm.vhost.kernel.base import VhostKernelBackend


class VhostKernelNet(VhostKernelBackend):
    device = "/dev/vhost-net"
    module = "vhost_net"

    def set_backend(self, index, tap_fd):
        """VHOST_NET_SET_BACKEND: the tap behind queue index (None detaches it)."""
        self._set_vring_file(uapi.VHOST_NET_SET_BACKEND, "VHOST_NET_SET_BACKEND", index, tap_fd)
