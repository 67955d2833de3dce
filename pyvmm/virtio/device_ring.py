"""The device's side of a split ring (virtio 1.x 2.7): what a back-end does.

DeviceRing takes the chains the driver made available, as lists of guest
buffers, and returns them as used. Everything the guest wrote is checked
before it is used: the available index may not run more than a ring's
worth ahead, a head must be a descriptor of the table, a chain may not be
longer than the table (a loop), an indirect table must lie in guest RAM
and hold at most MAX_INDIRECT descriptors, every buffer must lie in guest
RAM too, and a chain's readable and writable bytes must each fit the used
ring's u32 length. A broken ring raises RingError; it never makes the
device read or write outside guest memory. Descriptors are read one at a
time where they are, never a whole table at once: what a guest names
costs the device no more than what it uses.
"""

import struct
from dataclasses import dataclass
from typing import NamedTuple

from pyvmm.virtio.splitring import (VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
                                    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, RingError,
                                    check_ring)

DESC = struct.Struct("<QIHH")      # addr, len, flags, next
MAX_INDIRECT = 1 << 16             # descriptors in an indirect table (vhost's bound too)
MAX_CHAIN_BYTES = 0xFFFF_FFFF      # a used element's len is a u32


class Buffer(NamedTuple):      # (a NamedTuple: made once per descriptor, so cheap to make)
    addr: int          # guest-physical
    length: int
    writable: bool     # device-writable (VIRTQ_DESC_F_WRITE)


def pieces(buffers, start, length):
    """(addr, length) pieces of the bytes [start, start+length) of buffers."""
    out = []
    for b in buffers:
        if length <= 0:
            break
        if start >= b.length:
            start -= b.length
            continue
        n = min(b.length - start, length)
        out.append((b.addr + start, n))
        start, length = 0, length - n
    return out


@dataclass(frozen=True)
class Chain:
    head: int
    buffers: tuple     # Buffers, device-readable ones first

    @property
    def readable(self):
        return [b for b in self.buffers if not b.writable]

    @property
    def writable(self):
        return [b for b in self.buffers if b.writable]

    @property
    def readable_len(self):
        return sum(b.length for b in self.buffers if not b.writable)

    @property
    def writable_len(self):
        return sum(b.length for b in self.buffers if b.writable)

    def read(self, memory, start, length):
        """Bytes [start, start+length) of the device-readable part, as one bytes."""
        return b"".join(memory.read(a, n) for a, n in pieces(self.readable, start, length))

    def write(self, memory, data, start=0):
        """data into the device-writable part from start; returns the bytes written."""
        done = 0
        for a, n in pieces(self.writable, start, len(data)):
            memory.write(a, data[done:done + n])
            done += n
        return done


class DeviceRing:
    def __init__(self, memory, num, desc, avail, used, next_avail=0):
        check_ring(memory, num, desc, avail, used)
        self.memory = memory
        self.num = num
        self.desc, self.avail, self.used = desc, avail, used
        self.next_avail = next_avail & 0xFFFF

    def _u16(self, gpa):
        return struct.unpack("<H", self.memory.read(gpa, 2))[0]

    def avail_idx(self):
        return self._u16(self.avail + 2)

    def used_idx(self):
        return self._u16(self.used + 2)

    def pop(self):
        """The next available chain, or None when the driver has made none.

        Each call also tells the driver (avail_event, VIRTIO_RING_F_EVENT_IDX)
        to notify for anything it adds from here on; so a caller that pops
        until None misses nothing added meanwhile.
        """
        if not self._pending():
            return None
        head = self._u16(self.avail + 4 + 2 * (self.next_avail % self.num))
        chain = self.chain(head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chain

    def chain(self, head):
        """The chain at head, walked and checked as pop() does (to serve it again)."""
        return Chain(head, tuple(self._walk(head)))

    def _walk(self, head):
        """The buffers of the chain at head, through an indirect table if any."""
        table, size, index = self.desc, self.num, head
        indirect = False
        buffers = []
        total = {False: 0, True: 0}       # readable, writable bytes
        for _ in range(self.num + 1):
            if index >= size:
                raise RingError(f"descriptor {index} is outside a table of {size}")
            addr, length, flags, nxt = DESC.unpack(self.memory.read(table + 16 * index, 16))
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect or buffers:
                    raise RingError("an indirect descriptor inside a chain or an indirect table")
                table, size, index = self._indirect(addr, length), length // 16, 0
                indirect = True
                continue
            if not self.memory.contains(addr, length):
                raise RingError(f"buffer at {addr:#x}+{length:#x} is not inside guest RAM")
            writable = bool(flags & VIRTQ_DESC_F_WRITE)
            if buffers and buffers[-1].writable and not writable:
                raise RingError("a device-readable buffer after a device-writable one")
            total[writable] += length
            if total[writable] > MAX_CHAIN_BYTES:
                raise RingError(f"the chain at head {head} has more than 4 GiB of device-"
                                f"{'writable' if writable else 'readable'} bytes")
            buffers.append(Buffer(addr, length, writable))
            if not flags & VIRTQ_DESC_F_NEXT:
                return buffers
            index = nxt
        raise RingError(f"the chain at head {head} is longer than the table (a loop)")

    def _indirect(self, addr, length):
        """The address of an indirect table of length bytes, checked."""
        if length % 16 or not length or not self.memory.contains(addr, length):
            raise RingError(f"indirect table at {addr:#x}+{length:#x} is not whole "
                            f"descriptors inside guest RAM")
        if length // 16 > MAX_INDIRECT:
            raise RingError(f"an indirect table of {length // 16} descriptors (at most "
                            f"{MAX_INDIRECT})")
        return addr

    def has_available(self):
        """Whether pop() would return a chain; asks the driver (avail_event) to
        notify for the next one when there is none."""
        return self._pending() > 0

    def _pending(self):
        """Chains made available and not yet popped, after asking the driver
        (avail_event) to notify for any it adds from here on."""
        self.memory.write(self.used + 4 + 8 * self.num, struct.pack("<H", self.next_avail))
        idx = self.avail_idx()
        pending = (idx - self.next_avail) & 0xFFFF
        if pending > self.num:
            raise RingError(f"the available index {idx} is {pending} entries ahead of the "
                            f"device, more than the ring's {self.num}")
        return pending

    def should_notify(self, used_before, event_idx):
        """Whether the driver wants an interrupt for what was used since the used
        index was used_before: past its used_event with VIRTIO_RING_F_EVENT_IDX,
        else unless it set VIRTQ_AVAIL_F_NO_INTERRUPT."""
        new = self.used_idx()
        if new == used_before:
            return False
        if event_idx:
            used_event = self._u16(self.avail + 4 + 2 * self.num)
            return (new - used_event - 1) & 0xFFFF < (new - used_before) & 0xFFFF
        return not self._u16(self.avail) & VIRTQ_AVAIL_F_NO_INTERRUPT

    def push(self, head, written, before_publish=None):
        """Return chain head as used, with `written` bytes written into it
        (before_publish(), if given, runs between the used element and the
        index that publishes it: a back-end's fault injection)."""
        idx = self.used_idx()
        self.memory.write(self.used + 4 + 8 * (idx % self.num), struct.pack("<II", head, written))
        if before_publish is not None:
            before_publish()
        # The entry must be visible before the index that covers it (x86 keeps
        # stores in order).
        self.memory.write(self.used + 2, struct.pack("<H", (idx + 1) & 0xFFFF))
