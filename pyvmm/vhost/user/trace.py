"""One line per vhost-user message, decoded, for people (`pyvmm run --trace vhost-user`).

    virtio-blk0 -> GET_FEATURES
    virtio-blk0 <- reply to GET_FEATURES: features=0x175007e46 (SIZE_MAX|SEG_MAX|...)
    virtio-blk0 -> SET_VRING_ADDR [NEED_REPLY] index=0 desc=0x7f3e...
    virtio-blk0 -> SET_VRING_KICK [NEED_REPLY] index=0 (fd 1)

"->" is the front-end (pyvmm) to the back-end, "<-" the other way. Feature
masks are spelled out bit by bit, sizes and addresses given in the units
the spec uses, so that the trace reads without the spec open.
"""

import threading

from pyvmm.vhost.user.messages import (
    U64, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, BackendReq, DeviceConfig, Empty,
    FrontendReq, MemTable, SingleMemRegion, VringAddress, VringFd, VringState,
    protocol_feature_names)
from pyvmm.vhost.user.rules import BACKEND_RULES, FRONTEND_RULES, Reply

R = FrontendReq

# Device-independent feature bits (virtio 1.x section 6), and vhost's own.
COMMON_FEATURE_NAMES = {
    24: "NOTIFY_ON_EMPTY", 27: "ANY_LAYOUT", 28: "RING_INDIRECT_DESC", 29: "RING_EVENT_IDX",
    VHOST_F_LOG_ALL: "LOG_ALL", VHOST_USER_F_PROTOCOL_FEATURES: "PROTOCOL_FEATURES",
    32: "VERSION_1", 33: "ACCESS_PLATFORM", 34: "RING_PACKED", 35: "IN_ORDER",
    36: "ORDER_PLATFORM", 37: "SR_IOV", 38: "NOTIFICATION_DATA", 39: "NOTIF_CONFIG_DATA",
    40: "RING_RESET",
}


def feature_names(bits, device_names=None):
    names = []
    for n in range(64):
        if bits >> n & 1:
            names.append((device_names or {}).get(n) or COMMON_FEATURE_NAMES.get(n) or f"bit{n}")
    return "|".join(names) or "none"


def _size(n):
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def describe_payload(request, payload, is_reply, device_names=None):
    """The payload's fields by name, as the spec calls them."""
    if isinstance(payload, Empty):
        return ""
    if isinstance(payload, U64):
        value = payload.value
        if is_reply and _answered_by_ack(request):
            return f"ack={value} ({'ok' if value == 0 else 'refused'})"
        if request in (R.GET_FEATURES, R.SET_FEATURES):
            return f"features={value:#x} ({feature_names(value, device_names)})"
        if request in (R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES):
            return f"protocol features={value:#x} ({protocol_feature_names(value)})"
        if request in (R.GET_QUEUE_NUM,):
            return f"queues={value}"
        if request is R.GET_MAX_MEM_SLOTS:
            return f"memory slots={value}"
        if request in (R.GET_STATUS, R.SET_STATUS):
            return f"status={value:#x}"
        return f"value={value:#x}"
    if isinstance(payload, VringState):
        field = {R.SET_VRING_NUM: "size", R.SET_VRING_BASE: "base", R.GET_VRING_BASE: "base",
                 R.SET_VRING_ENABLE: "enable"}.get(request, "num")
        if request is R.GET_VRING_BASE and not is_reply:
            return f"index={payload.index}"
        return f"index={payload.index} {field}={payload.num}"
    if isinstance(payload, VringFd):
        return f"index={payload.index}" + (" NOFD (no fd: none wanted)" if payload.no_fd else "")
    if isinstance(payload, VringAddress):
        return (f"index={payload.index} flags={payload.flags:#x} desc={payload.desc:#x} "
                f"avail={payload.avail:#x} used={payload.used:#x} log={payload.log:#x}")
    if isinstance(payload, MemTable):
        regions = ", ".join(_region(r) for r in payload.regions)
        return f"{len(payload.regions)} region(s): {regions}"
    if isinstance(payload, SingleMemRegion):
        return _region(payload.region)
    if isinstance(payload, DeviceConfig):
        data = payload.data[:16].hex(" ") + (" ..." if len(payload.data) > 16 else "")
        return (f"offset={payload.offset} size={len(payload.data)} flags={payload.flags}"
                + (f" data={data}" if any(payload.data) else ""))
    fields = ", ".join(f"{k}={v:#x}" if isinstance(v, int) else f"{k}={v!r}"
                       for k, v in vars(payload).items())
    return fields


def _answered_by_ack(request):
    rules = BACKEND_RULES if isinstance(request, BackendReq) else FRONTEND_RULES
    return rules[request].reply is Reply.ACK


def _region(r):
    return (f"[guest {r.guest_addr:#x} size {_size(r.size)} user {r.user_addr:#x} "
            f"fd offset {r.mmap_offset:#x}]")


def describe(direction, message, device_names=None):
    """One line for a message going in direction "->" or "<-"."""
    request = message.request
    prefix = "BACKEND_" if isinstance(request, BackendReq) else ""
    name = f"{prefix}{request.name}"
    flags = " [NEED_REPLY]" if message.need_reply else ""
    head = f"reply to {name}:" if message.is_reply else f"{name}{flags}"
    body = describe_payload(request, message.payload, message.is_reply, device_names)
    fds = f" ({len(message.fds)} fd{'s' if len(message.fds) != 1 else ''})" if message.fds else ""
    return f"{direction} {head}{' ' + body if body else ''}{fds}"


class Tracer:
    """Writes one line per message to a text stream, each prefixed with the device."""

    def __init__(self, stream):
        self.stream = stream
        self._lock = threading.Lock()

    def for_device(self, name, device_names=None):
        def trace(direction, message):
            line = f"{name} {describe(direction, message, device_names)}\n"
            with self._lock:
                self.stream.write(line)
                self.stream.flush()
        return trace
