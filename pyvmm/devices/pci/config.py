"""The configuration space of one PCI function (type 0 header), as the guest sees it.

256 bytes and, beside them, which bits of each byte the guest may change;
a write changes only those, so a guest writing garbage anywhere leaves the
read-only fields (ids, class, capability list) as they were. BAR sizing
falls out of the same rule: the guest writes all ones to a BAR and reads
back only the bits it may set, which tell the size.
"""

import struct

# Header fields (<linux/pci_regs.h>)
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS_CAP_LIST = 0x10

PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11

CONFIG_SPACE_SIZE = 256
FIRST_CAPABILITY = 0x40


class PciConfig:
    """Configuration space: bytes, and the mask of bits the guest may write."""

    def __init__(self, vendor, device, class_code, revision=0, subsystem_vendor=0,
                 subsystem_id=0):
        self.data = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        struct.pack_into("<HH", self.data, PCI_VENDOR_ID, vendor, device)
        self.data[PCI_REVISION_ID] = revision
        self.data[PCI_CLASS_PROG:PCI_CLASS_PROG + 3] = class_code.to_bytes(3, "little")
        struct.pack_into("<HH", self.data, PCI_SUBSYSTEM_VENDOR_ID, subsystem_vendor, subsystem_id)
        self._set_mask(PCI_COMMAND, 2, PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
                       | PCI_COMMAND_INTX_DISABLE)
        for field in (PCI_CACHE_LINE_SIZE, PCI_LATENCY_TIMER, PCI_INTERRUPT_LINE):
            self.wmask[field] = 0xFF     # scratch bytes a guest's PCI core writes
        self._last_capability = None
        self._next_capability = FIRST_CAPABILITY

    def _set_mask(self, offset, size, mask):
        self.wmask[offset:offset + size] = mask.to_bytes(size, "little")

    def u16(self, offset):
        return struct.unpack_from("<H", self.data, offset)[0]

    def u32(self, offset):
        return struct.unpack_from("<I", self.data, offset)[0]

    # --- what the device model sets up -------------------------------------

    def memory_bar(self, index, size, address):
        """A 32-bit non-prefetchable memory BAR of size bytes (a power of two) at address."""
        assert size & (size - 1) == 0 and size >= 16 and address % size == 0
        offset = PCI_BASE_ADDRESS_0 + 4 * index
        struct.pack_into("<I", self.data, offset, address)
        self._set_mask(offset, 4, ~(size - 1) & 0xFFFF_FFFF)

    def bar_address(self, index):
        return self.u32(PCI_BASE_ADDRESS_0 + 4 * index) & ~0xF

    def add_capability(self, cap_id, body, writable=b""):
        """Append a capability (its bytes after id and next); writable: the
        write mask of body's first bytes. Returns its offset."""
        offset = self._next_capability
        length = 2 + len(body)
        if offset + length > CONFIG_SPACE_SIZE:
            raise ValueError("capabilities do not fit in configuration space")
        self.data[offset] = cap_id
        self.data[offset + 2:offset + length] = body
        self.wmask[offset + 2:offset + 2 + len(writable)] = writable
        if self._last_capability is None:
            self.data[PCI_CAPABILITY_LIST] = offset
            struct.pack_into("<H", self.data, PCI_STATUS, self.u16(PCI_STATUS) | PCI_STATUS_CAP_LIST)
        else:
            self.data[self._last_capability + 1] = offset
        self._last_capability = offset
        self._next_capability = (offset + length + 3) & ~3
        return offset

    # --- guest accesses ------------------------------------------------------

    def read(self, offset, size):
        """A naturally aligned access of 1, 2 or 4 bytes; anything else reads all ones."""
        if not _aligned(offset, size):
            return (1 << (8 * size)) - 1 if size in (1, 2, 4) else 0xFFFF_FFFF
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset, size, value):
        """Change the writable bits; False if the access was ignored (misaligned)."""
        if not _aligned(offset, size):
            return False
        for i in range(size):
            mask = self.wmask[offset + i]
            if mask:
                byte = (value >> (8 * i)) & 0xFF
                self.data[offset + i] = (self.data[offset + i] & ~mask) | (byte & mask)
        return True


def _aligned(offset, size):
    return size in (1, 2, 4) and offset % size == 0 and 0 <= offset and offset + size <= CONFIG_SPACE_SIZE
