"""The virtio-pci transport (virtio 1.x section 4.1, modern devices only), with MSI-X.

A PCI function whose one memory BAR holds the four virtio structures that
vendor capabilities in configuration space point at, plus the MSI-X table.
What keeps pyvmm out of the data path, with no exit at all per request:

- Notifications: queue N's notify address is BAR + NOTIFY + 4 * N (a
  notify_off_multiplier of 4); the guest writes the queue index there
  (16 bits) and a KVM ioeventfd turns that into the back-end's kick.
- Interrupts: one MSI-X vector per queue and one for config changes. Each
  vector's eventfd is an irqfd on a GSI that KVM routes to the message the
  guest programmed (pci/msix.py), and each queue's call eventfd is the
  eventfd of the vector the guest chose for it. With MSI-X the guest reads
  no interrupt status: the vector says which queue.

BAR layout (one 32 KiB 32-bit memory BAR, BAR 0):

    0x0000  common configuration (features, status, queue set-up)
    0x1000  ISR status (read-to-clear; unused by a guest on MSI-X)
    0x2000  device-specific configuration
    0x3000  notifications, 4 bytes per queue
    0x4000  MSI-X table, 16 bytes per vector
    0x5000  MSI-X pending bit array

pyvmm places the BAR as firmware would and turns memory decoding on. The
guest may move it or turn decoding off (Linux does, while it sizes the
BAR): the bus entry and the notify ioeventfds follow the BAR register,
and are there only while decoding is on and the range is free.
"""

import logging
import os
import struct
import threading

from pyvmm.devices.bus import BusConflict
from pyvmm.devices.pci.config import (PCI_BASE_ADDRESS_0, PCI_CAP_ID_MSIX, PCI_CAP_ID_VNDR,
                                      PCI_COMMAND, PCI_COMMAND_MEMORY, PciConfig)
from pyvmm.devices.pci.msix import MsixTable
from pyvmm.devices.virtio.transport import VirtioTransport
from pyvmm.virtio import spec

log = logging.getLogger("pyvmm.virtio")

PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1AF4
VIRTIO_PCI_MODERN_DEVICE_BASE = 0x1040     # device id = 0x1040 + virtio device id
VIRTIO_PCI_MAX_DEVICE_ID = 0x3F
VIRTIO_MSI_NO_VECTOR = 0xFFFF

# cfg_type of the vendor capabilities (<linux/virtio_pci.h>)
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

BAR = 0
BAR_SIZE = 0x8000
COMMON, ISR, DEVICE, NOTIFY, MSIX_TABLE, MSIX_PBA = 0x0000, 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
REGION_SIZE = 0x1000
COMMON_SIZE = 0x40
NOTIFY_OFF_MULTIPLIER = 4

# struct virtio_pci_common_cfg (and the later fields of
# virtio_pci_modern_common_cfg, which read 0): offset -> (name, size).
COMMON_FIELDS = {
    0x00: ("device_feature_select", 4), 0x04: ("device_feature", 4),
    0x08: ("driver_feature_select", 4), 0x0C: ("driver_feature", 4),
    0x10: ("config_msix_vector", 2), 0x12: ("num_queues", 2),
    0x14: ("device_status", 1), 0x15: ("config_generation", 1),
    0x16: ("queue_select", 2), 0x18: ("queue_size", 2),
    0x1A: ("queue_msix_vector", 2), 0x1C: ("queue_enable", 2),
    0x1E: ("queue_notify_off", 2),
    0x20: ("queue_desc_lo", 4), 0x24: ("queue_desc_hi", 4),
    0x28: ("queue_driver_lo", 4), 0x2C: ("queue_driver_hi", 4),
    0x30: ("queue_device_lo", 4), 0x34: ("queue_device_hi", 4),
    0x38: ("queue_notify_data", 2), 0x3A: ("queue_reset", 2),
    0x3C: ("admin_queue_index", 2), 0x3E: ("admin_queue_num", 2),
}
QUEUE_ADDRESS_FIELDS = {
    "queue_desc_lo": ("desc", 0), "queue_desc_hi": ("desc", 32),
    "queue_driver_lo": ("avail", 0), "queue_driver_hi": ("avail", 32),
    "queue_device_lo": ("used", 0), "queue_device_hi": ("used", 32),
}
REGION_NAMES = {COMMON: "common", ISR: "ISR", DEVICE: "device config", NOTIFY: "notify",
                MSIX_TABLE: "MSI-X table", MSIX_PBA: "MSI-X PBA"}

# PCI class codes QEMU gives the same devices; a guest does not depend on them.
CLASS_CODES = {spec.VIRTIO_ID_NET: 0x020000, spec.VIRTIO_ID_BLOCK: 0x010000,
               spec.VIRTIO_ID_SCSI: 0x010000, spec.VIRTIO_ID_CONSOLE: 0x078000,
               spec.VIRTIO_ID_VSOCK: 0x078000, spec.VIRTIO_ID_FS: 0x018000}
PCI_CLASS_OTHERS = 0xFF0000


def virtio_cap(cfg_type, offset, length, extra=b""):
    """The body of a struct virtio_pci_cap (after cap_vndr and cap_next)."""
    return struct.pack("<BBBBxxII", 16 + len(extra), cfg_type, BAR, 0, offset, length) + extra


class VirtioPci(VirtioTransport):
    """One virtio device as a PCI function with MSI-X (the locks: transport.VirtioTransport).

    routes: the VM's GsiRoutes; mmio_bus: where the BAR is put while the
    guest has it decoded; address: where pyvmm places it (BAR_SIZE-aligned).
    """

    def __init__(self, device, vm, memory, routes, mmio_bus, address):
        if not 0 <= device.device_id <= VIRTIO_PCI_MAX_DEVICE_ID:
            raise ValueError(f"virtio device id {device.device_id} has no virtio-pci device id")
        self.queue_vectors = [VIRTIO_MSI_NO_VECTOR] * device.num_queues
        super().__init__(device, vm, memory)
        self.mmio_bus = mmio_bus
        self.config_vector = VIRTIO_MSI_NO_VECTOR
        self._unrouted_fd = self._eventfd()     # the call eventfd of a queue with no vector
        self.msix = MsixTable(device.num_queues + 1, vm, routes, self._eventfd, device.name,
                              active=lambda: self.active)
        # MAX_QUEUES (64) + 1 vectors: 1040 bytes of table, 16 of PBA.
        assert self.msix.table_size <= REGION_SIZE and self.msix.pba_size <= REGION_SIZE
        self.config = PciConfig(PCI_VENDOR_ID_REDHAT_QUMRANET,
                                VIRTIO_PCI_MODERN_DEVICE_BASE + device.device_id,
                                CLASS_CODES.get(device.device_id, PCI_CLASS_OTHERS), revision=1,
                                subsystem_vendor=PCI_VENDOR_ID_REDHAT_QUMRANET,
                                subsystem_id=VIRTIO_PCI_MODERN_DEVICE_BASE + device.device_id)
        self.config.memory_bar(BAR, BAR_SIZE, address)
        config_size = min(max(len(device.config()), 4), REGION_SIZE)
        self.config.add_capability(PCI_CAP_ID_VNDR, virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON,
                                                               COMMON_SIZE))
        self.config.add_capability(PCI_CAP_ID_VNDR, virtio_cap(
            VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY, NOTIFY_OFF_MULTIPLIER * len(self.queues),
            struct.pack("<I", NOTIFY_OFF_MULTIPLIER)))
        self.config.add_capability(PCI_CAP_ID_VNDR, virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR, 4))
        self.config.add_capability(PCI_CAP_ID_VNDR, virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE,
                                                               config_size))
        # The spec's other way into the BAR, through configuration space: the
        # driver writes bar, offset and length, then reads or writes pci_cfg_data.
        self.pci_cfg_cap = self.config.add_capability(
            PCI_CAP_ID_VNDR, virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, bytes(4)),
            writable=bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 8 + b"\xff" * 4)
        body, writable = self.msix.capability(BAR, MSIX_TABLE, MSIX_PBA)
        self.msix_cap = self.config.add_capability(PCI_CAP_ID_MSIX, body, writable)
        for q in self.queues:
            q.call_fd = self._unrouted_fd
        self.mapped_at = None             # where the BAR is decoded, if it is
        # Configuration writes one at a time: a BAR moved by two vCPUs at once
        # must end up in one place. (Linux serialises them anyway: pci_lock.)
        self._config_lock = threading.Lock()
        struct.pack_into("<H", self.config.data, PCI_COMMAND, PCI_COMMAND_MEMORY)
        self._place_bar()                 # decoding on, as firmware leaves it

    def _reset_state(self):
        super()._reset_state()
        for q in self.queues:
            q.size = self.device.queue_max_size    # a reset queue_size reads the maximum
            q.call_fd = getattr(self, "_unrouted_fd", None)    # (None while __init__ runs)
        self.queue_vectors = [VIRTIO_MSI_NO_VECTOR] * len(self.queues)
        self.config_vector = VIRTIO_MSI_NO_VECTOR

    def _signal_config(self):
        fd = self.msix.fd(self.config_vector)
        if fd is not None:
            os.eventfd_write(fd, 1)

    # --- configuration space, through the root bus --------------------------

    def config_read(self, offset, size):
        window = self._pci_cfg_window(offset, size)
        if window is not None:
            return self.read(*window)
        return self.config.read(offset, size)

    def config_write(self, offset, size, value):
        window = self._pci_cfg_window(offset, size)
        if window is not None:
            self.write(*window, value)
            return
        with self._config_lock:
            if self.config.write(offset, size, value):
                self._config_written(offset, offset + size)

    def _config_written(self, offset, end):
        """(under _config_lock) Act on a write to [offset, end): decoding, the BAR, MSI-X."""
        if offset < PCI_COMMAND + 2 and end > PCI_COMMAND or \
                offset < PCI_BASE_ADDRESS_0 + 4 and end > PCI_BASE_ADDRESS_0:
            self._place_bar()
        if offset < self.msix_cap + 4 and end > self.msix_cap + 2:
            self.msix.control_written(self.config.u16(self.msix_cap + 2))

    def _pci_cfg_window(self, offset, size):
        """(BAR offset, size) an access to VIRTIO_PCI_CAP_PCI_CFG's pci_cfg_data
        means: the cap's offset and length, if they name a sane access of
        size bytes to BAR 0, else None (and the access goes nowhere)."""
        data = self.pci_cfg_cap + 16
        if offset != data:
            return None
        bar = self.config.data[self.pci_cfg_cap + 4]
        at, length = struct.unpack_from("<II", self.config.data, self.pci_cfg_cap + 8)
        if bar != BAR or length != size or length not in (1, 2, 4) or at % length \
                or at + length > BAR_SIZE:
            return None
        return at, length

    def _place_bar(self):
        """Decoding or the BAR changed: put the BAR where the register says, or nowhere."""
        address = self.config.bar_address(BAR)
        wanted = address if self.config.u16(PCI_COMMAND) & PCI_COMMAND_MEMORY and address else None
        if wanted == self.mapped_at:
            return
        if self.mapped_at is not None:
            self._unmap()
        if wanted is not None:
            self._map(wanted)

    def _notify_ioeventfds(self, address, deassign=False):
        """Each back-end queue's notify address at BAR address: an ioeventfd
        (16-bit writes of the queue index), or none any more (deassign)."""
        notifies = [(q, address + NOTIFY + NOTIFY_OFF_MULTIPLIER * q.index)
                    for q in self.queues if q.kick_fd is not None]
        done = []
        try:
            for q, at in notifies:
                self.vm.ioeventfd(q.kick_fd, at, 2, datamatch=q.index, deassign=deassign)
                done.append((q, at))
        except OSError:
            if not deassign:       # take back the ones made, and say why
                for q, at in done:
                    self.vm.ioeventfd(q.kick_fd, at, 2, datamatch=q.index, deassign=True)
            raise

    def _map(self, address):
        try:
            self.mmio_bus.add(address, BAR_SIZE, self, self.device.name)
        except BusConflict:
            log.warning("%s: the guest put its BAR at %#x, over another device; it is not "
                        "decoded there", self.device.name, address)
            return
        try:
            self._notify_ioeventfds(address)
        except OSError as e:
            self.mmio_bus.remove(address)
            log.warning("%s: KVM refused the notify ioeventfds at %#x (%s); the BAR is not "
                        "decoded there", self.device.name, address, e.strerror)
            return
        self.mapped_at = address

    def _unmap(self):
        self._notify_ioeventfds(self.mapped_at, deassign=True)
        self.mmio_bus.remove(self.mapped_at)
        self.mapped_at = None

    # --- the BAR ----------------------------------------------------------------

    def read(self, offset, size):
        region, at = offset & ~(REGION_SIZE - 1), offset & (REGION_SIZE - 1)
        if region == COMMON:
            with self._lock:
                return self._read_common(at, size)
        if region == ISR:
            return self._read_isr() if at == 0 else 0
        if region == DEVICE:
            with self._lock:
                data = self.device.config()[at:at + size]
            return int.from_bytes(data.ljust(size, b"\0"), "little")
        if region == MSIX_TABLE:
            return self.msix.read_table(at, size)
        if region == MSIX_PBA:
            return self.msix.read_pba(at, size)
        return 0

    def write(self, offset, size, value):
        region, at = offset & ~(REGION_SIZE - 1), offset & (REGION_SIZE - 1)
        if region == COMMON:
            if COMMON_FIELDS.get(at) == ("device_status", 1) and size == 1:
                self._write_status(value & 0xFF)
                return
            with self._lock:
                self._write_common(at, size, value)
        elif region == DEVICE:
            with self._status_lock:        # may talk to the back-end: never under _lock
                self.device.write_config(at, value.to_bytes(size, "little"))
        elif region == NOTIFY:
            self._notify(at, size, value)
        elif region == MSIX_TABLE:
            self.msix.write_table(at, size, value)

    def _read_isr(self):
        """Bit 0 always (as virtio-mmio's InterruptStatus), bit 1 once per config interrupt."""
        with self._isr_lock:
            pending, self.config_pending = self.config_pending, False
        return 1 | (2 if pending else 0)

    def _notify(self, at, size, value):
        """A notification that no ioeventfd took: a queue pyvmm serves itself, or
        an odd-sized write to one a back-end serves (passed on to its kick)."""
        index = at // NOTIFY_OFF_MULTIPLIER
        if at % NOTIFY_OFF_MULTIPLIER or index >= len(self.queues):
            return
        q = self.queues[index]
        if q.kick_fd is not None:
            os.eventfd_write(q.kick_fd, 1)
            return
        with self._status_lock:
            self.device.notify(index)

    def _field(self, at, size):
        """The common configuration field an access of size bytes at at names
        (its offset and size exactly), or None."""
        field = COMMON_FIELDS.get(at)
        if field is None or field[1] != size:
            return None
        return field[0]

    def _read_common(self, at, size):
        if size == 8 and at in (0x20, 0x28, 0x30):
            return self._read_common(at, 4) | self._read_common(at + 4, 4) << 32
        name = self._field(at, size)
        q = self._queue()
        if name == "device_feature":
            return self._device_features_word()
        if name == "device_feature_select":
            return self.device_features_sel
        if name == "driver_feature_select":
            return self.driver_features_sel
        if name == "driver_feature":
            return (self.driver_features >> (32 * self.driver_features_sel)) & 0xFFFF_FFFF \
                if self.driver_features_sel < 2 else 0
        if name == "config_msix_vector":
            return self.config_vector
        if name == "num_queues":
            return len(self.queues)
        if name == "device_status":
            return self.status
        if name == "config_generation":
            return self.config_generation & 0xFF
        if name == "queue_select":
            return self.queue_sel
        if q is None:
            return 0                  # queue_size 0: the driver's sign of no such queue
        if name == "queue_size":
            return q.size
        if name == "queue_msix_vector":
            return self.queue_vectors[q.index]
        if name == "queue_enable":
            return int(q.ready)
        if name == "queue_notify_off":
            return q.index
        if name in QUEUE_ADDRESS_FIELDS:
            field, shift = QUEUE_ADDRESS_FIELDS[name]
            return (getattr(q, field) >> shift) & 0xFFFF_FFFF
        return 0

    def _write_common(self, at, size, value):
        if size == 8 and at in (0x20, 0x28, 0x30):
            self._write_common(at, 4, value & 0xFFFF_FFFF)
            self._write_common(at + 4, 4, value >> 32)
            return
        name = self._field(at, size)
        q = self._queue()
        if name == "device_feature_select":
            self.device_features_sel = value
        elif name == "driver_feature_select":
            self.driver_features_sel = value
        elif name == "driver_feature":
            self._write_driver_features_word(value)
        elif name == "config_msix_vector":
            self.config_vector = self._vector(value)
        elif name == "queue_select":
            self.queue_sel = value
        elif q is None or name is None:
            log.debug("%s: common configuration write of %#x at %#x (%d bytes) ignored",
                      self.device.name, value, at, size)
        elif name == "queue_enable":
            self._write_queue_ready(q, value)
        elif name == "queue_size":
            self._write_queue_field(q, "size", value, bits=16)
        elif name in QUEUE_ADDRESS_FIELDS:
            field, shift = QUEUE_ADDRESS_FIELDS[name]
            self._write_queue_field(q, field, value, shift)
        elif name == "queue_msix_vector":
            if q.ready:
                log.debug("%s: queue %d's vector changed while ready, ignored",
                          self.device.name, q.index)
            else:
                self.queue_vectors[q.index] = self._vector(value)
                fd = self.msix.fd(self.queue_vectors[q.index])
                q.call_fd = self._unrouted_fd if fd is None else fd
        else:
            log.debug("%s: write of %#x to %s ignored", self.device.name, value, name)

    def _vector(self, value):
        """What a vector register reads back after value is written: the vector
        if the table has it, else NO_VECTOR (how the spec says "refused")."""
        return value if value < self.msix.nvectors else VIRTIO_MSI_NO_VECTOR

    def describe(self, offset):
        """For --stats: which structure an exit touched."""
        region = offset & ~(REGION_SIZE - 1)
        name = REGION_NAMES.get(region, f"{offset:#x}")
        if region == COMMON:
            field = COMMON_FIELDS.get(offset - COMMON)
            return f"{name} {field[0]}" if field else name
        return name
