"""Guest RAM: one memfd, mapped once, split around the MMIO hole below 4 GiB.

Guest-physical layout (x86):

    0           .. min(size, 3 GiB)    RAM, region 0 (memfd offset 0)
    3 GiB       .. 4 GiB               MMIO hole: virtio-mmio devices,
                                       virtio-pci BARs, IOAPIC, local
                                       APIC, KVM's TSS pages
    4 GiB       .. 4 GiB + the rest    RAM, region 1 (memfd offset 3 GiB)

The memfd is what makes vhost possible: a vhost-user back-end receives the
fd and each region's offset, maps the same pages, and reads the rings
without copies. Every access from pyvmm itself goes through read()/write()/
view(), which refuse anything outside guest RAM.
"""

import ctypes
import fcntl
import mmap
import os
from dataclasses import dataclass

from pyvmm.errors import PyvmmError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

MMIO_HOLE_START = 3 * GiB
MMIO_HOLE_END = 4 * GiB
HUGE_PAGE_SIZE = 2 * MiB

# <linux/memfd.h>: ask for 2 MiB pages (log2 of the size, shifted by 26).
MFD_HUGE_2MB = 21 << 26
# The pool MFD_HUGE_2MB draws from (whatever the default huge page size is).
HUGEPAGES_2MB_SYSFS = "/sys/kernel/mm/hugepages/hugepages-2048kB"

# What the memfd is sealed with, so that no process holding it (a vhost-user
# back-end) can pull the memory from under another: no shrinking (our
# accesses would SIGBUS), no growing, and no more seals, above all no
# F_SEAL_FUTURE_WRITE, which would make every later writable mapping fail
# (a reconnecting or second back-end).
GUEST_MEMORY_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class GuestMemoryError(PyvmmError):
    """An access outside guest RAM, or memory that cannot be set up."""


@dataclass(frozen=True)
class MemoryRegion:
    """One contiguous piece of guest RAM, as a vhost back-end needs to see it."""
    guest_phys_addr: int
    size: int
    memfd_offset: int     # where the region starts within the memfd
    host_addr: int        # where pyvmm has it mapped (userspace_addr for KVM and vhost)

    @property
    def end(self):
        return self.guest_phys_addr + self.size


def free_huge_pages_bytes(sysfs=None):
    """Free 2 MiB huge pages, in bytes (0 where the kernel has no such pool)."""
    try:
        with open(f"{sysfs or HUGEPAGES_2MB_SYSFS}/free_hugepages") as f:
            return int(f.read()) * HUGE_PAGE_SIZE
    except (OSError, ValueError):
        return 0


class GuestMemory:
    def __init__(self, size, hugepages=False):
        if size <= 0 or size % mmap.PAGESIZE:
            raise GuestMemoryError(f"guest memory size {size} is not a positive number of pages")
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        if hugepages:
            if size % HUGE_PAGE_SIZE:
                raise GuestMemoryError("with huge pages the memory size must be a multiple of 2 MiB")
            free = free_huge_pages_bytes()
            if free < size:
                raise GuestMemoryError(
                    f"not enough free 2 MiB huge pages: {free // MiB} MiB free, {size // MiB} MiB "
                    f"needed (echo {size // HUGE_PAGE_SIZE} > "
                    f"{HUGEPAGES_2MB_SYSFS}/nr_hugepages)")
            flags |= os.MFD_HUGETLB | MFD_HUGE_2MB
        self.size = size
        self.fd = os.memfd_create("pyvmm-guest-ram", flags)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, GUEST_MEMORY_SEALS)
            self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(self.fd)
            raise GuestMemoryError(f"cannot allocate {size // MiB} MiB of guest memory: "
                                   f"{e.strerror}") from None
        self._anchor = ctypes.c_char.from_buffer(self._map)
        base = ctypes.addressof(self._anchor)
        low = min(size, MMIO_HOLE_START)
        self.regions = [MemoryRegion(0, low, 0, base)]
        if size > low:
            self.regions.append(MemoryRegion(MMIO_HOLE_END, size - low, low, base + low))

    def close(self):
        del self._anchor
        self._map.close()
        os.close(self.fd)

    def _offset(self, gpa, length):
        """The memfd offset of [gpa, gpa + length), which must lie in one region."""
        if length < 0:
            raise GuestMemoryError(f"negative length {length}")
        return self.span(gpa, length)[1]

    # The regions never change: span()'s answers hold for the memory's life.
    generation = 0

    def span(self, gpa, length):
        """(buffer, offset, start, end), as the back-end's MappedMemory.span."""
        if length >= 0:
            for r in self.regions:
                if r.guest_phys_addr <= gpa and gpa + length <= r.end:
                    return (self._map, r.memfd_offset + gpa - r.guest_phys_addr,
                            r.guest_phys_addr, r.end)
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not inside guest RAM")

    def contains(self, gpa, length):
        try:
            self._offset(gpa, length)
            return True
        except GuestMemoryError:
            return False

    def view(self, gpa, length):
        """A writable memoryview of guest RAM, without copying."""
        off = self._offset(gpa, length)
        return memoryview(self._map)[off:off + length]

    def views(self, ranges):
        """view() of each (gpa, length) of ranges, as MappedMemory.views."""
        whole = memoryview(self._map)
        out = []
        for gpa, length in ranges:
            off = self._offset(gpa, length)
            out.append(whole[off:off + length])
        return out

    def read(self, gpa, length):
        off = self._offset(gpa, length)
        return self._map[off:off + length]

    def write(self, gpa, data):
        off = self._offset(gpa, len(data))
        self._map[off:off + len(data)] = data

    def host_regions(self):
        """(guest start, guest end, host address) of each region (for compiled_ring)."""
        return [(r.guest_phys_addr, r.end, r.host_addr) for r in self.regions]

    def host_address(self, gpa, length=1):
        """The address of guest-physical gpa in pyvmm's own address space."""
        return self._base() + self._offset(gpa, length)

    def _base(self):
        return self.regions[0].host_addr
