"""virtio-mmio registers and the split ring, on the host (no KVM).

The transport's eventfd wiring needs a VM; here a recorder stands in for
the two Vm methods it calls, so the register state machine can be driven
the way Linux's virtio_mmio driver drives it. The real thing runs in
tests/testbed/.
"""

import os
import struct
import threading
import time

import pytest

from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.device import DeviceError, VirtioDevice
from pyvmm.devices.virtio.net import NET_FEATURE_REQUIRES
from pyvmm.memory import GuestMemory
from pyvmm.virtio import spec
from pyvmm.virtio.splitring import DriverRing, RingError, check_ring, check_queue_size

MiB = 1 << 20


class RecordingVm:
    """Records the ioeventfd/irqfd registrations a transport makes."""
    def __init__(self):
        self.ioeventfds, self.irqfds = [], []

    def ioeventfd(self, fd, addr, length, datamatch=None, pio=False, deassign=False):
        self.ioeventfds.append((addr, length, datamatch))

    def irqfd(self, fd, gsi, deassign=False):
        self.irqfds.append(gsi)


class ToyDevice(VirtioDevice):
    device_id = spec.VIRTIO_ID_NET
    name = "toy"
    num_queues = 3
    queue_max_size = 64

    def __init__(self, fail=False):
        self.fail = fail
        self.activations, self.resets, self.notified = [], 0, []

    @property
    def features(self):
        return spec.bits(spec.VIRTIO_F_VERSION_1, spec.VIRTIO_NET_F_MAC)

    def config(self):
        return b"\x02\x00\x00\x00\x00\x07\x01\x00"

    def vhost_queues(self):
        return (0, 1)

    def activate(self, memory, features, queues):
        if self.fail:
            raise DeviceError("back-end said no")
        self.activations.append((features, [(q.index, q.size, q.desc) for q in queues]))

    def reset(self):
        self.resets += 1

    def notify(self, index):
        self.notified.append(index)


@pytest.fixture(scope="module")
def memory():
    m = GuestMemory(16 * MiB)
    yield m
    m.close()


def make(memory, **kw):
    vm = RecordingVm()
    dev = ToyDevice(**kw)
    return mmio.VirtioMmio(dev, vm, memory, 0xD000_0000, 5), dev, vm


def r32(t, off):
    return t.read(off, 4)


def w32(t, off, value):
    t.write(off, 4, value)


def bring_up(t, features, queues=((0, 64, 0x10000), (1, 64, 0x20000))):
    """What vm_probe/virtio_dev_probe/vm_setup_vq do, in order."""
    w32(t, mmio.STATUS, spec.VIRTIO_CONFIG_S_ACKNOWLEDGE)
    w32(t, mmio.STATUS, spec.VIRTIO_CONFIG_S_ACKNOWLEDGE | spec.VIRTIO_CONFIG_S_DRIVER)
    for sel in (0, 1):
        w32(t, mmio.DRIVER_FEATURES_SEL, sel)
        w32(t, mmio.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFF_FFFF)
    status = spec.VIRTIO_CONFIG_S_ACKNOWLEDGE | spec.VIRTIO_CONFIG_S_DRIVER
    w32(t, mmio.STATUS, status | spec.VIRTIO_CONFIG_S_FEATURES_OK)
    if not r32(t, mmio.STATUS) & spec.VIRTIO_CONFIG_S_FEATURES_OK:
        return False
    for index, size, gpa in queues:
        ring = DriverRing(t.memory, gpa, size)
        w32(t, mmio.QUEUE_SEL, index)
        assert r32(t, mmio.QUEUE_NUM_MAX) == 64 and r32(t, mmio.QUEUE_READY) == 0
        w32(t, mmio.QUEUE_NUM, size)
        for low, addr in ((mmio.QUEUE_DESC_LOW, ring.desc_addr), (mmio.QUEUE_AVAIL_LOW, ring.avail_addr),
                          (mmio.QUEUE_USED_LOW, ring.used_addr)):
            w32(t, low, addr & 0xFFFF_FFFF)
            w32(t, low + 4, addr >> 32)
        w32(t, mmio.QUEUE_READY, 1)
    w32(t, mmio.STATUS, status | spec.VIRTIO_CONFIG_S_FEATURES_OK | spec.VIRTIO_CONFIG_S_DRIVER_OK)
    return True


FEATURES = spec.bits(spec.VIRTIO_F_VERSION_1, spec.VIRTIO_NET_F_MAC)


def test_identity_registers(memory):
    t, dev, vm = make(memory)
    assert r32(t, mmio.MAGIC_VALUE) == 0x74726976
    assert r32(t, mmio.VERSION) == 2
    assert r32(t, mmio.DEVICE_ID) == spec.VIRTIO_ID_NET
    w32(t, mmio.DEVICE_FEATURES_SEL, 1)
    assert r32(t, mmio.DEVICE_FEATURES) == 1          # VERSION_1 is bit 32
    w32(t, mmio.DEVICE_FEATURES_SEL, 0)
    assert r32(t, mmio.DEVICE_FEATURES) == 1 << spec.VIRTIO_NET_F_MAC


def test_notify_and_interrupt_wiring(memory):
    t, dev, vm = make(memory)
    # An ioeventfd per back-end queue (datamatch = index), one on InterruptACK.
    assert sorted(vm.ioeventfds) == [(0xD000_0050, 4, 0), (0xD000_0050, 4, 1), (0xD000_0064, 4, None)]
    # One irqfd for the whole device, every queue's call fd: two irqfds on one
    # edge-triggered line can lose an interrupt (KVM coalesces overlapping
    # injections; issue 24).
    assert vm.irqfds == [5]
    assert len({q.call_fd for q in t.queues}) == 1
    assert mmio.mmio_cmdline(t.base, t.gsi) == "virtio_mmio.device=4K@0xd0000000:5"


def test_bring_up_activates_with_the_driver_features_and_ready_queues(memory):
    t, dev, vm = make(memory)
    assert bring_up(t, FEATURES)
    assert dev.activations == [(FEATURES, [(0, 64, 0x10000), (1, 64, 0x20000)])]
    assert r32(t, mmio.STATUS) & spec.VIRTIO_CONFIG_S_DRIVER_OK


def test_features_without_version_1_or_unknown_are_refused(memory):
    t, dev, vm = make(memory)
    assert not bring_up(t, spec.bit(spec.VIRTIO_NET_F_MAC))
    t, dev, vm = make(memory)
    assert not bring_up(t, FEATURES | spec.bit(spec.VIRTIO_NET_F_MRG_RXBUF))
    assert dev.activations == []


def test_reset_stops_the_device_and_allows_bring_up_again(memory):
    t, dev, vm = make(memory)
    assert bring_up(t, FEATURES)
    w32(t, mmio.STATUS, 0)
    assert dev.resets == 1 and r32(t, mmio.STATUS) == 0
    w32(t, mmio.QUEUE_SEL, 0)
    assert r32(t, mmio.QUEUE_READY) == 0
    assert bring_up(t, FEATURES)
    assert len(dev.activations) == 2


def negotiate_version_1(t):
    """ACKNOWLEDGE, DRIVER, accept VIRTIO_F_VERSION_1 alone, FEATURES_OK: the status."""
    status = spec.VIRTIO_CONFIG_S_ACKNOWLEDGE | spec.VIRTIO_CONFIG_S_DRIVER
    w32(t, mmio.STATUS, status)
    w32(t, mmio.DRIVER_FEATURES_SEL, 1)
    w32(t, mmio.DRIVER_FEATURES, 1)
    status |= spec.VIRTIO_CONFIG_S_FEATURES_OK
    w32(t, mmio.STATUS, status)
    return status


def test_bad_ring_sets_needs_reset_and_raises_config_interrupt(memory):
    t, dev, vm = make(memory)
    # Queue 0's descriptor table sits beyond the end of guest memory.
    negotiate_version_1(t)
    w32(t, mmio.QUEUE_SEL, 0)
    w32(t, mmio.QUEUE_NUM, 64)
    w32(t, mmio.QUEUE_DESC_LOW, 16 * MiB)
    w32(t, mmio.QUEUE_READY, 1)
    generation = r32(t, mmio.CONFIG_GENERATION)
    w32(t, mmio.STATUS, 3 | spec.VIRTIO_CONFIG_S_FEATURES_OK | spec.VIRTIO_CONFIG_S_DRIVER_OK)
    assert dev.activations == []
    assert r32(t, mmio.STATUS) & spec.VIRTIO_CONFIG_S_NEEDS_RESET
    assert r32(t, mmio.CONFIG_GENERATION) == generation + 1
    assert r32(t, mmio.INTERRUPT_STATUS) == mmio.VIRTIO_MMIO_INT_VRING | mmio.VIRTIO_MMIO_INT_CONFIG
    assert r32(t, mmio.INTERRUPT_STATUS) == mmio.VIRTIO_MMIO_INT_VRING   # consumed by the read


def test_back_end_refusal_sets_needs_reset(memory):
    t, dev, vm = make(memory, fail=True)
    bring_up(t, FEATURES)
    assert r32(t, mmio.STATUS) & spec.VIRTIO_CONFIG_S_NEEDS_RESET


def test_queue_size_above_maximum_is_refused(memory):
    t, dev, vm = make(memory)
    bring_up(t, FEATURES, queues=((0, 128, 0x10000),))
    assert dev.activations == []
    assert r32(t, mmio.STATUS) & spec.VIRTIO_CONFIG_S_NEEDS_RESET


def test_queues_outside_the_back_end_reach_notify(memory):
    t, dev, vm = make(memory)
    w32(t, mmio.QUEUE_NOTIFY, 2)
    w32(t, mmio.QUEUE_NOTIFY, 99)   # no such queue: ignored
    assert dev.notified == [2]


def test_config_space_and_odd_accesses(memory):
    t, dev, vm = make(memory)
    assert t.read(mmio.CONFIG, 4) == 0x00000002
    assert t.read(mmio.CONFIG + 5, 1) == 0x07
    assert t.read(mmio.CONFIG + 6, 2) == 1
    assert t.read(mmio.CONFIG + 200, 4) == 0          # beyond the config: zeros
    assert t.read(mmio.MAGIC_VALUE, 2) == 0           # registers are 32-bit only
    w32(t, mmio.QUEUE_SEL, 7)                          # a queue that does not exist
    assert r32(t, mmio.QUEUE_NUM_MAX) == 0
    w32(t, mmio.QUEUE_NUM, 16)                         # ignored, no crash
    assert [q.size for q in t.queues] == [0, 0, 0]
    assert mmio.register_name(0x50) == "QueueNotify" and mmio.register_name(0x104) == "config"


def test_driver_ring_layout_and_round_trip(memory):
    ring = DriverRing(memory, 0x40000, 8)
    assert (ring.avail_addr - ring.desc_addr, ring.used_addr % 4) == (128, 0)
    assert DriverRing.ring_size(8) == ring.used_addr + 6 + 64 - 0x40000
    head = ring.add([(0x50000, 100, False), (0x51000, 200, True)])
    addr, length, flags, nxt = struct.unpack("<QIHH", memory.read(ring.desc_addr + 16 * head, 16))
    assert (addr, length, flags) == (0x50000, 100, 1)   # NEXT
    assert struct.unpack("<HH", memory.read(ring.avail_addr, 4)) == (0, 1)
    # Play the device: one used entry.
    memory.write(ring.used_addr + 4, struct.pack("<II", head, 200))
    memory.write(ring.used_addr + 2, struct.pack("<H", 1))
    assert ring.pop_used() == [(head, 200)]
    memory.write(ring.used_addr + 12, struct.pack("<II", 5, 1))
    memory.write(ring.used_addr + 2, struct.pack("<H", 2))
    with pytest.raises(RingError, match="not in use"):
        ring.pop_used()


@pytest.mark.parametrize("num", [0, 3, 65536, -1])
def test_queue_sizes(num):
    with pytest.raises(RingError):
        check_queue_size(num)


def test_check_ring(memory):
    check_ring(memory, 256, 0x1000, 0x2000, 0x3000)
    with pytest.raises(RingError, match="available ring at 0x2001"):
        check_ring(memory, 256, 0x1000, 0x2001, 0x3000)
    with pytest.raises(RingError, match="used ring .* not inside guest RAM"):
        check_ring(memory, 256, 0x1000, 0x2000, 16 * MiB - 8)


# --- the device's life cycle under concurrent vCPUs (issue 10, item 1) -------

class SlowDevice(ToyDevice):
    """Records activate/reset; activate() holds on until told to finish, the
    way a back-end over a socket takes its time."""

    def __init__(self, hold=None):
        super().__init__()
        self.events = []
        self.started = threading.Event()
        self.hold = hold

    def activate(self, memory, features, queues):
        self.started.set()
        if self.hold is not None:
            self.hold.wait(timeout=2)
        else:
            time.sleep(0.0002)   # let the other vCPU run meanwhile
        self.events.append(("activate", [(q.index, q.size, q.desc) for q in queues]))

    def reset(self):
        self.events.append(("reset",))


def ready_for_driver_ok(t):
    """bring_up() up to, not including, DRIVER_OK; the status to add it to."""
    status = negotiate_version_1(t)
    for index, gpa in ((0, 0x10000), (1, 0x20000)):
        ring = DriverRing(t.memory, gpa, 64)
        w32(t, mmio.QUEUE_SEL, index)
        w32(t, mmio.QUEUE_NUM, 64)
        for low, addr in ((mmio.QUEUE_DESC_LOW, ring.desc_addr),
                          (mmio.QUEUE_AVAIL_LOW, ring.avail_addr),
                          (mmio.QUEUE_USED_LOW, ring.used_addr)):
            w32(t, low, addr)
        w32(t, mmio.QUEUE_READY, 1)
    return status


def test_a_reset_from_another_vcpu_waits_for_the_activation(memory):
    """vCPU A writes DRIVER_OK; while the back-end is being set up, vCPU B
    resets the device. B must wait: the device ends reset and stopped, and
    the activation saw the queues as they were at DRIVER_OK."""
    hold = threading.Event()
    dev = SlowDevice(hold)
    t = mmio.VirtioMmio(dev, RecordingVm(), memory, 0xD000_0000, 5)
    status = ready_for_driver_ok(t)
    a = threading.Thread(target=w32, args=(t, mmio.STATUS, status | spec.VIRTIO_CONFIG_S_DRIVER_OK))
    a.start()
    assert dev.started.wait(5)
    b = threading.Thread(target=w32, args=(t, mmio.STATUS, 0))
    b.start()
    b.join(0.2)
    assert b.is_alive(), "the reset did not wait for the activation in progress"
    hold.set()
    a.join(5)
    b.join(5)
    assert dev.events == [("activate", [(0, 64, 0x10000), (1, 64, 0x20000)]), ("reset",)]
    assert r32(t, mmio.STATUS) == 0 and not t.active
    t.close()


def test_status_writes_from_two_vcpus_never_leave_a_stopped_device_running(memory):
    """Random interleavings of bring-up and reset: whenever both vCPUs are
    done, the device runs exactly when the transport says it is active, and
    never with a ring the guest had not set up."""
    for i in range(150):
        dev = SlowDevice()
        t = mmio.VirtioMmio(dev, RecordingVm(), memory, 0xD000_0000, 5)
        status = ready_for_driver_ok(t)
        go = threading.Barrier(2)

        def driver_ok():
            go.wait()
            w32(t, mmio.STATUS, status | spec.VIRTIO_CONFIG_S_DRIVER_OK)

        def reset():
            go.wait()
            time.sleep(i * 0.00001)   # from 0 to 1.5 ms after the other vCPU
            w32(t, mmio.STATUS, 0)

        threads = [threading.Thread(target=f) for f in (driver_ok, reset)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(5)
        activations = [e for e in dev.events if e[0] == "activate"]
        resets = [e for e in dev.events if e[0] == "reset"]
        running = len(activations) - len(resets)
        assert running == (1 if t.active else 0), dev.events
        assert not (t.active and r32(t, mmio.STATUS) == 0), dev.events
        for _, queues in activations:
            assert queues == [(0, 64, 0x10000), (1, 64, 0x20000)], dev.events
        t.close()


# --- registers and rules of the virtio spec (issue 10, items 7 and 9) -----------

def test_device_features_above_word_1_read_zero(memory):
    t, dev, vm = make(memory)
    for sel in (2, 3, 0xFFFF_FFFF):
        w32(t, mmio.DEVICE_FEATURES_SEL, sel)
        assert r32(t, mmio.DEVICE_FEATURES) == 0


def test_driver_features_after_features_ok_are_ignored(memory):
    t, dev, vm = make(memory)
    negotiate_version_1(t)
    w32(t, mmio.DRIVER_FEATURES_SEL, 0)
    w32(t, mmio.DRIVER_FEATURES, 1 << spec.VIRTIO_NET_F_MAC)
    w32(t, mmio.DRIVER_FEATURES_SEL, 2)             # no such word: ignored too
    w32(t, mmio.DRIVER_FEATURES, 0xFFFF_FFFF)
    assert t.driver_features == spec.bit(spec.VIRTIO_F_VERSION_1)


def test_driver_ok_without_features_ok_needs_reset(memory):
    t, dev, vm = make(memory)
    w32(t, mmio.STATUS, 3)
    w32(t, mmio.STATUS, 3 | spec.VIRTIO_CONFIG_S_DRIVER_OK)
    assert dev.activations == []
    assert r32(t, mmio.STATUS) & spec.VIRTIO_CONFIG_S_NEEDS_RESET
    assert r32(t, mmio.INTERRUPT_STATUS) & mmio.VIRTIO_MMIO_INT_CONFIG


def test_stopping_a_queue_of_a_running_device_is_refused(memory):
    t, dev, vm = make(memory)
    assert bring_up(t, FEATURES)
    w32(t, mmio.QUEUE_SEL, 0)
    w32(t, mmio.QUEUE_READY, 0)
    assert r32(t, mmio.QUEUE_READY) == 1               # no VIRTIO_F_RING_RESET
    w32(t, mmio.QUEUE_DESC_LOW, 0x80000)               # still locked while ready
    assert t.queues[0].desc == 0x10000
    w32(t, mmio.STATUS, 0)                             # after a reset, all is open again
    assert r32(t, mmio.QUEUE_READY) == 0


def test_no_shared_memory_regions(memory):
    """Linux's vm_get_shm_region() takes only a length of ~0 as "none"."""
    t, dev, vm = make(memory)
    w32(t, mmio.SHM_SEL, 0)
    assert r32(t, mmio.SHM_LEN_LOW) == 0xFFFF_FFFF
    assert r32(t, mmio.SHM_LEN_HIGH) == 0xFFFF_FFFF


def test_back_end_error_eventfd_sets_needs_reset(memory):
    t, dev, vm = make(memory)
    assert bring_up(t, FEATURES)
    sources = dict(t.event_sources())
    err_fd = t.queues[1].err_fd
    assert set(sources) == {t.queues[0].err_fd, err_fd}
    os.eventfd_write(err_fd, 1)
    sources[err_fd]()
    assert r32(t, mmio.STATUS) & spec.VIRTIO_CONFIG_S_NEEDS_RESET
    assert r32(t, mmio.INTERRUPT_STATUS) == mmio.VIRTIO_MMIO_INT_VRING | mmio.VIRTIO_MMIO_INT_CONFIG
    assert os.eventfd_read(t._irq_fd) == 1             # the config interrupt went to KVM


class OffloadDevice(ToyDevice):
    """Offers virtio-net's checksum and TSO bits, with the spec's rules for them."""
    feature_requires = NET_FEATURE_REQUIRES

    @property
    def features(self):
        return spec.bits(spec.VIRTIO_F_VERSION_1, spec.VIRTIO_NET_F_GUEST_CSUM,
                         spec.VIRTIO_NET_F_GUEST_TSO4, spec.VIRTIO_NET_F_GUEST_ECN)


@pytest.mark.parametrize("accepted,ok", [
    ((spec.VIRTIO_NET_F_GUEST_CSUM, spec.VIRTIO_NET_F_GUEST_TSO4), True),
    ((spec.VIRTIO_NET_F_GUEST_TSO4,), False),                     # TSO4 needs GUEST_CSUM
    ((spec.VIRTIO_NET_F_GUEST_CSUM, spec.VIRTIO_NET_F_GUEST_ECN), False),  # ECN needs TSO4/6
    ((spec.VIRTIO_NET_F_GUEST_CSUM, spec.VIRTIO_NET_F_GUEST_TSO4, spec.VIRTIO_NET_F_GUEST_ECN), True),
])
def test_features_ok_enforces_the_net_feature_requirements(memory, accepted, ok):
    dev = OffloadDevice()
    t = mmio.VirtioMmio(dev, RecordingVm(), memory, 0xD000_0000, 5)
    assert bring_up(t, spec.bits(spec.VIRTIO_F_VERSION_1, *accepted), queues=()) == ok


def test_queue_report_shows_where_driver_and_device_are(memory):
    """--stats ends with each queue's indexes: a request the back-end never
    answered shows as avail ahead of used."""
    t, dev, vm = make(memory)
    assert t.queue_report() == []                      # nothing running yet
    assert bring_up(t, FEATURES)
    queue = t.queues[0]
    memory.write(queue.avail + 2, struct.pack("<H", 3))          # the driver posted 3
    memory.write(queue.used + 2, struct.pack("<H", 1))           # the device answered 1
    report = t.queue_report()
    assert len(report) == 2
    assert "queue 0: avail idx 3, used idx 1 (2 outstanding)" in report[0]
    assert "queue 1: avail idx 0, used idx 0 (0 outstanding)" in report[1]
