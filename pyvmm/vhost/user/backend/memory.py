"""Guest memory as a vhost-user back-end sees it: regions mapped from the
fds the front-end sends (SET_MEM_TABLE, ADD_MEM_REG).

Two kinds of addresses arrive (BE-28): ring addresses (SET_VRING_ADDR) are
the front-end's own ("user") addresses, buffer addresses in descriptors
are guest-physical. Both are looked up in the region table; neither is
ever dereferenced as given. The accessors (read, write, view, contains)
have the same shape as pyvmm's GuestMemory, so the ring code serves both.

A region is mapped only from a file that covers it and cannot shrink
(fds.memory): a page past the end of a file is a SIGBUS, which a Python
process cannot survive. The table holds at most MAX_MEM_SLOTS regions,
whether or not the front-end asked how many (GET_MAX_MEM_SLOTS). A region
that cannot be mapped is refused and changes nothing; the fds are the
caller's to close (the mappings keep the memory).
"""

import ctypes
import mmap
from dataclasses import dataclass

from pyvmm.vhost.user.backend import fds as checked
from pyvmm.vhost.user.backend.device import Refused
from pyvmm.virtio.splitring import RingError

MAX_MEM_SLOTS = 32                 # what GET_MAX_MEM_SLOTS answers
ADDRESS_LIMIT = 1 << 64


def mapping_address(mapping):
    """Where a writable mmap (or bytearray) starts in this process, for C. No
    export of it is kept (an mmap with exports cannot close): the address
    is good for as long as the mapping stays open."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))


class OutsideMemory(RingError):
    """A guest address outside every mapped region: a ring that points there is broken."""


@dataclass
class MappedRegion:
    guest_addr: int
    size: int
    user_addr: int
    mapping: mmap.mmap        # the region's fd from a page boundary ...
    skip: int                 # ... so the region starts this far into the mapping
    end: int = 0              # guest_addr + size
    host_addr: int = 0        # where guest_addr is mapped in this process

    def __post_init__(self):
        self.end = self.guest_addr + self.size
        self.host_addr = mapping_address(self.mapping) + self.skip

    def same(self, region):
        """REM_MEM_REG's match: guest address, user address, size (BE-33)."""
        return (self.guest_addr, self.size, self.user_addr) == (region.guest_addr, region.size,
                                                                region.user_addr)


def map_region(region, fd, allow_unsealed=False):
    """A MappedRegion of one MemoryRegion from fd (Refused if it cannot be)."""
    where = f"the region at {region.guest_addr:#x}+{region.size:#x}"
    if not region.size:
        raise Refused(f"{where} is empty", "BE-27")
    if max(region.guest_addr, region.user_addr) + region.size > ADDRESS_LIMIT:
        raise Refused(f"{where} runs past the end of the address space", "BE-27")
    try:
        checked.memory(fd, region.mmap_offset, region.size, allow_unsealed)
        page = mmap.ALLOCATIONGRANULARITY
        start = region.mmap_offset - region.mmap_offset % page
        mapping = mmap.mmap(fd, region.size + region.mmap_offset - start, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    except Refused as e:
        raise Refused(f"{where}: {e}") from None
    except (OSError, ValueError, OverflowError) as e:
        raise Refused(f"cannot map {where} from its fd: {getattr(e, 'strerror', None) or e}",
                      "BE-27") from None
    return MappedRegion(region.guest_addr, region.size, region.user_addr, mapping,
                        region.mmap_offset - start)


class MappedMemory:
    def __init__(self, max_regions=MAX_MEM_SLOTS, allow_unsealed=False):
        self.regions = []
        self.max_regions = max_regions
        self.allow_unsealed = allow_unsealed
        self._last = None         # the region found last: most lookups hit it again
        # Bumped whenever the table changes: what a caller learnt from span()
        # holds while the generation is the same.
        self.generation = 0

    def add(self, region, fd):
        """ADD_MEM_REG: map one MemoryRegion from fd into a free slot (BE-37)."""
        if len(self.regions) >= self.max_regions:
            raise Refused(f"all {self.max_regions} memory slots are in use", "BE-37")
        self.regions.append(map_region(region, fd, self.allow_unsealed))
        self.generation += 1

    def replace(self, regions_and_fds):
        """SET_MEM_TABLE: the new table, all of it or (Refused) none of it."""
        new = []
        try:
            for region, fd in regions_and_fds:
                new.append(map_region(region, fd, self.allow_unsealed))
        except Refused:
            for r in new:
                r.mapping.close()
            raise
        self.clear()
        self.regions = new
        self.generation += 1

    def remove(self, region):
        for i, r in enumerate(self.regions):
            if r.same(region):
                r.mapping.close()
                del self.regions[i]
                self._last = None
                self.generation += 1
                return True
        return False

    def clear(self):
        for r in self.regions:
            r.mapping.close()
        self.regions = []
        self._last = None
        self.generation += 1

    def _find(self, gpa, length):
        if length >= 0:
            r = self._last
            if r is not None and r.guest_addr <= gpa and gpa + length <= r.end:
                return r, r.skip + gpa - r.guest_addr
            for r in self.regions:
                if r.guest_addr <= gpa and gpa + length <= r.end:
                    self._last = r
                    return r, r.skip + gpa - r.guest_addr
        raise OutsideMemory(f"guest range {gpa:#x}+{length:#x} is not inside the mapped memory")

    def span(self, gpa, length):
        """(buffer, offset, start, end): the mapping [gpa, gpa + length) lies in
        (for struct.unpack_from/pack_into at offset), and the guest range
        [start, end) of its region, within which the caller may go on without
        another lookup until the generation changes."""
        r, off = self._find(gpa, length)
        return r.mapping, off, r.guest_addr, r.end

    def contains(self, gpa, length):
        try:
            self._find(gpa, length)
            return True
        except OutsideMemory:
            return False

    def read(self, gpa, length):
        r, off = self._find(gpa, length)
        return r.mapping[off:off + length]

    def write(self, gpa, data):
        r, off = self._find(gpa, len(data))
        r.mapping[off:off + len(data)] = data

    def view(self, gpa, length):
        r, off = self._find(gpa, length)
        return memoryview(r.mapping)[off:off + length]

    def views(self, ranges):
        """view() of each (gpa, length) of ranges, for one preadv/pwritev: one
        memoryview of a region serves all its ranges. The caller releases
        them before the table may change (a mapping with views cannot close)."""
        out = []
        start, end = 1, 0                  # the guest range of the region at hand
        for gpa, length in ranges:
            if not (start <= gpa and gpa + length <= end):
                r, _ = self._find(gpa, length)
                start, end, delta = r.guest_addr, r.end, r.skip - r.guest_addr
                whole = memoryview(r.mapping)
            off = gpa + delta
            out.append(whole[off:off + length])
        return out

    def host_address(self, gpa, length=1):
        """Where guest-physical gpa is mapped in this process (as GuestMemory.host_address)."""
        r, _ = self._find(gpa, length)
        return r.host_addr + gpa - r.guest_addr

    def host_regions(self):
        """(guest start, guest end, host address) of each region (for compiled_ring)."""
        return [(r.guest_addr, r.end, r.host_addr) for r in self.regions]

    def guest_address(self, user_addr, length=1):
        """The guest-physical address of a front-end (user) address (BE-28)."""
        for r in self.regions:
            if r.user_addr <= user_addr and user_addr + length <= r.user_addr + r.size:
                return r.guest_addr + user_addr - r.user_addr
        raise OutsideMemory(f"front-end address {user_addr:#x}+{length:#x} is in no region "
                            f"(BE-28)")
