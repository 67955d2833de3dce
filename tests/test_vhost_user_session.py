"""The vhost-user session state machine, driven with messages and no sockets.

A front-end session and a back-end session exchange bytes directly; each
rule is checked on both sides: the side about to break it gets a
LocalProtocolError, the side receiving the breach a RemoteProtocolError,
both naming the rule.
"""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.vhost.user.errors import LocalProtocolError, RemoteProtocolError
from pyvmm.vhost.user.messages import (
    U64, VHOST_USER_F_PROTOCOL_FEATURES, BackendReq, DeviceConfig, Empty, FrontendReq,
    MemoryRegion, MemTable, ProtocolFeature, VringAddress, VringFd, VringState)
from pyvmm.vhost.user.rules import Channel, Side
from pyvmm.vhost.user.session import NEED_DATA, Role, Session
from pyvmm.vhost.user.wire import encode

PF = ProtocolFeature
R = FrontendReq
BIT30 = 1 << VHOST_USER_F_PROTOCOL_FEATURES
VERSION_1 = 1 << 32
REGION = MemoryRegion(0, 0x100_0000, 0x7F00_0000_0000, 0)


class Pair:
    """A front-end and a back-end session joined by nothing but bytes."""

    def __init__(self):
        self.fe = Session(Role.FRONTEND)
        self.be = Session(Role.BACKEND)
        self.observer = Session(Role.OBSERVER)

    def ask(self, request, payload=None, fds=(), need_reply=False):
        """The front-end sends; the back-end (and the observer) get the message."""
        data, fds = self.fe.send(self.fe.request(request, payload, fds, need_reply))
        self.observer.receive(data, fds, sender=Side.FRONTEND)
        assert self.observer.next_message(sender=Side.FRONTEND).request == request
        self.be.receive(data, fds)
        message = self.be.next_message()
        for fd in message.fds:      # no back-end here to use them
            os.close(fd)
        return message

    def answer(self, message, payload, fds=()):
        data, fds = self.be.send(self.be.reply_to(message, payload, fds))
        self.observer.receive(data, fds, sender=Side.BACKEND)
        self.observer.next_message(sender=Side.BACKEND)
        self.fe.receive(data, fds)
        return self.fe.next_message()

    def call(self, request, payload=None, answer=None, **kw):
        return self.answer(self.ask(request, payload, **kw), answer)

    def handshake(self, features=VERSION_1 | BIT30, protocol=PF.REPLY_ACK.mask | PF.MQ.mask,
                  queues=2):
        """GET/SET of features and protocol features, SET_OWNER, GET_QUEUE_NUM."""
        offered = self.call(R.GET_FEATURES, answer=U64(features)).payload.value
        if offered & BIT30:
            self.call(R.GET_PROTOCOL_FEATURES, answer=U64(protocol))
            self.ask(R.SET_PROTOCOL_FEATURES, U64(protocol))
        self.ask(R.SET_OWNER)
        if protocol & PF.MQ.mask and offered & BIT30:
            self.call(R.GET_QUEUE_NUM, answer=U64(queues))

    def set_up_ring(self, index, num=256):
        self.ask(R.SET_VRING_NUM, VringState(index, num))
        self.ask(R.SET_VRING_BASE, VringState(index, 0))
        self.ask(R.SET_VRING_ADDR, VringAddress(index, 0, 0x1000, 0x3000, 0x2000))
        self.ask(R.SET_VRING_KICK, VringFd(index, no_fd=True))


def raw(request, flags=0x1, payload=b""):
    return encode(request, flags, payload)


def test_a_handshake_leaves_both_sides_agreeing():
    p = Pair()
    p.handshake()
    p.ask(R.SET_FEATURES, U64(VERSION_1 | BIT30))
    p.ask(R.SET_MEM_TABLE, MemTable((REGION,)), fds=(os.dup(0),))
    for side in (p.fe, p.be, p.observer):
        n = side.negotiated
        assert (n.features_offered, n.features_acked) == (VERSION_1 | BIT30, VERSION_1 | BIT30)
        assert n.protocol_acked == PF.REPLY_ACK.mask | PF.MQ.mask and n.owner
        assert n.max_queues == 2 and n.regions == [REGION]


def test_ring_states_with_protocol_features():
    """Stopped and disabled at first; the kick starts, ENABLE enables, GET_VRING_BASE stops."""
    p = Pair()
    p.handshake()
    p.ask(R.SET_FEATURES, U64(VERSION_1 | BIT30))
    p.ask(R.SET_MEM_TABLE, MemTable((REGION,)), fds=(os.dup(0),))
    p.set_up_ring(0)
    ring = p.be.negotiated.rings[0]
    assert (ring.started, ring.enabled) == (True, False)                       # BE-46, BE-52
    assert p.call(R.SET_VRING_ENABLE, VringState(0, 1), U64(0), need_reply=True).payload.value == 0
    assert ring.enabled
    reply = p.call(R.GET_VRING_BASE, VringState(0, 0), VringState(0, 17))
    assert reply.payload == VringState(0, 17)
    for side in (p.fe, p.be):
        assert not side.negotiated.rings[0].started and side.negotiated.rings[0].base == 17


def test_without_protocol_features_set_features_enables_every_ring():
    p = Pair()
    p.handshake(features=VERSION_1)
    p.ask(R.SET_FEATURES, U64(VERSION_1))
    p.ask(R.SET_MEM_TABLE, MemTable((REGION,)), fds=(os.dup(0),))
    p.set_up_ring(1)
    assert p.be.negotiated.rings[1].enabled                                    # BE-53
    with pytest.raises(LocalProtocolError, match="FE-17"):
        p.fe.send(p.fe.request(R.SET_VRING_ENABLE, VringState(1, 1)))


def test_undo_puts_back_what_a_refused_request_changed():
    """A back-end that refuses a request undoes it: the record is as before it."""
    p = Pair()
    p.handshake()
    p.ask(R.SET_FEATURES, U64(VERSION_1 | BIT30))
    p.ask(R.SET_MEM_TABLE, MemTable((REGION,)), fds=(os.dup(0),))
    p.ask(R.SET_VRING_NUM, VringState(0, 256))
    p.ask(R.SET_VRING_NUM, VringState(0, 64))
    assert p.be.before.rings[0].num == 256
    p.be.undo()
    assert p.be.negotiated.rings[0].num == 256
    p.ask(R.SET_VRING_NUM, VringState(1, 32))          # a ring the record had not seen
    p.be.undo()
    assert 1 not in p.be.negotiated.rings
    p.ask(R.SET_FEATURES, U64(VERSION_1))               # (SET_FEATURES without bit 30
    p.be.undo()                                         # enables every ring: undone too)
    n = p.be.negotiated
    assert n.features_acked == VERSION_1 | BIT30 and not n.rings[0].enabled


def test_a_request_whose_checks_change_nothing_leaves_nothing_to_undo():
    p = Pair()
    p.handshake()
    p.ask(R.SET_VRING_NUM, VringState(0, 256))
    assert p.be.before is not None
    p.call(R.GET_FEATURES, answer=U64(VERSION_1 | BIT30))
    assert p.be.before is None
    p.be.undo()                                         # (nothing to put back)
    assert p.be.negotiated.rings[0].num == 256
    assert p.fe.before is None and p.observer.before is None   # only a back-end refuses


# --- each rule, broken by each side ---------------------------------------------------

def both_sides(pair, message_bytes, local_call, rule):
    """local_call() must raise Local naming rule; the same bytes sent raw must make
    the back-end raise Remote naming rule."""
    with pytest.raises(LocalProtocolError, match=rule):
        local_call()
    pair.be.receive(message_bytes)
    with pytest.raises(RemoteProtocolError, match=rule):
        pair.be.next_message()


def test_protocol_features_need_bit_30():
    p = Pair()
    p.call(R.GET_FEATURES, answer=U64(VERSION_1))
    both_sides(p, raw(R.GET_PROTOCOL_FEATURES),
               lambda: p.fe.send(p.fe.request(R.GET_PROTOCOL_FEATURES)), "FE-9")


def test_a_feature_gated_request_without_its_feature():
    p = Pair()
    p.handshake(protocol=PF.REPLY_ACK.mask)
    both_sides(p, raw(R.GET_CONFIG, payload=DeviceConfig(0, 0, bytes(4)).pack()),
               lambda: p.fe.send(p.fe.request(R.GET_CONFIG, DeviceConfig(0, 0, bytes(4)))),
               "CONFIG, which was not negotiated")


def test_set_features_only_with_offered_bits():
    p = Pair()
    p.call(R.GET_FEATURES, answer=U64(VERSION_1))
    both_sides(p, raw(R.SET_FEATURES, payload=U64(VERSION_1 | 1).pack()),
               lambda: p.fe.send(p.fe.request(R.SET_FEATURES, U64(VERSION_1 | 1))), "FE-10")


def test_need_reply_only_with_reply_ack():
    p = Pair()
    p.handshake(protocol=0)
    both_sides(p, raw(R.SET_OWNER, flags=0x9),
               lambda: p.fe.send(p.fe.request(R.SET_OWNER, need_reply=True)), "FE-6")


def test_one_reply_bearing_request_at_a_time():
    p = Pair()
    p.ask(R.GET_FEATURES)
    both_sides(p, raw(R.GET_FEATURES), lambda: p.fe.send(p.fe.request(R.GET_FEATURES)), "FE-8")


def test_kick_fd_and_nofd_bit_must_agree():
    p = Pair()
    p.handshake()
    p.ask(R.SET_MEM_TABLE, MemTable((REGION,)), fds=(os.dup(0),))
    p.ask(R.SET_VRING_NUM, VringState(0, 64))
    p.ask(R.SET_VRING_ADDR, VringAddress(0, 0, 0x1000, 0x3000, 0x2000))
    r, w = os.pipe()
    with pytest.raises(LocalProtocolError, match="FE-48"):
        p.fe.send(p.fe.request(R.SET_VRING_KICK, VringFd(0, no_fd=True), fds=(r,)))
    os.fstat(r)                   # our own fd: not closed by the refusal
    p.be.receive(raw(R.SET_VRING_KICK, payload=VringFd(0, no_fd=True).pack()), (r,))
    with pytest.raises(RemoteProtocolError, match="FE-48"):
        p.be.next_message()
    with pytest.raises(OSError):
        os.fstat(r)               # the peer's stray fd: closed
    os.close(w)


def test_ring_set_up_order():
    p = Pair()
    p.handshake()
    with pytest.raises(LocalProtocolError, match="before any memory table.*FE-50"):
        p.fe.send(p.fe.request(R.SET_VRING_ADDR, VringAddress(0, 0, 0x1000, 0x3000, 0x2000)))
    p = Pair()
    p.handshake()
    p.ask(R.SET_MEM_TABLE, MemTable((REGION,)), fds=(os.dup(0),))
    with pytest.raises(LocalProtocolError, match="not 16-byte aligned.*FE-44"):
        p.fe.send(p.fe.request(R.SET_VRING_ADDR, VringAddress(0, 0, 0x1008, 0x3000, 0x2000)))


def test_queue_index_beyond_the_back_ends_queues():
    p = Pair()
    p.handshake(queues=1)
    with pytest.raises(LocalProtocolError, match="FE-16"):
        p.fe.send(p.fe.request(R.SET_VRING_NUM, VringState(1, 64)))


def test_overlapping_memory_regions():
    p = Pair()
    p.handshake()
    overlapping = MemoryRegion(0x80_0000, 0x100_0000, 0x7F10_0000_0000, 0)
    with pytest.raises(LocalProtocolError, match="overlap.*FE-34"):
        p.fe.send(p.fe.request(R.SET_MEM_TABLE, MemTable((REGION, overlapping)),
                               fds=(0, 1)))


# --- replies: the back-end's rules ----------------------------------------------------

@pytest.mark.parametrize("reply,rule", [
    (raw(R.GET_PROTOCOL_FEATURES, 0x5, bytes(8)), "BE-4"),     # answers something else
    (raw(R.GET_FEATURES, 0x1, bytes(8)), "BE-1"),               # no reply flag
    (raw(R.GET_FEATURES, 0xD, bytes(8)), "BE-3"),               # echoes NEED_REPLY
    (raw(R.GET_FEATURES, 0x5, bytes(7)), "BE-5"),               # 7 bytes for a u64
    (raw(R.GET_FEATURES, 0x6, bytes(8)), "BE-2"),               # version 2
])
def test_bad_replies_are_the_back_ends_fault(reply, rule):
    p = Pair()
    p.ask(R.GET_FEATURES)
    p.fe.receive(reply)
    with pytest.raises(RemoteProtocolError, match=rule):
        p.fe.next_message()


def test_a_reply_nobody_asked_for():
    p = Pair()
    p.ask(R.SET_OWNER)                               # no reply due
    p.fe.receive(raw(R.SET_OWNER, 0x5, bytes(8)))
    with pytest.raises(RemoteProtocolError, match="BE-6"):
        p.fe.next_message()


def test_get_config_answered_with_another_size_or_refused():
    p = Pair()
    p.handshake(protocol=PF.CONFIG.mask)
    asked = p.ask(R.GET_CONFIG, DeviceConfig(0, 0, bytes(8)))
    assert isinstance(p.answer(asked, Empty()).payload, Empty)             # BE-76: refusal
    asked = p.ask(R.GET_CONFIG, DeviceConfig(0, 0, bytes(8)))
    p.fe.receive(raw(R.GET_CONFIG, 0x5, DeviceConfig(0, 0, bytes(4)).pack()))
    with pytest.raises(RemoteProtocolError, match="BE-75"):
        p.fe.next_message()


def test_a_failed_session_stays_failed():
    p = Pair()
    p.fe.receive(raw(R.GET_FEATURES, 0x5, bytes(8)))
    with pytest.raises(RemoteProtocolError):
        p.fe.next_message()
    with pytest.raises(LocalProtocolError, match="already failed"):
        p.fe.send(p.fe.request(R.GET_FEATURES))


# --- the back-end request channel ------------------------------------------------------

def test_the_back_end_channel_asks_the_other_way_round():
    p = Pair()
    p.handshake(protocol=PF.REPLY_ACK.mask | PF.BACKEND_REQ.mask | PF.CONFIG.mask)
    fe_side = Session(Role.FRONTEND, Channel.BACKEND, main=p.fe)
    be_side = Session(Role.BACKEND, Channel.BACKEND, main=p.be)
    data, fds = be_side.send(be_side.request(BackendReq.CONFIG_CHANGE_MSG, need_reply=True))
    fe_side.receive(data, fds)
    msg = fe_side.next_message()
    assert msg.request is BackendReq.CONFIG_CHANGE_MSG and msg.need_reply
    data, fds = fe_side.send(fe_side.reply_to(msg, U64(0)))
    be_side.receive(data, fds)
    assert be_side.next_message().payload == U64(0)


def test_no_back_end_requests_without_backend_req():
    p = Pair()
    p.handshake(protocol=PF.CONFIG.mask)
    be_side = Session(Role.BACKEND, Channel.BACKEND, main=p.be)
    with pytest.raises(LocalProtocolError, match="BE-81"):
        be_side.send(be_side.request(BackendReq.CONFIG_CHANGE_MSG))


# --- fed anything at all ---------------------------------------------------------------

MESSAGES = st.sampled_from([
    raw(R.GET_FEATURES), raw(R.SET_FEATURES, payload=U64(VERSION_1).pack()), raw(R.SET_OWNER),
    raw(R.GET_PROTOCOL_FEATURES), raw(R.SET_PROTOCOL_FEATURES, payload=bytes(8)),
    raw(R.SET_VRING_NUM, payload=VringState(0, 256).pack()),
    raw(R.SET_VRING_ADDR, payload=VringAddress(0, 0, 0x1000, 0x3000, 0x2000).pack()),
    raw(R.SET_VRING_KICK, payload=VringFd(0, True).pack()),
    raw(R.GET_VRING_BASE, payload=bytes(8)), raw(R.SET_VRING_ENABLE, payload=bytes(8)),
    raw(R.GET_FEATURES, 0x5, bytes(8)), raw(99), raw(R.SET_MEM_TABLE, payload=bytes(8)),
])


@settings(max_examples=400, deadline=None)
@given(stream=st.lists(st.one_of(MESSAGES, st.binary(max_size=40)), max_size=10),
       cut=st.integers(0, 400))
def test_a_back_end_session_fed_anything_ends_cleanly(stream, cut):
    """Reordered, truncated or nonsense input: messages or one clean protocol error."""
    data = b"".join(stream)[:cut] if cut < 400 else b"".join(stream)
    be = Session(Role.BACKEND)
    try:
        be.receive(data)
        while (msg := be.next_message()) is not NEED_DATA:
            if be.awaiting is msg:
                be.send(be.reply_to(msg, U64(VERSION_1 | BIT30)
                                    if msg.request is R.GET_FEATURES else
                                    VringState(msg.payload.index, 0)
                                    if msg.request is R.GET_VRING_BASE else U64(0)))
    except RemoteProtocolError as e:
        assert "\n" not in str(e)


@settings(max_examples=300, deadline=None)
@given(reply=st.binary(max_size=40))
def test_a_front_end_session_fed_any_reply_ends_cleanly(reply):
    fe = Session(Role.FRONTEND)
    fe.send(fe.request(R.GET_FEATURES))
    try:
        fe.receive(reply)
        msg = fe.next_message()
        assert msg is NEED_DATA or msg.request is R.GET_FEATURES
    except RemoteProtocolError as e:
        assert "\n" not in str(e)
