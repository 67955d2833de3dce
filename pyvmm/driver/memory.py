"""Guest memory laid out to catch a back-end's address mistakes (the
harness notes of the conformance rules, BE-27 to BE-29): one memfd cut
into regions whose guest addresses, memfd offsets (mmap_offset) and user
addresses all differ, so that mixing any two of them up breaks the data.
"""

from pyvmm.memory.guest_memory import GuestMemory, MemoryRegion

OPAQUE_BASE = 0x5A5A_0000_0000        # user addresses no process has mapped


class ScatteredMemory(GuestMemory):
    def __init__(self, size, pieces=1, opaque=False):
        """size bytes in `pieces` equal regions, contiguous in guest addresses
        but in reverse order in the memfd; with opaque, the user addresses
        sent to the back-end are values nothing has mapped."""
        super().__init__(size)
        if size % pieces or (size // pieces) % 4096:
            raise ValueError(f"{size} bytes do not cut into {pieces} page-sized pieces")
        piece = size // pieces
        real = self.regions[0].host_addr
        self.regions = []
        for i in range(pieces):
            offset = (pieces - 1 - i) * piece
            user = OPAQUE_BASE + (i << 32) if opaque else real + offset
            self.regions.append(MemoryRegion(i * piece, piece, offset, user))

    def host_address(self, gpa, length=1):
        """The user address the back-end knows gpa by (opaque or not)."""
        self._offset(gpa, length)                 # inside one region, or an error
        r = next(r for r in self.regions if r.guest_phys_addr <= gpa < r.end)
        return r.host_addr + gpa - r.guest_phys_addr
