"""What every virtio transport does, whatever the guest reads it through.

A transport (virtio-mmio in mmio.py, virtio-pci in pci.py) decodes the
guest's register accesses; this base keeps what both mean: the status
state machine (reset, FEATURES_OK, DRIVER_OK and the activation it
starts), the feature words, the queues' sizes and addresses, and what
happens when a back-end fails or goes away (pyvmm then answers the
guest's requests with errors). A transport subclass supplies its
eventfds (one kick per queue, and the call eventfds the guest's interrupt
scheme needs) and how a config interrupt reaches the guest.
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


@dataclasses.dataclass(frozen=True)
class Activation:
    """What DRIVER_OK hands to the device: a copy taken under the register lock,
    so that nothing the guest writes meanwhile can change it."""
    features: int
    queues: tuple     # copies of the ready Queues


class VirtioTransport:
    """One device's transport state, which the guest reaches through a subclass.

    Three locks, none held while another thread might need it on the data
    path. _isr_lock guards only the pending config interrupt bit, so that
    reading the interrupt status (one read per interrupt on virtio-mmio)
    never waits for anything else. _lock guards the registers and is only
    ever held briefly. _status_lock serialises whatever may talk to a
    back-end and take long: Status writes with what they start (activation
    and reset), config space writes and the notifications pyvmm serves
    itself (a NIC's control queue). A vCPU that writes Status waits for an
    activation or reset in progress on another vCPU, so a reset can never
    overtake an activation and leave a device running that the guest
    thinks is stopped.
    """

    def __init__(self, device, vm, memory):
        self.device = device
        self.vm = vm
        self.memory = memory
        self._isr_lock = threading.Lock()
        self._lock = threading.Lock()
        self._status_lock = threading.Lock()
        self._fds = []
        self.queues = [Queue(i) for i in range(device.num_queues)]
        for q in self.queues:
            if q.index in device.vhost_queues():
                q.kick_fd = self._eventfd()
                q.err_fd = self._eventfd()
        self._loop = None
        self._activation = None     # what the running device was started with
        self._started = False       # DRIVER_OK was acted on since the last reset
        self._taken_over = {}       # kick fd -> (DeviceRing, Queue, heads) of a gone back-end
        self.config_generation = 0
        with self._lock:
            self._reset_state()
        device.on_config_change = self.config_changed
        device.on_failure = self.device_failed
        device.on_backend_gone = self.backend_gone

    def _eventfd(self):
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(fd)
        return fd

    def _reset_state(self):
        """(under _lock) The registers as a reset leaves them."""
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
        self._signal_config()

    def _signal_config(self):
        """Raise the device's config interrupt (the subclass knows how)."""
        raise NotImplementedError

    def _needs_reset(self):
        """(under _lock) DEVICE_NEEDS_RESET, which the driver learns of by a config interrupt."""
        self.status |= spec.VIRTIO_CONFIG_S_NEEDS_RESET
        self._config_interrupt()


    # --- registers both transports have --------------------------------------

    def _queue(self):
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _device_features_word(self):
        """32 bits of the offered features, by device_features_sel (0 above word 1)."""
        if self.device_features_sel >= 2:
            return 0
        return (self.device.features >> (32 * self.device_features_sel)) & 0xFFFF_FFFF

    def _write_driver_features_word(self, value):
        """(under _lock) 32 bits of the driver's features, by driver_features_sel."""
        if self.status & spec.VIRTIO_CONFIG_S_FEATURES_OK:
            log.debug("%s: features written after FEATURES_OK, ignored", self.device.name)
        elif self.driver_features_sel < 2:
            shift = 32 * self.driver_features_sel
            self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)

    def _write_queue_ready(self, q, value):
        """(under _lock) QueueReady / queue_enable."""
        if self.active and q.ready and not value & 1:
            # Stopping one queue of a running device is the spec's queue
            # reset (VIRTIO_F_RING_RESET), which pyvmm does not offer: the
            # queue keeps running and reads back as ready.
            log.warning("%s: the driver tried to stop queue %d of a running device; "
                        "ignored (no VIRTIO_F_RING_RESET)", self.device.name, q.index)
        else:
            q.ready = bool(value & 1)

    def _write_queue_field(self, q, field, value, shift=0, bits=32):
        """(under _lock) Part of a queue's size or ring addresses, unless it is ready."""
        if q.ready:
            log.debug("%s: queue %d changed while ready, ignored", self.device.name, q.index)
            return
        mask = ((1 << bits) - 1) << shift
        setattr(q, field, (getattr(q, field) & ~mask) | ((value << shift) & mask))

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

