"""The state of one vhost-user connection, as a state machine without I/O.

A Session plays one role on one channel:

- FRONTEND on the main socket: it sends requests and receives replies;
- BACKEND on the main socket: it receives requests and sends replies;
- OBSERVER: it sends nothing and watches both directions (a tracer);

and the back-end request channel works the same way with the sides
swapped (the back-end asks, the front-end answers); its session shares the
main session's negotiated features.

Every message, sent or received, goes through one check (`_check`) that
applies rules.py and then records what the message changed: what was
negotiated (features, protocol features, the owner, the queue count, the
memory table) and each ring's state (size, base, address, stopped or
started, disabled or enabled). A message our side is about to send that
breaks a rule raises LocalProtocolError; one the peer sent raises
RemoteProtocolError. Either ends the session for good: every later call
raises again.

    session = Session(Role.FRONTEND)
    data, fds = session.send(session.request(FrontendReq.GET_FEATURES))
    ... write data and fds to the socket, read the answer ...
    session.receive(answer, answer_fds)
    reply = session.next_message()        # a Message, or NEED_DATA
"""

import enum
from dataclasses import dataclass, field

from pyvmm.vhost.user import rules
from pyvmm.vhost.user.errors import LocalProtocolError, RemoteProtocolError
from pyvmm.vhost.user.messages import (
    U64, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_USER_NEED_REPLY_MASK, VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION, VHOST_USER_VRING_IDX_MASK, VHOST_VRING_F_LOG, DeviceConfig, Empty, FrontendReq, Message,
    PayloadError, ProtocolFeature, methods_by_request)
from pyvmm.vhost.user.rules import Channel, Fds, Reply, Side
from pyvmm.vhost.user.wire import NEED_DATA, FrameReader, close_fds, encode

PF = ProtocolFeature
R = FrontendReq
VIRTIO_F_IOMMU_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
MAX_QUEUE_SIZE = 32768

__all__ = ["NEED_DATA", "Role", "RingState", "Session"]

# What the checks compare every message with, bound to module names once.
# In Python 3.11 each attribute of an Enum class (Side.FRONTEND, Reply.ALWAYS)
# goes through EnumType.__getattr__'s hook: 60 ns, against 6 for a module
# name. That was a fifth of the back-end's Python per message (3.12 drops
# the hook).
FRONTEND, BACKEND = Side.FRONTEND, Side.BACKEND
ALWAYS, ALWAYS_WITH_LOG_SHMFD = Reply.ALWAYS, Reply.ALWAYS_WITH_LOG_SHMFD
NO_FDS, ONE_FD, ONE_FD_UNLESS_NOFD, FD_PER_REGION = Fds.NONE, Fds.ONE, Fds.ONE_UNLESS_NOFD, \
    Fds.PER_REGION
REPLY_ACK, LOG_SHMFD, BACKEND_REQ, BACKEND_SEND_FD = PF.REPLY_ACK, PF.LOG_SHMFD, \
    PF.BACKEND_REQ, PF.BACKEND_SEND_FD
SET_LOG_BASE = R.SET_LOG_BASE
# The requests _check_gate has a word of its own for.
_GATED = {R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES, R.SET_VRING_ENABLE, R.IOTLB_MSG}


class Role(enum.Enum):
    FRONTEND = "front-end"
    BACKEND = "back-end"
    OBSERVER = "observer"


@dataclass
class RingState:
    """What the messages so far say about one ring."""
    index: int
    num: int = None
    base: int = 0
    addr: object = None          # the VringAddress last set
    kick: bool = False           # SET_VRING_KICK seen (with an fd or polled)
    started: bool = False
    enabled: bool = False


def _shallow(record):
    """A copy of a dataclass record sharing its fields' values (copy.copy's
    result, at a fraction of its cost: it is taken before every message)."""
    new = object.__new__(type(record))
    new.__dict__.update(record.__dict__)
    return new


@dataclass
class Negotiated:
    """What both sides agreed on; lives in the main socket's session."""
    features_offered: int = None      # the back-end's GET_FEATURES reply
    features_acked: int = None        # the front-end's last SET_FEATURES
    protocol_offered: int = None      # the GET_PROTOCOL_FEATURES reply
    protocol_acked: int = 0           # the SET_PROTOCOL_FEATURES sent
    owner: bool = False
    max_queues: int = None            # the GET_QUEUE_NUM reply
    max_mem_slots: int = None         # the GET_MAX_MEM_SLOTS reply
    regions: list = field(default_factory=list)   # MemoryRegions in force
    rings: dict = field(default_factory=dict)     # index -> RingState

    def has(self, feature):
        """A protocol feature both sides have agreed on."""
        return bool(self.protocol_acked >> feature & 1)     # (feature: its bit number)

    @property
    def protocol_features_on(self):
        """VHOST_USER_F_PROTOCOL_FEATURES offered, and not left out of SET_FEATURES."""
        bit = 1 << VHOST_USER_F_PROTOCOL_FEATURES
        return bool((self.features_offered or 0) & bit) and (
            self.features_acked is None or bool(self.features_acked & bit))

    def snapshot(self):
        """A copy to put back if a request is refused (Session.undo): the
        lists and ring states copied, the payloads in them shared (nothing
        changes a message's payload in place). copy.deepcopy did the same at
        several times the cost (0.1 s of a connection's set-up inside the
        testbed VM, when it was taken before every message)."""
        snap = _shallow(self)
        snap.regions = list(self.regions)
        snap.rings = {i: _shallow(r) for i, r in self.rings.items()}
        return snap

    def ring(self, index):
        if index not in self.rings:
            self.rings[index] = RingState(index)
        return self.rings[index]


class Session:
    def __init__(self, role, channel=Channel.MAIN, main=None):
        """main: for the back-end request channel, the main socket's session."""
        self.role = role
        self.channel = channel
        self._main = channel is Channel.MAIN              # (compared for every message)
        self._refuses = role is Role.BACKEND and self._main   # (see `before`)
        self.negotiated = main.negotiated if main is not None else Negotiated()
        # On the main socket the front-end asks; on the back-end channel, the back-end.
        self.requester = Side.FRONTEND if channel is Channel.MAIN else Side.BACKEND
        self.answerer = Side.BACKEND if self.requester is Side.FRONTEND else Side.FRONTEND
        self.awaiting = None          # the request Message whose reply is due
        self.failed = None            # the error that ended the session
        # A back-end may refuse a request it received: `before` keeps the
        # record as it was before the last one, for undo(); None when that
        # request's checks could not change it (GET_FEATURES, say).
        self.before = None
        if role is Role.OBSERVER:
            self._readers = {side: FrameReader(_rules_of(side)) for side in Side}
            self._peer_side = self._peer_reader = None
        else:
            self._side = Side.FRONTEND if role is Role.FRONTEND else Side.BACKEND
            self._peer_side = Side.BACKEND if role is Role.FRONTEND else Side.FRONTEND
            self._peer_reader = FrameReader(_rules_of(self._peer_side))
            self._readers = {self._peer_side: self._peer_reader}

    # --- building messages -----------------------------------------------------

    def request(self, request, payload=None, fds=(), need_reply=False):
        """A request message with the right header flags."""
        flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
        return Message(request, flags, Empty() if payload is None else payload, tuple(fds))

    def reply_to(self, request, payload, fds=()):
        """The reply to request (an ack is a U64)."""
        return Message(request.request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, payload,
                       tuple(fds))

    def wants_reply(self, message):
        """Whether message, if sent now, is answered (always, or as an ack)."""
        rule = self.channel.rules[message.request]
        return self._reply_expected(rule, message)

    # --- the two directions -------------------------------------------------------

    def send(self, message):
        """Check a message our side is about to send; its (bytes, fds)."""
        if self._peer_reader is None:           # (an observer: it has no one peer)
            raise LocalProtocolError("an observer sends nothing")
        self._guard(LocalProtocolError)
        try:
            self._check(message, self._side, LocalProtocolError)
        except LocalProtocolError as e:
            self.failed = e
            raise
        return encode(message.request, message.flags, message.payload.pack()), message.fds

    def receive(self, data, fds=(), sender=None):
        """Bytes (and the fds that came with them) from the peer, or, for an
        observer, from `sender` (a Side)."""
        self._guard(RemoteProtocolError)
        sender, reader = self._reader(sender)
        try:
            reader.feed(data, fds)
        except RemoteProtocolError as e:
            self.failed = e
            raise

    def next_message(self, sender=None):
        """The next whole message from the peer (or `sender`), checked: a
        Message, or NEED_DATA."""
        self._guard(RemoteProtocolError)
        sender, reader = self._reader(sender)
        return self._message(sender, reader.next)

    def message(self, data, fds=()):
        """receive(data, fds) then next_message(), for data that is one whole
        frame from the peer (what Connection.receive reads): it does not go
        through the frame reader's buffer."""
        self._guard(RemoteProtocolError)
        sender, reader = self._reader(None)
        return self._message(sender, reader.frame, data, fds)

    def _message(self, sender, read, *args):
        """The Message of the frame read(*args) gives, checked; or NEED_DATA."""
        frame = None
        try:
            frame = read(*args)
            if frame is NEED_DATA:
                return NEED_DATA
            message = self._decode(frame, sender)
            self._check(message, sender, RemoteProtocolError)
        except RemoteProtocolError as e:
            # The fds of a message that broke the rules are nobody's: close them.
            if frame is not None and frame is not NEED_DATA:
                close_fds(frame.fds)
            self.failed = e
            self.close()
            raise
        return message

    def undo(self):
        """Put the record back as it was before the last request received:
        the back-end refused it, so nothing it asked for took effect."""
        if self.before is not None:
            vars(self.negotiated).update(vars(self.before))

    def close(self):
        """Close every fd received but not yet handed out."""
        for reader in self._readers.values():
            reader.close()

    def _reader(self, sender):
        """(sender, its FrameReader); sender None: the peer (an observer must say)."""
        if sender is not None:
            return sender, self._readers[sender]
        if self._peer_reader is None:
            raise LocalProtocolError("an observer must say which side sent the bytes")
        return self._peer_side, self._peer_reader

    def _guard(self, error):
        if self.failed is not None:
            raise error(f"the session already failed: {self.failed}")

    # --- decoding -----------------------------------------------------------------

    def _decode(self, frame, sender):
        request = self.channel.request(frame.request)
        if request is None:
            raise RemoteProtocolError(f"unknown request {frame.request} on the "
                                      f"{self.channel.title}", f"{_rules_of(sender)}-2")
        rule = self.channel.rules[request]
        is_reply = bool(frame.flags & VHOST_USER_REPLY_MASK)
        if is_reply != (sender is self.answerer):
            raise RemoteProtocolError(
                f"{request.name} from the {sender.value} "
                f"{'with' if is_reply else 'without'} the reply flag",
                {BACKEND: "BE-1", FRONTEND: "FE-1"}[sender] if self._main else None)
        if is_reply:
            if self.awaiting is None or self.awaiting.request != request:
                due = self.awaiting.request.name if self.awaiting else "no reply"
                raise RemoteProtocolError(f"a reply to {request.name} arrived, but {due} "
                                          f"was due", "BE-4" if self.awaiting else "BE-6")
            layout = self._reply_layout(rule, frame)
        else:
            layout = rule.payload
        try:
            payload = layout.unpack(frame.payload)
        except PayloadError as e:
            what = f"the reply to {request.name}" if is_reply else request.name
            raise RemoteProtocolError(f"{what}: {e}",
                                      "BE-5" if sender is BACKEND else "FE-2") from None
        return Message(request, frame.flags, payload, frame.fds)

    def _reply_layout(self, rule, frame):
        if rule.reply is ALWAYS or (rule.reply is ALWAYS_WITH_LOG_SHMFD
                                    and self.negotiated.has(LOG_SHMFD)):
            # GET_CONFIG fails with an empty payload (BE-76): not a broken frame.
            if rule.reply_payload is DeviceConfig and not frame.payload:
                return Empty
            return rule.reply_payload
        return U64

    # --- the rules -----------------------------------------------------------------

    def _check(self, message, sender, error):
        """Apply the rules to a message from sender; record what it changes."""
        if message.request not in self.channel.rules:
            raise error(f"{message.request!r} is not a request of the {self.channel.title}")
        rule = self.channel.rules[message.request]
        if message.flags & VHOST_USER_REPLY_MASK:
            self._check_reply(message, rule, sender, error)
        else:
            self._check_request(message, rule, sender, error)

    def _check_request(self, msg, rule, sender, error):
        # (The request's name is looked up only for an error's words: every
        # message comes through here.)
        n = self.negotiated
        if sender is not self.requester:
            raise error(f"{msg.request.name} sent by the {sender.value} without the reply "
                        f"flag", "BE-1" if sender is BACKEND else None)
        if self.awaiting is not None:
            raise error(f"{msg.request.name} sent while the reply to "
                        f"{self.awaiting.request.name} was still due",
                        "FE-8" if sender is FRONTEND else None)
        self._check_gate(msg, rule, error)
        self._check_fds(msg.fds, rule.fds, msg, error,
                        "FE-4" if sender is FRONTEND else "BE-83")
        if msg.need_reply and rule.reply is not ALWAYS and not n.has(REPLY_ACK):
            raise error(f"{msg.request.name} asks for a reply (NEED_REPLY) without REPLY_ACK "
                        f"negotiated", "FE-6")
        if self._main and (check := _REQUEST_CHECKS.get(msg.request)):
            # (Only these checks change the record; it is copied for undo()
            # only then: a copy before every message was a tenth of the
            # back-end's Python per message.)
            if self._refuses:
                self.before = n.snapshot()
            check(self, msg, error)
        elif self._refuses:
            self.before = None
        if self._reply_expected(rule, msg):
            self.awaiting = msg

    def _reply_expected(self, rule, msg):
        n = self.negotiated
        if rule.reply is ALWAYS:
            return True
        if rule.reply is ALWAYS_WITH_LOG_SHMFD and n.has(LOG_SHMFD):
            return True
        return msg.need_reply and n.has(REPLY_ACK)

    def _check_gate(self, msg, rule, error):
        n = self.negotiated
        if not self._main and not n.has(BACKEND_REQ):
            raise error(f"{msg.request.name} on a back-end channel without BACKEND_REQ "
                        f"negotiated", "BE-81")
        if rule.needs is not None and not n.has(rule.needs):
            raise error(f"{msg.request.name} needs protocol feature {rule.needs.name}, which "
                        f"was not negotiated", rule.needs_rule)
        if msg.request not in _GATED:
            return
        if msg.request in (R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES):
            if not (n.features_offered or 0) & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
                raise error(f"{msg.request.name} sent though the back-end did not offer "
                            f"VHOST_USER_F_PROTOCOL_FEATURES (bit 30)", "FE-9")
        if msg.request is R.SET_VRING_ENABLE and not n.protocol_features_on:
            raise error("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES (bit 30) "
                        "negotiated", "FE-17")
        if msg.request is R.IOTLB_MSG and not (
                (n.features_acked or 0) >> VIRTIO_F_IOMMU_PLATFORM & 1):
            raise error("IOTLB_MSG without VIRTIO_F_IOMMU_PLATFORM negotiated", "FE-21")

    def _check_fds(self, fds, expected, msg, error, rule):
        count = len(fds)
        if expected is NO_FDS:
            ok = count == 0
        elif expected is ONE_FD:
            ok = count == 1
        elif expected is ONE_FD_UNLESS_NOFD:
            ok = count == (0 if msg.payload.no_fd else 1)
            rule = "FE-48"
        elif expected is FD_PER_REGION:
            ok = count == len(msg.payload.regions)
            rule = "FE-36"
        else:
            ok = count <= 1
        if msg.request is SET_LOG_BASE and not msg.flags & VHOST_USER_REPLY_MASK:
            ok = count == (1 if self.negotiated.has(LOG_SHMFD) else 0)
            rule = "FE-42"
        if not self._main and count and not msg.flags & VHOST_USER_REPLY_MASK \
                and not self.negotiated.has(BACKEND_SEND_FD):
            ok, rule = False, "BE-83"
        if not ok:
            what = msg.request.name + (" reply" if msg.flags & VHOST_USER_REPLY_MASK else "")
            raise error(f"{what} carries {count} fds; it takes {expected.value}", rule)

    def _check_reply(self, msg, rule, sender, error):
        if sender is not self.answerer:
            raise error(f"the {sender.value} set the reply flag on {msg.request.name}",
                        "FE-1" if sender is FRONTEND else None)
        if self.awaiting is None or self.awaiting.request != msg.request:
            due = self.awaiting.request.name if self.awaiting else "nothing"
            raise error(f"a reply to {msg.request.name} while {due} was awaited",
                        "BE-4" if self.awaiting else "BE-6")
        if msg.flags != VHOST_USER_VERSION | VHOST_USER_REPLY_MASK:
            raise error(f"the reply to {msg.request.name} has flags {msg.flags:#x}, not 0x5",
                        "BE-3")
        request, self.awaiting = self.awaiting, None
        is_ack = not (rule.reply is ALWAYS or (rule.reply is ALWAYS_WITH_LOG_SHMFD
                                               and self.negotiated.has(LOG_SHMFD)))
        if is_ack and not isinstance(msg.payload, U64):
            raise error(f"the ack of {msg.request.name} is not a u64", "BE-5")
        self._check_fds(msg.fds, NO_FDS if is_ack else rule.reply_fds, msg, error,
                        "BE-5" if sender is BACKEND else None)
        if not is_ack and self._main and (
                check := _REPLY_CHECKS.get(msg.request)):
            check(self, request, msg, error)

    # --- what each request may carry and what it changes (main socket) --------------

    @staticmethod
    def _check_offered(msg, offered, error):
        """FE-10: a SET_*FEATURES acks only bits the back-end offered."""
        value = msg.payload.value
        if offered is not None and value & ~offered:
            raise error(f"{msg.request.name} acks bits {value & ~offered:#x} the back-end "
                        f"did not offer", "FE-10")
        return value

    def _request_set_features(self, msg, error):
        n = self.negotiated
        value = self._check_offered(msg, n.features_offered, error)
        n.features_acked = value
        if not value & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            for ring in n.rings.values():   # without bit 30 every ring is enabled (BE-53)
                ring.enabled = True

    def _request_set_protocol_features(self, msg, error):
        n = self.negotiated
        value = self._check_offered(msg, n.protocol_offered, error)
        conflict = rules.protocol_feature_conflict(value)
        if conflict:
            feature, partners, rule = conflict
            raise error(f"SET_PROTOCOL_FEATURES acks {feature.name} without "
                        f"{' and '.join(p.name for p in partners)}", rule)
        n.protocol_acked = value

    def _request_set_owner(self, msg, error):
        if self.negotiated.owner:
            raise error("SET_OWNER sent a second time", "FE-69")
        self.negotiated.owner = True

    def _request_set_mem_table(self, msg, error):
        regions = list(msg.payload.regions)
        _check_no_overlap(regions, error)
        self.negotiated.regions = regions

    def _request_add_mem_reg(self, msg, error):
        n = self.negotiated
        region = msg.payload.region
        _check_no_overlap(n.regions + [region], error)
        if n.max_mem_slots is not None and len(n.regions) + 1 > n.max_mem_slots:
            raise error(f"ADD_MEM_REG beyond the back-end's {n.max_mem_slots} memory slots",
                        "FE-37")
        n.regions.append(region)

    def _request_rem_mem_reg(self, msg, error):
        r = msg.payload.region
        for i, old in enumerate(self.negotiated.regions):
            if (old.guest_addr, old.user_addr, old.size) == (r.guest_addr, r.user_addr, r.size):
                del self.negotiated.regions[i]
                return
        raise error(f"REM_MEM_REG of a region at {r.guest_addr:#x}+{r.size:#x} that is not "
                    f"in the table", "BE-33")

    def _ring(self, index, name, error):
        n = self.negotiated
        if n.max_queues is not None and index >= n.max_queues:
            raise error(f"{name} for queue {index}; the back-end has {n.max_queues}", "FE-16")
        return n.ring(index)

    def _request_set_vring_num(self, msg, error):
        ring = self._ring(msg.payload.index, "SET_VRING_NUM", error)
        if not 1 <= msg.payload.num <= MAX_QUEUE_SIZE:
            raise error(f"SET_VRING_NUM {msg.payload.num} for queue {ring.index}: a queue has "
                        f"1 to {MAX_QUEUE_SIZE} entries")
        ring.num = msg.payload.num

    def _request_set_vring_base(self, msg, error):
        ring = self._ring(msg.payload.index, "SET_VRING_BASE", error)
        packed = (self.negotiated.features_acked or 0) >> VIRTIO_F_RING_PACKED & 1
        if not packed and msg.payload.num > 0xFFFF:
            raise error(f"SET_VRING_BASE {msg.payload.num:#x} for split queue {ring.index} uses "
                        f"bits 16-31", "FE-47")
        ring.base = msg.payload.num

    def _request_set_vring_addr(self, msg, error):
        a = msg.payload
        ring = self._ring(a.index, "SET_VRING_ADDR", error)
        if not self.negotiated.regions:
            raise error(f"SET_VRING_ADDR for queue {a.index} before any memory table", "FE-50")
        if a.flags & ~VHOST_VRING_F_LOG:
            raise error(f"SET_VRING_ADDR flags {a.flags:#x} (only bit 0 is defined)", "FE-44")
        for what, addr, align in (("descriptor table", a.desc, 16), ("available ring", a.avail, 2),
                                  ("used ring", a.used, 4)):
            if addr % align:
                raise error(f"queue {a.index}: {what} at {addr:#x} is not {align}-byte aligned",
                            "FE-44")
        ring.addr = a

    def _request_get_vring_base(self, msg, error):
        self._ring(msg.payload.index, "GET_VRING_BASE", error)
        if msg.payload.num != 0:
            raise error(f"GET_VRING_BASE for queue {msg.payload.index} with num "
                        f"{msg.payload.num}, not 0", "FE-46")

    def _vring_fd_ring(self, msg, error):
        """The ring of a SET_VRING_KICK/CALL/ERR, whose u64 has 8 bits for the
        index (a larger one would run into the NOFD bit)."""
        index = msg.payload.index
        if index > VHOST_USER_VRING_IDX_MASK:
            raise error(f"{msg.request.name} for queue {index}: the message has 8 bits for "
                        f"the queue index", "FE-48")
        return self._ring(index, msg.request.name, error)

    def _request_set_vring_kick(self, msg, error):
        ring = self._vring_fd_ring(msg, error)
        if ring.num is None or ring.addr is None:
            raise error(f"SET_VRING_KICK for queue {ring.index} before its size and address",
                        "FE-50")
        ring.kick = True
        ring.started = True       # BE-46: the kick fd starts the ring
        if not self.negotiated.protocol_features_on:
            ring.enabled = True   # BE-53

    def _request_set_vring_call(self, msg, error):
        self._vring_fd_ring(msg, error)

    def _request_set_vring_err(self, msg, error):
        self._vring_fd_ring(msg, error)

    def _request_set_vring_enable(self, msg, error):
        ring = self._ring(msg.payload.index, "SET_VRING_ENABLE", error)
        if msg.payload.num not in (0, 1):
            raise error(f"SET_VRING_ENABLE for queue {ring.index} with num {msg.payload.num}, "
                        f"not 0 or 1", "BE-55")
        ring.enabled = bool(msg.payload.num)

    def _request_get_config(self, msg, error):
        self._check_config(msg, error)

    def _request_set_config(self, msg, error):
        self._check_config(msg, error)

    def _check_config(self, msg, error):
        if msg.payload.flags not in (0, 1):
            raise error(f"{msg.request.name} flags {msg.payload.flags} (0 for a driver's write, "
                        f"1 for migration)", "FE-65")

    def _request_reset_device(self, msg, error):
        for ring in self.negotiated.rings.values():   # BE-92: back to stopped and disabled
            ring.started = ring.enabled = False

    # --- what replies say (main socket) ---------------------------------------------

    def _reply_get_features(self, request, msg, error):
        self.negotiated.features_offered = msg.payload.value

    def _reply_get_protocol_features(self, request, msg, error):
        self.negotiated.protocol_offered = msg.payload.value

    def _reply_get_queue_num(self, request, msg, error):
        if msg.payload.value < 1:
            raise error("GET_QUEUE_NUM answered 0 queues", "BE-17")
        self.negotiated.max_queues = msg.payload.value

    def _reply_get_max_mem_slots(self, request, msg, error):
        if msg.payload.value < 1:
            raise error("GET_MAX_MEM_SLOTS answered 0 memory slots: no memory could be "
                        "given to it", "BE-35")
        self.negotiated.max_mem_slots = msg.payload.value

    def _reply_get_vring_base(self, request, msg, error):
        index = request.payload.index
        if msg.payload.index != index:
            raise error(f"GET_VRING_BASE for queue {index} answered for queue "
                        f"{msg.payload.index}", "BE-58")
        packed = (self.negotiated.features_acked or 0) >> VIRTIO_F_RING_PACKED & 1
        if not packed and msg.payload.num > 0xFFFF:
            raise error(f"GET_VRING_BASE for split queue {index} answered {msg.payload.num:#x} "
                        f"(bits 16-31 must be 0)", "BE-58")
        ring = self.negotiated.ring(index)
        ring.started = False          # BE-48: the ring is stopped
        ring.base = msg.payload.num

    def _reply_get_config(self, request, msg, error):
        if isinstance(msg.payload, Empty):
            return                    # the back-end's way to fail (BE-76)
        asked = request.payload
        if len(msg.payload.data) and (msg.payload.offset, len(msg.payload.data)) != (
                asked.offset, len(asked.data)):
            raise error(f"GET_CONFIG of {len(asked.data)} bytes at {asked.offset} answered with "
                        f"{len(msg.payload.data)} bytes at {msg.payload.offset}", "BE-75")

    def _reply_get_inflight_fd(self, request, msg, error):
        if bool(msg.fds) != bool(msg.payload.mmap_size):
            raise error(f"GET_INFLIGHT_FD answered mmap_size {msg.payload.mmap_size} with "
                        f"{len(msg.fds)} fds", "BE-71")


# What Session checks of a request, and of a reply, beyond rules.py's table:
# _request_set_features for SET_FEATURES, _reply_get_features for its reply.
_REQUEST_CHECKS = methods_by_request(Session, "_request_")
_REPLY_CHECKS = methods_by_request(Session, "_reply_")


def _rules_of(side):
    return "FE" if side is Side.FRONTEND else "BE"


def _check_no_overlap(regions, error):
    """FE-34: no two regions share guest addresses, nor user addresses."""
    for field_name in ("guest_addr", "user_addr"):
        spans = sorted((getattr(r, field_name), getattr(r, field_name) + r.size) for r in regions)
        for (start_a, end_a), (start_b, _) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise error(f"memory regions overlap in their {field_name.replace('_', ' ')}es "
                            f"({start_a:#x}-{end_a:#x} and one at {start_b:#x})", "FE-34")

