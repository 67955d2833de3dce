"""Guest RAM in a memfd that a vhost back-end can map too."""

from pyvmm.memory.guest_memory import GuestMemory, GuestMemoryError, MemoryRegion

__all__ = ["GuestMemory", "GuestMemoryError", "MemoryRegion"]
