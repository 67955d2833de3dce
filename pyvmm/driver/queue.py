"""One queue of the guest-less driver: the driver side of a split ring
(pyvmm/virtio/splitring.py) with its three eventfds, as KVM would hold them.

send() makes a chain available and kicks; wait() takes what the device
used and checks it the way a careful guest would: each id must be a chain
in flight, the used length no larger than the chain's device-writable
bytes, and the used index may advance only by chains that were in flight.
A device that breaks one of these is a DriverError naming what it did.
"""

import os
import select
import time

from pyvmm.errors import PyvmmError
from pyvmm.virtio.splitring import DriverRing, RingError


class DriverError(PyvmmError):
    """The device did something a driver must not accept, or did nothing in time."""


class DriverQueue:
    def __init__(self, memory, index, gpa, size, ring=None):
        """A new ring of size entries at gpa, or ring: a DriverRing already in
        use there (left by an earlier driver, for a back-end to take over)."""
        self.index = index
        self.size = size
        self.ring = ring if ring is not None else DriverRing(memory, gpa, size)
        self.kick, self.call, self.err = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                                          for _ in range(3))
        self.in_flight = {}          # head -> device-writable bytes of its chain

    def send(self, buffers, kick=True):
        """Make one chain of (gpa, length, device_writable) available; its head."""
        head = self.ring.add(buffers)
        self.in_flight[head] = sum(length for _, length, writable in buffers if writable)
        if kick:
            os.eventfd_write(self.kick, 1)
        return head

    def used(self):
        """What the device used since last time, [(head, length)], checked."""
        start = self.ring.last_used_idx
        moved = (self.ring.used_idx() - start) & 0xFFFF
        if moved > len(self.in_flight):
            raise DriverError(f"queue {self.index}: the used index moved by {moved} with only "
                              f"{len(self.in_flight)} chains in flight")
        try:
            done = self.ring.pop_used()
        except RingError as e:
            raise DriverError(f"queue {self.index}: {e}") from None
        for head, length in done:
            writable = self.in_flight.pop(head)
            if length > writable:
                raise DriverError(f"queue {self.index}: chain {head} came back with {length} "
                                  f"bytes written into {writable} device-writable bytes")
        return done

    def wait(self, head=None, timeout=5.0):
        """Wait until the device used chain head (or anything, with None); its
        used length, or all that was used. DriverError after timeout seconds,
        or if the device signalled its error eventfd."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            seen += self.used()
            if head is None and seen:
                return seen
            for h, length in seen:
                if h == head:
                    return length
            left = deadline - time.monotonic()
            if left <= 0:
                raise DriverError(f"queue {self.index}: the device did not use "
                                  f"{'chain ' + str(head) if head is not None else 'anything'}"
                                  f" within {timeout:g} s")
            # The call eventfd says when; a short poll also catches a device
            # that uses buffers without signalling (suppressed interrupts).
            ready = select.select([self.call, self.err], [], [], min(left, 0.05))[0]
            if self.err in ready:
                raise DriverError(f"queue {self.index}: the device signalled its error "
                                  f"eventfd (it found the ring broken)")
            if self.call in ready:
                os.eventfd_read(self.call)

    def close(self):
        for fd in (self.kick, self.call, self.err):
            os.close(fd)
