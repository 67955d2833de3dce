"""Queue back-ends in the kernel: vhost-net with a tap, vhost-vsock and vhost-scsi.

pyvmm only answers the control plane. At DRIVER_OK it hands the rings to
the kernel (memory table, ring addresses, the kick ioeventfd and the call
irqfd of each queue); packets then go guest rings -> vhost -> tap or
AF_VSOCK and back without pyvmm.

vhost-net: the tap carries the virtio-net header itself (IFF_VNET_HDR) and
accepts frames whose checksum is not filled in and 64 KiB TSO frames
(VIRTIO_NET_F_CSUM, HOST_TSO4/6); what the guest accepts the other way
(GUEST_CSUM, GUEST_TSO4/6) is set on the tap with TUNSETOFFLOAD once the
guest has said so. Fewer, bigger frames mean fewer interrupts.

With several queue pairs (queues=N) the tap is multiqueue and each pair has
its own vhost-net device (its own kernel thread), whose rings 0 and 1 are
the pair's receive and transmit queues, on the tap's queue of the same
number. A pair the guest does not use (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
which the model serves) has its tap queue detached, as QEMU does, so that
the tap hands it no frames.
"""

import logging

from pyvmm.devices.virtio.device import QueueBackend
from pyvmm.sys.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO
from pyvmm.vhost.backend import VhostError, VringAddr
from pyvmm.vhost.kernel import uapi
from pyvmm.virtio import spec

log = logging.getLogger("pyvmm.vhost")

# Ring features vhost-net implements and pyvmm passes on.
VHOST_NET_RING_FEATURES = spec.bits(spec.VIRTIO_F_VERSION_1, spec.VIRTIO_RING_F_INDIRECT_DESC,
                                    spec.VIRTIO_RING_F_EVENT_IDX, spec.VIRTIO_NET_F_MRG_RXBUF)
# What the tap does whatever vhost-net says: checksums and segmentation.
TAP_FEATURES = spec.bits(
    spec.VIRTIO_NET_F_CSUM, spec.VIRTIO_NET_F_HOST_TSO4, spec.VIRTIO_NET_F_HOST_TSO6,
    spec.VIRTIO_NET_F_GUEST_CSUM, spec.VIRTIO_NET_F_GUEST_TSO4, spec.VIRTIO_NET_F_GUEST_TSO6)
VHOST_VSOCK_RING_FEATURES = spec.bits(spec.VIRTIO_F_VERSION_1, spec.VIRTIO_RING_F_INDIRECT_DESC,
                                      spec.VIRTIO_RING_F_EVENT_IDX)
# vhost-scsi also offers HOTPLUG and T10_PI; pyvmm hot-plugs nothing and
# passes no protection information.
VHOST_SCSI_RING_FEATURES = VHOST_VSOCK_RING_FEATURES

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


def start_vrings(vhost, queues, started, first=0):
    """Hand each queue to a kernel vhost device as its ring q.index - first,
    noting (vhost, ring) in started."""
    for q in queues:
        vhost.start_vring(q.index - first, q.size, VringAddr(q.desc, q.avail, q.used),
                          q.kick_fd, q.call_fd, q.err_fd)
        started.append((vhost, q.index - first))


class VhostKernelNetBackend(QueueBackend):
    def __init__(self, vhosts, tap):
        """vhosts: one open VhostKernelNet per queue pair, tap a tap with as many
        queues; all of them now belong to the back-end."""
        self.vhosts = list(vhosts)
        self.tap = tap
        pairs = len(self.vhosts)
        self.description = f"vhost-net on tap {tap.name}" + (
            f" ({pairs} queue pairs)" if pairs > 1 else "")
        self.vhost_features = ~0
        for vhost in self.vhosts:
            vhost.set_owner()
            self.vhost_features &= vhost.get_features()
        if not self.vhost_features & spec.bit(spec.VIRTIO_F_VERSION_1):
            raise VhostError("this kernel's vhost-net lacks VIRTIO_F_VERSION_1 "
                             "(Linux 4.0 or later needed)")
        self.disabled_at_start = set()     # (the model's: pairs past the first, with MQ)
        self._attached = [True] * pairs    # each tap queue, as TUNSETQUEUE left it
        self._started = []                 # (vhost, ring index) handed to the kernel

    def features(self):
        return (self.vhost_features & VHOST_NET_RING_FEATURES) | TAP_FEATURES

    def start(self, memory, features, queues):
        try:
            offload = 0
            for feature, flag in TAP_OFFLOADS.items():
                if features & spec.bit(feature):
                    offload |= flag
            self.tap.set_offload(offload)
            modern = features & spec.bits(spec.VIRTIO_F_VERSION_1, spec.VIRTIO_NET_F_MRG_RXBUF)
            self.tap.set_vnet_hdr_size(VNET_HDR_SIZE_MODERN if modern else VNET_HDR_SIZE_LEGACY)
            for pair, vhost in enumerate(self.vhosts):
                pair_queues = [q for q in queues if q.index // 2 == pair]
                if not pair_queues:
                    continue
                # vhost only cares about the bits it implements.
                vhost.set_features(features & self.vhost_features)
                vhost.set_mem_table(memory)
                start_vrings(vhost, pair_queues, self._started, first=2 * pair)
                for ring in (q.index - 2 * pair for q in pair_queues):
                    vhost.set_backend(ring, self.tap.fds[pair])
                if pair:
                    self._attach(pair, 2 * pair not in self.disabled_at_start)
        except BaseException:
            self.stop()
            raise
        log.debug("vhost-net running on %s with features %#x", self.tap.name, features)

    def set_enabled(self, index, enabled):
        """The model's VQ_PAIRS_SET, per queue: a pair's tap queue is attached
        or detached (once, at its receive queue)."""
        if index % 2 == 0 and index // 2 < len(self.vhosts):
            self._attach(index // 2, enabled)

    def _attach(self, pair, attached):
        if self._attached[pair] != attached:
            self.tap.set_queue_attached(pair, attached)
            self._attached[pair] = attached

    def stop(self):
        for vhost, index in self._started:
            try:
                vhost.set_backend(index, None)
                vhost.get_vring_base(index)
            except VhostError as e:
                log.warning("%s: stopping queue %d: %s", self.description, index, e)
        self._started = []

    def close(self):
        self.stop()
        for vhost in self.vhosts:
            vhost.close()
        self.tap.close()


class OneVhostBackend(QueueBackend):
    """A device served by one /dev/vhost-* fd: its rings, then a switch of
    the device's own that starts serving them (_serve), and at reset the
    switch off (_unserve) before the rings are stopped."""

    vhost_features = 0                     # what the fd offers (GET_FEATURES)

    def __init__(self, vhost):
        self.vhost = vhost
        self._started = []                 # (vhost, ring index) handed to the kernel
        self._serving = False

    def start(self, memory, features, queues):
        try:
            self.vhost.set_features(features & self.vhost_features)
            self.vhost.set_mem_table(memory)
            start_vrings(self.vhost, queues, self._started)
            self._serve()
            self._serving = True
        except BaseException:
            self.stop()
            raise
        log.debug("%s running", self.description)

    def stop(self):
        try:
            if self._serving:
                self._serving = False
                self._unserve()
            for vhost, index in self._started:
                vhost.get_vring_base(index)
        except VhostError as e:
            log.warning("%s: stopping: %s", self.description, e)
        self._started = []

    def close(self):
        self.stop()
        self.vhost.close()


class VhostKernelVsockBackend(OneVhostBackend):
    def __init__(self, vhost, cid):
        """vhost: an open VhostKernelVsock, now the back-end's."""
        super().__init__(vhost)
        self.description = f"vhost-vsock (CID {cid})"
        self.vhost.set_owner()
        self.vhost.set_guest_cid(cid)
        self.vhost_features = self.vhost.get_features()

    def features(self):
        return self.vhost_features & VHOST_VSOCK_RING_FEATURES

    def _serve(self):
        self.vhost.set_running(True)

    def _unserve(self):
        self.vhost.set_running(False)


class VhostKernelScsiBackend(OneVhostBackend):
    def __init__(self, vhost, wwpn, target=None):
        """vhost: an open VhostKernelScsi, now the back-end's; wwpn: the configfs
        target whose TPGs it serves; target: the ScsiTarget pyvmm made for it,
        if any, taken away after the fd is closed (the kernel holds the TPG
        while the fd is open)."""
        super().__init__(vhost)
        self.wwpn = wwpn
        self.target = target
        self.description = f"vhost-scsi (target {wwpn})"
        self.vhost.set_owner()
        abi = self.vhost.get_abi_version()
        if abi != uapi.VHOST_SCSI_ABI_VERSION:
            raise VhostError(f"vhost-scsi speaks ABI version {abi}; pyvmm knows "
                             f"{uapi.VHOST_SCSI_ABI_VERSION}")
        self.vhost_features = self.vhost.get_features()

    @classmethod
    def open(cls, image=None, wwpn=None, tpgt=1, name="pyvmm"):
        """/dev/vhost-scsi on a target pyvmm makes in configfs (image: LUN 0 of
        target tpgt, under wwpn or a new name; its backstore called name), or
        on the target wwpn made beforehand (checked now: the kernel would only
        tell at DRIVER_OK). Nothing is left open or made if it fails."""
        from pyvmm.vhost.kernel import VhostKernelScsi
        from pyvmm.vhost.kernel.scsi_target import ScsiTarget, check_target
        vhost = VhostKernelScsi()
        target = None
        try:
            if image:
                target = ScsiTarget(image, wwpn, tpgt, name=name)
                target.create()
            else:
                check_target(wwpn)
            return cls(vhost, target.wwpn if target else wwpn, target)
        except BaseException:
            vhost.close()
            if target:
                target.close()
            raise

    def features(self):
        return self.vhost_features & VHOST_SCSI_RING_FEATURES

    def _serve(self):
        # The kernel checks the rings it is to serve, then serves them.
        self.vhost.set_endpoint(self.wwpn)

    def _unserve(self):
        self.vhost.clear_endpoint(self.wwpn)

    def close(self):
        super().close()
        if self.target is not None:
            self.target.close()
