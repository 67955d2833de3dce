"""Counting vCPU exits per reason and per device, to show where time goes.

The point of vhost is that the data path causes no exits to the VMM; these
counts are how pyvmm proves it (`pyvmm run --stats`).

Counting happens on every exit, the InterruptStatus read of a vhost device
included, so it must cost next to nothing: keys are the KVM exit reason (an
int), the bus entry that took the access and the offset into it. Names are
made only when the report is printed. Accesses no device claims are counted
per page (MMIO) or port (port I/O) for the first UNCLAIMED_BUCKETS of them
and together after that: a guest sweeping the address space must not be
able to grow pyvmm's memory.
"""

import collections

from pyvmm.kvm import uapi

UNCLAIMED_BUCKETS = 16
OTHER_UNCLAIMED = -1
PAGE_SHIFT = 12


class ExitStats:
    def __init__(self):
        self.by_reason = collections.Counter()   # exit reason -> exits
        self.by_place = collections.Counter()    # (reason, BusEntry or None, offset or bucket)
        self._unclaimed = set()                  # buckets counted on their own

    def count(self, reason):
        self.by_reason[reason] += 1

    def count_access(self, reason, entry, offset):
        """An I/O or MMIO exit that the device of bus entry entry handled."""
        self.by_reason[reason] += 1
        self.by_place[(reason, entry, offset)] += 1

    def count_unclaimed(self, reason, addr):
        """An I/O or MMIO exit at addr, which no device claims."""
        self.by_reason[reason] += 1
        bucket = addr >> PAGE_SHIFT if reason == uapi.KVM_EXIT_MMIO else addr
        if bucket not in self._unclaimed:
            if len(self._unclaimed) >= UNCLAIMED_BUCKETS:
                bucket = OTHER_UNCLAIMED
            else:
                self._unclaimed.add(bucket)
        self.by_place[(reason, None, bucket)] += 1

    def merge(self, other):
        self.by_reason.update(other.by_reason)
        self.by_place.update(other.by_place)

    def report(self):
        """Lines such as 'io        1203  (serial 1190, debugcon 1, exit-port 1)'."""
        places = collections.defaultdict(collections.Counter)
        for (reason, entry, detail), n in self.by_place.items():
            places[reason][place_name(reason, entry, detail)] += n
        lines = []
        for reason, n in self.by_reason.most_common():
            parts = [f"{name} {m}" for name, m in places[reason].most_common()]
            detail = f"  ({', '.join(parts)})" if parts else ""
            lines.append(f"{reason_name(reason):<16}{n:>8}{detail}")
        return lines


def reason_name(reason):
    return uapi.EXIT_REASONS.get(reason, str(reason)) if isinstance(reason, int) else reason


def place_name(reason, entry, detail):
    if entry is None:
        if detail == OTHER_UNCLAIMED:
            return "other unclaimed"
        if reason == uapi.KVM_EXIT_MMIO:
            return f"page {detail << PAGE_SHIFT:#x}"
        return f"port {detail:#x}"
    describe = getattr(entry.device, "describe", None)
    if reason == uapi.KVM_EXIT_MMIO and describe:
        # Per register for devices that name theirs: --stats shows QueueNotify at zero.
        return f"{entry.name} {describe(detail)}"
    return entry.name
