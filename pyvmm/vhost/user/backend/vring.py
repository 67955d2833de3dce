"""One queue as the back-end library keeps it, and what a device's
handle_queue() gets: pop() a chain, push() it back as used.

What the control messages said of the ring (size, base, addresses,
enabled) is the connection's Session's record (session.RingState), kept
once; a Vring reads it there and adds what serving the ring takes: the
three eventfds, the DeviceRing while the ring is started, and, when the
front-end gave an inflight area, the tracking that lets a successor
resubmit what this back-end took but never completed (inflight.py).
"""

import logging
import os

from pyvmm.vhost.user.backend import faults

log = logging.getLogger("pyvmm.backend")


class Vring:
    def __init__(self, index, negotiated):
        """negotiated: the session's record of the connection (session.Negotiated)."""
        self.index = index
        self._negotiated = negotiated
        self.kick = self.call = self.err = None
        self.device_ring = None   # a DeviceRing while started
        self.broken = False
        self.inflight = None      # an InflightQueue, with an inflight area
        self.resubmit = []        # heads to run again first, oldest first

    # What the front-end's messages set, as the session accepted them (a
    # request the daemon refuses is taken back out of the record).
    @property
    def num(self):
        return self._negotiated.ring(self.index).num

    @property
    def base(self):
        return self._negotiated.ring(self.index).base

    @property
    def addr(self):
        """The VringAddress as sent."""
        return self._negotiated.ring(self.index).addr

    @property
    def enabled(self):
        return self._negotiated.ring(self.index).enabled

    @property
    def started(self):
        return self.device_ring is not None

    def start(self, device_ring):
        """SET_VRING_KICK: serve device_ring, after anything left in flight. A
        ring already started keeps its place (a new kick fd, or new addresses,
        must not serve again what was served)."""
        if self.started:
            device_ring.next_avail = self.device_ring.next_avail
            self.device_ring = device_ring
            return
        self.device_ring = device_ring
        self.broken = False
        self.resubmit = []
        if self.inflight is not None and self.num > self.inflight.queue_size:
            # QEMU sizes the area by its queue-size property (128 by default),
            # but its virtio-mmio lets the driver make rings of up to 1024.
            # Heads past the area cannot be tracked: no tracking then, rather
            # than writing past it (as libvhost-user would) or refusing.
            log.warning("queue %d: a ring of %d entries, but the inflight area was made for %d; "
                        "requests on this queue are not tracked", self.index, self.num,
                        self.inflight.queue_size)
            self.inflight = None
        if self.inflight is not None:
            used = device_ring.used_idx()
            left = self.inflight.start(self.num, used)
            if left is not None:
                # Where the dead back-end had got to: everything it took is
                # either used or about to be resubmitted.
                self.resubmit = left
                device_ring.next_avail = (used + len(left)) & 0xFFFF

    def stop(self):
        """Where the next request starts (GET_VRING_BASE's answer, which the
        session records as the ring's base)."""
        base = self.base if self.device_ring is None else self.device_ring.next_avail
        self.device_ring = None
        return base

    @property
    def resubmitting(self):
        """Whether pop() would return a request a dead predecessor left in
        flight (resubmitted in the order it took them, BE-74)."""
        return bool(self.resubmit)

    @property
    def compiled(self):
        """Whether a device may serve requests whole in C, as Vring.pop and
        push would (compiled_ring.BlkRequests): the ring is walked in C, nothing
        waits to be resubmitted (BE-74), and no --die-at point is armed (those
        are reached per request, here)."""
        return (self.device_ring is not None and self.device_ring.walk == "compiled"
                and not self.resubmitting and not faults.armed())

    def available(self):
        """Whether pop() would return a chain (for a device that has something to
        put into the guest's buffers and must not take one otherwise)."""
        return self.resubmitting or self.device_ring.has_available()

    def pop(self):
        """The next chain to serve (a Chain of guest buffers), or None."""
        if self.resubmit:
            chain = self.device_ring.chain(self.resubmit.pop(0))
            faults.reach("resubmitted")
            return chain
        chain = self.device_ring.pop()
        if chain is not None:
            faults.reach("popped")
            if self.inflight is not None:
                self.inflight.take(chain.head)
                faults.reach("taken")
        return chain

    def push(self, head, written):
        """Give chain head back as used, `written` bytes written into it."""
        faults.reach("served")
        if self.inflight is None:
            self.device_ring.push(head, written, self._published)
            faults.reach("completed")
            return
        self.inflight.completing(head)
        self.device_ring.push(head, written, self._published)
        faults.reach("used-idx")
        self.inflight.completed(head, self.device_ring.used_idx())
        faults.reach("completed")

    @staticmethod
    def _published():
        faults.reach("used-elem")

    def close_fds(self):
        for fd in (self.kick, self.call, self.err):
            if fd is not None:
                os.close(fd)
        self.kick = self.call = self.err = None
