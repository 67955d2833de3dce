"""The split virtqueue (virtio 1.x section 2.7), as laid out in guest memory.

Three areas, written by the driver (guest) or the device (back-end):

    descriptor table  16 x num    driver  {addr u64, len u32, flags u16, next u16}
    available ring    6 + 2 x num driver  {flags u16, idx u16, ring[num] u16, used_event u16}
    used ring         6 + 8 x num device  {flags u16, idx u16, ring[num] {id u32, len u32},
                                           avail_event u16}

check_ring() is what pyvmm does before it hands ring addresses to a
back-end. DriverRing plays the guest's part on a ring in a GuestMemory, so
that a test (or a learner) can drive /dev/vhost-net or a vhost-user
back-end without booting anything.
"""

import struct

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4


class RingError(Exception):
    """Ring parameters a device must refuse (they come from the guest)."""


def desc_table_size(num):
    return 16 * num


def avail_ring_size(num):
    return 6 + 2 * num


def used_ring_size(num):
    return 6 + 8 * num


def avail_idx(memory, avail):
    """avail.idx of the available ring at guest address avail: how many
    chains the driver has made available (mod 2^16)."""
    return struct.unpack("<H", memory.read(avail + 2, 2))[0]


def used_idx(memory, used):
    """used.idx of the used ring at guest address used: how many chains the
    device has returned (mod 2^16)."""
    return struct.unpack("<H", memory.read(used + 2, 2))[0]


def check_queue_size(num, max_size=MAX_QUEUE_SIZE):
    if not 1 <= num <= max_size or num & (num - 1):
        raise RingError(f"queue size {num} is not a power of two between 1 and {max_size}")


def check_ring(memory, num, desc, avail, used):
    """Refuse a ring that is misaligned or not entirely inside guest RAM."""
    check_queue_size(num)
    for name, addr, size, align in (("descriptor table", desc, desc_table_size(num), DESC_ALIGN),
                                    ("available ring", avail, avail_ring_size(num), AVAIL_ALIGN),
                                    ("used ring", used, used_ring_size(num), USED_ALIGN)):
        if addr % align:
            raise RingError(f"{name} at {addr:#x} is not {align}-byte aligned")
        if not memory.contains(addr, size):
            raise RingError(f"{name} at {addr:#x}+{size:#x} is not inside guest RAM")


class DriverRing:
    """The driver's side of a split ring at guest-physical address gpa.

    The areas are laid out back to back (used ring 4-byte aligned) in
    ring_size(num) bytes. Buffers are (gpa, length, device_writable) tuples.
    """

    def __init__(self, memory, gpa, num):
        check_queue_size(num)
        self.memory = memory
        self.num = num
        self.desc_addr = gpa
        self.avail_addr = gpa + desc_table_size(num)
        self.used_addr = (self.avail_addr + avail_ring_size(num) + USED_ALIGN - 1) & ~(USED_ALIGN - 1)
        check_ring(memory, num, self.desc_addr, self.avail_addr, self.used_addr)
        memory.write(gpa, bytes(self.used_addr + used_ring_size(num) - gpa))
        self._free = list(range(num))
        self._chains = {}       # head -> descriptor ids of its chain
        self.avail_idx = 0      # our copy: the next free slot of the available ring
        self.last_used_idx = 0  # how far we have consumed the used ring

    @staticmethod
    def ring_size(num):
        avail_end = desc_table_size(num) + avail_ring_size(num)
        return ((avail_end + USED_ALIGN - 1) & ~(USED_ALIGN - 1)) + used_ring_size(num)

    def add(self, buffers):
        """Chain buffers into descriptors and publish the chain; return its head id.

        Device-readable buffers must come before device-writable ones.
        """
        if not buffers or len(buffers) > len(self._free):
            raise RingError(f"{len(buffers)} buffers, {len(self._free)} free descriptors")
        ids = [self._free.pop() for _ in buffers]
        for i, (desc_id, (addr, length, writable)) in enumerate(zip(ids, buffers)):
            flags = VIRTQ_DESC_F_WRITE if writable else 0
            nxt = 0
            if i + 1 < len(ids):
                flags |= VIRTQ_DESC_F_NEXT
                nxt = ids[i + 1]
            self.memory.write(self.desc_addr + 16 * desc_id,
                              struct.pack("<QIHH", addr, length, flags, nxt))
        head = ids[0]
        self._chains[head] = ids
        slot = self.avail_idx % self.num
        self.memory.write(self.avail_addr + 4 + 2 * slot, struct.pack("<H", head))
        # The entry must be visible before the index that covers it (x86
        # keeps stores in order; a real driver would put a barrier here).
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write(self.avail_addr + 2, struct.pack("<H", self.avail_idx))
        return head

    def used_idx(self):
        return struct.unpack("<H", self.memory.read(self.used_addr + 2, 2))[0]

    def pop_used(self):
        """The (head id, bytes written) the device has returned since last time."""
        done = []
        end = self.used_idx()
        while self.last_used_idx != end:
            slot = self.last_used_idx % self.num
            head, length = struct.unpack("<II", self.memory.read(self.used_addr + 4 + 8 * slot, 8))
            if head not in self._chains:
                raise RingError(f"the device returned descriptor {head}, which is not in use")
            self._free.extend(self._chains.pop(head))
            done.append((head, length))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        # used_event (VIRTIO_RING_F_EVENT_IDX): interrupt me at the next used buffer.
        self.memory.write(self.avail_addr + 4 + 2 * self.num, struct.pack("<H", self.last_used_idx))
        return done

    def set_no_interrupt(self, suppress):
        """VIRTQ_AVAIL_F_NO_INTERRUPT: ask the device not to interrupt (a hint)."""
        self.memory.write(self.avail_addr, struct.pack("<H", VIRTQ_AVAIL_F_NO_INTERRUPT if suppress else 0))
