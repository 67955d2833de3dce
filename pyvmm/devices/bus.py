"""Port I/O and MMIO buses: which device answers which address.

A device implements read(offset, size) -> int and write(offset, size, value),
offsets being relative to its base. Accesses nobody claims are ignored
(reads return all ones, like a floating bus) and logged at debug level, a
few lines a second at most: a guest probing for hardware must never be able
to stop the VMM or flood its log.
"""

import bisect
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("pyvmm.bus")


class BusConflict(Exception):
    pass


# eq=False: hashed by identity, which is cheap; exit statistics key on entries.
@dataclass(frozen=True, eq=False)
class BusEntry:
    base: int
    size: int
    device: object
    name: str


class RateLimitedLog:
    """Debug lines, at most `burst` in each `period` seconds; the rest are
    counted and the count is given with the next line that gets through."""

    def __init__(self, logger, burst=10, period=1.0):
        self.logger, self.burst, self.period = logger, burst, period
        self._window_start = float("-inf")
        self._in_window = 0
        self._suppressed = 0

    def __call__(self, msg, *args):
        if not self.logger.isEnabledFor(logging.DEBUG):
            return
        now = time.monotonic()
        if now - self._window_start >= self.period:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self.burst:
            self._suppressed += 1
            return
        self._in_window += 1
        if self._suppressed:
            msg += f" ({self._suppressed} similar lines suppressed)"
            self._suppressed = 0
        self.logger.debug(msg, *args)


class Bus:
    """Entries sorted by base. The table is replaced whole on a change (rare: a
    guest moving a PCI BAR), never changed in place, so a vCPU looking up an
    address meanwhile sees either the old table or the new one."""

    def __init__(self, name):
        self.name = name
        self._table = ((), ())   # (sorted base addresses, BusEntry in the same order)
        self._log_unclaimed = RateLimitedLog(log)

    def add(self, base, size, device, name):
        starts, entries = self._table
        i = bisect.bisect_right(starts, base)
        before = entries[i - 1] if i > 0 else None
        after = entries[i] if i < len(entries) else None
        if (before and before.base + before.size > base) or (after and base + size > after.base):
            raise BusConflict(f"{name}: {self.name} range {base:#x}+{size:#x} overlaps another device")
        entry = BusEntry(base, size, device, name)
        self._table = (starts[:i] + (base,) + starts[i:], entries[:i] + (entry,) + entries[i:])

    def remove(self, base):
        """Take away the entry that starts at base."""
        starts, entries = self._table
        i = starts.index(base)
        self._table = (starts[:i] + starts[i + 1:], entries[:i] + entries[i + 1:])

    def find(self, addr):
        """The BusEntry covering addr, or None."""
        starts, entries = self._table
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and addr < entries[i].base + entries[i].size:
            return entries[i]
        return None

    def read(self, entry, addr, size):
        if entry is None:
            self._log_unclaimed("%s read of %d bytes at %#x: no device", self.name, size, addr)
            return (1 << (8 * size)) - 1
        return entry.device.read(addr - entry.base, size)

    def write(self, entry, addr, size, value):
        if entry is None:
            self._log_unclaimed("%s write of %d bytes (%#x) at %#x: no device",
                                self.name, size, value, addr)
            return
        entry.device.write(addr - entry.base, size, value)
