"""The vhost-user messages: request numbers, header flags, feature bits, payloads.

Names and numbers follow QEMU's docs/interop/vhost-user.rst ("the spec"):
VHOST_USER_GET_FEATURES is FrontendReq.GET_FEATURES here, and the back-end's
VHOST_USER_BACKEND_CONFIG_CHANGE_MSG is BackendReq.CONFIG_CHANGE_MSG. Every
message is a 12-byte header (request u32, flags u32, size u32, host byte
order) and `size` bytes of payload; file descriptors travel beside it as
SCM_RIGHTS ancillary data.

Each payload layout is a frozen dataclass with pack() and a classmethod
unpack(data) that refuses a wrong size with PayloadError. Nothing here
knows which payload goes with which request, or when a message may be
sent: that is rules.py.
"""

import enum
import functools
import struct
from dataclasses import dataclass, fields

# --- the header ---------------------------------------------------------------

HEADER = struct.Struct("=III")          # request, flags, size
HEADER_SIZE = HEADER.size               # 12

VHOST_USER_VERSION = 0x1                # flags bits 0-1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x1 << 2        # this message is a reply
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3   # the sender wants a reply (REPLY_ACK)
KNOWN_FLAGS = VHOST_USER_VERSION_MASK | VHOST_USER_REPLY_MASK | VHOST_USER_NEED_REPLY_MASK

# Largest payload accepted. The spec sets none; the largest defined payload is
# GET_SHMEM_CONFIG's 2056 bytes, and rust-vmm's back-ends refuse anything over
# 4 KiB. A size field above this is a broken or hostile peer, not a message.
MAX_PAYLOAD_SIZE = 0x1000
# SCM_RIGHTS fds accepted with one message: SET_MEM_TABLE's 8 regions at most.
MAX_FDS = 8
# Regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_MEM_TABLE_REGIONS = 8
# Config space moved by GET_CONFIG / SET_CONFIG (VHOST_USER_MAX_CONFIG_SIZE).
MAX_CONFIG_SIZE = 256

# Feature bit 30 of GET/SET_FEATURES: the back-end speaks protocol features.
VHOST_USER_F_PROTOCOL_FEATURES = 30
# Feature bit 26: the back-end can log the pages it writes (migration).
VHOST_F_LOG_ALL = 26

# Kick/call/err payload: bits 0-7 the queue index, bit 8 "no fd attached".
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8

# SET_VRING_ADDR flags: log used-ring writes at log_guest_addr.
VHOST_VRING_F_LOG = 0x1

# GET_CONFIG / SET_CONFIG flags
VHOST_SET_CONFIG_TYPE_FRONTEND = 0    # a driver's write
VHOST_SET_CONFIG_TYPE_MIGRATION = 1


class FrontendReq(enum.IntEnum):
    """Requests from the front-end on the main socket (VHOST_USER_*)."""
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4               # deprecated
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21       # SET_SLAVE_REQ_FD in older copies
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44
    GET_VRING_BASE_SKIP_DRAIN = 45  # only in the newest copy of the spec

    @property
    def spec_name(self):
        return f"VHOST_USER_{self.name}"


class BackendReq(enum.IntEnum):
    """Requests from the back-end on the socket given by SET_BACKEND_REQ_FD."""
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10

    @property
    def spec_name(self):
        return f"VHOST_USER_BACKEND_{self.name}"


class ProtocolFeature(enum.IntEnum):
    """Bits of GET/SET_PROTOCOL_FEATURES (VHOST_USER_PROTOCOL_F_*)."""
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5               # SLAVE_REQ in older copies
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    GET_VRING_BASE_INFLIGHT = 20
    GPA_ADDRESSES = 21
    SHMEM = 22
    GET_VRING_BASE_SKIP_DRAIN = 23

    @property
    def mask(self):
        return 1 << self.value


def methods_by_request(cls, prefix, requests=FrontendReq):
    """{request: method} of cls's methods named prefix + a request's name in
    lower case (_set_features for SET_FEATURES, say): looked up once, not by
    building the name for every message."""
    return {r: m for r in requests if (m := getattr(cls, prefix + r.name.lower(), None))}


def protocol_feature_names(bits):
    """'MQ|REPLY_ACK|...' for a protocol feature mask; unknown bits as numbers."""
    names = []
    for n in range(64):
        if bits >> n & 1:
            try:
                names.append(ProtocolFeature(n).name)
            except ValueError:
                names.append(f"bit{n}")
    return "|".join(names) or "none"


def flag_names(flags):
    """'VERSION1|REPLY|NEED_REPLY' for a header's flags."""
    names = [f"VERSION{flags & VHOST_USER_VERSION_MASK}"]
    if flags & VHOST_USER_REPLY_MASK:
        names.append("REPLY")
    if flags & VHOST_USER_NEED_REPLY_MASK:
        names.append("NEED_REPLY")
    if flags & ~KNOWN_FLAGS:
        names.append(f"unknown {flags & ~KNOWN_FLAGS:#x}")
    return "|".join(names)


# --- payloads -------------------------------------------------------------------

class PayloadError(ValueError):
    """A payload that does not have the layout its message needs."""


def _exact(cls, data, size):
    if len(data) != size:
        raise PayloadError(f"{cls.__name__} is {size} bytes, got {len(data)}")


@functools.cache
def _field_names(cls):
    """A dataclass's field names in order (dataclasses.fields, once per class)."""
    return tuple(f.name for f in fields(cls))


class _Struct:
    """A payload that is one fixed C struct: LAYOUT packs the dataclass's fields
    in their order (padding included in LAYOUT)."""

    def pack(self):
        return self.LAYOUT.pack(*[getattr(self, name) for name in _field_names(type(self))])

    @classmethod
    def unpack(cls, data):
        _exact(cls, data, cls.LAYOUT.size)
        return cls(*cls.LAYOUT.unpack(data))


@dataclass(frozen=True)
class Empty:
    """No payload (size 0)."""
    SIZE = 0

    def pack(self):
        return b""

    @classmethod
    def unpack(cls, data):
        _exact(cls, data, 0)
        return cls()


@dataclass(frozen=True)
class U64(_Struct):
    """A 64-bit number: features, a status, an ack (0 = success), a queue count."""
    value: int
    LAYOUT = struct.Struct("=Q")

    def pack(self):              # (most replies are one: no field lookup)
        return self.LAYOUT.pack(self.value)


@dataclass(frozen=True)
class VringState(_Struct):
    """struct vhost_vring_state: a queue index and a number (size, base, enable)."""
    index: int
    num: int
    LAYOUT = struct.Struct("=II")


@dataclass(frozen=True)
class VringFd:
    """The u64 of SET_VRING_KICK/CALL/ERR: queue index in bits 0-7, bit 8 set
    when no fd comes with it (a polled ring, or no interrupts)."""
    index: int
    no_fd: bool = False

    def pack(self):
        return U64.LAYOUT.pack(self.index | (VHOST_USER_VRING_NOFD_MASK if self.no_fd else 0))

    @classmethod
    def unpack(cls, data):
        value = U64.unpack(data).value
        if value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
            raise PayloadError(f"vring fd word {value:#x} has bits other than the index "
                               f"and NOFD set")
        return cls(value & VHOST_USER_VRING_IDX_MASK, bool(value & VHOST_USER_VRING_NOFD_MASK))


@dataclass(frozen=True)
class VringAddress(_Struct):
    """struct vhost_vring_addr: where a ring is, as front-end (user) addresses."""
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int = 0
    LAYOUT = struct.Struct("=IIQQQQ")


@dataclass(frozen=True)
class MemoryRegion(_Struct):
    """One region of guest memory: where the guest sees it, how big, where the
    front-end has it mapped (an opaque value for the back-end), and where it
    starts in the fd that comes with it."""
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    LAYOUT = struct.Struct("=QQQQ")


@dataclass(frozen=True)
class MemTable:
    """SET_MEM_TABLE: num_regions u32, padding u32, then the regions (one fd each)."""
    regions: tuple
    HEAD = struct.Struct("=II")

    def pack(self):
        return self.HEAD.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data):
        if len(data) < cls.HEAD.size:
            raise PayloadError(f"memory table of {len(data)} bytes has no header")
        count, _ = cls.HEAD.unpack_from(data)
        if count > MAX_MEM_TABLE_REGIONS:
            raise PayloadError(f"memory table with {count} regions (at most "
                               f"{MAX_MEM_TABLE_REGIONS})")
        size = MemoryRegion.LAYOUT.size
        _exact(cls, data, cls.HEAD.size + count * size)
        return cls(tuple(MemoryRegion.unpack(data[cls.HEAD.size + i * size:
                                                  cls.HEAD.size + (i + 1) * size])
                         for i in range(count)))


@dataclass(frozen=True)
class SingleMemRegion:
    """ADD_MEM_REG / REM_MEM_REG: padding u64, then one region."""
    region: MemoryRegion
    PAD = struct.Struct("=Q")

    def pack(self):
        return self.PAD.pack(0) + self.region.pack()

    @classmethod
    def unpack(cls, data):
        _exact(cls, data, cls.PAD.size + MemoryRegion.LAYOUT.size)
        return cls(MemoryRegion.unpack(data[cls.PAD.size:]))


@dataclass(frozen=True)
class LogArea(_Struct):
    """SET_LOG_BASE: the dirty log's size and where it starts in its fd."""
    mmap_size: int
    mmap_offset: int
    LAYOUT = struct.Struct("=QQ")


@dataclass(frozen=True)
class Inflight(_Struct):
    """GET/SET_INFLIGHT_FD: the shared area that tracks requests in flight.
    (20 bytes of fields, 24 on the wire: the C struct is not packed.)"""
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    LAYOUT = struct.Struct("=QQHH4x")


@dataclass(frozen=True)
class DeviceConfig:
    """GET_CONFIG / SET_CONFIG: a piece of the virtio config space."""
    offset: int
    flags: int
    data: bytes
    HEAD = struct.Struct("=III")        # offset, size, flags

    def pack(self):
        return self.HEAD.pack(self.offset, len(self.data), self.flags) + bytes(self.data)

    @classmethod
    def unpack(cls, data):
        if len(data) < cls.HEAD.size:
            raise PayloadError(f"config payload of {len(data)} bytes has no header")
        offset, size, flags = cls.HEAD.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise PayloadError(f"config of {size} bytes (at most {MAX_CONFIG_SIZE})")
        _exact(cls, data, cls.HEAD.size + size)
        return cls(offset, flags, bytes(data[cls.HEAD.size:]))


@dataclass(frozen=True)
class VringArea:
    """BACKEND_VRING_HOST_NOTIFIER_MSG: index and NOFD as in VringFd, then an
    area of the fd to map as the queue's notify register."""
    index: int
    no_fd: bool
    size: int
    offset: int
    LAYOUT = struct.Struct("=QQQ")

    def pack(self):
        return self.LAYOUT.pack(self.index | (VHOST_USER_VRING_NOFD_MASK if self.no_fd else 0),
                                self.size, self.offset)

    @classmethod
    def unpack(cls, data):
        _exact(cls, data, cls.LAYOUT.size)
        word, size, offset = cls.LAYOUT.unpack(data)
        return cls(word & VHOST_USER_VRING_IDX_MASK, bool(word & VHOST_USER_VRING_NOFD_MASK),
                   size, offset)


@dataclass(frozen=True)
class IotlbMsg(_Struct):
    """struct vhost_iotlb_msg (26 bytes of fields, 32 with the C padding)."""
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int
    LAYOUT = struct.Struct("=QQQBB6x")


@dataclass(frozen=True)
class DeviceStateTransfer(_Struct):
    """SET_DEVICE_STATE_FD: direction (0 save, 1 load) and phase (0 stopped)."""
    direction: int
    phase: int
    LAYOUT = struct.Struct("=II")


@dataclass(frozen=True)
class Uuid:
    """A shared object's 16-byte UUID."""
    value: bytes

    def pack(self):
        return bytes(self.value)

    @classmethod
    def unpack(cls, data):
        _exact(cls, data, 16)
        return cls(bytes(data))


@dataclass(frozen=True)
class Raw:
    """A payload pyvmm carries but does not interpret (crypto sessions, shmem
    maps, a SET_LOG_BASE reply whose layout the spec leaves open)."""
    data: bytes

    def pack(self):
        return bytes(self.data)

    @classmethod
    def unpack(cls, data):
        return cls(bytes(data))


# --- a whole message --------------------------------------------------------------

@dataclass(frozen=True, init=False)
class Message:
    """One message: its request (a FrontendReq or BackendReq), the header
    flags, the decoded payload, and the fds that came with it."""
    request: enum.IntEnum
    flags: int
    payload: object
    fds: tuple = ()

    def __init__(self, request, flags, payload, fds=()):
        # Two are made for every message answered (the request and its
        # reply): filling __dict__ takes 0.2 us where a frozen dataclass's
        # own __init__ (object.__setattr__ per field) takes 0.6.
        d = self.__dict__
        d["request"], d["flags"], d["payload"], d["fds"] = request, flags, payload, fds

    @property
    def is_reply(self):
        return bool(self.flags & VHOST_USER_REPLY_MASK)

    @property
    def need_reply(self):
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)
