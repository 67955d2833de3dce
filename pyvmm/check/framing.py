"""Checks of framing, feature negotiation and REPLY_ACK (sections A to C
of the back-end rules)."""

from pyvmm.check.core import REPLY_FLAGS, Failed, check, count, expect
from pyvmm.check.probe import NEED_REPLY
from pyvmm.vhost.user.errors import Disconnected
from pyvmm.vhost.user.messages import (FrontendReq as R, ProtocolFeature as PF, U64,
                                       VringState)


# --- A. header, flags, framing -------------------------------------------------------------

def _replies(ctx):
    """Replies to two plain requests, with their probe."""
    p = ctx.probe()
    out = [(p, p.ask(R.GET_FEATURES))]
    if ctx.offer.protocol_features:
        out.append((p, p.ask(R.GET_PROTOCOL_FEATURES)))
    return out


@check("BE-1", "MUST", "every reply has the reply flag (0x4)")
def reply_flag(ctx):
    for p, reply in _replies(ctx):
        expect(reply.flags & 0x4, p, reply, "flags with 0x4")


@check("BE-2", "MUST*", "replies carry protocol version 1")
def reply_version(ctx):
    for p, reply in _replies(ctx):
        expect(reply.flags & 0x3 == 1, p, reply, "flags & 0x3 == 1")


@check("BE-3", "SHOULD**", "reply flags are exactly 0x5 (what QEMU accepts)")
def reply_flags_exact(ctx):
    for p, reply in _replies(ctx):
        expect(reply.flags == REPLY_FLAGS, p, reply, "flags 0x5")


@check("BE-4", "MUST*", "a reply carries the id of its request")
def reply_id(ctx):
    for p, reply in _replies(ctx):
        expect(reply.request in (R.GET_FEATURES, R.GET_PROTOCOL_FEATURES), p, reply,
               "the request's id")
    reply = p.ask(R.GET_FEATURES)
    expect(reply.request == R.GET_FEATURES, p, reply, f"request={int(R.GET_FEATURES)}")


@check("BE-5", "MUST*", "a reply's size is its type's (u64: 8)")
def reply_size(ctx):
    for p, reply in _replies(ctx):
        expect(reply.size == 8 == len(reply.payload), p, reply, "size 8")


@check("BE-6", "MUST*", "requests without a reply produce no bytes")
def no_stray_bytes(ctx):
    p = ctx.negotiated(protocol=ctx.offer.protocol & ~PF.REPLY_ACK.mask, owner=False)
    p.send(R.SET_OWNER)
    p.send(R.SET_FEATURES, U64(ctx.offer.features))
    reply = p.ask(R.GET_FEATURES)                     # the barrier: its reply comes next
    expect(reply.request == R.GET_FEATURES, p, reply,
           "the barrier's reply next, nothing for SET_OWNER or SET_FEATURES")


# --- B. negotiation ----------------------------------------------------------------------------

@check("BE-9", "MUST", "GET_FEATURES is answered with a u64")
def get_features(ctx):
    p = ctx.probe()
    reply = p.ask(R.GET_FEATURES)
    expect(reply.request == R.GET_FEATURES and len(reply.payload) == 8, p, reply,
           "id 1, 8 bytes")


@check("BE-10", "MUST", "with bit 30, GET_PROTOCOL_FEATURES is answered before SET_FEATURES")
def protocol_before_features(ctx):
    ctx.needs_protocol_features()
    p = ctx.probe()
    p.ask(R.GET_FEATURES)
    reply = p.ask(R.GET_PROTOCOL_FEATURES)
    expect(reply.request == R.GET_PROTOCOL_FEATURES and len(reply.payload) == 8, p, reply,
           "id 15, 8 bytes")


@check("BE-14", "SHOULD**", "the offered protocol features are consistent")
def protocol_consistent(ctx):
    offered = ctx.offer.protocol
    needs = {PF.INBAND_NOTIFICATIONS: (PF.BACKEND_REQ, PF.REPLY_ACK),
             PF.GET_VRING_BASE_INFLIGHT: (PF.INFLIGHT_SHMFD,)}
    for bit, required in needs.items():
        if offered & bit.mask:
            missing = [r.name for r in required if not offered & r.mask]
            if missing:
                raise Failed(f"{bit.name} offered without {', '.join(missing)} "
                             f"(protocol features {offered:#x})")


@check("BE-16", "SHOULD", "MQ is offered, even for a fixed number of queues")
def mq_offered(ctx):
    ctx.needs_protocol_features()             # MQ is one of them
    if not ctx.offer.has(PF.MQ):
        raise Failed(f"protocol features {ctx.offer.protocol:#x} lack MQ (bit 0)")


@check("BE-17", "MUST*", "with MQ, GET_QUEUE_NUM answers at least 1")
def queue_num(ctx):
    count(ctx, PF.MQ, R.GET_QUEUE_NUM)


# --- C. REPLY_ACK --------------------------------------------------------------------------------

@check("BE-20", "MUST", "with REPLY_ACK, a request with need_reply gets an ack")
def reply_ack(ctx):
    ctx.needs(PF.REPLY_ACK)
    p = ctx.negotiated(owner=False)
    for request, payload in ((R.SET_OWNER, b""), (R.SET_FEATURES, U64(ctx.offer.features)),
                             (R.SET_VRING_NUM, VringState(0, 64))):
        reply = p.ask(request, payload, NEED_REPLY)
        expect(reply.request == request and reply.flags & 0x4 and reply.u64 == 0, p, reply,
               f"an ack for {request.name}: id {int(request)}, u64 0")


@check("BE-22", "MUST*", "need_reply on a request with a reply gives one reply, not two")
def need_reply_on_get(ctx):
    ctx.needs(PF.REPLY_ACK)
    p = ctx.negotiated()
    reply = p.ask(R.GET_FEATURES, flags=NEED_REPLY)
    expect(len(reply.payload) == 8, p, reply, "the 8-byte features")
    barrier = p.ask(R.GET_QUEUE_NUM if ctx.offer.has(PF.MQ) else R.GET_FEATURES)
    expect(barrier.request != R.GET_FEATURES or len(barrier.payload) == 8, p, barrier,
           "the barrier's reply next, not a second reply to GET_FEATURES")
    if ctx.offer.has(PF.MQ):
        expect(barrier.request == R.GET_QUEUE_NUM, p, barrier,
               "GET_QUEUE_NUM's reply, not a second one to GET_FEATURES")




@check("BE-11", "MUST", "with bit 30, SET_PROTOCOL_FEATURES is accepted before SET_FEATURES")
def protocol_set_first(ctx):
    ctx.needs_protocol_features()
    p = ctx.negotiated()                      # GET_FEATURES, GET/SET_PROTOCOL_FEATURES
    reply = p.ask(R.GET_FEATURES)             # the barrier
    expect(reply.request == R.GET_FEATURES, p, reply, "the barrier's reply, the socket open")


@check("BE-12", "MUST*", "protocol features hold even if SET_FEATURES lacks bit 30")
def protocol_without_bit_30(ctx):
    ctx.needs(PF.REPLY_ACK)
    p = ctx.negotiated()
    p.send(R.SET_FEATURES, U64(ctx.offer.features & ~(1 << 30)))
    reply = p.ask(R.SET_VRING_NUM, VringState(0, 64), NEED_REPLY)
    expect(reply.request == R.SET_VRING_NUM and reply.u64 == 0, p, reply,
           "an ack (REPLY_ACK still on)")


@check("BE-13", "MUST*", "SET_FEATURES with a subset of the offered bits is accepted")
def features_subset(ctx):
    ctx.needs(PF.REPLY_ACK)
    p = ctx.negotiated()
    subset = ctx.offer.features & (1 << 32 | 1 << 30)          # VERSION_1 and bit 30 only
    reply = p.ask(R.SET_FEATURES, U64(subset), NEED_REPLY)
    expect(reply.request == R.SET_FEATURES and reply.u64 == 0, p, reply, "ack 0")


@check("BE-21", "SHOULD", "with REPLY_ACK, an invalid request gets a non-zero ack")
def ack_refusal(ctx):
    ctx.needs(PF.REPLY_ACK)
    for request, payload, what in (
            (R.SET_VRING_NUM, VringState(1024, 64), "queue 1024, past any back-end's last"),
            (R.SET_VRING_ENABLE, VringState(0, 2), "enable = 2")):
        p = ctx.negotiated()
        p.send(R.SET_FEATURES, U64(ctx.offer.features))
        try:
            reply = p.ask(request, payload, NEED_REPLY)
        except Disconnected:
            gone = ctx.target.gone()
            if gone:
                raise Failed(f"sent {p.sent[-1]} ({what}): the back-end {gone}") from None
            reply = None      # refused by hanging up: the notes record it as a refusal
        if reply is not None:
            expect(reply.request == request and reply.u64 not in (0, None), p, reply,
                   f"a non-zero ack for {what}")
        ctx.target.release()


@check("BE-24", "MUST", "with REPLY_ACK, SET_BACKEND_REQ_FD is acked with 0")
def backend_req_fd(ctx):
    import socket
    ctx.needs(PF.REPLY_ACK)
    ctx.needs(PF.BACKEND_REQ)
    p = ctx.negotiated()
    ours, theirs = socket.socketpair()
    try:
        reply = p.ask(R.SET_BACKEND_REQ_FD, flags=NEED_REPLY, fds=(theirs.fileno(),))
    finally:
        theirs.close()
        ours.close()
    expect(reply.request == R.SET_BACKEND_REQ_FD and reply.u64 == 0, p, reply, "ack 0")
