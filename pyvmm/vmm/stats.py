"""Counting vCPU exits per reason and per device, to show where time goes.

The point of vhost is that the data path causes no exits to the VMM; these
counts are how pyvmm proves it (`pyvmm run --stats`).
"""

import collections


class ExitStats:
    def __init__(self):
        self.by_reason = collections.Counter()
        self.by_device = collections.Counter()   # (reason, device name)

    def count(self, reason, device=None):
        self.by_reason[reason] += 1
        if device is not None:
            self.by_device[(reason, device)] += 1

    def merge(self, other):
        self.by_reason.update(other.by_reason)
        self.by_device.update(other.by_device)

    def report(self):
        """Lines such as 'io        1203  (serial 1190, debugcon 1, exit-port 1)'."""
        lines = []
        for reason, n in self.by_reason.most_common():
            parts = [f"{dev} {m}" for (r, dev), m in self.by_device.most_common() if r == reason]
            detail = f"  ({', '.join(parts)})" if parts else ""
            lines.append(f"{reason:<16}{n:>8}{detail}")
        return lines
