"""The checks of `pyvmm check`, each named by its rule in
../shared/VHOST-USER-CONFORMANCE.md section 1 and run on a fresh
connection, so that one failure does not poison the next.

A check raises Failed (what was sent, what came back) or Skipped (what
the back-end does not offer); returning is a pass. Levels as in the
notes: MUST and MUST* (required by implication) fail the run, SHOULD and
SHOULD** are reported only.
"""

from dataclasses import dataclass

from pyvmm.check.probe import NEED_REPLY, Probe
from pyvmm.vhost.user.messages import (VHOST_USER_F_PROTOCOL_FEATURES, DeviceConfig,
                                       FrontendReq as R, ProtocolFeature as PF, U64,
                                       VringState)

MUST_LEVELS = ("MUST", "MUST*")
REPLY_FLAGS = 0x5                     # version 1, reply


class Failed(Exception):
    pass


class Skipped(Exception):
    pass


@dataclass
class Check:
    rule: str
    level: str
    what: str
    run: object


CHECKS = []


def check(rule, level, what):
    def register(fn):
        CHECKS.append(Check(rule, level, what, fn))
        return fn
    return register


@dataclass
class Offer:
    """What the back-end offers, learned on a first connection."""
    features: int
    protocol: int = 0
    queues: int = 1

    def has(self, pf):
        return bool(self.protocol & pf.mask)


class Context:
    def __init__(self, path, offer, device=None, timeout=5.0):
        self.path, self.offer, self.device, self.timeout = path, offer, device, timeout

    def probe(self):
        return Probe(self.path, self.timeout)

    def negotiated(self, protocol=None):
        """A probe past GET_FEATURES and, where offered, the protocol features
        (all offered ones that pyvmm knows, or `protocol`)."""
        p = self.probe()
        p.ask(R.GET_FEATURES)
        if self.offer.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            p.ask(R.GET_PROTOCOL_FEATURES)
            mask = self.offer.protocol if protocol is None else protocol
            p.send(R.SET_PROTOCOL_FEATURES, U64(mask & known_protocol_mask()))
        return p

    def needs(self, pf):
        if not self.offer.has(pf):
            raise Skipped(f"{pf.name} not offered")


def known_protocol_mask():
    """What the checker acks: what pyvmm's front-end implements (acking, say,
    in-band notifications would ask for behaviour nobody then checks)."""
    from pyvmm.vhost.user.frontend import SUPPORTED_PROTOCOL_FEATURES
    return SUPPORTED_PROTOCOL_FEATURES


def discover(path, timeout=5.0):
    """GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM on one connection."""
    p = Probe(path, timeout)
    try:
        features = p.ask(R.GET_FEATURES).u64 or 0
        offer = Offer(features)
        if features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            offer.protocol = p.ask(R.GET_PROTOCOL_FEATURES).u64 or 0
            p.send(R.SET_PROTOCOL_FEATURES, U64(offer.protocol & known_protocol_mask()))
            if offer.has(PF.MQ):
                offer.queues = p.ask(R.GET_QUEUE_NUM).u64 or 1
        return offer
    finally:
        p.close()


def expect(condition, p, reply, wanted):
    if not condition:
        raise Failed(f"sent {p.sent[-1] if p.sent else 'nothing'}; wanted {wanted}; got {reply}")


# --- A. header, flags, framing -------------------------------------------------------------

def _replies(ctx):
    """Replies to two plain requests, with their probe."""
    p = ctx.probe()
    out = [(p, p.ask(R.GET_FEATURES))]
    if ctx.offer.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
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
    p = ctx.probe()
    reply = p.ask(R.GET_FEATURES)
    expect(reply.request == R.GET_FEATURES, p, reply, f"request={int(R.GET_FEATURES)}")


@check("BE-5", "MUST*", "a reply's size is its type's (u64: 8)")
def reply_size(ctx):
    for p, reply in _replies(ctx):
        expect(reply.size == 8 == len(reply.payload), p, reply, "size 8")


@check("BE-6", "MUST*", "requests without a reply produce no bytes")
def no_stray_bytes(ctx):
    p = ctx.negotiated(protocol=ctx.offer.protocol & ~PF.REPLY_ACK.mask)
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
    if not ctx.offer.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
        raise Skipped("VHOST_USER_F_PROTOCOL_FEATURES not offered")
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
    if not ctx.offer.has(PF.MQ):
        raise Failed(f"protocol features {ctx.offer.protocol:#x} lack MQ (bit 0)")


def _count(ctx, feature, request):
    """request, gated by feature, answers a count of at least 1."""
    ctx.needs(feature)
    p = ctx.negotiated()
    reply = p.ask(request)
    expect(reply.request == request and (reply.u64 or 0) >= 1, p, reply,
           f"id {int(request)}, a u64 of at least 1")


@check("BE-17", "MUST*", "with MQ, GET_QUEUE_NUM answers at least 1")
def queue_num(ctx):
    _count(ctx, PF.MQ, R.GET_QUEUE_NUM)


# --- C. REPLY_ACK --------------------------------------------------------------------------------

@check("BE-20", "MUST", "with REPLY_ACK, a request with need_reply gets an ack")
def reply_ack(ctx):
    ctx.needs(PF.REPLY_ACK)
    p = ctx.negotiated()
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


# --- D. memory, configuration, status ------------------------------------------------------------

@check("BE-35", "SHOULD", "with CONFIGURE_MEM_SLOTS, GET_MAX_MEM_SLOTS answers at least 1")
def max_mem_slots(ctx):
    _count(ctx, PF.CONFIGURE_MEM_SLOTS, R.GET_MAX_MEM_SLOTS)


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


# --- E. the data path, through the guest-less driver --------------------------------------------

def _driver(ctx):
    from pyvmm.driver import vhost_user
    if ctx.device not in ("blk", "rng"):
        raise Skipped(f"no data-path check for device {ctx.device or 'unknown'} (give --device)")
    return vhost_user(ctx.path, timeout=ctx.timeout)


def _one_request(d, q, timeout):
    """One harmless request: rng reads, blk reads a sector and writes it back."""
    from pyvmm.driver import DriverError
    from pyvmm.driver.devices import blk_read, blk_write, rng_read
    try:
        if d.device == "rng":
            if len(rng_read(d, q, 16, timeout)) != 16:
                raise Failed("asked for 16 random bytes; got fewer")
            return
        status, data = blk_read(d, q, 0, 512, timeout)
        if status != 0 or len(data) != 512:
            raise Failed(f"a 512-byte read of sector 0: status {status}, {len(data)} bytes")
        if blk_write(d, q, 0, data, timeout) not in (0, 1):   # 1: a read-only disk's IOERR
            raise Failed("writing sector 0 back: a status other than OK or IOERR")
    except DriverError as e:
        raise Failed(str(e)) from None


def _post(d, q):
    """One request made available, not waited for."""
    from pyvmm.virtio.blk import OUTHDR, VIRTIO_BLK_T_IN
    if d.device == "rng":
        return q.send([(d.alloc(16), 16, True)])
    header = d.alloc(OUTHDR.size)
    d.write(header, OUTHDR.pack(VIRTIO_BLK_T_IN, 0, 0))
    return q.send([(header, OUTHDR.size, False), (d.alloc(512), 512, True),
                   (d.alloc(1), 1, True)])


def _untouched(q, used, what):
    import time
    time.sleep(0.5)
    if q.ring.used_idx() != used:
        raise Failed(what)


@check("BE-45", "MUST", "a ring is not processed before SET_VRING_KICK starts it")
def not_started(ctx):
    from pyvmm.vhost import VringAddr
    with _driver(ctx) as d:
        d.device = ctx.device
        fe = d.backend.frontend
        q = d.make_queue(0, 64)
        fe.set_features(d.backend.features())
        fe.set_mem_table(d.memory)
        _post(d, q)                                  # already there when the ring is set up
        fe.set_vring_num(0, 64)
        fe.set_vring_base(0, 0)
        fe.set_vring_addr(0, VringAddr(q.ring.desc_addr, q.ring.avail_addr, q.ring.used_addr))
        fe.set_vring_call(0, q.call)
        if fe.negotiated.protocol_features_on:
            fe.set_vring_enable(0, True)
        _untouched(q, 0, "a request was served on a ring that had no SET_VRING_KICK yet")


@check("BE-55", "MUST*", "a disabled ring is served without side effects; enabled, normally")
def enable_disable(ctx):
    """The spec's disabled ring is processed "without causing any side effects"
    (a NIC consumes and drops TX): a request may be consumed, but not executed.
    So: while disabled, a read into a marked buffer must not come back done
    with the data; enabled again, a request is served."""
    if not ctx.offer.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
        raise Skipped("VHOST_USER_F_PROTOCOL_FEATURES not offered")
    with _driver(ctx) as d:
        d.device = ctx.device
        q = d.start(queues=[(0, 64)])[0]
        fe = d.backend.frontend
        _one_request(d, q, ctx.timeout)
        fe.set_vring_enable(0, False)
        head, executed = _post_marked(d, q)
        import os
        import time
        os.eventfd_write(q.kick, 1)
        time.sleep(0.5)
        done = dict(q.used())
        if head in done and executed():
            raise Failed("a read on a disabled ring was executed: the data and an OK status "
                         "reached the guest's buffers")
        fe.set_vring_enable(0, True)
        if head not in done:
            os.eventfd_write(q.kick, 1)
            try:
                q.wait(head, ctx.timeout)
            except Exception as e:
                raise Failed(f"enabled again, the ring did not serve the held request: "
                             f"{e}") from None
        _one_request(d, q, ctx.timeout)


def _post_marked(d, q):
    """A read into buffers marked 0xa5 (status 0xff); (head, executed()) where
    executed() says whether the device did the read."""
    from pyvmm.virtio.blk import OUTHDR, VIRTIO_BLK_T_IN
    data = d.alloc(512)
    d.write(data, b"\xa5" * 512)
    if d.device == "rng":
        return q.send([(data, 512, True)]), lambda: d.read(data, 512) != b"\xa5" * 512
    header, status = d.alloc(OUTHDR.size), d.alloc(1)
    d.write(header, OUTHDR.pack(VIRTIO_BLK_T_IN, 0, 0))
    d.write(status, b"\xff")
    head = q.send([(header, OUTHDR.size, False), (data, 512, True), (status, 1, True)])
    return head, lambda: d.read(status, 1) == b"\0"


@check("BE-92", "MUST*", "after RESET_DEVICE the rings are stopped")
def reset_device(ctx):
    ctx.needs(PF.RESET_DEVICE)
    import os
    with _driver(ctx) as d:
        d.device = ctx.device
        q = d.start(queues=[(0, 64)])[0]
        _one_request(d, q, ctx.timeout)
        d.backend.frontend.reset_device()
        used = q.ring.used_idx()
        _post(d, q)
        os.eventfd_write(q.kick, 1)
        _untouched(q, used, "a request posted and kicked after RESET_DEVICE was served")


@check("BE-51", "MUST", "a started and enabled ring executes requests")
def data_path(ctx):
    with _driver(ctx) as d:
        d.device = ctx.device
        q = d.start(queues=[(0, 64)])[0]
        _one_request(d, q, ctx.timeout)


@check("BE-58", "MUST", "GET_VRING_BASE answers where the ring stopped")
def vring_base(ctx):
    with _driver(ctx) as d:
        d.device = ctx.device
        q = d.start(queues=[(0, 64)])[0]
        for _ in range(3):
            _one_request(d, q, ctx.timeout)
        requests = 3 if ctx.device == "rng" else 6
        base = d.backend.frontend.get_vring_base(0)
        if base != requests:
            raise Failed(f"GET_VRING_BASE after {requests} requests from base 0: got {base}")


@check("BE-48", "MUST", "after GET_VRING_BASE the ring is stopped: kicks are not served")
def stopped_ring(ctx):
    import os
    with _driver(ctx) as d:
        d.device = ctx.device
        q = d.start(queues=[(0, 64)])[0]
        _one_request(d, q, ctx.timeout)
        d.backend.frontend.get_vring_base(0)
        used = q.ring.used_idx()
        _post(d, q)
        os.eventfd_write(q.kick, 1)
        _untouched(q, used, "a request posted and kicked after GET_VRING_BASE was served")
