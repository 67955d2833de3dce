"""The virtio-mmio transport, version 2 (virtio 1.x section 4.2), without Python on the data path.

The guest finds each device through `virtio_mmio.device=4K@BASE:IRQ` on its
command line and drives it through the registers below. What keeps pyvmm
out of the data path:

- QueueNotify: each queue's notification is a KVM ioeventfd (datamatch on
  the queue index). KVM turns the guest's write into a signal on an eventfd
  that the back-end (vhost) waits on; no exit reaches pyvmm.
- Interrupts: one eventfd per device is a KVM irqfd on the device's IRQ,
  and it is the call eventfd of every queue (and what pyvmm writes for a
  config interrupt). The back-end signals it and KVM injects the
  interrupt; pyvmm never sees it.

Why one eventfd and not one per queue: the IRQ is edge-triggered, and KVM
injects each irqfd from a work item of its own as two separate line
changes (up, then down) under one IRQ source. Two irqfds on one line,
signalled on two host CPUs at once, overlap: the second "up" comes while
the first has not gone down yet, and KVM drops it as coalesced. If the
guest handled the first interrupt before the second queue's completion,
that completion waits forever (seen with virtiofsd, whose threads
complete requests on two queues at once: issue 24). One irqfd is one work
item, which the kernel never runs twice at once, so its edges never
overlap.

That leaves InterruptStatus. Linux's vm_interrupt() (drivers/virtio/
virtio_mmio.c) reads it on every interrupt, acks what it read through
InterruptACK, handles a config change if INT_CONFIG is set, and scans all
its queues if INT_VRING is set (each scan finds nothing to do when a queue
has no new used buffers). Since pyvmm never learns when a back-end raised
an interrupt, it cannot know whether a vring interrupt is pending, so:

- InterruptStatus always reads INT_VRING, plus INT_CONFIG when pyvmm itself
  raised a config interrupt; the read consumes INT_CONFIG (the driver acks
  exactly what it read). A scan too many costs the guest a few loads.
  (Firecracker settled on the same answer for its vhost-user devices.)
- InterruptACK therefore carries nothing pyvmm needs: it is an ioeventfd
  without datamatch, which KVM swallows without an exit.

The one exit left per interrupt is the InterruptStatus read; `--stats`
shows it, and shows that QueueNotify causes none.
"""

import logging
import os

from pyvmm.devices.virtio.transport import VirtioTransport

log = logging.getLogger("pyvmm.virtio")

MMIO_SIZE = 0x1000   # what the kernel command line announces ("4K@")

VIRTIO_MMIO_MAGIC = 0x7472_6976   # "virt"
VIRTIO_MMIO_VERSION_MODERN = 2
VIRTIO_MMIO_VENDOR_ID = 0x4D56_5950   # "PYVM"

# Register offsets (<linux/virtio_mmio.h>)
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_AVAIL_LOW, QUEUE_AVAIL_HIGH = 0x090, 0x094
QUEUE_USED_LOW, QUEUE_USED_HIGH = 0x0A0, 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW, SHM_LEN_HIGH = 0x0B0, 0x0B4
SHM_BASE_LOW, SHM_BASE_HIGH = 0x0B8, 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

VIRTIO_MMIO_INT_VRING = 1 << 0
VIRTIO_MMIO_INT_CONFIG = 1 << 1

REGISTER_NAMES = {
    MAGIC_VALUE: "MagicValue", VERSION: "Version", DEVICE_ID: "DeviceID", VENDOR_ID: "VendorID",
    DEVICE_FEATURES: "DeviceFeatures", DEVICE_FEATURES_SEL: "DeviceFeaturesSel",
    DRIVER_FEATURES: "DriverFeatures", DRIVER_FEATURES_SEL: "DriverFeaturesSel",
    QUEUE_SEL: "QueueSel", QUEUE_NUM_MAX: "QueueNumMax", QUEUE_NUM: "QueueNum",
    QUEUE_READY: "QueueReady", QUEUE_NOTIFY: "QueueNotify",
    INTERRUPT_STATUS: "InterruptStatus", INTERRUPT_ACK: "InterruptACK", STATUS: "Status",
    QUEUE_DESC_LOW: "QueueDescLow", QUEUE_DESC_HIGH: "QueueDescHigh",
    QUEUE_AVAIL_LOW: "QueueDriverLow", QUEUE_AVAIL_HIGH: "QueueDriverHigh",
    QUEUE_USED_LOW: "QueueDeviceLow", QUEUE_USED_HIGH: "QueueDeviceHigh",
    SHM_SEL: "SHMSel", SHM_LEN_LOW: "SHMLenLow", SHM_LEN_HIGH: "SHMLenHigh",
    SHM_BASE_LOW: "SHMBaseLow", SHM_BASE_HIGH: "SHMBaseHigh",
    CONFIG_GENERATION: "ConfigGeneration",
}

# Which 32-bit half of which Queue field each address register holds.
QUEUE_ADDRESS_REGISTERS = {
    QUEUE_DESC_LOW: ("desc", 0), QUEUE_DESC_HIGH: ("desc", 32),
    QUEUE_AVAIL_LOW: ("avail", 0), QUEUE_AVAIL_HIGH: ("avail", 32),
    QUEUE_USED_LOW: ("used", 0), QUEUE_USED_HIGH: ("used", 32),
}


def mmio_cmdline(base, gsi):
    """The kernel command line entry that announces a device at base on gsi."""
    return f"virtio_mmio.device={MMIO_SIZE // 1024}K@{base:#x}:{gsi}"


def register_name(offset):
    if offset >= CONFIG:
        return "config"
    return REGISTER_NAMES.get(offset & ~3, f"{offset:#x}")


class VirtioMmio(VirtioTransport):
    """The register file of one device, at base, interrupting on gsi
    (the locks: transport.VirtioTransport)."""

    def __init__(self, device, vm, memory, base, gsi):
        super().__init__(device, vm, memory)
        self.base = base
        self.gsi = gsi
        self._irq_fd = self._eventfd()          # the device's one irqfd (see the module doc)
        vm.irqfd(self._irq_fd, gsi)
        for q in self.queues:
            q.call_fd = self._irq_fd
            if q.kick_fd is not None:
                vm.ioeventfd(q.kick_fd, base + QUEUE_NOTIFY, 4, datamatch=q.index)
        self._ack_fd = self._eventfd()
        vm.ioeventfd(self._ack_fd, base + INTERRUPT_ACK, 4)

    def _signal_config(self):
        os.eventfd_write(self._irq_fd, 1)

    # --- guest accesses ------------------------------------------------------

    def read(self, offset, size):
        if offset == INTERRUPT_STATUS and size == 4:
            return self._interrupt_status()      # the data path's read: no _lock
        with self._lock:
            if offset >= CONFIG:
                data = self.device.config()[offset - CONFIG:offset - CONFIG + size]
                return int.from_bytes(data.ljust(size, b"\0"), "little")
            if size != 4:
                log.debug("%s: %d-byte read of register %#x ignored", self.device.name, size, offset)
                return 0
            return self._read_register(offset)

    def _interrupt_status(self):
        """INT_VRING always (see the module doc), INT_CONFIG once per config interrupt."""
        with self._isr_lock:
            pending, self.config_pending = self.config_pending, False
        return VIRTIO_MMIO_INT_VRING | (VIRTIO_MMIO_INT_CONFIG if pending else 0)

    def _read_register(self, offset):
        q = self._queue()
        if offset == MAGIC_VALUE:
            return VIRTIO_MMIO_MAGIC
        if offset == VERSION:
            return VIRTIO_MMIO_VERSION_MODERN
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID:
            return VIRTIO_MMIO_VENDOR_ID
        if offset == DEVICE_FEATURES:
            return self._device_features_word()
        if offset == QUEUE_NUM_MAX:
            return self.device.queue_max_size if q else 0
        if offset == QUEUE_READY:
            return int(q.ready) if q else 0
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            # No shared memory regions. Linux takes only a length of ~0 as
            # "no such region" (vm_get_shm_region); 0 would make a DAX-capable
            # virtio-fs driver map an empty region at address 0.
            return 0xFFFF_FFFF
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return self.config_generation
        log.debug("%s: read of register %#x", self.device.name, offset)
        return 0

    def write(self, offset, size, value):
        if offset == STATUS and size == 4:
            self._write_status(value & 0xFF)
            return
        if offset >= CONFIG or (offset == QUEUE_NOTIFY and size == 4):
            # These may talk to the back-end: never under _lock (see the class doc).
            with self._status_lock:
                if offset >= CONFIG:
                    self.device.write_config(offset - CONFIG, value.to_bytes(size, "little"))
                elif value < len(self.queues):
                    # Only queues without a back-end get here: the rest are ioeventfds.
                    self.device.notify(value)
            return
        with self._lock:
            if size != 4:
                log.debug("%s: %d-byte write of register %#x ignored", self.device.name, size, offset)
            else:
                self._write_register(offset, value)

    def _write_register(self, offset, value):
        q = self._queue()
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            self._write_driver_features_word(value)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif q is None:
            log.debug("%s: queue register %#x for queue %d, which does not exist",
                      self.device.name, offset, self.queue_sel)
        elif offset == QUEUE_READY:
            self._write_queue_ready(q, value)
        elif offset == QUEUE_NUM:
            self._write_queue_field(q, "size", value)
        elif offset in QUEUE_ADDRESS_REGISTERS:
            field, shift = QUEUE_ADDRESS_REGISTERS[offset]
            self._write_queue_field(q, field, value, shift)
        else:
            log.debug("%s: write of %#x to register %#x ignored", self.device.name, value, offset)


    def describe(self, offset):
        """For --stats: which register an exit touched."""
        return register_name(offset)
