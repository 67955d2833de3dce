"""Checks of memory slots, configuration space, owner, status and reset
(sections D, G and I of the back-end rules)."""

import contextlib
import mmap
import os

from pyvmm.check.core import Failed, Skipped, check, count, expect
from pyvmm.check.probe import NEED_REPLY
from pyvmm.vhost.user.messages import (DeviceConfig, FrontendReq as R, Inflight,
                                       ProtocolFeature as PF, U64)


# --- D. memory, configuration, status ------------------------------------------------------------

@check("BE-35", "SHOULD", "with CONFIGURE_MEM_SLOTS, GET_MAX_MEM_SLOTS answers at least 1")
def max_mem_slots(ctx):
    count(ctx, PF.CONFIGURE_MEM_SLOTS, R.GET_MAX_MEM_SLOTS)


@check("BE-76", "MUST*", "a GET_CONFIG it cannot serve is answered with an empty payload")
def get_config_error(ctx):
    ctx.needs(PF.CONFIG)
    p = ctx.negotiated()
    reply = p.ask(R.GET_CONFIG, DeviceConfig(0, 0, bytes(256)))    # past any blk config
    if ctx.device != "blk" and reply.size == 12 + 256:
        raise Skipped("the device's config space may be 256 bytes long (give --device)")
    expect(reply.request == R.GET_CONFIG and reply.size == 0, p, reply,
           "size 0 (the error form) for 256 bytes of a 60-byte config space")


@check("BE-75", "MUST", "GET_CONFIG is answered with as many bytes as asked")
def get_config(ctx):
    ctx.needs(PF.CONFIG)
    p = ctx.negotiated()
    reply = p.ask(R.GET_CONFIG, DeviceConfig(0, 0, bytes(8)))
    expect(reply.request == R.GET_CONFIG and reply.size == 12 + 8, p, reply,
           "id 24, 12 + 8 bytes")


@check("BE-93", "MUST*", "with STATUS, GET_STATUS returns what SET_STATUS set")
def status(ctx):
    ctx.needs(PF.STATUS)
    p = ctx.negotiated()
    p.send(R.SET_STATUS, U64(0x3))                    # ACKNOWLEDGE | DRIVER
    reply = p.ask(R.GET_STATUS)
    expect(reply.request == R.GET_STATUS and (reply.u64 or 0) & 0x3 == 0x3, p, reply,
           "a u64 with bits 0x3")


@check("BE-90", "MUST*", "SET_OWNER is accepted as the session start")
def set_owner(ctx):
    ctx.needs(PF.REPLY_ACK)
    p = ctx.negotiated(owner=False)
    reply = p.ask(R.SET_OWNER, flags=NEED_REPLY)
    expect(reply.u64 == 0, p, reply, "ack 0")




@check("BE-36", "SHOULD**", "GET_MAX_MEM_SLOTS does not shrink between connections")
def mem_slots_stable(ctx):
    ctx.needs(PF.CONFIGURE_MEM_SLOTS)
    values = []
    for _ in range(2):
        values.append(ctx.negotiated().ask(R.GET_MAX_MEM_SLOTS).u64 or 0)
        ctx.target.release()
    if values[1] < values[0]:
        raise Failed(f"GET_MAX_MEM_SLOTS answered {values[0]}, then {values[1]}")


INFLIGHT_QUEUE_SIZE = 64


@contextlib.contextmanager
def _inflight_reply(ctx):
    """GET_INFLIGHT_FD for every queue of 64 entries: (probe, reply); the
    reply's fds are closed afterwards."""
    ctx.needs(PF.INFLIGHT_SHMFD)
    p = ctx.negotiated()
    p.send(R.SET_FEATURES, U64(ctx.offer.features))
    reply = p.ask(R.GET_INFLIGHT_FD, Inflight(0, 0, ctx.offer.queues, INFLIGHT_QUEUE_SIZE))
    try:
        yield p, reply
    finally:
        for fd in reply.fds:
            os.close(fd)


def _mapped(fd, area):
    """The inflight area, mapped read-only; Failed if it does not map."""
    try:
        return mmap.mmap(fd, area.mmap_size, mmap.MAP_SHARED, mmap.PROT_READ,
                         offset=area.mmap_offset)
    except (OSError, ValueError) as e:
        raise Failed(f"the area ({area.mmap_size} bytes at {area.mmap_offset}) does "
                     f"not map: {e}") from None


@check("BE-71", "MUST", "GET_INFLIGHT_FD answers a 24-byte description and an fd to map")
def inflight_fd(ctx):
    with _inflight_reply(ctx) as (p, reply):
        expect(reply.request == R.GET_INFLIGHT_FD and reply.size == 24, p, reply,
               "id 31, 24 bytes")
        area = Inflight.unpack(reply.payload)
        if area.mmap_size:
            expect(len(reply.fds) == 1, p, reply, f"one fd (got {len(reply.fds)})")
            _mapped(reply.fds[0], area).close()


@check("BE-72", "SHOULD", "the inflight area holds the spec's split-ring layout, zeroed")
def inflight_layout(ctx):
    with _inflight_reply(ctx) as (p, reply):
        area = Inflight.unpack(reply.payload) if reply.size == 24 else None
        if area is None or not area.mmap_size or len(reply.fds) != 1:
            raise Failed(f"no inflight area to look at: {reply}")
        queues, size = ctx.offer.queues, INFLIGHT_QUEUE_SIZE
        needed = queues * (16 + 16 * size)
        if area.mmap_size < needed:
            raise Failed(f"{area.mmap_size} bytes for {queues} queue(s) of {size}: the "
                         f"split layout needs {needed}")
        with _mapped(reply.fds[0], area) as m:
            if any(m[:needed]):
                raise Failed("a fresh inflight area is not zeroed")


BLK_CAPACITY = 0                         # struct virtio_blk_config: le64 capacity first
BLK_WRITEBACK = 32                       # u8 writeback (VIRTIO_BLK_F_CONFIG_WCE)


def _blk_config(ctx):
    ctx.needs(PF.CONFIG)
    if ctx.device != "blk":
        raise Skipped("a check of blk's config space (give --device blk)")
    return ctx.negotiated()


@check("BE-77", "MUST", "SET_CONFIG does not change a read-only field (blk's capacity)")
def read_only_config(ctx):
    from pyvmm.vhost.user.errors import Disconnected
    p = _blk_config(ctx)
    before = p.ask(R.GET_CONFIG, DeviceConfig(BLK_CAPACITY, 0, bytes(8)))
    p.send(R.SET_CONFIG, DeviceConfig(BLK_CAPACITY, 0, (12345).to_bytes(8, "little")))
    try:
        after = p.ask(R.GET_CONFIG, DeviceConfig(BLK_CAPACITY, 0, bytes(8)))
    except Disconnected:
        return        # refused by hanging up (libvhost-user): not accepted, at least
    expect(after.payload == before.payload, p, after,
           f"the capacity unchanged ({before.payload[12:].hex()})")


@check("BE-78", "MUST*", "SET_CONFIG changes a writable field (blk's writeback, with CONFIG_WCE)")
def writable_config(ctx):
    p = _blk_config(ctx)
    if not ctx.offer.features & (1 << 11):          # VIRTIO_BLK_F_CONFIG_WCE
        raise Skipped("VIRTIO_BLK_F_CONFIG_WCE not offered")
    p.send(R.SET_FEATURES, U64(ctx.offer.features))
    # Read from offset 0, as QEMU does: libvhost-user's blk ignores the offset.
    whole = DeviceConfig(0, 0, bytes(BLK_WRITEBACK + 1))
    before = p.ask(R.GET_CONFIG, whole).payload[12:]
    flipped = bytes([before[BLK_WRITEBACK] ^ 1]) if len(before) > BLK_WRITEBACK else b"\1"
    p.send(R.SET_CONFIG, DeviceConfig(BLK_WRITEBACK, 0, flipped))
    after = p.ask(R.GET_CONFIG, whole)
    expect(after.payload[12 + BLK_WRITEBACK:] == flipped, p, after,
           f"writeback {flipped.hex()}")


@check("BE-91", "SHOULD", "RESET_OWNER leaves the connection open and answering")
def reset_owner(ctx):
    p = ctx.negotiated()
    p.send(R.RESET_OWNER)
    reply = p.ask(R.GET_FEATURES)
    expect(reply.request == R.GET_FEATURES, p, reply, "GET_FEATURES answered")


@check("BE-94", "SHOULD", "SET_STATUS(0) resets the status GET_STATUS answers")
def status_reset(ctx):
    ctx.needs(PF.STATUS)
    p = ctx.negotiated()
    p.send(R.SET_STATUS, U64(0x3))
    p.send(R.SET_STATUS, U64(0))
    reply = p.ask(R.GET_STATUS)
    expect(reply.u64 == 0, p, reply, "status 0")


@check("BE-80", "SHOULD**", "a blk back-end offers bit 30 and CONFIG (QEMU needs both)")
def blk_needs_config(ctx):
    if ctx.device != "blk":
        raise Skipped("a check of blk back-ends (give --device blk)")
    missing = [name for name, offered in (("bit 30", ctx.offer.protocol_features),
                                          ("CONFIG", ctx.offer.has(PF.CONFIG))) if not offered]
    if missing:
        raise Failed(f"features {ctx.offer.features:#x}, protocol features "
                     f"{ctx.offer.protocol:#x}: no {' and no '.join(missing)}")
