"""What a virtio device model provides to its transport.

The transport (mmio.py) owns the registers, the status state machine and the
queues' addresses; the device owns its feature bits, its config space, and
what happens when the driver says DRIVER_OK: hand the queues to a back-end.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

from pyvmm.errors import PyvmmError


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
    call_fd: int = None   # written to interrupt the guest (an irqfd)
    err_fd: int = None    # signalled by the back-end when the guest broke the ring


class VirtioDevice(ABC):
    #: VIRTIO_ID_* and a name for messages and --stats
    device_id = None
    name = "virtio"
    #: how many queues and how big each may be
    num_queues = 0
    queue_max_size = 256
    #: feature bit -> bits of which the driver must accept at least one with it
    #: (the "Feature bit requirements" section of each device type in the spec)
    feature_requires = {}

    @property
    @abstractmethod
    def features(self):
        """Every feature bit offered to the driver."""

    @abstractmethod
    def config(self):
        """The device-specific config space, as bytes."""

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
        """Indexes of the queues a back-end serves (the rest come to notify())."""
        return range(self.num_queues)

    @abstractmethod
    def activate(self, memory, features, queues):
        """DRIVER_OK: start serving queues (a list of Queue) with these features."""

    @abstractmethod
    def reset(self):
        """The driver reset the device: stop serving the queues, forget features."""

    def notify(self, index):
        """A queue notification that no back-end took (queues outside vhost_queues())."""

    def close(self):
        """The VM is going away."""
