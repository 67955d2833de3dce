"""Checks of memory tables (section D of the back-end rules): regions the
back-end must map from their fds at their offsets, and addresses it must
translate rather than use.

The data-path ones give the driver a ScatteredMemory (driver/memory.py):
regions in reverse order in the memfd, so that a back-end ignoring
mmap_offset, or mixing up guest and user addresses, writes its answers
where the driver does not look.
"""

import fcntl
import os

from pyvmm.check.core import Failed, check, expect, known_protocol_mask
from pyvmm.check.probe import NEED_REPLY
from pyvmm.check.rings import running, taken
from pyvmm.driver.memory import ScatteredMemory
from pyvmm.memory.guest_memory import GUEST_MEMORY_SEALS
from pyvmm.vhost.user.errors import Disconnected
from pyvmm.vhost.user.messages import (FrontendReq as R, MemoryRegion, ProtocolFeature as PF,
                                       SingleMemRegion, U64)

MiB = 1 << 20


def _requests_in_each_region(ctx, memory, **driver):
    """The device's request with its buffers in each region past the rings'."""
    with running(ctx, memory=memory, **driver) as (d, path, q):
        for region in memory.regions[1:]:
            d.seek(region.guest_phys_addr)
            path.request(d)


@check("BE-27", "MUST*", "regions are mapped from their fds at mmap_offset")
def mapped_at_offsets(ctx):
    _requests_in_each_region(ctx, ScatteredMemory(32 * MiB, pieces=4))


@check("BE-28", "MUST*", "user addresses are opaque: looked up in the table, never used")
def opaque_user_addresses(ctx):
    with running(ctx, memory=ScatteredMemory(32 * MiB, opaque=True)) as (d, path, q):
        path.request(d)


@check("BE-29", "MUST*", "SET_MEM_TABLE with 8 regions is accepted and used")
def eight_regions(ctx):
    memory = ScatteredMemory(32 * MiB, pieces=8)
    with running(ctx, memory=memory,
                 protocol=known_protocol_mask() & ~PF.CONFIGURE_MEM_SLOTS.mask) as (d, path, q):
        d.seek(memory.regions[7].guest_phys_addr)
        path.request(d)


@check("BE-32", "MUST", "with CONFIGURE_MEM_SLOTS, ADD_MEM_REG maps each region")
def add_mem_reg(ctx):
    ctx.needs(PF.CONFIGURE_MEM_SLOTS)
    _requests_in_each_region(ctx, ScatteredMemory(24 * MiB, pieces=3))


def _memfd(size):
    """Sealed as guest memory is (a back-end may refuse memory that can shrink)."""
    fd = os.memfd_create("pyvmm-check", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, GUEST_MEMORY_SEALS)
    return fd


def _slots_probe(ctx):
    ctx.needs(PF.CONFIGURE_MEM_SLOTS)
    ctx.needs(PF.REPLY_ACK)
    p = ctx.negotiated()
    p.send(R.SET_FEATURES, U64(ctx.offer.features))
    return p


def _acked(p, request, region, fd, what):
    reply = p.ask(request, SingleMemRegion(region), NEED_REPLY, fds=() if fd is None else (fd,))
    expect(reply.request == request and reply.u64 == 0, p, reply, f"ack 0 for {what}")


@check("BE-33", "MUST", "REM_MEM_REG removes the region by address and size, not mmap_offset")
def rem_mem_reg(ctx):
    p = _slots_probe(ctx)
    first, second = _memfd(MiB + 0x2000), _memfd(MiB)
    try:
        region = MemoryRegion(0x100000, MiB, 0x7F00_0010_0000, 0x2000)
        _acked(p, R.ADD_MEM_REG, region, first, "ADD_MEM_REG")
        stale = MemoryRegion(region.guest_addr, region.size, region.user_addr, 0xDEAD000)
        _acked(p, R.REM_MEM_REG, stale, None, "REM_MEM_REG with another mmap_offset")
        again = MemoryRegion(region.guest_addr, MiB, 0x7F00_0020_0000, 0)
        _acked(p, R.ADD_MEM_REG, again, second, "ADD_MEM_REG over the removed range")
    finally:
        os.close(first)
        os.close(second)


@check("BE-34", "MUST", "an fd that comes with REM_MEM_REG is closed unused")
def rem_mem_reg_fd(ctx):
    import time
    p = _slots_probe(ctx)
    ram = _memfd(MiB)
    read_end, write_end = os.pipe()
    try:
        region = MemoryRegion(0x100000, MiB, 0x7F00_0010_0000, 0)
        _acked(p, R.ADD_MEM_REG, region, ram, "ADD_MEM_REG")
        try:
            p.ask(R.REM_MEM_REG, SingleMemRegion(region), NEED_REPLY, fds=(read_end,))
        except Disconnected:
            pass           # refusing the message is allowed, if the fd is closed all the same
        os.close(read_end)
        read_end = None
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                os.write(write_end, b"x")
            except BrokenPipeError:
                return                         # nobody holds the read end any more
            time.sleep(0.05)
        raise Failed("the pipe's read end sent with REM_MEM_REG is still open in the "
                     "back-end after 1 s")
    finally:
        for fd in (ram, read_end, write_end):
            if fd is not None:
                os.close(fd)


@check("BE-31", "MUST", "the memory table may grow while the rings run")
def table_grows(ctx):
    memory = ScatteredMemory(32 * MiB, pieces=4)
    held_back = memory.regions.pop()                 # not the back-end's at first
    with running(ctx, memory=memory) as (d, path, q):
        path.request(d)
        memory.regions.append(held_back)
        d.backend.frontend.set_mem_table(memory)     # a new table, or ADD_MEM_REG
        taken(d.backend.frontend)
        d.seek(held_back.guest_phys_addr)
        path.request(d)


@check("BE-37", "SHOULD**", "as many ADD_MEM_REG regions as GET_MAX_MEM_SLOTS says are taken")
def all_the_slots(ctx):
    p = _slots_probe(ctx)
    slots = min(p.ask(R.GET_MAX_MEM_SLOTS).u64 or 0, 128)
    ram = _memfd((slots + 1) * 4096)
    try:
        for i in range(slots):
            region = MemoryRegion(i * 0x10000, 4096, 0x7F00_0000_0000 + i * 0x10000, i * 4096)
            _acked(p, R.ADD_MEM_REG, region, ram, f"region {i + 1} of {slots}")
        extra = MemoryRegion(slots * 0x10000, 4096, 0x7F00_0000_0000 + slots * 0x10000,
                             slots * 4096)
        try:
            reply = p.ask(R.ADD_MEM_REG, SingleMemRegion(extra), NEED_REPLY, fds=(ram,))
        except Disconnected:
            return                                   # refused by hanging up: allowed
        expect(reply.u64 != 0, p, reply, f"a refusal of region {slots + 1} past {slots} slots")
    finally:
        os.close(ram)


@check("BE-30", "MUST*", "a new memory table replaces the old one")
def table_replaced(ctx):
    """Rings stopped, the same guest addresses move to another memfd (its
    contents copied, rings included) in one SET_MEM_TABLE (CONFIGURE_MEM_SLOTS
    left out: it would be REM_MEM_REG then ADD_MEM_REG), rings restarted
    where they stopped: the device's answers must land in the new memfd.
    The new memfd is mapped at other user addresses, as a front-end's would
    be (DPDK takes a region with the same addresses for the same memory)."""
    from pyvmm.vhost import VringAddr
    old = ScatteredMemory(32 * MiB, pieces=2)
    with running(ctx, memory=old,
                 protocol=known_protocol_mask() & ~PF.CONFIGURE_MEM_SLOTS.mask) as (d, path, q):
        path.request(d)
        fe = d.backend.frontend
        bases = {i: fe.get_vring_base(i) for i in d.queues}
        new = ScatteredMemory(32 * MiB, pieces=2)
        for r in old.regions:
            new.write(r.guest_phys_addr, old.read(r.guest_phys_addr, r.size))
        fe.set_mem_table(new)
        d.memory = new                               # the driver looks there from now on
        try:
            for i, dq in d.queues.items():
                dq.ring.memory = new
                fe.start_vring(i, dq.size, VringAddr(dq.ring.desc_addr, dq.ring.avail_addr,
                                                     dq.ring.used_addr), dq.kick, dq.call,
                               base=bases[i])
                if fe.negotiated.protocol_features_on:
                    fe.set_vring_enable(i, True)
            for r in old.regions:                    # nothing is to be found here any more
                old.write(r.guest_phys_addr, bytes(r.size))
            path.request(d)
        finally:
            d.memory = old                           # the driver closes its own
            new.close()
