"""Port I/O and MMIO buses: which device answers which address.

A device implements read(offset, size) -> int and write(offset, size, value),
offsets being relative to its base. Accesses nobody claims are logged at
debug level and ignored (reads return all ones, like a floating bus): a
guest probing for hardware must never be able to stop the VMM.
"""

import bisect
import logging
from dataclasses import dataclass

log = logging.getLogger("pyvmm.bus")


class BusConflict(Exception):
    pass


@dataclass(frozen=True)
class BusEntry:
    base: int
    size: int
    device: object
    name: str


class Bus:
    def __init__(self, name):
        self.name = name
        self._starts = []    # sorted base addresses
        self._entries = []   # BusEntry, in the same order

    def add(self, base, size, device, name):
        i = bisect.bisect_right(self._starts, base)
        before = self._entries[i - 1] if i > 0 else None
        after = self._entries[i] if i < len(self._entries) else None
        if (before and before.base + before.size > base) or (after and base + size > after.base):
            raise BusConflict(f"{name}: {self.name} range {base:#x}+{size:#x} overlaps another device")
        self._starts.insert(i, base)
        self._entries.insert(i, BusEntry(base, size, device, name))

    def find(self, addr):
        """The BusEntry covering addr, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._entries[i].base + self._entries[i].size:
            return self._entries[i]
        return None

    def read(self, entry, addr, size):
        if entry is None:
            log.debug("%s read of %d bytes at %#x: no device", self.name, size, addr)
            return (1 << (8 * size)) - 1
        return entry.device.read(addr - entry.base, size)

    def write(self, entry, addr, size, value):
        if entry is None:
            log.debug("%s write of %d bytes (%#x) at %#x: no device", self.name, size, value, addr)
            return
        entry.device.write(addr - entry.base, size, value)
