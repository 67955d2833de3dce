"""A virtio device: the model the guest sees, and the back-end that serves its queues.

The transport (pci.py or mmio.py, on transport.py) owns the registers,
the status state machine and the queues' addresses. A VirtioDevice is the device model: its id, how many
queues, its config space, which feature bits it offers and the rules
between them. What moves the data is a QueueBackend: the kernel's vhost
driver, or a vhost-user back-end in another process. A model never knows
which one serves it; the same virtio-net model runs on vhost-net or on a
vhost-user back-end.

What the guest is offered: the bits the model implements itself (a MAC in
its config space, say), plus those of the bits the model knows that the
back-end can serve.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

from pyvmm.errors import PyvmmError
from pyvmm.virtio import spec

# The most queues pyvmm gives one device, whatever a back-end offers: each
# costs eventfds and a KVM ioeventfd, and vhost-user names a queue in 8 bits
# (SET_VRING_KICK/CALL/ERR), so a back-end's count is no bound by itself.
MAX_QUEUES = 64

# Ring layout features pyvmm's transports pass on (split rings).
RING_FEATURES = spec.bits(spec.VIRTIO_F_VERSION_1, spec.VIRTIO_RING_F_INDIRECT_DESC,
                          spec.VIRTIO_RING_F_EVENT_IDX)


class DeviceError(PyvmmError):
    """The device cannot do what the driver asked (it will need a reset)."""


@dataclass
class Queue:
    """One virtqueue as the driver set it up, plus the eventfds that serve it."""
    index: int
    size: int = 0
    ready: bool = False
    desc: int = 0
    avail: int = 0
    used: int = 0
    kick_fd: int = None   # the guest's QueueNotify writes for this queue (an ioeventfd)
    call_fd: int = None   # written to interrupt the guest (the device's irqfd, shared)
    err_fd: int = None    # signalled by the back-end when the guest broke the ring


class QueueBackend(ABC):
    """What serves a device's queues."""

    #: a few words for messages, e.g. "vhost-net on tap pyvmm0"
    description = "a back-end"

    @abstractmethod
    def features(self):
        """The virtio feature bits it can serve."""

    @abstractmethod
    def start(self, memory, features, queues):
        """DRIVER_OK: serve these queues (Queue objects) with these features."""

    @abstractmethod
    def stop(self):
        """The driver reset the device: stop serving the queues."""

    def watch(self, device, loop):
        """Add what the back-end needs watched to the event loop (a socket, say)."""

    def unfinished(self, index, num, used_idx):
        """After the back-end went away: the heads of queue index (num entries,
        used index used_idx) it took and never completed, oldest first; None
        when it cannot be known (no inflight tracking)."""
        return None

    @abstractmethod
    def close(self):
        """The VM is going away."""


class VirtioDevice(ABC):
    #: VIRTIO_ID_*
    device_id = None
    #: how many queues and how big each may be
    num_queues = 0
    queue_max_size = 256
    #: bits the model implements itself, whatever the back-end
    model_features = 0
    #: bits the model knows and passes on when the back-end can serve them
    backend_features = RING_FEATURES
    #: feature bit -> bits of which the driver must accept at least one with it
    #: (the "Feature bit requirements" section of each device type in the spec)
    feature_requires = {}

    def __init__(self, backend, name):
        self.backend = backend
        self.name = name
        # Set by the transport: raise a config interrupt; put the device in
        # DEVICE_NEEDS_RESET (with a reason, for the one line the user sees);
        # the back-end went away, none of its rings runs: the transport may
        # answer the guest's requests itself (fail_request).
        self.on_config_change = lambda: None
        self.on_failure = lambda reason: None
        self.on_backend_gone = lambda: None

    @property
    def features(self):
        """Every feature bit offered to the driver."""
        return self.model_features | (self.backend.features() & self.backend_features)

    @abstractmethod
    def config(self):
        """The device-specific config space, as bytes (never read over a socket here)."""

    def refuse_features(self, features):
        """Why the driver's feature set breaks the device's rules, or None.

        The transport checks first that every bit was offered and VERSION_1
        is set; this adds the dependencies between the device's own bits.
        """
        for feature, needs in self.feature_requires.items():
            if features & (1 << feature) and not any(features & (1 << n) for n in needs):
                return (f"feature bit {feature} needs " +
                        " or ".join(f"bit {n}" for n in needs))
        return None

    def write_config(self, offset, data):
        """The driver wrote config space (read-only for most devices)."""

    def vhost_queues(self):
        """Indexes of the queues the back-end serves (the rest come to notify())."""
        return range(self.num_queues)

    def activate(self, memory, features, queues):
        """DRIVER_OK: hand the back-end's queues to it."""
        try:
            self.backend.start(memory, features,
                               [q for q in queues if q.index in self.vhost_queues()])
        except DeviceError:
            raise
        except (PyvmmError, OSError) as e:
            raise DeviceError(f"{self.backend.description}: {e}") from None

    def reset(self):
        """The driver reset the device: the back-end stops serving the queues."""
        self.backend.stop()

    def notify(self, index):
        """A queue notification that no back-end took (queues outside vhost_queues())."""

    def unfinished_requests(self, index, num, used_idx):
        """The back-end is gone: the heads it left in flight on queue index, or None."""
        return self.backend.unfinished(index, num, used_idx)

    def fail_request(self, memory, chain):
        """The back-end is gone: answer one request (a DeviceRing Chain) with an
        error the driver understands; the bytes written into it. By default,
        nothing: the buffers come back unused."""
        return 0

    def watch(self, loop):
        self.backend.watch(self, loop)

    def close(self):
        """The VM is going away."""
        self.backend.close()
