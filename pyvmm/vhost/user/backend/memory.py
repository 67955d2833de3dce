"""Guest memory as a vhost-user back-end sees it: regions mapped from the
fds the front-end sends (SET_MEM_TABLE, ADD_MEM_REG).

Two kinds of addresses arrive (BE-28): ring addresses (SET_VRING_ADDR) are
the front-end's own ("user") addresses, buffer addresses in descriptors
are guest-physical. Both are looked up in the region table; neither is
ever dereferenced as given. The accessors (read, write, view, contains)
have the same shape as pyvmm's GuestMemory, so the ring code serves both.
"""

import mmap
import os
from dataclasses import dataclass

from pyvmm.vhost.user.errors import RemoteProtocolError


class OutsideMemory(RemoteProtocolError):
    """A guest address outside every mapped region."""


@dataclass
class MappedRegion:
    guest_addr: int
    size: int
    user_addr: int
    mapping: mmap.mmap        # the region's fd from a page boundary ...
    skip: int                 # ... so the region starts this far into the mapping
    end: int = 0              # guest_addr + size

    def __post_init__(self):
        self.end = self.guest_addr + self.size


class MappedMemory:
    def __init__(self):
        self.regions = []
        self._last = None         # the region found last: most lookups hit it again

    def add(self, region, fd):
        """Map one MemoryRegion from fd (which is closed: the mapping keeps the memory)."""
        try:
            page = mmap.ALLOCATIONGRANULARITY
            start = region.mmap_offset - region.mmap_offset % page
            mapping = mmap.mmap(fd, region.size + region.mmap_offset - start, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except (OSError, ValueError, OverflowError) as e:
            raise RemoteProtocolError(f"cannot map the region at {region.guest_addr:#x}+"
                                      f"{region.size:#x} from its fd: {e}", "BE-27") from None
        finally:
            os.close(fd)
        self.regions.append(MappedRegion(region.guest_addr, region.size, region.user_addr,
                                         mapping, region.mmap_offset - start))

    def remove(self, region):
        for i, r in enumerate(self.regions):
            if (r.guest_addr, r.size, r.user_addr) == (region.guest_addr, region.size,
                                                       region.user_addr):
                r.mapping.close()
                del self.regions[i]
                self._last = None
                return True
        return False

    def clear(self):
        for r in self.regions:
            r.mapping.close()
        self.regions.clear()
        self._last = None

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

    def guest_address(self, user_addr, length=1):
        """The guest-physical address of a front-end (user) address (BE-28)."""
        for r in self.regions:
            if r.user_addr <= user_addr and user_addr + length <= r.user_addr + r.size:
                return r.guest_addr + user_addr - r.user_addr
        raise OutsideMemory(f"front-end address {user_addr:#x}+{length:#x} is in no region",
                           "BE-28")
