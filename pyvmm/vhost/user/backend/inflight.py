"""Inflight I/O tracking for split rings (vhost-user.rst, "Inflight I/O
tracking"): how a back-end that dies mid-request lets its successor finish
the job.

The back-end makes the area (a memfd) at GET_INFLIGHT_FD; the front-end
keeps it across back-end restarts and hands it back with SET_INFLIGHT_FD.
Per queue, a 16-byte header and one 16-byte DescStateSplit per descriptor:

    header: features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16
    desc:   inflight u8, padding 5, next u16, counter u64

Taking a request: desc[head].counter = counter++, desc[head].inflight = 1,
before the request has any effect. Completing it: link it as the last
batch (next, last_batch_head), publish the used element and index, clear
inflight, copy the used index into the header. A successor that finds the
header's used_idx behind the ring's knows it died between the two and
clears that batch; every head still marked is resubmitted, oldest counter
first. Execution is at least once.

Everything in the area is the front-end's memory: indexes read from it
are bounded before use, and a head resubmitted from it is walked through
the same checks as a new one. The memfd made here is sealed against
shrinking and growing; one handed back must be unable to shrink too
(fds.memory), as guest memory must.
"""

import fcntl
import mmap
import os
import struct

from pyvmm.vhost.user.backend import fds as checked
from pyvmm.vhost.user.backend.device import Refused
from pyvmm.vhost.user.backend.memory import mapping_address

HEADER = struct.Struct("<QHHHH")     # features, version, desc_num, last_batch_head, used_idx
DESC = struct.Struct("<B5xHQ")       # inflight, padding, next, counter
VERSION = 1
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_VERSION, _LAST_BATCH_HEAD, _USED_IDX = 8, 12, 14
_U16 = struct.Struct("<H")


def queue_region_size(queue_size):
    """Bytes per queue: header and descriptors, rounded up to 64 (what
    libvhost-user and DPDK both compute, so either can take over)."""
    return (HEADER.size + DESC.size * queue_size + 63) & ~63


def create(num_queues, queue_size):
    """A fresh, zeroed, sealed area for GET_INFLIGHT_FD: (fd, size)."""
    size = num_queues * queue_region_size(queue_size)
    fd = os.memfd_create("pyvmm-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError:
        os.close(fd)
        raise
    return fd, size


class InflightArea:
    """The area mapped from SET_INFLIGHT_FD's fd (the caller closes the fd)."""

    def __init__(self, fd, description, allow_unsealed=False):
        d = description
        try:
            if not d.num_queues or not d.queue_size:
                raise ValueError("no queues")
            if d.mmap_size < d.num_queues * queue_region_size(d.queue_size):
                raise ValueError(f"{d.mmap_size} bytes for {d.num_queues} queues of "
                                 f"{d.queue_size}")
            checked.memory(fd, d.mmap_offset, d.mmap_size, allow_unsealed)
            page = mmap.ALLOCATIONGRANULARITY
            start = d.mmap_offset - d.mmap_offset % page
            self.mapping = mmap.mmap(fd, d.mmap_size + d.mmap_offset - start, mmap.MAP_SHARED,
                                     mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except (Refused, OSError, ValueError, OverflowError) as e:
            raise Refused(f"an unusable inflight area: {getattr(e, 'strerror', None) or e}") \
                from None
        self.skip = d.mmap_offset - start
        self.num_queues, self.queue_size = d.num_queues, d.queue_size

    def queue(self, index):
        """The InflightQueue of queue index, or None if the area has none for it."""
        if index >= self.num_queues:
            return None
        return InflightQueue(self.mapping, self.skip + index * queue_region_size(self.queue_size),
                             self.queue_size)

    def close(self):
        self.mapping.close()


class InflightQueue:
    def __init__(self, mapping, base, queue_size):
        self.m, self.base, self.queue_size = mapping, base, queue_size
        self.host_addr = mapping_address(mapping) + base    # (for C: compiled_ring)
        self.counter = 0

    def _u16(self, offset):
        return _U16.unpack_from(self.m, self.base + offset)[0]

    def _set_u16(self, offset, value):
        _U16.pack_into(self.m, self.base + offset, value & 0xFFFF)

    def _desc(self, head):
        return DESC.unpack_from(self.m, self.base + HEADER.size + DESC.size * head)

    def _set_desc(self, head, inflight, nxt, counter):
        DESC.pack_into(self.m, self.base + HEADER.size + DESC.size * head, inflight, nxt, counter)

    def start(self, num, used_idx):
        """The ring (num entries, at most queue_size; used index used_idx) starts.
        Returns the heads to resubmit, oldest first; None for a fresh area,
        initialised here."""
        if self._u16(_VERSION) == 0:
            self.m[self.base:self.base + HEADER.size + DESC.size * self.queue_size] = bytes(
                HEADER.size + DESC.size * self.queue_size)
            # used_idx from the ring, not 0: else dying before the first
            # completion would look like a half-recorded batch (spdk#3766).
            HEADER.pack_into(self.m, self.base, 0, VERSION, self.queue_size, 0, used_idx)
            self.counter = 0
            return None
        recorded = self._u16(_USED_IDX)
        if recorded != used_idx:
            # Died after publishing a batch, before clearing it: it is done.
            head = self._u16(_LAST_BATCH_HEAD)
            for _ in range(min((used_idx - recorded) & 0xFFFF, num)):
                if head >= num:
                    break
                _, nxt, counter = self._desc(head)
                self._set_desc(head, 0, nxt, counter)
                head = nxt
            self._set_u16(_USED_IDX, used_idx)
        taken = []
        for head in range(num):
            inflight, _, counter = self._desc(head)
            if inflight:
                taken.append((counter, head))
        taken.sort()
        self.counter = taken[-1][0] + 1 if taken else 0
        return [head for _, head in taken]

    def take(self, head):
        self._set_desc(head, 1, 0, self.counter)
        self.counter += 1

    def completing(self, head):
        """Before the used element for head is published: it is the last batch."""
        _, _, counter = self._desc(head)
        self._set_desc(head, 1, self._u16(_LAST_BATCH_HEAD), counter)
        self._set_u16(_LAST_BATCH_HEAD, head)

    def completed(self, head, used_idx):
        """After the used index that covers head was published."""
        _, nxt, counter = self._desc(head)
        self._set_desc(head, 0, nxt, counter)
        self._set_u16(_USED_IDX, used_idx)
