"""MSI-X: a table of vectors, each an eventfd that KVM turns into the guest's MSI.

The guest writes each vector's message (address, data) into the table and
unmasks it; from then on a write to the vector's eventfd (by a vhost
back-end, say) is an irqfd on a GSI routed to that message
(kvm/irq_routing.py): the interrupt reaches the vCPU with no exit.

Masking. A vector is deliverable when MSI-X is enabled, the function is
not masked and its own entry is not masked; otherwise its GSI is routed
nowhere and KVM drops what its eventfd raises. The spec would have the
device remember it in the Pending Bit Array and send it at unmask; pyvmm
cannot see a back-end's eventfd writes without reading them (which would
put Python on the data path), so the PBA reads 0 and every unmask of a
running device's vector sends one interrupt anyway. A spurious interrupt
costs a virtio driver a look at its used ring; a lost one could leave a
queue waiting forever. Linux masks a vector only while it rewrites it
(moving it to another CPU), so this is rare.
"""

import logging
import os
import struct
import threading

log = logging.getLogger("pyvmm.pci")

PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_VECTOR_CTRL = 12
PCI_MSIX_ENTRY_CTRL_MASKBIT = 1
PCI_MSIX_FLAGS_MASKALL = 1 << 14       # in Message Control
PCI_MSIX_FLAGS_ENABLE = 1 << 15
MAX_VECTORS = 2048


class MsixTable:
    """nvectors vectors, each an eventfd made an irqfd on a GSI of routes."""

    def __init__(self, nvectors, vm, routes, eventfd, name, active=lambda: True):
        """eventfd(): a new eventfd the owner closes; active(): whether an
        unmask should send an interrupt (the device is running)."""
        assert 0 < nvectors <= MAX_VECTORS
        self.nvectors = nvectors
        self.routes = routes
        self.name = name
        self._active = active
        self._lock = threading.Lock()
        self.table = bytearray(nvectors * PCI_MSIX_ENTRY_SIZE)
        for v in range(nvectors):                         # every entry starts masked
            self.table[v * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL] = \
                PCI_MSIX_ENTRY_CTRL_MASKBIT
        self.enabled = False
        self.function_masked = False
        self.fds = []
        self.gsis = []
        self._routed = [False] * nvectors
        for _ in range(nvectors):
            fd, gsi = eventfd(), routes.allocate()
            vm.irqfd(fd, gsi)
            self.fds.append(fd)
            self.gsis.append(gsi)

    @property
    def table_size(self):
        return len(self.table)

    @property
    def pba_size(self):
        return (self.nvectors + 63) // 64 * 8

    def capability(self, bar, table_offset, pba_offset):
        """The body of the MSI-X capability (after id and next) and its write mask."""
        body = struct.pack("<HII", self.nvectors - 1, table_offset | bar, pba_offset | bar)
        writable = struct.pack("<H", PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
        return body, writable

    def fd(self, vector):
        """The eventfd of vector, or None if the table has no such entry."""
        return self.fds[vector] if 0 <= vector < self.nvectors else None

    # --- the guest ------------------------------------------------------------

    def control_written(self, control):
        """Message Control changed (in configuration space): enable and function mask."""
        with self._lock:
            self.enabled = bool(control & PCI_MSIX_FLAGS_ENABLE)
            self.function_masked = bool(control & PCI_MSIX_FLAGS_MASKALL)
            self._update(range(self.nvectors))

    def read_table(self, offset, size):
        """A 4- or 8-byte aligned read of the table (anything else reads 0)."""
        if size not in (4, 8) or offset % size or offset + size > self.table_size:
            return 0
        with self._lock:
            return int.from_bytes(self.table[offset:offset + size], "little")

    def write_table(self, offset, size, value):
        if size not in (4, 8) or offset % size or offset + size > self.table_size:
            log.debug("%s: MSI-X table write of %d bytes at %#x ignored", self.name, size, offset)
            return
        with self._lock:
            self.table[offset:offset + size] = value.to_bytes(size, "little")
            first = offset // PCI_MSIX_ENTRY_SIZE
            self._update(range(first, (offset + size - 1) // PCI_MSIX_ENTRY_SIZE + 1))

    def read_pba(self, offset, size):
        return 0       # see the module doc

    def _update(self, vectors):
        """(under _lock) Route each of vectors to its message, or nowhere if
        masked: one routing table for them all."""
        deliverable, changes = {}, {}
        for v in vectors:
            entry = v * PCI_MSIX_ENTRY_SIZE
            address_lo, address_hi, data, ctrl = struct.unpack_from("<IIII", self.table, entry)
            deliverable[v] = (self.enabled and not self.function_masked
                              and not ctrl & PCI_MSIX_ENTRY_CTRL_MASKBIT)
            changes[self.gsis[v]] = (address_hi << 32 | address_lo, data) if deliverable[v] \
                else None
        try:
            self.routes.update(changes)
        except OSError as e:
            log.warning("%s: KVM refused the routes of MSI-X vectors %d-%d (%s); they stay as "
                        "they were", self.name, min(vectors), max(vectors), e.strerror)
            return
        for v, now in deliverable.items():
            if now and not self._routed[v] and self._active():
                os.eventfd_write(self.fds[v], 1)       # what may have been dropped meanwhile
            self._routed[v] = now
