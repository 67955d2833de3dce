"""The PCI root bus: configuration mechanism #1 and a host bridge at 00:00.0.

With no ACPI and no firmware, Linux finds PCI by writing 0x80000000 to
port 0xCF8 and reading it back (arch/x86/pci/direct.c), then looks for a
host bridge on bus 0 to believe it; after that it scans bus 0 through the
same two ports: CONFIG_ADDRESS at 0xCF8 (enable bit, bus, device,
function, register) and CONFIG_DATA at 0xCFC-0xCFF. kvmtool does the same.
Bus 0 only, function 0 only: every other address reads all ones, which
is how a guest learns nothing is there.
"""

import logging
import threading

from pyvmm.devices.pci.config import PciConfig

log = logging.getLogger("pyvmm.pci")

PCI_CONFIG_PORT = 0xCF8          # CONFIG_ADDRESS, then CONFIG_DATA at 0xCFC
PCI_CONFIG_PORTS = 8
CONFIG_DATA = 4                  # offset of 0xCFC from 0xCF8
CONFIG_ENABLE = 1 << 31
MAX_SLOTS = 32

PCI_CLASS_BRIDGE_HOST = 0x060000
# Cloud Hypervisor's (and Firecracker's) host bridge ids: Intel's virtual PCIe host.
HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE = 0x8086, 0x0D57


class HostBridge:
    """00:00.0: nothing but its ids, so that the guest believes there is a bus."""

    def __init__(self):
        self.config = PciConfig(HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, PCI_CLASS_BRIDGE_HOST)

    def config_read(self, offset, size):
        return self.config.read(offset, size)

    def config_write(self, offset, size, value):
        self.config.write(offset, size, value)


class PciRoot:
    """Bus 0 and its ports: add() functions, put the root on the port I/O bus."""

    def __init__(self):
        self._lock = threading.Lock()       # CONFIG_ADDRESS, then the data access
        self.address = 0
        self.slots = [None] * MAX_SLOTS
        self.slots[0] = HostBridge()

    def add(self, function):
        """Put function (config_read/config_write) in the next free slot; its number."""
        for slot, present in enumerate(self.slots):
            if present is None:
                self.slots[slot] = function
                return slot
        raise ValueError(f"at most {MAX_SLOTS - 1} PCI devices")

    def _target(self):
        """(under _lock) The function and register CONFIG_ADDRESS points at, or None."""
        a = self.address
        bus, slot, function = (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7
        if not a & CONFIG_ENABLE or bus != 0 or function != 0:
            return None, 0
        return self.slots[slot], a & 0xFC

    def read(self, offset, size):
        all_ones = (1 << (8 * size)) - 1
        with self._lock:
            if offset < CONFIG_DATA:
                # Only dword accesses reach CONFIG_ADDRESS (Linux's probe
                # writes a byte to 0xCFB first, which must not change it).
                return self.address if offset == 0 and size == 4 else all_ones
            target, register = self._target()
            if target is None:
                return all_ones
            return target.config_read(register + offset - CONFIG_DATA, size)

    def write(self, offset, size, value):
        with self._lock:
            if offset < CONFIG_DATA:
                if offset == 0 and size == 4:
                    self.address = value & 0x80FF_FFFC
                return
            target, register = self._target()
        if target is not None:
            # Outside _lock: a write may remap a BAR, which takes the device's locks.
            target.config_write(register + offset - CONFIG_DATA, size, value)
