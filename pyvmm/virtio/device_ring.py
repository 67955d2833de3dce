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
time where they are (unpacked in place from the mapping), never a whole
table at once: what a guest names costs the device no more than what it
uses.

The walk is done in C where compiled_ring.py could build it (the same
checks, the same refusals, and the request's bytes moved in C too); this
module's walk in Python is the reference, and what runs without it.
"""

import os
import struct
from typing import NamedTuple

from pyvmm.virtio import compiled_ring
from pyvmm.virtio.splitring import (VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
                                    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, RingError,
                                    avail_ring_size, check_ring, desc_table_size,
                                    used_ring_size)

DESC = struct.Struct("<QIHH")      # addr, len, flags, next
MAX_INDIRECT = 1 << 16             # descriptors in an indirect table (vhost's bound too)
MAX_CHAIN_BYTES = 0xFFFF_FFFF      # a used element's len is a u32


class Buffer(NamedTuple):      # (a NamedTuple: made once per descriptor, so cheap to make)
    addr: int          # guest-physical
    length: int
    writable: bool     # device-writable (VIRTQ_DESC_F_WRITE)


# Buffer(addr, length, writable) at half the cost, for the walk's inner loop.
new_buffer = tuple.__new__


def pieces(buffers, start, length):
    """(addr, length) pieces of the bytes [start, start+length) of buffers."""
    out = []
    for addr, size, _ in buffers:
        if length <= 0:
            break
        if start >= size:
            start -= size
            continue
        n = size - start if size - start < length else length
        out.append((addr + start, n))
        start, length = 0, length - n
    return out


class Chain(NamedTuple):
    """One request: its head, and its buffers, device-readable ones first
    (with the lengths the walk summed, so that serving it sums nothing)."""
    head: int
    buffers: tuple        # Buffers
    readable_len: int     # bytes the device reads
    writable_len: int     # bytes the device may write
    n_readable: int       # how many of buffers are device-readable

    @property
    def readable(self):
        return self.buffers[:self.n_readable]

    @property
    def writable(self):
        return self.buffers[self.n_readable:]

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

    def read_file(self, memory, fd, offset, start, length):
        """preadv: the file's bytes at offset into device-writable bytes [start,
        start+length); returns the bytes read."""
        return _file_io(os.preadv, fd, offset, memory, pieces(self.writable, start, length))

    def write_file(self, memory, fd, offset, start, length):
        """pwritev: device-readable bytes [start, start+length) to the file at offset."""
        return _file_io(os.pwritev, fd, offset, memory, pieces(self.readable, start, length))


def _file_io(io, fd, offset, memory, ranges):
    """One preadv or pwritev between the file and views of the ranges."""
    views = memory.views(ranges)
    try:
        return io(fd, views, offset) if views else 0
    finally:
        for v in views:
            v.release()


U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")


class DeviceRing:
    """The device's side of one split ring in memory (a GuestMemory or a
    back-end's MappedMemory).

    Where the descriptor table and the two rings lie in the memory's
    mappings is looked up once, and again only when the memory's table
    changes (its generation); each descriptor is then unpacked where it
    is, with no copy and no lookup.
    """

    def __init__(self, memory, num, desc, avail, used, next_avail=0, walk=None):
        """walk: "compiled" or "python" (None: compiled where it was built and
        the memory can tell host addresses)."""
        check_ring(memory, num, desc, avail, used)
        self.memory = memory
        self.num = num
        self.desc, self.avail, self.used = desc, avail, used
        self.next_avail = next_avail & 0xFFFF
        if walk is None:
            walk = compiled_ring.walker() if hasattr(memory, "host_regions") else "python"
        if walk == "compiled" and not compiled_ring.available:
            raise ValueError("the compiled ring walk was not built")
        self.walk = walk
        self._regions = None             # compiled_ring.Regions, for the compiled walk
        self._located = (None, None)     # (memory, generation) the spans below are of
        self._locate()

    def _locate(self):
        """Where the table and rings are mapped, if the memory changed since last asked."""
        memory = self.memory
        located_in, generation = self._located
        if located_in is memory and generation == memory.generation:
            return
        num = self.num
        self._desc_buf, self._desc_off, _, _ = memory.span(self.desc, desc_table_size(num))
        self._avail_buf, self._avail_off, _, _ = memory.span(self.avail, avail_ring_size(num))
        self._used_buf, self._used_off, _, _ = memory.span(self.used, used_ring_size(num))
        if self.walk == "compiled":
            self._regions = compiled_ring.Regions(memory)
            self._desc_host = memory.host_address(self.desc, desc_table_size(num))
            self._avail_host = memory.host_address(self.avail, avail_ring_size(num))
            self._used_host = memory.host_address(self.used, used_ring_size(num))
        self._located = (memory, memory.generation)

    def host_layout(self):
        """For C that serves this ring itself (compiled_ring.BlkRequests), on the
        compiled walk: (Regions, the host addresses of the descriptor table,
        the avail ring and the used ring), of the memory's present table."""
        self._locate()
        return self._regions, self._desc_host, self._avail_host, self._used_host

    def avail_idx(self):
        self._locate()
        return U16.unpack_from(self._avail_buf, self._avail_off + 2)[0]

    def used_idx(self):
        self._locate()
        return U16.unpack_from(self._used_buf, self._used_off + 2)[0]

    def pop(self):
        """The next available chain, or None when the driver has made none.

        Returning None, it has told the driver (avail_event,
        VIRTIO_RING_F_EVENT_IDX) to notify for anything it adds from here on;
        so a caller that pops until None misses nothing added meanwhile.
        """
        if not self._pending():
            return None
        slot = self.next_avail % self.num
        head = U16.unpack_from(self._avail_buf, self._avail_off + 4 + 2 * slot)[0]
        chain = self._walk(head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chain

    def chain(self, head):
        """The chain at head, walked and checked as pop() does (to serve it again)."""
        self._locate()
        return self._walk(head)

    def _walk(self, head):
        if self._regions is not None:
            return compiled_ring.walk(self._regions, self._desc_host, self.num, head)
        return self._walk_python(head)

    def _walk_python(self, head):
        """The chain at head, through an indirect table if any. Every buffer
        is checked to lie inside one region of guest RAM; the bounds of the
        region the last one was in save the lookup for the next."""
        unpack = DESC.unpack_from
        memory = self.memory
        table, base, size, index = self._desc_buf, self._desc_off, self.num, head
        indirect = False
        buffers = []
        n_readable = readable_len = writable_len = 0
        start, end = 1, 0                      # no region yet
        for _ in range(self.num + 1):
            if index >= size:
                raise RingError(f"descriptor {index} is outside a table of {size}")
            addr, length, flags, nxt = unpack(table, base + 16 * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect or buffers:
                    raise RingError("an indirect descriptor inside a chain or an indirect table")
                table, base, size = self._indirect(addr, length)
                index, indirect = 0, True
                continue
            if not (start <= addr and addr + length <= end):
                if not memory.contains(addr, length):
                    raise RingError(f"buffer at {addr:#x}+{length:#x} is not inside guest RAM")
                _, _, start, end = memory.span(addr, length)
            if flags & VIRTQ_DESC_F_WRITE:
                writable_len += length
                if writable_len > MAX_CHAIN_BYTES:
                    raise RingError(f"the chain at head {head} has more than 4 GiB of "
                                    f"device-writable bytes")
                buffers.append(new_buffer(Buffer, (addr, length, True)))
            else:
                if n_readable != len(buffers):
                    raise RingError("a device-readable buffer after a device-writable one")
                readable_len += length
                if readable_len > MAX_CHAIN_BYTES:
                    raise RingError(f"the chain at head {head} has more than 4 GiB of "
                                    f"device-readable bytes")
                n_readable += 1
                buffers.append(new_buffer(Buffer, (addr, length, False)))
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, tuple(buffers), readable_len, writable_len, n_readable)
            index = nxt
        raise RingError(f"the chain at head {head} is longer than the table (a loop)")

    def _indirect(self, addr, length):
        """(buffer, offset, descriptors) of an indirect table of length bytes, checked."""
        if length % 16 or not length or not self.memory.contains(addr, length):
            raise RingError(f"indirect table at {addr:#x}+{length:#x} is not whole "
                            f"descriptors inside guest RAM")
        if length // 16 > MAX_INDIRECT:
            raise RingError(f"an indirect table of {length // 16} descriptors (at most "
                            f"{MAX_INDIRECT})")
        table, base, _, _ = self.memory.span(addr, length)
        return table, base, length // 16

    def has_available(self):
        """Whether pop() would return a chain; asks the driver (avail_event) to
        notify for the next one when there is none."""
        return self._pending() > 0

    def _pending(self):
        """Chains made available and not yet popped. Finding none, the device
        asks the driver (avail_event, VIRTIO_RING_F_EVENT_IDX) to notify for
        the next one and looks again, so that one added meanwhile is not
        missed; while there are some, avail_event stays where it was: the
        driver need not notify of chains the device takes anyway (each
        notification is a VM exit, and a wake-up of the back-end that finds
        nothing new)."""
        self._locate()
        idx = U16.unpack_from(self._avail_buf, self._avail_off + 2)[0]
        if idx == self.next_avail:
            U16.pack_into(self._used_buf, self._used_off + 4 + 8 * self.num, self.next_avail)
            idx = U16.unpack_from(self._avail_buf, self._avail_off + 2)[0]
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
            used_event = U16.unpack_from(self._avail_buf, self._avail_off + 4 + 2 * self.num)[0]
            return (new - used_event - 1) & 0xFFFF < (new - used_before) & 0xFFFF
        flags = U16.unpack_from(self._avail_buf, self._avail_off)[0]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def push(self, head, written, before_publish=None):
        """Return chain head as used, with `written` bytes written into it
        (before_publish(), if given, runs between the used element and the
        index that publishes it: a back-end's fault injection)."""
        self._locate()
        used, off = self._used_buf, self._used_off
        idx = U16.unpack_from(used, off + 2)[0]
        USED_ELEM.pack_into(used, off + 4 + 8 * (idx % self.num), head, written)
        if before_publish is not None:
            before_publish()
            self._locate()
            used, off = self._used_buf, self._used_off
        # The entry must be visible before the index that covers it (x86 keeps
        # stores in order).
        U16.pack_into(used, off + 2, (idx + 1) & 0xFFFF)
