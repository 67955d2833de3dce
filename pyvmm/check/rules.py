"""Every check of `pyvmm check`, each named by its rule in
../shared/VHOST-USER-CONFORMANCE.md section 1 and run on a fresh
connection, so that one failure does not poison the next; in rule order.

    framing.py   A-C: header, flags, sizes, negotiation, REPLY_ACK
    memory.py    D: memory tables and slots
    rings.py     E: ring states, kicks, GET_VRING_BASE, the data path
    device.py    F, G, I: inflight, configuration space, owner, status
    program.py   M: the back-end program conventions (given a command)
    restart.py   kill and start again (given a command): inflight resubmission
"""

# (importing them registers their checks)
from pyvmm.check import device, framing, memory, program, restart, rings  # noqa: F401
from pyvmm.check.core import (CHECKS, DEVICES, MUST_LEVELS, Check, Context, Failed, Offer,
                              Skipped, discover)

CHECKS.sort(key=lambda c: c.number)

__all__ = ["CHECKS", "DEVICES", "MUST_LEVELS", "Check", "Context", "Failed", "Offer", "Skipped",
           "discover"]
