"""A hostile vhost-user front-end for tests: hand-built frames on a raw
AF_UNIX socket (struct-packed headers and payloads, fds as SCM_RIGHTS),
none of pyvmm's session code, so that it can send what a session would
refuse to. And a guest's memory and split ring laid out by hand, so that
descriptors can point anywhere.

    fe = RawFrontEnd.connect(path)
    fe.handshake()                              # features, protocol features, SET_OWNER
    assert fe.ack(SET_VRING_NUM, state(0, 64)) == 0
"""

import array
import fcntl
import mmap
import os
import select
import socket
import struct
import time

HEADER = struct.Struct("=III")                 # request, flags, size
VERSION, REPLY, NEED_REPLY = 0x1, 0x4, 0x8
U64 = struct.Struct("=Q")
STATE = struct.Struct("=II")                   # vhost_vring_state
ADDR = struct.Struct("=IIQQQQ")                # vhost_vring_addr
REGION = struct.Struct("=QQQQ")                # guest, size, user, mmap_offset
INFLIGHT = struct.Struct("=QQHH4x")
DESC = struct.Struct("<QIHH")

# Requests (vhost-user.rst), numbered by hand on purpose.
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_LOG_BASE, SET_LOG_FD, SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE = 6, 7, 8, 9, 10
GET_VRING_BASE, SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 11, 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
SET_BACKEND_REQ_FD, GET_CONFIG, SET_CONFIG = 21, 24, 25
GET_INFLIGHT_FD, SET_INFLIGHT_FD, RESET_DEVICE = 31, 32, 34
GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG, SET_STATUS, GET_STATUS = 36, 37, 38, 39, 40
NOFD = 0x100
# Protocol features: MQ, REPLY_ACK, BACKEND_REQ, CONFIG, INFLIGHT_SHMFD,
# CONFIGURE_MEM_SLOTS, STATUS (and RESET_DEVICE).
PROTOCOL = 1 << 0 | 1 << 3 | 1 << 5 | 1 << 9 | 1 << 12 | 1 << 13 | 1 << 15 | 1 << 16
VERSION_1, PROTOCOL_FEATURES_BIT = 1 << 32, 1 << 30
F_SEAL_FUTURE_WRITE = 0x10


def u64(value):
    return U64.pack(value)


def state(index, num):
    return STATE.pack(index, num)


def region(guest, size, user, offset=0):
    return REGION.pack(guest, size, user, offset)


def mem_table(*regions):
    return struct.pack("=II", len(regions), 0) + b"".join(regions)


def single(region_bytes):
    return u64(0) + region_bytes


class Closed(Exception):
    """The back-end closed the connection."""


class RawFrontEnd:
    def __init__(self, sock, timeout=5.0):
        self.sock = sock
        self.timeout = timeout

    @classmethod
    def connect(cls, path, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                return cls(sock, timeout)
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- sending ---------------------------------------------------------------------

    def send_raw(self, data, fds=()):
        """Bytes as they are, fds with the first of them."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                      array.array("i", fds).tobytes())] if fds else []
        self.sock.sendmsg([data], ancillary)

    def send(self, request, payload=b"", flags=VERSION, fds=(), size=None):
        """One frame; size: what the header says, if not the payload's length."""
        self.send_raw(HEADER.pack(request, flags, len(payload) if size is None else size)
                      + payload, fds)

    # --- receiving -------------------------------------------------------------------

    def _recv(self, n, deadline):
        data, fds = b"", []
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError(f"no reply within {self.timeout} s")
            chunk, ancillary, _, _ = self.sock.recvmsg(n - len(data), socket.CMSG_SPACE(64))
            for level, kind, raw in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", raw[:len(raw) - len(raw) % 4]))
            if not chunk:
                raise Closed("the back-end closed the connection")
            data += chunk
        return data, fds

    def reply(self):
        """(request, flags, payload, fds) of the next frame from the back-end."""
        deadline = time.monotonic() + self.timeout
        header, fds = self._recv(HEADER.size, deadline)
        request, flags, size = HEADER.unpack(header)
        payload, more = self._recv(size, deadline) if size else (b"", [])
        return request, flags, payload, fds + more

    def ask(self, request, payload=b"", flags=VERSION, fds=()):
        """Send and read the reply, checked to be the reply to request."""
        self.send(request, payload, flags, fds)
        got, rflags, answer, rfds = self.reply()
        assert (got, rflags) == (request, VERSION | REPLY), (got, rflags, answer)
        return answer, rfds

    def ack(self, request, payload=b"", fds=()):
        """A request with NEED_REPLY; its ack (0: done)."""
        answer, rfds = self.ask(request, payload, VERSION | NEED_REPLY, fds)
        assert not rfds and len(answer) == 8, answer
        return U64.unpack(answer)[0]

    def u64(self, request):
        return U64.unpack(self.ask(request)[0])[0]

    def closed(self, timeout=2.0):
        """Whether the back-end closes the connection within timeout (reading
        and dropping anything it sends first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not select.select([self.sock], [], [], deadline - time.monotonic())[0]:
                return False
            try:
                if not self.sock.recv(4096):
                    return True
            except ConnectionResetError:
                return True
        return False

    # --- the usual start -----------------------------------------------------------------

    def handshake(self, protocol=PROTOCOL, owner=True):
        """GET_FEATURES, GET/SET_PROTOCOL_FEATURES (what is asked, of what is
        offered), SET_OWNER; the features offered."""
        features = self.u64(GET_FEATURES)
        offered = self.u64(GET_PROTOCOL_FEATURES)
        self.send(SET_PROTOCOL_FEATURES, u64(offered & protocol))
        if owner:
            self.send(SET_OWNER)
        return features


def eventfd(value=0):
    return os.eventfd(value, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def memfd(size, seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, sealing=True):
    """A memfd of size bytes: sealable (and sealed with seals), or not at all."""
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0))
    os.ftruncate(fd, size)
    if sealing and seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


class Guest:
    """Guest RAM (a sealed memfd, guest address 0, user address USER) with a
    split ring at RING; descriptors written by hand."""

    USER = 0x7F00_0000_0000
    RING = 0x1000
    BUF = 0x10000

    def __init__(self, size=1 << 20, num=8, seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW):
        self.size, self.num = size, num
        self.fd = memfd(size, seals)
        self.map = mmap.mmap(self.fd, size)
        self.desc = self.RING
        self.avail = self.desc + 16 * num
        self.used = (self.avail + 6 + 2 * num + 3) & ~3
        self.avail_idx = 0

    def close(self):
        self.map.close()
        os.close(self.fd)

    def table(self):
        """SET_MEM_TABLE's payload for all of it (its fd goes with it)."""
        return mem_table(region(0, self.size, self.USER))

    def vring_addr(self, index=0):
        return ADDR.pack(index, 0, self.USER + self.desc, self.USER + self.used,
                         self.USER + self.avail, 0)

    def write_desc(self, index, addr, length, flags=0, nxt=0, table=None):
        at = (self.desc if table is None else table) + 16 * index
        self.map[at:at + 16] = DESC.pack(addr, length, flags, nxt)

    def make_available(self, head):
        slot = self.avail + 4 + 2 * (self.avail_idx % self.num)
        self.map[slot:slot + 2] = struct.pack("<H", head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.map[self.avail + 2:self.avail + 4] = struct.pack("<H", self.avail_idx)

    def used_idx(self):
        return struct.unpack_from("<H", self.map, self.used + 2)[0]

    def wait_used(self, idx, timeout=5.0):
        """Whether the used index reaches idx within timeout."""
        deadline = time.monotonic() + timeout
        while self.used_idx() != idx and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.used_idx() == idx

    def set_avail_idx(self, value):
        self.map[self.avail + 2:self.avail + 4] = struct.pack("<H", value & 0xFFFF)

    def start(self, fe, index=0, kick=None, call=None, err=None, enable=True):
        """Memory table, then ring index: NUM, BASE, ADDR, CALL, ERR, KICK, ENABLE,
        each acked (fds given are sent; the caller keeps its copies)."""
        assert fe.ack(SET_MEM_TABLE, self.table(), fds=(self.fd,)) == 0
        for request, payload in ((SET_VRING_NUM, state(index, self.num)),
                                 (SET_VRING_BASE, state(index, 0)),
                                 (SET_VRING_ADDR, self.vring_addr(index))):
            assert fe.ack(request, payload) == 0
        for request, fd in ((SET_VRING_CALL, call), (SET_VRING_ERR, err),
                            (SET_VRING_KICK, kick)):
            word = index | (NOFD if fd is None else 0)
            assert fe.ack(request, u64(word), fds=() if fd is None else (fd,)) == 0
        if enable:
            assert fe.ack(SET_VRING_ENABLE, state(index, 1)) == 0


def wait_readable(fd, timeout=5.0):
    return bool(select.select([fd], [], [], timeout)[0])


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def _status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_kib(pid):
    return _status_kib(pid, "VmRSS")


def peak_rss_kib(pid):
    """VmHWM: the most resident memory the process has had."""
    return _status_kib(pid, "VmHWM")


class Backend:
    """`python -m pyvmm backend DEVICE --socket-path PATH OPTIONS` in directory,
    its stderr in a file (a pipe nobody reads could fill up and stall it)."""

    def __init__(self, directory, device, *options):
        import subprocess
        import sys
        self.path = os.path.join(str(directory), f"{device}.sock")
        self.log_path = os.path.join(str(directory), f"{device}.log")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pyvmm", "backend", device, "--socket-path", self.path,
                 *options], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.path):
            assert self.proc.poll() is None, f"the back-end died at start: {self.log()}"
            assert time.monotonic() < deadline, "the back-end did not start"
            time.sleep(0.02)
        self.pid = self.proc.pid

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def connect(self, timeout=5.0):
        return RawFrontEnd.connect(self.path, timeout)

    def alive(self):
        return self.proc.poll() is None

    def answers(self, timeout=5.0):
        """Whether a fresh connection's GET_FEATURES is answered within timeout
        (the back-end serves one front-end at a time: close the others first)."""
        try:
            with self.connect(timeout) as fe:
                fe.send(GET_FEATURES)
                request, flags, payload, fds = fe.reply()
                for fd in fds:
                    os.close(fd)
                return (request, flags, len(payload)) == (GET_FEATURES, VERSION | REPLY, 8)
        except (OSError, TimeoutError, Closed):
            return False

    def fds(self):
        return fd_count(self.pid)

    def settled_fds(self, expected, timeout=3.0):
        """Its fd count once it reaches expected (a closed connection takes a moment)."""
        deadline = time.monotonic() + timeout
        while (count := self.fds()) != expected and time.monotonic() < deadline:
            time.sleep(0.002)
        return count

    def cpu_seconds(self):
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        from pyvmm.sys.process import stop
        return stop(self.proc, grace=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
