"""virtio-net whose data path is the kernel's vhost-net, with a tap on the host side.

pyvmm only answers the control plane: feature bits, the config space (MAC,
link status), and, at DRIVER_OK, the vhost-net set-up. Packets go guest
rings -> vhost-net -> tap and back without pyvmm.

Offloads: the tap accepts frames whose checksum is not filled in and 64 KiB
TSO frames (VIRTIO_NET_F_CSUM, HOST_TSO4/6); what the guest accepts the
other way (GUEST_CSUM, GUEST_TSO4/6) is set on the tap with TUNSETOFFLOAD
once the guest has said so. Fewer, bigger frames mean fewer interrupts.
"""

import logging

from pyvmm.devices.virtio.device import DeviceError, VirtioDevice
from pyvmm.sys.tap import (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO,
                           TapError)
from pyvmm.vhost.backend import VhostError, VringAddr
from pyvmm.virtio import spec

log = logging.getLogger("pyvmm.virtio.net")

RX_QUEUE, TX_QUEUE = 0, 1

# Ring features vhost-net implements and pyvmm passes on to the guest.
VHOST_RING_FEATURES = spec.bits(spec.VIRTIO_F_VERSION_1, spec.VIRTIO_RING_F_INDIRECT_DESC,
                                spec.VIRTIO_RING_F_EVENT_IDX, spec.VIRTIO_NET_F_MRG_RXBUF)
# Net features pyvmm implements itself (config space) or through the tap.
DEVICE_FEATURES = spec.bits(
    spec.VIRTIO_NET_F_MAC, spec.VIRTIO_NET_F_STATUS,
    spec.VIRTIO_NET_F_CSUM, spec.VIRTIO_NET_F_HOST_TSO4, spec.VIRTIO_NET_F_HOST_TSO6,
    spec.VIRTIO_NET_F_GUEST_CSUM, spec.VIRTIO_NET_F_GUEST_TSO4, spec.VIRTIO_NET_F_GUEST_TSO6)

# virtio 1.x 5.1.3.1, "Feature bit requirements": bit -> bits one of which it needs.
NET_FEATURE_REQUIRES = {
    spec.VIRTIO_NET_F_GUEST_TSO4: (spec.VIRTIO_NET_F_GUEST_CSUM,),
    spec.VIRTIO_NET_F_GUEST_TSO6: (spec.VIRTIO_NET_F_GUEST_CSUM,),
    spec.VIRTIO_NET_F_GUEST_ECN: (spec.VIRTIO_NET_F_GUEST_TSO4, spec.VIRTIO_NET_F_GUEST_TSO6),
    spec.VIRTIO_NET_F_GUEST_UFO: (spec.VIRTIO_NET_F_GUEST_CSUM,),
    spec.VIRTIO_NET_F_GUEST_USO4: (spec.VIRTIO_NET_F_GUEST_CSUM,),
    spec.VIRTIO_NET_F_GUEST_USO6: (spec.VIRTIO_NET_F_GUEST_CSUM,),
    spec.VIRTIO_NET_F_HOST_TSO4: (spec.VIRTIO_NET_F_CSUM,),
    spec.VIRTIO_NET_F_HOST_TSO6: (spec.VIRTIO_NET_F_CSUM,),
    spec.VIRTIO_NET_F_HOST_ECN: (spec.VIRTIO_NET_F_HOST_TSO4, spec.VIRTIO_NET_F_HOST_TSO6),
    spec.VIRTIO_NET_F_HOST_UFO: (spec.VIRTIO_NET_F_CSUM,),
    spec.VIRTIO_NET_F_HOST_USO: (spec.VIRTIO_NET_F_CSUM,),
    spec.VIRTIO_NET_F_CTRL_RX: (spec.VIRTIO_NET_F_CTRL_VQ,),
    spec.VIRTIO_NET_F_CTRL_VLAN: (spec.VIRTIO_NET_F_CTRL_VQ,),
    spec.VIRTIO_NET_F_GUEST_ANNOUNCE: (spec.VIRTIO_NET_F_CTRL_VQ,),
    spec.VIRTIO_NET_F_MQ: (spec.VIRTIO_NET_F_CTRL_VQ,),
    spec.VIRTIO_NET_F_CTRL_MAC_ADDR: (spec.VIRTIO_NET_F_CTRL_VQ,),
    spec.VIRTIO_NET_F_NOTF_COAL: (spec.VIRTIO_NET_F_CTRL_VQ,),
    spec.VIRTIO_NET_F_RSC_EXT: (spec.VIRTIO_NET_F_HOST_TSO4, spec.VIRTIO_NET_F_HOST_TSO6),
    spec.VIRTIO_NET_F_RSS: (spec.VIRTIO_NET_F_CTRL_VQ,),
}

# Guest feature -> what the tap may then hand the guest.
TAP_OFFLOADS = {
    spec.VIRTIO_NET_F_GUEST_CSUM: TUN_F_CSUM,
    spec.VIRTIO_NET_F_GUEST_TSO4: TUN_F_TSO4,
    spec.VIRTIO_NET_F_GUEST_TSO6: TUN_F_TSO6,
    spec.VIRTIO_NET_F_GUEST_ECN: TUN_F_TSO_ECN,
    spec.VIRTIO_NET_F_GUEST_UFO: TUN_F_UFO,
}

# struct virtio_net_hdr_mrg_rxbuf (12 bytes) once VERSION_1 or MRG_RXBUF is on.
VNET_HDR_SIZE_MODERN, VNET_HDR_SIZE_LEGACY = 12, 10


class VhostKernelNetDevice(VirtioDevice):
    device_id = spec.VIRTIO_ID_NET
    num_queues = 2
    queue_max_size = 256
    feature_requires = NET_FEATURE_REQUIRES

    def __init__(self, vhost, tap, mac, name="virtio-net"):
        """vhost: an open VhostKernelNet; both it and tap now belong to the device."""
        self.name = name
        self.tap = tap
        self.mac = mac
        self.vhost = vhost
        self.vhost.set_owner()
        self.vhost_features = self.vhost.get_features()
        missing = spec.bit(spec.VIRTIO_F_VERSION_1) & ~self.vhost_features
        if missing:
            raise VhostError("this kernel's vhost-net lacks VIRTIO_F_VERSION_1 (Linux 4.0 or later needed)")
        self._features = (self.vhost_features & VHOST_RING_FEATURES) | DEVICE_FEATURES
        self._started = []

    @property
    def features(self):
        return self._features

    def config(self):
        # struct virtio_net_config: mac[6], status
        return self.mac + spec.VIRTIO_NET_S_LINK_UP.to_bytes(2, "little")

    def activate(self, memory, features, queues):
        try:
            offload = 0
            for feature, flag in TAP_OFFLOADS.items():
                if features & spec.bit(feature):
                    offload |= flag
            self.tap.set_offload(offload)
            modern = features & spec.bits(spec.VIRTIO_F_VERSION_1, spec.VIRTIO_NET_F_MRG_RXBUF)
            self.tap.set_vnet_hdr_size(VNET_HDR_SIZE_MODERN if modern else VNET_HDR_SIZE_LEGACY)
            # vhost only cares about the bits it implements.
            self.vhost.set_features(features & self.vhost_features)
            self.vhost.set_mem_table(memory)
            for q in queues:
                self.vhost.start_vring(q.index, q.size, VringAddr(q.desc, q.avail, q.used),
                                       q.kick_fd, q.call_fd, q.err_fd)
                self.vhost.set_backend(q.index, self.tap.fd)
                self._started.append(q.index)
        except (VhostError, TapError, OSError) as e:
            self.reset()
            raise DeviceError(str(e)) from None
        log.debug("%s: vhost-net running on %s with features %#x", self.name, self.tap.name,
                  features)

    def reset(self):
        for index in self._started:
            try:
                self.vhost.set_backend(index, None)
                self.vhost.get_vring_base(index)
            except VhostError as e:
                log.warning("%s: stopping queue %d: %s", self.name, index, e)
        self._started = []

    def close(self):
        self.reset()
        self.vhost.close()
        self.tap.close()
