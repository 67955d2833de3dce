"""The VM's GSI routing table: the irqchip's pins, and the MSIs of PCI devices.

An irqfd raises a GSI; the routing table says what that GSI is. After
KVM_CREATE_IRQCHIP, GSIs 0-23 are IOAPIC pins (0-15 also PIC pins), which
virtio-mmio's irqfds and the serial port use. An MSI-X vector of a PCI
device is a GSI above those, routed to the MSI message (address and data)
the guest wrote into the vector's table entry: the back-end's call eventfd
becomes an interrupt on the vCPU the guest chose, with no exit and no
interrupt status to read.

KVM_SET_GSI_ROUTING replaces the whole table, so this keeps all of it and
sends it again on every change. Changes come only when the guest programs
or (un)masks a vector: at driver start, and when it moves an interrupt to
another CPU; never per I/O.
"""

import threading

from pyvmm.errors import PyvmmError
from pyvmm.kvm import uapi

FIRST_MSI_GSI = uapi.KVM_IOAPIC_NUM_PINS
# KVM_MAX_IRQ_ROUTES in the kernel is 4096; a machine of pyvmm needs at most
# a few hundred (one per MSI-X vector).
MAX_GSI = 4096


class GsiRoutes:
    """The routing table of one VM, and the GSIs handed out for MSIs."""

    def __init__(self, vm):
        self.vm = vm
        self._lock = threading.Lock()
        self._next_gsi = FIRST_MSI_GSI
        self._msi = {}            # gsi -> (address, data) of a routed vector

    def allocate(self):
        """A GSI of our own, routed nowhere until update() routes it."""
        with self._lock:
            if self._next_gsi >= MAX_GSI:
                raise PyvmmError(f"out of GSIs for MSI-X vectors (at most {MAX_GSI - FIRST_MSI_GSI})")
            gsi, self._next_gsi = self._next_gsi, self._next_gsi + 1
            return gsi

    def update(self, changes):
        """Route each GSI of changes ({gsi: (address, data)}) to that MSI
        message, or (None) nowhere: an irqfd on it then raises nothing. One
        KVM_SET_GSI_ROUTING for them all, none if nothing changes; an OSError
        from KVM leaves the table as it was."""
        with self._lock:
            msi = dict(self._msi)
            for gsi, route in changes.items():
                if route is None:
                    msi.pop(gsi, None)
                else:
                    msi[gsi] = route
            if msi == self._msi:
                return
            self.vm.set_gsi_routing(self.entries(msi))
            self._msi = msi

    def entries(self, msi):
        """The table for MSI routes msi ({gsi: (address, data)}): KVM's default
        irqchip routes, then the MSIs."""
        table = []
        for pin in range(uapi.KVM_IOAPIC_NUM_PINS):
            table.append(_irqchip(pin, uapi.KVM_IRQCHIP_IOAPIC, pin))
            if pin < 16:
                chip = uapi.KVM_IRQCHIP_PIC_MASTER if pin < 8 else uapi.KVM_IRQCHIP_PIC_SLAVE
                table.append(_irqchip(pin, chip, pin % 8))
        for gsi, (address, data) in sorted(msi.items()):
            entry = uapi.kvm_irq_routing_entry(gsi=gsi, type=uapi.KVM_IRQ_ROUTING_MSI)
            entry.u.msi.address_lo = address & 0xFFFF_FFFF
            entry.u.msi.address_hi = address >> 32
            entry.u.msi.data = data
            table.append(entry)
        return table


def _irqchip(gsi, chip, pin):
    entry = uapi.kvm_irq_routing_entry(gsi=gsi, type=uapi.KVM_IRQ_ROUTING_IRQCHIP)
    entry.u.irqchip.irqchip = chip
    entry.u.irqchip.pin = pin
    return entry
