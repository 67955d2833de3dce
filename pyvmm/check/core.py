"""What every check is built from: the registry, the back-end's offer, and
the Context a check runs in (fresh connections, a driver, what was asked).

A check raises Failed (what was sent, what came back) or Skipped (what
the back-end does not offer); returning is a pass. Levels as in
../shared/VHOST-USER-CONFORMANCE.md: MUST and MUST* (required by
implication) fail the run, SHOULD and SHOULD** are reported only.
"""

from dataclasses import dataclass

from pyvmm.check.probe import Probe
from pyvmm.vhost.user.messages import (VHOST_USER_F_PROTOCOL_FEATURES, FrontendReq as R,
                                       ProtocolFeature as PF, U64)

MUST_LEVELS = ("MUST", "MUST*")
REPLY_FLAGS = 0x5                     # version 1, reply
DEVICES = ("blk", "net", "fs", "rng", "vsock")


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

    @property
    def number(self):
        return int(self.rule[3:])


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

    @property
    def protocol_features(self):
        """Bit 30: the back-end speaks the protocol-feature handshake."""
        return bool(self.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES))


class Context:
    """target: a check.target.Target; device: "blk", "net", ... or None."""

    def __init__(self, target, offer, device=None, timeout=5.0):
        self.target, self.offer, self.device, self.timeout = target, offer, device, timeout
        self.learned = {}       # what one check found out that later ones reuse

    def probe(self):
        return Probe(self.target.connect())

    def negotiated(self, protocol=None, owner=True):
        """A probe past GET_FEATURES and, where offered, the protocol features
        (all offered ones that pyvmm knows, or `protocol`), and SET_OWNER
        unless owner is False (a back-end may serve nothing else before it:
        BE-90)."""
        p = self.probe()
        p.ask(R.GET_FEATURES)
        if self.offer.protocol_features:
            p.ask(R.GET_PROTOCOL_FEATURES)
            mask = self.offer.protocol if protocol is None else protocol
            p.send(R.SET_PROTOCOL_FEATURES, U64(mask & known_protocol_mask()))
        if owner:
            p.send(R.SET_OWNER)
        return p

    def driver(self, config_size=0, inflight=False, **options):
        """A guest-less Driver on a fresh connection, negotiated, not started
        (options: vhost_user()'s memory and protocol). INFLIGHT_SHMFD only with
        inflight: else the driver's start() hands an area over itself, and a
        back-end then takes its ring positions from the area, not from what a
        check sent (SET_VRING_BASE)."""
        from pyvmm.driver import vhost_user
        options.setdefault("protocol", known_protocol_mask() if inflight
                           else known_protocol_mask() & ~PF.INFLIGHT_SHMFD.mask)
        return vhost_user(self.target.connect(), config_size=config_size,
                          timeout=self.timeout, **options)

    def needs(self, pf):
        if not self.offer.has(pf):
            raise Skipped(f"{pf.name} not offered")

    def needs_protocol_features(self):
        if not self.offer.protocol_features:
            raise Skipped("VHOST_USER_F_PROTOCOL_FEATURES (bit 30) not offered")


def known_protocol_mask():
    """What the checker acks: what pyvmm's front-end implements (acking, say,
    in-band notifications would ask for behaviour nobody then checks), and
    INFLIGHT_SHMFD, whose messages the checks send themselves."""
    from pyvmm.vhost.user.frontend import SUPPORTED_PROTOCOL_FEATURES
    return SUPPORTED_PROTOCOL_FEATURES | PF.INFLIGHT_SHMFD.mask


def discover(target):
    """GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM on one connection."""
    p = Probe(target.connect())
    try:
        offer = Offer(p.ask(R.GET_FEATURES).u64 or 0)
        if offer.protocol_features:
            offer.protocol = p.ask(R.GET_PROTOCOL_FEATURES).u64 or 0
            p.send(R.SET_PROTOCOL_FEATURES, U64(offer.protocol & known_protocol_mask()))
            if offer.has(PF.MQ):
                offer.queues = p.ask(R.GET_QUEUE_NUM).u64 or 1
        return offer
    finally:
        target.release()


def expect(condition, p, reply, wanted):
    if not condition:
        raise Failed(f"sent {p.sent[-1] if p.sent else 'nothing'}; wanted {wanted}; got {reply}")


def count(ctx, feature, request):
    """request, gated by feature, answers a count of at least 1."""
    ctx.needs(feature)
    p = ctx.negotiated()
    reply = p.ask(request)
    expect(reply.request == request and (reply.u64 or 0) >= 1, p, reply,
           f"id {int(request)}, a u64 of at least 1")
