"""The virtio-pci transport, its PCI root and MSI-X, driven as Linux drives them, and by garbage.

No KVM: a recording VM stands in for the ioeventfd, irqfd and GSI routing
ioctls; guest accesses go through the same port I/O and MMIO buses the vCPU
threads use.
"""

import os
import random
import struct

import pytest
from test_virtio import FEATURES, MiB, ToyDevice

from pyvmm.devices.bus import Bus
from pyvmm.devices.pci import config as pcfg
from pyvmm.devices.pci.msix import PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_MASKALL
from pyvmm.devices.pci.root import PCI_CONFIG_PORT, PciRoot
from pyvmm.devices.virtio import pci
from pyvmm.kvm import uapi
from pyvmm.kvm.irq_routing import FIRST_MSI_GSI, GsiRoutes
from pyvmm.memory import GuestMemory
from pyvmm.virtio import spec
from pyvmm.virtio.splitring import DriverRing

BAR_AT = 0xE000_0000
S = spec


class RecordingVm:
    """What the transport asks of KVM: ioeventfds (live ones), irqfds, the routing table."""

    def __init__(self):
        self.ioeventfds = {}       # (addr, length, datamatch) -> fd
        self.irqfds = {}           # fd -> gsi
        self.routing = []          # the last table: (gsi, type, (address, data) or (chip, pin))
        self.routing_calls = 0

    def ioeventfd(self, fd, addr, length, datamatch=None, pio=False, deassign=False):
        key = (addr, length, datamatch)
        if deassign:
            assert self.ioeventfds.pop(key) == fd, "deassigned an ioeventfd never assigned"
        else:
            assert key not in self.ioeventfds, "KVM would say EEXIST"
            self.ioeventfds[key] = fd

    def irqfd(self, fd, gsi, deassign=False):
        self.irqfds[fd] = gsi

    def set_gsi_routing(self, entries):
        self.routing_calls += 1
        self.routing = []
        for e in entries:
            if e.type == uapi.KVM_IRQ_ROUTING_MSI:
                self.routing.append((e.gsi, e.type, (e.u.msi.address_hi << 32 | e.u.msi.address_lo,
                                                     e.u.msi.data)))
            else:
                self.routing.append((e.gsi, e.type, (e.u.irqchip.irqchip, e.u.irqchip.pin)))

    def msi_routes(self):
        return {gsi: route for gsi, kind, route in self.routing if kind == uapi.KVM_IRQ_ROUTING_MSI}


class Guest:
    """Config space through ports 0xCF8/0xCFC, the BAR through the MMIO bus."""

    def __init__(self, root, mmio):
        self.root, self.mmio = root, mmio

    def cfg_read(self, slot, offset, size):
        self.root.write(0, 4, 0x8000_0000 | slot << 11 | (offset & 0xFC))
        return self.root.read(4 + (offset & 3), size)

    def cfg_write(self, slot, offset, size, value):
        self.root.write(0, 4, 0x8000_0000 | slot << 11 | (offset & 0xFC))
        self.root.write(4 + (offset & 3), size, value)

    def read(self, addr, size):
        return self.mmio.read(self.mmio.find(addr), addr, size)

    def write(self, addr, size, value):
        self.mmio.write(self.mmio.find(addr), addr, size, value)


@pytest.fixture(scope="module")
def memory():
    m = GuestMemory(16 * MiB)
    yield m
    m.close()


@pytest.fixture
def rig(memory):
    vm = RecordingVm()
    mmio = Bus("MMIO")
    root = PciRoot()
    dev = ToyDevice()
    t = pci.VirtioPci(dev, vm, memory, GsiRoutes(vm), mmio, BAR_AT)
    slot = root.add(t)
    yield t, dev, vm, Guest(root, mmio), slot
    t.close()


def capabilities(g, slot):
    """(offset, id, cfg_type or None) for each capability, walking the list as Linux does."""
    caps, offset = [], g.cfg_read(slot, pcfg.PCI_CAPABILITY_LIST, 1)
    while offset:
        cap_id = g.cfg_read(slot, offset, 1)
        caps.append((offset, cap_id, g.cfg_read(slot, offset + 3, 1)
                     if cap_id == pcfg.PCI_CAP_ID_VNDR else None))
        offset = g.cfg_read(slot, offset + 1, 1)
        assert len(caps) < 48
    return caps


def common(field):
    return BAR_AT + pci.COMMON + {name: off for off, (name, _) in pci.COMMON_FIELDS.items()}[field]


def bring_up(t, g, slot, features=FEATURES, queues=((0, 64, 0x10000), (1, 64, 0x20000)),
             vectors=True):
    """What virtio_pci_modern_probe, vp_find_vqs_msix and virtio_dev_probe do, in order."""
    msix = [off for off, cap_id, _ in capabilities(g, slot) if cap_id == pcfg.PCI_CAP_ID_MSIX][0]
    g.cfg_write(slot, msix + 2, 2, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
    for v in range(len(queues) + 1):     # message: APIC 0, vector 0x30 + v; unmasked
        entry = BAR_AT + pci.MSIX_TABLE + 16 * v
        g.write(entry, 4, 0xFEE0_0000)
        g.write(entry + 4, 4, 0)
        g.write(entry + 8, 4, 0x30 + v)
        g.write(entry + 12, 4, 0)
    g.cfg_write(slot, msix + 2, 2, PCI_MSIX_FLAGS_ENABLE)
    g.write(common("device_status"), 1, S.VIRTIO_CONFIG_S_ACKNOWLEDGE)
    status = S.VIRTIO_CONFIG_S_ACKNOWLEDGE | S.VIRTIO_CONFIG_S_DRIVER
    g.write(common("device_status"), 1, status)
    for sel in (0, 1):
        g.write(common("driver_feature_select"), 4, sel)
        g.write(common("driver_feature"), 4, (features >> (32 * sel)) & 0xFFFF_FFFF)
    g.write(common("device_status"), 1, status | S.VIRTIO_CONFIG_S_FEATURES_OK)
    if not g.read(common("device_status"), 1) & S.VIRTIO_CONFIG_S_FEATURES_OK:
        return False
    if vectors:
        g.write(common("config_msix_vector"), 2, 0)
        assert g.read(common("config_msix_vector"), 2) == 0
    for n, (index, size, gpa) in enumerate(queues):
        ring = DriverRing(t.memory, gpa, size)
        g.write(common("queue_select"), 2, index)
        assert g.read(common("queue_size"), 2) == 64 and g.read(common("queue_enable"), 2) == 0
        g.write(common("queue_size"), 2, size)
        for name, addr in (("queue_desc_lo", ring.desc_addr), ("queue_driver_lo", ring.avail_addr),
                           ("queue_device_lo", ring.used_addr)):
            g.write(common(name), 4, addr & 0xFFFF_FFFF)
            g.write(common(name) + 4, 4, addr >> 32)
        if vectors:
            g.write(common("queue_msix_vector"), 2, n + 1)
            assert g.read(common("queue_msix_vector"), 2) == n + 1
    for index, _, _ in queues:
        g.write(common("queue_select"), 2, index)
        g.write(common("queue_enable"), 2, 1)
    g.write(common("device_status"), 1, status | S.VIRTIO_CONFIG_S_FEATURES_OK
            | S.VIRTIO_CONFIG_S_DRIVER_OK)
    return True


# --- the root bus ----------------------------------------------------------------

def test_config_address_reads_back_and_a_byte_write_to_0xcfb_does_not_change_it():
    root = PciRoot()
    root.write(3, 1, 0x01)                         # Linux's pci_check_type1 does this first
    root.write(0, 4, 0x8000_0000)
    assert root.read(0, 4) == 0x8000_0000
    root.write(3, 1, 0x01)
    assert root.read(0, 4) == 0x8000_0000


def test_the_host_bridge_is_what_linux_looks_for_and_empty_slots_read_all_ones():
    g = Guest(PciRoot(), Bus("MMIO"))
    assert g.cfg_read(0, pcfg.PCI_VENDOR_ID, 4) == 0x0D57_8086
    assert g.cfg_read(0, 0x0A, 2) == 0x0600                   # PCI_CLASS_BRIDGE_HOST
    assert g.cfg_read(5, 0, 4) == 0xFFFF_FFFF
    g.root.write(0, 4, 0x8001_0000)                           # bus 1
    assert g.root.read(4, 4) == 0xFFFF_FFFF
    g.root.write(0, 4, 0x0000_0000)                           # enable bit clear
    assert g.root.read(4, 2) == 0xFFFF


# --- identity, capabilities, the BAR ---------------------------------------------

def test_identity_and_the_capability_list_linux_looks_for(rig):
    t, dev, vm, g, slot = rig
    assert slot == 1
    assert g.cfg_read(slot, 0, 2) == 0x1AF4 and g.cfg_read(slot, 2, 2) == 0x1040 + dev.device_id
    assert g.cfg_read(slot, pcfg.PCI_REVISION_ID, 1) == 1       # a modern, non-transitional device
    assert g.cfg_read(slot, pcfg.PCI_STATUS, 2) & pcfg.PCI_STATUS_CAP_LIST
    assert g.cfg_read(slot, pcfg.PCI_INTERRUPT_PIN, 1) == 0     # MSI-X only
    caps = capabilities(g, slot)
    assert [c[2] for c in caps if c[1] == pcfg.PCI_CAP_ID_VNDR] == [
        pci.VIRTIO_PCI_CAP_COMMON_CFG, pci.VIRTIO_PCI_CAP_NOTIFY_CFG, pci.VIRTIO_PCI_CAP_ISR_CFG,
        pci.VIRTIO_PCI_CAP_DEVICE_CFG, pci.VIRTIO_PCI_CAP_PCI_CFG]
    for offset, cap_id, cfg_type in caps:
        assert offset % 4 == 0
        if cap_id == pcfg.PCI_CAP_ID_VNDR:
            bar, cap_offset, length = (g.cfg_read(slot, offset + 4, 1),
                                       g.cfg_read(slot, offset + 8, 4), g.cfg_read(slot, offset + 12, 4))
            assert bar == 0 and cap_offset + length <= pci.BAR_SIZE
            if cfg_type == pci.VIRTIO_PCI_CAP_NOTIFY_CFG:
                assert g.cfg_read(slot, offset + 16, 4) == pci.NOTIFY_OFF_MULTIPLIER
    msix = [c[0] for c in caps if c[1] == pcfg.PCI_CAP_ID_MSIX][0]
    assert g.cfg_read(slot, msix + 2, 2) == dev.num_queues          # table size - 1: queues + config
    assert g.cfg_read(slot, msix + 4, 4) == pci.MSIX_TABLE and g.cfg_read(slot, msix + 8, 4) == pci.MSIX_PBA


def test_bar_sizing_and_the_bar_following_its_register_and_decoding(rig):
    t, dev, vm, g, slot = rig
    notify0 = (BAR_AT + pci.NOTIFY, 2, 0)
    assert t.mapped_at == BAR_AT and notify0 in vm.ioeventfds
    # What Linux's __pci_read_base does: decoding off, all ones, read, restore, decoding on.
    command = g.cfg_read(slot, pcfg.PCI_COMMAND, 2)
    g.cfg_write(slot, pcfg.PCI_COMMAND, 2, command & ~pcfg.PCI_COMMAND_MEMORY)
    assert t.mapped_at is None and not vm.ioeventfds and g.mmio.find(BAR_AT) is None
    g.cfg_write(slot, pcfg.PCI_BASE_ADDRESS_0, 4, 0xFFFF_FFFF)
    assert g.cfg_read(slot, pcfg.PCI_BASE_ADDRESS_0, 4) == (~(pci.BAR_SIZE - 1)) & 0xFFFF_FFFF
    g.cfg_write(slot, pcfg.PCI_BASE_ADDRESS_0, 4, BAR_AT)
    g.cfg_write(slot, pcfg.PCI_COMMAND, 2, command)
    assert t.mapped_at == BAR_AT and set(vm.ioeventfds) == {notify0, (BAR_AT + pci.NOTIFY + 4, 2, 1)}
    # Moved by the guest: everything follows.
    g.cfg_write(slot, pcfg.PCI_BASE_ADDRESS_0, 4, 0xE100_0000)
    assert t.mapped_at == 0xE100_0000 and g.mmio.find(BAR_AT) is None
    assert (0xE100_0000 + pci.NOTIFY, 2, 0) in vm.ioeventfds and notify0 not in vm.ioeventfds
    assert g.read(0xE100_0000 + pci.COMMON + 0x12, 2) == dev.num_queues


def test_a_bar_moved_over_another_device_is_not_decoded(rig):
    t, dev, vm, g, slot = rig
    g.mmio.add(0xD000_0000, 0x1000, object(), "virtio-mmio device")
    g.cfg_write(slot, pcfg.PCI_BASE_ADDRESS_0, 4, 0xD000_0000)
    assert t.mapped_at is None and not vm.ioeventfds
    g.cfg_write(slot, pcfg.PCI_BASE_ADDRESS_0, 4, BAR_AT)
    assert t.mapped_at == BAR_AT


# --- bring-up, vectors, interrupts ----------------------------------------------

def test_bring_up_gives_each_queue_the_eventfd_of_its_vector_and_routes_the_messages(rig):
    t, dev, vm, g, slot = rig
    assert bring_up(t, g, slot)
    assert dev.activations == [(FEATURES, [(0, 64, 0x10000), (1, 64, 0x20000)])]
    started = t._activation.queues
    assert [q.call_fd for q in started] == [t.msix.fds[1], t.msix.fds[2]]
    assert all(vm.irqfds[fd] == gsi for fd, gsi in zip(t.msix.fds, t.msix.gsis))
    routes = vm.msi_routes()
    assert {gsi: routes[gsi] for gsi in t.msix.gsis[:3]} == {
        t.msix.gsis[v]: (0xFEE0_0000, 0x30 + v) for v in range(3)}
    assert t.msix.gsis[3] not in routes                   # never unmasked: routed nowhere
    # KVM's own routes stay: the 24 IOAPIC pins and the 16 PIC pins.
    chips = [r for r in vm.routing if r[1] == uapi.KVM_IRQ_ROUTING_IRQCHIP]
    assert len(chips) == 40 and (4, uapi.KVM_IRQ_ROUTING_IRQCHIP, (uapi.KVM_IRQCHIP_IOAPIC, 4)) in chips
    assert min(t.msix.gsis) == FIRST_MSI_GSI


def test_reset_reads_zero_at_once_and_forgets_the_vectors(rig):
    t, dev, vm, g, slot = rig
    assert bring_up(t, g, slot)
    g.write(common("device_status"), 1, 0)
    assert g.read(common("device_status"), 1) == 0 and dev.resets == 1      # vp_reset polls this
    g.write(common("queue_select"), 2, 0)
    assert g.read(common("queue_msix_vector"), 2) == pci.VIRTIO_MSI_NO_VECTOR
    assert g.read(common("queue_size"), 2) == 64 and g.read(common("queue_enable"), 2) == 0
    assert bring_up(t, g, slot)


def test_a_vector_beyond_the_table_reads_back_as_no_vector(rig):
    t, dev, vm, g, slot = rig
    g.write(common("config_msix_vector"), 2, dev.num_queues + 1)
    assert g.read(common("config_msix_vector"), 2) == pci.VIRTIO_MSI_NO_VECTOR
    g.write(common("queue_select"), 2, 0)
    g.write(common("queue_msix_vector"), 2, 0x1234)
    assert g.read(common("queue_msix_vector"), 2) == pci.VIRTIO_MSI_NO_VECTOR


def drain(fd):
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_config_interrupt_goes_to_the_config_vector(rig):
    t, dev, vm, g, slot = rig
    assert bring_up(t, g, slot)
    drain(t.msix.fds[0])
    t.config_changed()
    assert drain(t.msix.fds[0]) == 1 and g.read(common("config_generation"), 1) == 1
    assert g.read(BAR_AT + pci.ISR, 1) == 3 and g.read(BAR_AT + pci.ISR, 1) == 1    # read-to-clear


def test_unmasking_a_running_devices_vector_sends_what_may_have_been_dropped(rig):
    t, dev, vm, g, slot = rig
    assert bring_up(t, g, slot)
    for fd in t.msix.fds:
        drain(fd)
    ctrl = BAR_AT + pci.MSIX_TABLE + 16 * 1 + 12
    g.write(ctrl, 4, 1)                                   # Linux masks to move the vector...
    assert t.msix.gsis[1] not in vm.msi_routes()
    g.write(BAR_AT + pci.MSIX_TABLE + 16 * 1 + 8, 4, 0x41)
    g.write(ctrl, 4, 0)                                   # ... and unmasks
    assert vm.msi_routes()[t.msix.gsis[1]] == (0xFEE0_0000, 0x41)
    assert drain(t.msix.fds[1]) == 1 and drain(t.msix.fds[2]) == 0


def test_unmasking_the_function_routes_all_its_vectors_in_one_table(rig):
    """Clearing the function mask makes every unmasked vector deliverable at
    once: one KVM_SET_GSI_ROUTING for them all, not one per vector."""
    t, dev, vm, g, slot = rig
    msix = [off for off, cap_id, _ in capabilities(g, slot) if cap_id == pcfg.PCI_CAP_ID_MSIX][0]
    g.cfg_write(slot, msix + 2, 2, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
    for v in range(t.msix.nvectors):
        g.write(BAR_AT + pci.MSIX_TABLE + 16 * v, 4, 0xFEE0_0000)
        g.write(BAR_AT + pci.MSIX_TABLE + 16 * v + 8, 4, 0x30 + v)
        g.write(BAR_AT + pci.MSIX_TABLE + 16 * v + 12, 4, 0)
    calls = vm.routing_calls
    g.cfg_write(slot, msix + 2, 2, PCI_MSIX_FLAGS_ENABLE)
    assert vm.routing_calls == calls + 1
    assert sorted(vm.msi_routes()) == sorted(t.msix.gsis)


def test_notify_writes_no_ioeventfd_took(rig):
    """Queue 2 has no back-end (pyvmm serves it): its notification reaches the
    device model. An odd-sized write to a back-end's queue is passed on to its kick."""
    t, dev, vm, g, slot = rig
    g.write(BAR_AT + pci.NOTIFY + 8, 2, 2)
    assert dev.notified == [2]
    drain(t.queues[0].kick_fd)
    g.write(BAR_AT + pci.NOTIFY, 4, 0)
    assert drain(t.queues[0].kick_fd) == 1


def test_device_config_and_64_bit_queue_addresses(rig):
    t, dev, vm, g, slot = rig
    assert g.read(BAR_AT + pci.DEVICE, 4) == struct.unpack("<I", dev.config()[:4])[0]
    assert g.read(BAR_AT + pci.DEVICE + 0x200, 4) == 0
    g.write(common("queue_select"), 2, 1)
    g.write(common("queue_desc_lo"), 8, 0x1_2345_6000)
    assert g.read(common("queue_desc_lo"), 8) == 0x1_2345_6000 and t.queues[1].desc == 0x1_2345_6000


def test_the_bar_through_the_pci_cfg_capability(rig):
    t, dev, vm, g, slot = rig
    cap = [off for off, _, cfg_type in capabilities(g, slot)
           if cfg_type == pci.VIRTIO_PCI_CAP_PCI_CFG][0]
    g.cfg_write(slot, cap + 8, 4, pci.COMMON + 0x12)          # num_queues
    g.cfg_write(slot, cap + 12, 4, 2)
    assert g.cfg_read(slot, cap + 16, 2) == dev.num_queues
    g.cfg_write(slot, cap + 8, 4, pci.COMMON + 0x16)          # queue_select
    g.cfg_write(slot, cap + 16, 2, 1)
    assert t.queue_sel == 1
    g.cfg_write(slot, cap + 8, 4, pci.BAR_SIZE - 1)            # beyond the BAR: nowhere
    assert g.cfg_read(slot, cap + 16, 2) == 0                 # its own bytes, not the BAR


# --- a hostile guest ----------------------------------------------------------

def test_garbage_in_config_space_the_bar_and_the_msix_table_is_survived(memory):
    """Random accesses of every size to every register, from a guest that
    knows the layout; what must hold after each: the read-only identity is
    unchanged, ioeventfds exist only inside the decoded BAR and KVM would
    accept every call, routes point only at the device's own GSIs."""
    rng = random.Random(22)
    vm, mmio, root = RecordingVm(), Bus("MMIO"), PciRoot()
    dev = ToyDevice()
    t = pci.VirtioPci(dev, vm, memory, GsiRoutes(vm), mmio, BAR_AT)
    slot = root.add(t)
    g = Guest(root, mmio)
    ident = g.cfg_read(slot, 0, 4)
    interesting = [0xFFFF_FFFF, 0, 1, 0xFFFF, 0x8000_0000, BAR_AT, 0xE100_0000, 0xFEE0_0000,
                   pci.VIRTIO_MSI_NO_VECTOR, 0x12345678]
    tried = 0
    try:
        for _ in range(20000):
            size = rng.choice((1, 2, 4, 8, 3))
            value = rng.choice(interesting + [rng.getrandbits(64)]) & ((1 << (8 * size)) - 1)
            kind = rng.randrange(4)
            if kind == 0:
                offset = rng.randrange(-4, 264)
                if rng.random() < 0.5:
                    g.cfg_write(slot, offset & 0xFF, size if size < 8 else 4, value)
                else:
                    g.cfg_read(slot, offset & 0xFF, size if size < 8 else 4)
            else:
                base = t.mapped_at or BAR_AT
                offset = rng.choice((pci.COMMON, pci.ISR, pci.DEVICE, pci.NOTIFY, pci.MSIX_TABLE,
                                     pci.MSIX_PBA, 0x6000)) + rng.randrange(0, 0x420)
                entry = mmio.find(base + offset)
                if entry is not None:
                    if rng.random() < 0.6:
                        mmio.write(entry, base + offset, size, value)
                    else:
                        mmio.read(entry, base + offset, size)
            tried += 1
            assert g.cfg_read(slot, 0, 4) == ident
            for addr, length, datamatch in vm.ioeventfds:
                assert t.mapped_at is not None and t.mapped_at + pci.NOTIFY <= addr \
                    < t.mapped_at + pci.NOTIFY + 4 * dev.num_queues and length == 2
            assert set(vm.msi_routes()) <= set(t.msix.gsis)
    finally:
        t.close()
    print(f"virtio-pci garbage: {tried} accesses tried, {tried} survived")
    assert tried == 20000


class RefusingVm(RecordingVm):
    """A KVM that says no to every ioeventfd and routing table."""

    def ioeventfd(self, fd, addr, length, datamatch=None, pio=False, deassign=False):
        if not deassign:
            raise OSError(17, "File exists")
        super().ioeventfd(fd, addr, length, datamatch, pio, deassign)

    def set_gsi_routing(self, entries):
        raise OSError(22, "Invalid argument")


def test_what_kvm_refuses_leaves_the_bar_unmapped_and_the_routes_as_they_were(memory):
    vm, mmio, root = RefusingVm(), Bus("MMIO"), PciRoot()
    routes = GsiRoutes(vm)
    t = pci.VirtioPci(ToyDevice(), vm, memory, routes, mmio, BAR_AT)
    try:
        slot = root.add(t)
        assert t.mapped_at is None and mmio.find(BAR_AT) is None and not vm.ioeventfds
        g = Guest(root, mmio)
        msix = [off for off, cap_id, _ in capabilities(g, slot) if cap_id == pcfg.PCI_CAP_ID_MSIX][0]
        t.msix.write_table(12, 4, 0)                               # vector 0 unmasked ...
        g.cfg_write(slot, msix + 2, 2, PCI_MSIX_FLAGS_ENABLE)      # ... and enabled: refused
        assert routes._msi == {} and not any(t.msix._routed)
    finally:
        t.close()
