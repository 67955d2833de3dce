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

import dataclasses
import logging
import os
import struct
import threading

from pyvmm.devices.virtio.device import DeviceError, Queue
from pyvmm.errors import PyvmmError
from pyvmm.virtio import spec
from pyvmm.virtio.device_ring import DeviceRing
from pyvmm.virtio import splitring
from pyvmm.virtio.splitring import RingError, check_ring

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


@dataclasses.dataclass(frozen=True)
class Activation:
    """What DRIVER_OK hands to the device: a copy taken under the register lock,
    so that nothing the guest writes meanwhile can change it."""
    features: int
    queues: tuple     # copies of the ready Queues


class VirtioMmio:
    """The register file of one device, at base, interrupting on gsi.

    Three locks, none held while another thread might need it on the data
    path. _isr_lock guards only the pending INT_CONFIG bit, so that the
    InterruptStatus read (one per interrupt) never waits for anything else.
    _lock guards the registers and is only ever held briefly. _status_lock
    serialises whatever may talk to a back-end and take long: Status writes
    with what they start (activation and reset), config space writes and the
    notifications pyvmm serves itself (a NIC's control queue). A vCPU that
    writes Status waits for an activation or reset in progress on another
    vCPU, so a reset can never overtake an activation and leave a device
    running that the guest thinks is stopped.
    """

    def __init__(self, device, vm, memory, base, gsi):
        self.device = device
        self.vm = vm
        self.memory = memory
        self.base = base
        self.gsi = gsi
        self._isr_lock = threading.Lock()
        self._lock = threading.Lock()
        self._status_lock = threading.Lock()
        self._fds = []
        self.queues = [Queue(i) for i in range(device.num_queues)]
        self._irq_fd = self._eventfd()          # the device's one irqfd (see the module doc)
        vm.irqfd(self._irq_fd, gsi)
        for q in self.queues:
            q.call_fd = self._irq_fd
            if q.index in device.vhost_queues():
                q.kick_fd = self._eventfd()
                vm.ioeventfd(q.kick_fd, base + QUEUE_NOTIFY, 4, datamatch=q.index)
                q.err_fd = self._eventfd()
        self._ack_fd = self._eventfd()
        vm.ioeventfd(self._ack_fd, base + INTERRUPT_ACK, 4)
        self._loop = None
        self._activation = None     # what the running device was started with
        self._started = False       # DRIVER_OK was acted on since the last reset
        self._taken_over = {}       # kick fd -> (DeviceRing, Queue, heads) of a gone back-end
        self._reset_state()
        self.config_generation = 0
        device.on_config_change = self.config_changed
        device.on_failure = self.device_failed
        device.on_backend_gone = self.backend_gone

    def _eventfd(self):
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(fd)
        return fd

    def _reset_state(self):
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        with self._isr_lock:
            self.config_pending = False
        self.active = False
        for q in self.queues:
            q.size, q.ready, q.desc, q.avail, q.used = 0, False, 0, 0, 0

    def close(self):
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def event_sources(self):
        """(fd, callback) pairs for the machine's event loop: the error eventfds."""
        return [(q.err_fd, lambda q=q: self._vring_error(q)) for q in self.queues
                if q.err_fd is not None]

    def watch(self, loop):
        """Put the error eventfds, and what the device's back-end needs, in the loop."""
        self._loop = loop
        for fd, callback in self.event_sources():
            loop.add_reader(fd, callback, f"{self.device.name}'s error eventfd")
        self.device.watch(loop)

    # --- a back-end that failed, or is gone ------------------------------------
    #
    # The guest's driver does not know: it keeps waiting for the requests it
    # made (Linux's virtio-blk neither resets the device nor times out). So
    # once the back-end is gone (none of its rings can run any more) pyvmm
    # takes the queues over and answers every request with an error, by the
    # device model's rule (virtio-blk: VIRTIO_BLK_S_IOERR): first those the
    # back-end took and never completed, as its inflight area says, then
    # every one it never took. Without an inflight area, which requests
    # were outstanding is known exactly only if the back-end completed them
    # in order: pyvmm starts at the used index (QEMU leaves them waiting).

    def device_failed(self, reason):
        """The back-end failed for good: DEVICE_NEEDS_RESET and one line.
        (Called from the event loop.)"""
        log.warning("%s: %s; the device needs a reset", self.device.name, reason)
        with self._lock:
            self._needs_reset()

    def backend_gone(self):
        """None of the back-end's rings runs any more: pyvmm answers the
        device's requests with errors from now on. (Called from the event loop.)"""
        with self._status_lock:
            with self._lock:
                if not self.active or self._loop is None:
                    return
            failing = 0
            for q in self._activation.queues:
                if q.index not in self.device.vhost_queues() or q.kick_fd in self._taken_over:
                    continue
                try:
                    used_idx = splitring.used_idx(self.memory, q.used)
                    heads = self._unfinished(q, used_idx)
                    ring = DeviceRing(self.memory, q.size, q.desc, q.avail, q.used,
                                      used_idx + len(heads))
                except (RingError, DeviceError) as e:
                    log.warning("%s: queue %d cannot be taken over: %s", self.device.name,
                                q.index, e)
                    continue
                failing += len(heads)
                self._taken_over[q.kick_fd] = (ring, q, heads)
                self._loop.add_reader(q.kick_fd, lambda fd=q.kick_fd: self._fail_requests(fd),
                                      f"{self.device.name}'s queue {q.index} (failing)")
                self._fail_requests(q.kick_fd, locked=True)
            log.warning("%s: pyvmm answers its requests with errors from now on%s",
                        self.device.name, f" ({failing} the back-end took and never "
                                          f"completed first)" if failing else "")

    def _unfinished(self, q, used_idx):
        """The heads the back-end left in flight on q, oldest first ([] if none or unknown)."""
        try:
            heads = self.device.unfinished_requests(q.index, q.size, used_idx)
        except PyvmmError as e:
            log.warning("%s: queue %d: its inflight area is unusable (%s); failing from the "
                        "used index on", self.device.name, q.index, e)
            return []
        return list(heads or [])

    def _fail_requests(self, kick_fd, locked=False):
        """Answer every request waiting on a taken-over queue with an error."""
        if not locked:
            with self._status_lock:
                return self._fail_requests(kick_fd, locked=True)
        if kick_fd not in self._taken_over:
            return                       # the guest reset the device meanwhile
        ring, q, heads = self._taken_over[kick_fd]
        try:
            os.eventfd_read(kick_fd)
        except BlockingIOError:
            pass
        answered = 0
        try:
            while heads or (chain := ring.pop()) is not None:
                if heads:
                    chain = ring.chain(heads.pop(0))
                ring.push(chain.head, self.device.fail_request(self.memory, chain))
                answered += 1
        except RingError as e:
            log.warning("%s: queue %d: %s; no more answers on it", self.device.name, q.index, e)
            self._release(kick_fd)
        if answered:
            os.eventfd_write(q.call_fd, 1)

    def _release(self, kick_fd):
        del self._taken_over[kick_fd]
        self._loop.remove(kick_fd)

    def _release_all(self):
        """(under _status_lock) The guest reset the device: the queues are no longer ours."""
        for kick_fd in list(self._taken_over):
            self._release(kick_fd)

    def _vring_error(self, q):
        """The back-end found the guest's ring broken: the device needs a reset."""
        os.eventfd_read(q.err_fd)
        with self._lock:
            if not self.active:   # a late report about rings already given up
                return
            self._needs_reset()
        log.warning("%s: the back-end reports a broken ring on queue %d; the device "
                    "needs a reset", self.device.name, q.index)

    # --- interrupts pyvmm raises itself --------------------------------------

    def config_changed(self):
        """Tell the driver the config space changed (link status, needs-reset)."""
        with self._lock:
            self._config_interrupt()

    def _config_interrupt(self):
        """(under _lock) A new config generation, and INT_CONFIG for the driver."""
        self.config_generation += 1
        with self._isr_lock:
            self.config_pending = True
        os.eventfd_write(self._irq_fd, 1)

    def _needs_reset(self):
        """(under _lock) DEVICE_NEEDS_RESET, which the driver learns of by a config interrupt."""
        self.status |= spec.VIRTIO_CONFIG_S_NEEDS_RESET
        self._config_interrupt()

    # --- guest accesses ------------------------------------------------------

    def _queue(self):
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

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
            return (self.device.features >> (32 * self.device_features_sel)) & 0xFFFF_FFFF \
                if self.device_features_sel < 2 else 0
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
            if self.status & spec.VIRTIO_CONFIG_S_FEATURES_OK:
                log.debug("%s: features written after FEATURES_OK, ignored", self.device.name)
            elif self.driver_features_sel < 2:
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif q is None:
            log.debug("%s: queue register %#x for queue %d, which does not exist",
                      self.device.name, offset, self.queue_sel)
        elif offset == QUEUE_READY:
            if self.active and q.ready and not value & 1:
                # Stopping one queue of a running device is the spec's queue
                # reset (VIRTIO_F_RING_RESET), which pyvmm does not offer: the
                # queue keeps running and QueueReady reads back 1.
                log.warning("%s: the driver tried to stop queue %d of a running device; "
                            "ignored (no VIRTIO_F_RING_RESET)", self.device.name, q.index)
            else:
                q.ready = bool(value & 1)
        elif q.ready:
            log.debug("%s: queue %d changed while ready, ignored", self.device.name, q.index)
        elif offset == QUEUE_NUM:
            q.size = value
        elif offset in QUEUE_ADDRESS_REGISTERS:
            field, shift = QUEUE_ADDRESS_REGISTERS[offset]
            old = getattr(q, field)
            setattr(q, field, (old & ~(0xFFFF_FFFF << shift)) | (value << shift))
        else:
            log.debug("%s: write of %#x to register %#x ignored", self.device.name, value, offset)

    # --- Status: the device's life cycle ------------------------------------

    def _write_status(self, value):
        """A Status write, and the reset or activation it starts (see the class doc)."""
        with self._status_lock:
            with self._lock:
                activation = self._apply_status(value)
            if value == 0:
                self._release_all()
                self._activation = None
                if self._started:
                    # Also after a failed activation: a back-end may have
                    # started some queues before it failed.
                    self._started = False
                    self.device.reset()
            elif activation is not None:
                self._started = True
                self._activate(activation)

    def _apply_status(self, value):
        """Update the registers for a Status write (under _lock); an Activation if
        the device should start now."""
        if value == 0:
            self._reset_state()
            return None
        new = value & ~self.status
        if new & spec.VIRTIO_CONFIG_S_FEATURES_OK:
            refused = self._refuse_features(self.driver_features)
            if refused:
                # Leaving FEATURES_OK clear is how the spec says "no".
                log.warning("%s: driver features %#x refused: %s", self.device.name,
                            self.driver_features, refused)
                value &= ~spec.VIRTIO_CONFIG_S_FEATURES_OK
        if new & spec.VIRTIO_CONFIG_S_FAILED:
            log.warning("%s: the guest driver gave up on the device (FAILED)", self.device.name)
        self.status = value | (self.status & spec.VIRTIO_CONFIG_S_NEEDS_RESET)
        if not new & spec.VIRTIO_CONFIG_S_DRIVER_OK or self.active:
            return None
        if not self.status & spec.VIRTIO_CONFIG_S_FEATURES_OK:
            log.warning("%s: DRIVER_OK without FEATURES_OK (a legacy driver?); the device "
                        "needs a reset", self.device.name)
            self._needs_reset()
            return None
        return Activation(self.driver_features,
                          tuple(dataclasses.replace(q) for q in self.queues if q.ready))

    def _refuse_features(self, features):
        """Why the driver's feature set cannot be accepted, or None."""
        unsupported = features & ~self.device.features
        if unsupported:
            return f"bits {unsupported:#x} were not offered"
        if not features & spec.bit(spec.VIRTIO_F_VERSION_1):
            return "VIRTIO_F_VERSION_1 is missing (legacy drivers are not supported)"
        return self.device.refuse_features(features)

    def _activate(self, activation):
        """DRIVER_OK: check the queues, then hand them to the device's back-end."""
        try:
            for q in activation.queues:
                if q.size > self.device.queue_max_size:
                    raise DeviceError(f"queue {q.index}: size {q.size} is above the "
                                      f"maximum {self.device.queue_max_size}")
                try:
                    check_ring(self.memory, q.size, q.desc, q.avail, q.used)
                except RingError as e:
                    raise DeviceError(f"queue {q.index}: {e}") from None
            self.device.activate(self.memory, activation.features, list(activation.queues))
        except DeviceError as e:
            log.warning("%s: cannot start the device: %s", self.device.name, e)
            with self._lock:
                self._needs_reset()
            return
        with self._lock:
            self.active = True
            self._activation = activation

    def queue_report(self):
        """One line per queue of the running device: where the driver (avail)
        and the device (used) are, and what each asked the other to notify
        at (with EVENT_IDX). For telling a stuck back-end (avail ahead of
        used) from a lost interrupt (used ahead of what the driver saw)."""
        activation = self._activation
        if activation is None:
            return []
        lines = []
        for q in activation.queues:
            try:
                avail_flags, avail_idx = struct.unpack("<HH", self.memory.read(q.avail, 4))
                used_flags, used_idx = struct.unpack("<HH", self.memory.read(q.used, 4))
                used_event, = struct.unpack("<H", self.memory.read(q.avail + 4 + 2 * q.size, 2))
                avail_event, = struct.unpack("<H", self.memory.read(q.used + 4 + 8 * q.size, 2))
            except (RingError, DeviceError, PyvmmError) as e:
                lines.append(f"{self.device.name} queue {q.index}: unreadable ({e})")
                continue
            lines.append(f"{self.device.name} queue {q.index}: avail idx {avail_idx}, used idx "
                         f"{used_idx} ({(avail_idx - used_idx) & 0xFFFF} outstanding); "
                         f"used_event {used_event}, avail_event {avail_event}, flags "
                         f"{avail_flags:#x}/{used_flags:#x}")
        return lines

    def describe(self, offset):
        """For --stats: which register an exit touched."""
        return register_name(offset)
