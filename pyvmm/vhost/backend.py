"""The vhost back-end interface, shared by the kernel drivers and vhost-user.

Modelled on the rust-vmm `vhost` crate's VhostBackend trait. The sequence a
device follows (Documentation and QEMU's hw/virtio/vhost.c):

    set_owner()                            claim the back-end
    get_features() / set_features(f)       negotiate (after the guest's FEATURES_OK)
    set_mem_table(memory)                  guest RAM: GPA -> host address per region
    for each queue:
        set_vring_num(i, num)              its size
        set_vring_base(i, 0)               where the device starts in the avail ring
        set_vring_addr(i, VringAddr(...))  where the rings are (GPAs, checked here)
        set_vring_call(i, fd)              eventfd the back-end signals interrupts on
        set_vring_kick(i, fd)              eventfd the guest's notifications arrive on
    ... device-specific start (tap fd, CID, running) ...
    get_vring_base(i)                      stop a queue, learn where it stopped
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

from pyvmm.errors import PyvmmError
from pyvmm.virtio.splitring import RingError, check_ring


class VhostError(PyvmmError):
    """A back-end refused or failed an operation; the message is for the user."""


@dataclass(frozen=True)
class VringAddr:
    """Where a split ring lives, in guest-physical addresses."""
    desc: int
    avail: int
    used: int
    log: int = None     # used-ring address for dirty logging, if any


class VhostBackend(ABC):
    def __init__(self):
        self.memory = None
        self._sizes = {}

    @abstractmethod
    def set_owner(self): ...

    @abstractmethod
    def get_features(self): ...

    @abstractmethod
    def set_features(self, features): ...

    def set_mem_table(self, memory):
        """Tell the back-end about every region of guest RAM."""
        self.memory = memory
        self._set_mem_table(memory.regions)

    @abstractmethod
    def _set_mem_table(self, regions): ...

    def set_vring_num(self, index, num):
        self._sizes[index] = num
        self._set_vring_num(index, num)

    @abstractmethod
    def _set_vring_num(self, index, num): ...

    @abstractmethod
    def set_vring_base(self, index, base): ...

    @abstractmethod
    def get_vring_base(self, index): ...

    def set_vring_addr(self, index, addr):
        """Check the ring against guest memory, then pass host addresses on."""
        if self.memory is None or index not in self._sizes:
            raise VhostError("set_mem_table and set_vring_num must come before set_vring_addr")
        try:
            check_ring(self.memory, self._sizes[index], addr.desc, addr.avail, addr.used)
        except RingError as e:
            raise VhostError(f"queue {index}: {e}") from None
        host = self.memory.host_address
        self._set_vring_addr(index, host(addr.desc), host(addr.avail), host(addr.used),
                             addr.log)

    @abstractmethod
    def _set_vring_addr(self, index, desc, avail, used, log): ...

    def start_vring(self, index, num, addr, kick_fd, call_fd, err_fd=None, base=0):
        """One queue's whole set-up, in the order the back-ends expect it.

        The kick comes last: it starts the ring (vhost-user BE-46; the kernel
        polls it at once), and a back-end may complete a request the moment it
        starts (BE-47), so the call and error eventfds must be in place by
        then or that interrupt is lost."""
        self.set_vring_num(index, num)
        self.set_vring_base(index, base)
        self.set_vring_addr(index, addr)
        self.set_vring_call(index, call_fd)
        if err_fd is not None:
            self.set_vring_err(index, err_fd)
        self.set_vring_kick(index, kick_fd)

    @abstractmethod
    def set_vring_kick(self, index, fd): ...

    @abstractmethod
    def set_vring_call(self, index, fd): ...

    @abstractmethod
    def set_vring_err(self, index, fd): ...

    @abstractmethod
    def close(self): ...
