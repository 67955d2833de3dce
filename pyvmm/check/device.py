"""Checks of memory slots, configuration space, owner, status and reset
(sections D, G and I of the back-end rules)."""

from pyvmm.check.core import Skipped, check, count, expect
from pyvmm.check.probe import NEED_REPLY
from pyvmm.vhost.user.messages import (DeviceConfig, FrontendReq as R, ProtocolFeature as PF,
                                       U64)


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
    p = ctx.negotiated()
    reply = p.ask(R.SET_OWNER, flags=NEED_REPLY)
    expect(reply.u64 == 0, p, reply, "ack 0")


