"""The vhost-user protocol as data: for each request, what it carries, who may
send it, what gates it, and how it is answered.

One Rule per request of each channel. The session (session.py) applies
them to every message in both directions, so a front-end, a back-end, a
tracer and a conformance checker all enforce the same protocol. Rule ids
(FE-n, BE-n) are those of ../shared/VHOST-USER-CONFORMANCE.md.
"""

import enum
from dataclasses import dataclass

from pyvmm.vhost.user.messages import (
    U64, BackendReq, DeviceConfig, DeviceStateTransfer, Empty, FrontendReq, Inflight, IotlbMsg,
    LogArea, MemTable, ProtocolFeature, Raw, SingleMemRegion, Uuid, VringAddress, VringArea,
    VringFd, VringState)

PF = ProtocolFeature


class Fds(enum.Enum):
    """How many file descriptors a message carries."""
    NONE = "no fd"
    ONE = "one fd"
    ONE_UNLESS_NOFD = "one fd unless the NOFD bit is set"
    PER_REGION = "one fd per region"
    OPTIONAL = "at most one fd"


class Reply(enum.Enum):
    """How a request is answered."""
    ACK = "an ack (u64) only when REPLY_ACK is negotiated and NEED_REPLY is set"
    ALWAYS = "always, with a reply payload"
    ALWAYS_WITH_LOG_SHMFD = "always when LOG_SHMFD is negotiated, else as ACK"


class Side(enum.Enum):
    FRONTEND = "front-end"
    BACKEND = "back-end"


@dataclass(frozen=True)
class Rule:
    request: enum.IntEnum
    payload: type                   # the request's payload layout
    reply: Reply
    reply_payload: type = U64       # for Reply.ALWAYS (an ack is always a U64)
    fds: Fds = Fds.NONE
    reply_fds: Fds = Fds.NONE
    needs: ProtocolFeature = None   # a protocol feature both sides must have negotiated
    needs_rule: str = None          # the rule that says so
    sender: Side = Side.FRONTEND


def _fe(request, payload, reply=Reply.ACK, reply_payload=U64, fds=Fds.NONE,
        reply_fds=Fds.NONE, needs=None, needs_rule=None):
    return Rule(request, payload, reply, reply_payload, fds, reply_fds, needs, needs_rule)


def _be(request, payload, reply=Reply.ACK, reply_payload=U64, fds=Fds.NONE,
        reply_fds=Fds.NONE, needs=None, needs_rule=None):
    return Rule(request, payload, reply, reply_payload, fds, reply_fds, needs, needs_rule,
                Side.BACKEND)


R = FrontendReq
FRONTEND_RULES = {rule.request: rule for rule in [
    _fe(R.GET_FEATURES, Empty, Reply.ALWAYS),
    _fe(R.SET_FEATURES, U64),
    _fe(R.SET_OWNER, Empty),
    _fe(R.RESET_OWNER, Empty),
    _fe(R.SET_MEM_TABLE, MemTable, fds=Fds.PER_REGION),
    # The spec's entry says u64; every implementation sends the 16-byte log
    # area and, with LOG_SHMFD, waits for a reply of unspecified layout (D10).
    _fe(R.SET_LOG_BASE, LogArea, Reply.ALWAYS_WITH_LOG_SHMFD, Raw, fds=Fds.OPTIONAL),
    _fe(R.SET_LOG_FD, Empty, fds=Fds.ONE),
    _fe(R.SET_VRING_NUM, VringState),
    _fe(R.SET_VRING_ADDR, VringAddress),
    _fe(R.SET_VRING_BASE, VringState),
    _fe(R.GET_VRING_BASE, VringState, Reply.ALWAYS, VringState),
    _fe(R.SET_VRING_KICK, VringFd, fds=Fds.ONE_UNLESS_NOFD),
    _fe(R.SET_VRING_CALL, VringFd, fds=Fds.ONE_UNLESS_NOFD),
    _fe(R.SET_VRING_ERR, VringFd, fds=Fds.ONE_UNLESS_NOFD),
    # GET/SET_PROTOCOL_FEATURES need bit 30 in GET_FEATURES (checked apart, FE-9).
    _fe(R.GET_PROTOCOL_FEATURES, Empty, Reply.ALWAYS),
    _fe(R.SET_PROTOCOL_FEATURES, U64),
    _fe(R.GET_QUEUE_NUM, Empty, Reply.ALWAYS, needs=PF.MQ, needs_rule="FE-15"),
    _fe(R.SET_VRING_ENABLE, VringState),                     # bit 30 (FE-17), checked apart
    _fe(R.SEND_RARP, U64, needs=PF.RARP, needs_rule="FE-18"),
    _fe(R.NET_SET_MTU, U64, needs=PF.NET_MTU, needs_rule="FE-19"),
    _fe(R.SET_BACKEND_REQ_FD, Empty, fds=Fds.ONE, needs=PF.BACKEND_REQ, needs_rule="FE-20"),
    _fe(R.IOTLB_MSG, IotlbMsg, Reply.ALWAYS),                # VIRTIO_F_IOMMU_PLATFORM (FE-21)
    _fe(R.SET_VRING_ENDIAN, VringState, needs=PF.CROSS_ENDIAN, needs_rule="FE-22"),
    _fe(R.GET_CONFIG, DeviceConfig, Reply.ALWAYS, DeviceConfig, needs=PF.CONFIG,
        needs_rule="spec: GET_CONFIG"),
    _fe(R.SET_CONFIG, DeviceConfig, needs=PF.CONFIG, needs_rule="spec: SET_CONFIG"),
    _fe(R.CREATE_CRYPTO_SESSION, Raw, Reply.ALWAYS, Raw, needs=PF.CRYPTO_SESSION,
        needs_rule="FE-23"),
    _fe(R.CLOSE_CRYPTO_SESSION, U64, needs=PF.CRYPTO_SESSION, needs_rule="FE-23"),
    _fe(R.POSTCOPY_ADVISE, Empty, Reply.ALWAYS, Empty, reply_fds=Fds.ONE, needs=PF.PAGEFAULT,
        needs_rule="FE-33"),
    _fe(R.POSTCOPY_LISTEN, Empty, needs=PF.PAGEFAULT, needs_rule="FE-33"),
    _fe(R.POSTCOPY_END, Empty, Reply.ALWAYS, needs=PF.PAGEFAULT, needs_rule="FE-33"),
    _fe(R.GET_INFLIGHT_FD, Inflight, Reply.ALWAYS, Inflight, reply_fds=Fds.OPTIONAL,
        needs=PF.INFLIGHT_SHMFD, needs_rule="FE-24"),
    _fe(R.SET_INFLIGHT_FD, Inflight, fds=Fds.ONE, needs=PF.INFLIGHT_SHMFD, needs_rule="FE-24"),
    _fe(R.GPU_SET_SOCKET, Empty, fds=Fds.ONE),
    _fe(R.RESET_DEVICE, Empty, needs=PF.RESET_DEVICE, needs_rule="FE-25"),
    _fe(R.VRING_KICK, VringState, needs=PF.INBAND_NOTIFICATIONS, needs_rule="FE-26"),
    _fe(R.GET_MAX_MEM_SLOTS, Empty, Reply.ALWAYS, needs=PF.CONFIGURE_MEM_SLOTS,
        needs_rule="FE-27"),
    _fe(R.ADD_MEM_REG, SingleMemRegion, fds=Fds.ONE, needs=PF.CONFIGURE_MEM_SLOTS,
        needs_rule="FE-27"),
    _fe(R.REM_MEM_REG, SingleMemRegion, needs=PF.CONFIGURE_MEM_SLOTS, needs_rule="FE-27"),
    _fe(R.SET_STATUS, U64, needs=PF.STATUS, needs_rule="FE-28"),
    _fe(R.GET_STATUS, Empty, Reply.ALWAYS, needs=PF.STATUS, needs_rule="FE-28"),
    _fe(R.GET_SHARED_OBJECT, Uuid, Reply.ALWAYS, reply_fds=Fds.OPTIONAL,
        needs=PF.SHARED_OBJECT, needs_rule="FE-29"),
    _fe(R.SET_DEVICE_STATE_FD, DeviceStateTransfer, Reply.ALWAYS, fds=Fds.ONE,
        reply_fds=Fds.OPTIONAL, needs=PF.DEVICE_STATE, needs_rule="FE-30"),
    _fe(R.CHECK_DEVICE_STATE, Empty, Reply.ALWAYS, needs=PF.DEVICE_STATE, needs_rule="FE-30"),
    _fe(R.GET_SHMEM_CONFIG, Empty, Reply.ALWAYS, Raw, needs=PF.SHMEM, needs_rule="FE-31"),
    _fe(R.GET_VRING_BASE_SKIP_DRAIN, VringState, Reply.ALWAYS, VringState,
        needs=PF.GET_VRING_BASE_SKIP_DRAIN, needs_rule="FE-32"),
]}

B = BackendReq
# Every back-end request also needs BACKEND_REQ (BE-81), and fds only go with
# BACKEND_SEND_FD (BE-83); the session checks both.
BACKEND_RULES = {rule.request: rule for rule in [
    _be(B.IOTLB_MSG, IotlbMsg),                              # IOMMU_PLATFORM (BE-85)
    _be(B.CONFIG_CHANGE_MSG, Empty, needs=PF.CONFIG, needs_rule="BE-79"),
    _be(B.VRING_HOST_NOTIFIER_MSG, VringArea, fds=Fds.OPTIONAL, needs=PF.HOST_NOTIFIER,
        needs_rule="BE-84"),
    _be(B.VRING_CALL, VringState, needs=PF.INBAND_NOTIFICATIONS, needs_rule="BE-68"),
    _be(B.VRING_ERR, VringState, needs=PF.INBAND_NOTIFICATIONS, needs_rule="BE-68"),
    _be(B.SHARED_OBJECT_ADD, Uuid, needs=PF.SHARED_OBJECT, needs_rule="BE-86"),
    _be(B.SHARED_OBJECT_REMOVE, Uuid, needs=PF.SHARED_OBJECT, needs_rule="BE-86"),
    _be(B.SHARED_OBJECT_LOOKUP, Uuid, Reply.ALWAYS, reply_fds=Fds.OPTIONAL,
        needs=PF.SHARED_OBJECT, needs_rule="BE-86"),
    _be(B.SHMEM_MAP, Raw, fds=Fds.ONE, needs=PF.SHMEM, needs_rule="BE-89"),
    _be(B.SHMEM_UNMAP, Raw, needs=PF.SHMEM, needs_rule="BE-89"),
]}


class Channel(enum.Enum):
    """The two sockets of a connection and whose requests each carries."""
    MAIN = ("main socket", FrontendReq, FRONTEND_RULES)
    BACKEND = ("back-end request channel", BackendReq, BACKEND_RULES)

    def __init__(self, title, requests, rules):
        self.title, self.requests, self.rules = title, requests, rules
        self._by_number = {int(r): r for r in requests}

    def request(self, number):
        """The request with this number on this channel, or None."""
        return self._by_number.get(number)


# Protocol features that only make sense with others (FE-11 to FE-13, BE-14).
PROTOCOL_FEATURE_NEEDS = {
    PF.INBAND_NOTIFICATIONS: ((PF.BACKEND_REQ, PF.REPLY_ACK), "FE-11"),
    PF.GET_VRING_BASE_SKIP_DRAIN: ((PF.GET_VRING_BASE_INFLIGHT, PF.INFLIGHT_SHMFD), "FE-12"),
    PF.GET_VRING_BASE_INFLIGHT: ((PF.INFLIGHT_SHMFD,), "FE-13"),
}


def protocol_feature_conflict(bits):
    """(feature, rule) for the first feature in bits whose partners are missing."""
    for feature, (partners, rule) in PROTOCOL_FEATURE_NEEDS.items():
        if bits & feature.mask and any(not bits & p.mask for p in partners):
            return feature, partners, rule
    return None


# --- ring states (the spec's "Ring states" section) -------------------------------
#
# A ring is stopped or started, and disabled or enabled, and starts out
# stopped and disabled (BE-45, BE-52). SET_VRING_KICK starts it (BE-46);
# GET_VRING_BASE stops it (BE-48). With VHOST_USER_F_PROTOCOL_FEATURES
# negotiated, SET_VRING_ENABLE enables it (BE-52, BE-55); without, the
# SET_FEATURES that leaves bit 30 out enables every ring at once (BE-53).
# The enable state may change while the ring is stopped and applies when it
# starts (BE-54).

# Requests that set up one ring, with the order the front-end keeps (FE-50):
# the memory table before any ring address, size and address before the kick.
RING_SETUP_NEEDS_MEM_TABLE = {FrontendReq.SET_VRING_ADDR, FrontendReq.SET_VRING_KICK}
