"""--net vhost-kernel,queues=N with no KVM: a vhost-net device per queue pair,
each pair on its own tap queue, and the pairs the guest does not use
detached from the tap (tests/testbed/test_vhost_net.py runs it for real)."""

from pyvmm.devices.virtio.device import Queue
from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.devices.virtio.vhost_kernel import VhostKernelNetBackend
from pyvmm.virtio import spec


class FakeVhostNet:
    """/dev/vhost-net as the back-end drives it: what each ring was given."""

    def __init__(self):
        self.rings, self.backends, self.stopped = {}, {}, []

    def set_owner(self):
        pass

    def get_features(self):
        return spec.bits(spec.VIRTIO_F_VERSION_1, spec.VIRTIO_RING_F_EVENT_IDX)

    def set_features(self, features):
        self.features = features

    def set_mem_table(self, memory):
        self.memory = memory

    def start_vring(self, index, size, addr, kick, call, err):
        self.rings[index] = (addr.desc, kick)

    def set_backend(self, index, fd):
        self.backends[index] = fd

    def get_vring_base(self, index):
        self.stopped.append(index)
        return 0

    def close(self):
        pass


class FakeTap:
    name = "pyvmm0"

    def __init__(self, queues):
        self.fds = [100 + q for q in range(queues)]
        self.fd = self.fds[0]
        self.attached = []

    def set_offload(self, flags):
        pass

    def set_vnet_hdr_size(self, size):
        pass

    def set_queue_attached(self, queue, attached):
        self.attached.append((queue, attached))

    def close(self):
        pass


def test_each_queue_pair_has_its_own_vhost_net_and_tap_queue(memory16):
    vhosts, tap = [FakeVhostNet(), FakeVhostNet()], FakeTap(2)
    backend = VhostKernelNetBackend(vhosts, tap)
    net = VirtioNet(backend, b"\x02\0\0\0\0\1", queue_pairs=2)
    assert net.num_queues == 5 and net.vhost_queues() == range(4)   # the control queue is pyvmm's
    queues = [Queue(i, 64, True, 0x1000 * (i + 1), 0, 0, 10 + i, 20, 30) for i in range(4)]
    backend.start(memory16, spec.bit(spec.VIRTIO_F_VERSION_1), queues)
    # Pair p: queues 2p (receive) and 2p+1 (transmit) as rings 0 and 1 of
    # its own vhost-net, on tap queue p.
    assert vhosts[0].rings == {0: (0x1000, 10), 1: (0x2000, 11)}
    assert vhosts[1].rings == {0: (0x3000, 12), 1: (0x4000, 13)}
    assert vhosts[0].backends == {0: 100, 1: 100} and vhosts[1].backends == {0: 101, 1: 101}
    assert tap.attached == [(1, False)]         # the driver starts on the first pair only
    for index in (2, 3):                        # VQ_PAIRS_SET 2, as the model passes it on
        backend.set_enabled(index, True)
    assert tap.attached == [(1, False), (1, True)]
    backend.stop()
    assert vhosts[0].stopped == [0, 1] and vhosts[1].stopped == [0, 1]
    assert vhosts[1].backends == {0: None, 1: None}
