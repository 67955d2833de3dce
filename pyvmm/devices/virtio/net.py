"""virtio-net: the model the guest sees (MAC and link status in the config
space, the feature bits and their rules); its packets go through a
back-end (vhost_kernel.py: the kernel's vhost-net and a tap).
"""

from pyvmm.devices.virtio.device import RING_FEATURES, VirtioDevice
from pyvmm.virtio import spec

RX_QUEUE, TX_QUEUE = 0, 1

# What the model implements itself: a MAC and a link status in config space.
NET_MODEL_FEATURES = spec.bits(spec.VIRTIO_NET_F_MAC, spec.VIRTIO_NET_F_STATUS)
# What it passes on when the back-end can do it: ring features, merged receive
# buffers, checksum and segmentation offloads both ways.
NET_BACKEND_FEATURES = RING_FEATURES | spec.bits(
    spec.VIRTIO_NET_F_MRG_RXBUF,
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


class VirtioNet(VirtioDevice):
    device_id = spec.VIRTIO_ID_NET
    num_queues = 2
    queue_max_size = 256
    model_features = NET_MODEL_FEATURES
    backend_features = NET_BACKEND_FEATURES
    feature_requires = NET_FEATURE_REQUIRES

    def __init__(self, backend, mac, name="virtio-net"):
        super().__init__(backend, name)
        self.mac = mac

    def config(self):
        # struct virtio_net_config: mac[6], status
        return self.mac + spec.VIRTIO_NET_S_LINK_UP.to_bytes(2, "little")
