"""virtio-net: the model the guest sees (MAC and link status in the config
space, the feature bits and their rules); its packets go through a
back-end (vhost_kernel.py: the kernel's vhost-net and a tap; vhost_user.py:
a back-end process such as DPDK's vhost PMD).

With several queue pairs (VIRTIO_NET_F_MQ) the driver starts on the first
pair and asks for more on the control queue, which pyvmm serves itself
(a back-end like DPDK has none): VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET becomes
SET_VRING_ENABLE on each pair's queues (vhost-user), or a tap queue
attached or detached (vhost-net).
"""

import logging
import os
import struct

from pyvmm.devices.virtio.device import RING_FEATURES, DeviceError, VirtioDevice
from pyvmm.errors import PyvmmError
from pyvmm.virtio import spec
from pyvmm.virtio.device_ring import DeviceRing
from pyvmm.virtio.splitring import RingError

log = logging.getLogger("pyvmm.virtio")

# The control queue (virtio 1.x 5.1.6.5): class, command, data, then an ack.
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_OK, VIRTIO_NET_ERR = 0, 1

# struct virtio_net_config up to mtu: mac[6], then status, max_virtqueue_pairs, mtu.
CONFIG_TAIL = struct.Struct("<HHH")
NET_CONFIG_SIZE = 6 + CONFIG_TAIL.size       # 12

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

    def __init__(self, backend, mac, name="virtio-net", queue_pairs=1, mtu=None):
        """queue_pairs > 1: VIRTIO_NET_F_MQ and a control queue (the back-end must
        let single queues be enabled: set_enabled()); mtu: the back-end's,
        offered as VIRTIO_NET_F_MTU."""
        super().__init__(backend, name)
        self.mac = mac
        self.queue_pairs = queue_pairs
        self.mtu = mtu
        if mtu is not None:
            self.backend_features = NET_BACKEND_FEATURES | spec.bit(spec.VIRTIO_NET_F_MTU)
        if queue_pairs > 1:
            self.model_features = NET_MODEL_FEATURES | spec.bits(spec.VIRTIO_NET_F_MQ,
                                                                 spec.VIRTIO_NET_F_CTRL_VQ)
            self.num_queues = 2 * queue_pairs + 1          # the control queue last
            backend.disabled_at_start = set(range(2, 2 * queue_pairs))
        self._ctrl = None               # (DeviceRing, Queue) while the device runs
        self._event_idx = False

    def vhost_queues(self):
        return range(2 * self.queue_pairs)

    def config(self):
        return self.mac + CONFIG_TAIL.pack(spec.VIRTIO_NET_S_LINK_UP, self.queue_pairs,
                                           self.mtu or 0)

    def refuse_features(self, features):
        if (features & spec.bit(spec.VIRTIO_NET_F_CTRL_VQ)
                and not features & spec.bit(spec.VIRTIO_NET_F_MQ)):
            # The control queue would then be queue 2, which the back-end serves.
            return "pyvmm serves VIRTIO_NET_F_CTRL_VQ only together with VIRTIO_NET_F_MQ"
        return super().refuse_features(features)

    def activate(self, memory, features, queues):
        self._ctrl = None
        self._event_idx = bool(features & spec.bit(spec.VIRTIO_RING_F_EVENT_IDX))
        if features & spec.bit(spec.VIRTIO_NET_F_MQ):
            ctrl = 2 * self.queue_pairs
            q = next((q for q in queues if q.index == ctrl and q.ready), None)
            if q is None:
                # The driver would ask for queue pairs on a queue nobody serves.
                raise DeviceError(f"the driver acked VIRTIO_NET_F_MQ, but the control queue "
                                  f"(queue {ctrl}) is not ready")
            self._ctrl = (DeviceRing(memory, q.size, q.desc, q.avail, q.used), q)
        super().activate(memory, features, queues)

    def reset(self):
        self._ctrl = None
        super().reset()

    def notify(self, index):
        """The control queue (in the vCPU thread that wrote QueueNotify)."""
        if self._ctrl is None or index != 2 * self.queue_pairs:
            return
        ring, q = self._ctrl
        used_before = ring.used_idx()
        try:
            while (chain := ring.pop()) is not None:
                ack = self._control(chain, ring.memory)
                last = chain.writable[-1] if chain.writable else None
                if last is None:
                    ring.push(chain.head, 0)
                    continue
                ring.memory.write(last.addr + last.length - 1, bytes([ack]))
                ring.push(chain.head, 1)
        except RingError as e:
            log.warning("%s: the control queue is broken: %s", self.name, e)
            self._ctrl = None
        if ring.should_notify(used_before, self._event_idx):
            os.eventfd_write(q.call_fd, 1)

    def _control(self, chain, memory):
        """One command; VIRTIO_NET_OK or VIRTIO_NET_ERR."""
        command = chain.read(memory, 0, min(chain.readable_len, 4))
        if len(command) >= 4 and command[:2] == bytes([VIRTIO_NET_CTRL_MQ,
                                                       VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET]):
            pairs = int.from_bytes(command[2:4], "little")
            if 1 <= pairs <= self.queue_pairs:
                try:
                    for p in range(1, self.queue_pairs):
                        for index in (2 * p, 2 * p + 1):
                            self.backend.set_enabled(index, p < pairs)
                except PyvmmError as e:
                    log.warning("%s: enabling %d queue pairs: %s", self.name, pairs, e)
                    return VIRTIO_NET_ERR
                log.debug("%s: %d queue pairs in use", self.name, pairs)
                return VIRTIO_NET_OK
        return VIRTIO_NET_ERR
