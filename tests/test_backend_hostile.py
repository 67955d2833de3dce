"""A hostile front-end against pyvmm's three back-end programs (issue 19's
acceptance): `pyvmm backend rng`, `blk` and `vsock`, each in its own
process, and for each case a raw AF_UNIX connection sending hand-built
frames (tests/hostile.py; none of pyvmm's session code): bad framing, every
request with garbage payloads, out-of-range indexes, fds of every wrong
kind, memory tables that cannot be mapped, rings whose descriptors point
anywhere, eventfds that cannot be written, and so on, the cases generated
from tables.

After each case the program is alive and a fresh connection's GET_FEATURES
is answered within a deadline (a request with NEED_REPLY is answered or the
connection closed, never left hanging); at the end its fd count is what it
was after a warm-up session and its RSS within a few MiB of it, and its
stderr is one line per message, no traceback. The test prints the counts."""

import fcntl
import os
import random
import select
import socket
import struct
import time

import pytest
from hostile import (
    ADD_MEM_REG, ADDR, GET_FEATURES, GET_VRING_BASE, HEADER, INFLIGHT, NEED_REPLY, NOFD,
    PROTOCOL, REM_MEM_REG, RESET_DEVICE, SET_BACKEND_REQ_FD, SET_FEATURES, SET_INFLIGHT_FD,
    SET_LOG_BASE, SET_LOG_FD, SET_MEM_TABLE, SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_CALL,
    SET_VRING_ENABLE, SET_VRING_ERR, SET_VRING_KICK, SET_VRING_NUM, U64, VERSION, Backend,
    Closed, Guest, eventfd, mem_table, memfd, region, rss_kib, single, state, u64)

REQUESTS = range(1, 46)               # every front-end request of the spec
GPU_SET_SOCKET, SET_DEVICE_STATE_FD = 33, 42
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
QUEUES = {"rng": 1, "blk": 1, "vsock": 3}
DATA_QUEUE = {"rng": 0, "blk": 0, "vsock": 1}          # where requests come in (vsock: tx)
DEADLINE = 3.0                                         # for any answer
RSS_MARGIN_KIB = 8 << 10


# --- talking to the program ---------------------------------------------------------------------

def through_barrier(fe, request=None, timeout=DEADLINE):
    """After what was sent, a GET_FEATURES as a barrier: read up to its reply
    (fds closed) or the connection's close; silence is an AssertionError.
    Returns the ack of request among what came, None if none (a request's
    ack can depend on it: SET_PROTOCOL_FEATURES can turn REPLY_ACK off)."""
    fe.timeout = timeout
    ack = None
    try:
        fe.send(GET_FEATURES)
        barriers = 2 if request == GET_FEATURES else 1
        while barriers:
            got, _, answer, fds = fe.reply()
            for fd in fds:
                os.close(fd)
            if got == GET_FEATURES:
                barriers -= 1
            elif got == request and len(answer) == 8:
                ack = U64.unpack(answer)[0]
    except (Closed, BrokenPipeError, ConnectionResetError):
        pass
    except TimeoutError:
        raise AssertionError(f"request {request}: neither answered nor closed") from None
    return ack


def negotiated(backend, owner=True):
    fe = backend.connect(DEADLINE)
    fe.handshake(PROTOCOL, owner)
    return fe


def ask(backend, request, payload=b"", fds=(), owner=True, flags=VERSION | NEED_REPLY,
        then=None, before=None):
    """One request on a negotiated connection, answered or refused or the
    connection closed (through_barrier); its ack, None if none. before(fe)
    runs first, then(fe) before the connection closes."""
    with negotiated(backend, owner) as fe:
        if before:
            before(fe)
        try:
            fe.send(request, payload, flags, fds)
        except (BrokenPipeError, ConnectionResetError):
            return None
        ack = through_barrier(fe, request)
        if then:
            then(fe)
        return ack


def idle(backend, seconds=0.1):
    """The back-end uses (almost) no CPU for that long: nothing spins."""
    cpu = backend.cpu_seconds()
    time.sleep(seconds)
    assert backend.cpu_seconds() - cpu <= seconds / 2, "the back-end is busy doing nothing"


# --- fds of every kind --------------------------------------------------------------------------

def fd_kinds(tmp):
    """(name, make): make() returns a new fd of that kind, the case closes it."""
    def pipe_end(which):
        r, w = os.pipe()
        os.close(w if which == 0 else r)
        return r if which == 0 else w

    def full_pipe():
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            while True:
                os.write(w, bytes(65536))
        except BlockingIOError:
            pass
        os.close(r)
        return w

    def socket_at_eof(kind):
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        a.close()
        return b.detach()

    def saturated():
        fd = os.eventfd(0)
        os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)
        return fd

    def regular():
        return os.open(tmp / "regular", os.O_RDWR | os.O_CREAT, 0o600)

    def epoll():
        e = select.epoll()
        fd = os.dup(e.fileno())
        e.close()
        return fd

    return [("a pipe at EOF", lambda: pipe_end(0)), ("a pipe's write end", lambda: pipe_end(1)),
            ("a full pipe", full_pipe), ("a regular file", regular),
            ("a directory", lambda: os.open(tmp, os.O_RDONLY)),
            ("a stream socket at EOF", lambda: socket_at_eof(socket.SOCK_STREAM)),
            ("a datagram socket", lambda: socket_at_eof(socket.SOCK_DGRAM)),
            ("a UDP socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).detach()),
            ("/dev/null", lambda: os.open("/dev/null", os.O_RDWR)),
            ("/dev/zero", lambda: os.open("/dev/zero", os.O_RDWR)),
            ("an eventfd", eventfd), ("a saturated blocking eventfd", saturated),
            ("an epoll fd", epoll),
            ("a memfd that cannot be sealed", lambda: memfd(1 << 20, sealing=False)),
            ("a memfd of one page", lambda: memfd(4096)),
            ("a write-sealed memfd", lambda: memfd(1 << 20, fcntl.F_SEAL_WRITE))]


# What each fd-taking request carries beside its fd.
WITH_FD = [(SET_MEM_TABLE, mem_table(region(0, 1 << 20, 0x7F00_0000_0000))),
           (ADD_MEM_REG, single(region(0, 1 << 20, 0x7F00_0000_0000))),
           (REM_MEM_REG, single(region(0, 1 << 20, 0x7F00_0000_0000))),
           (SET_VRING_KICK, u64(0)), (SET_VRING_CALL, u64(0)), (SET_VRING_ERR, u64(0)),
           (SET_BACKEND_REQ_FD, b""), (SET_INFLIGHT_FD, INFLIGHT.pack(4096, 0, 1, 64)),
           (SET_LOG_BASE, struct.pack("=QQ", 4096, 0)), (SET_LOG_FD, b""),
           (GPU_SET_SOCKET, b""), (SET_DEVICE_STATE_FD, struct.pack("=II", 0, 0))]


# --- the cases ------------------------------------------------------------------------------------

def framing_cases(backend):
    """Frames broken as frames: the connection may be closed, nothing else."""
    def raw(data, fds_count=0, then=None, whole=True):
        """whole: data is whole frames, to be answered or refused; else the
        connection closes after it (a frame cut short)."""
        def case():
            with backend.connect(DEADLINE) as fe:
                fds = [eventfd() for _ in range(fds_count)]
                try:
                    fe.send_raw(data, fds)
                    if then:
                        fe.send_raw(*then)
                except OSError:
                    pass
                finally:
                    for fd in fds:
                        os.close(fd)
                if whole:
                    through_barrier(fe)
        return case

    header = HEADER.pack(GET_FEATURES, VERSION, 0)
    for n in range(1, HEADER.size):
        yield f"a header cut after {n} bytes", raw(header[:n], whole=False)
    for flags in (0, 2, 3, VERSION | 0x4, VERSION | 0x10, VERSION | 0x8000_0000, 0xFFFF_FFFF):
        yield f"flags {flags:#x}", raw(HEADER.pack(GET_FEATURES, flags, 0))
    for flags in (2, VERSION | 0x10):                  # (the fds are the back-end's to close)
        yield f"flags {flags:#x} on a whole SET_VRING_CALL with 2 fds", raw(
            HEADER.pack(SET_VRING_CALL, flags, 8) + bytes(8), fds_count=2)
    for size in (1, 8, 0x1001, 0x10_0000, 0xFFFF_FFFF):
        yield f"GET_FEATURES announcing {size} bytes, none sent", raw(
            HEADER.pack(GET_FEATURES, VERSION, size), whole=False)
    for request in (0, 46, 100, 1000, 0xFFFF_FFFF):
        yield f"unknown request {request}", raw(HEADER.pack(request, VERSION | NEED_REPLY, 0))
    for count in (1, 8, 9, 64, 250):
        yield f"GET_FEATURES with {count} fds", raw(header, fds_count=count)
    yield "fds in the middle of a payload", raw(
        HEADER.pack(SET_FEATURES, VERSION, 8) + bytes(4), then=(bytes(4), [eventfd_kept()]),
        whole=False)
    yield "a payload longer than announced", raw(HEADER.pack(GET_FEATURES, VERSION, 0) + b"x" * 9,
                                                 whole=False)
    yield "two requests in one write", raw(header * 2)
    yield "a thousand requests in one write", raw(header * 1000)


def garbage_cases(backend):
    """Every request, with payloads of every wrong size and a few right-sized
    ones full of nonsense, NEED_REPLY set, after the handshake and before it."""
    rnd = random.Random(19)
    payloads = [b"", b"\0", bytes(8), b"\xff" * 8, bytes(24), b"\xff" * 40,
                bytes(rnd.getrandbits(8) for _ in range(40)), bytes(4096)]
    for request in REQUESTS:
        for payload in payloads:
            yield (f"request {request} with {len(payload)} bytes "
                   f"({payload[:1].hex() or 'empty'})"), \
                lambda r=request, p=payload: ask(backend, r, p)
        yield f"request {request} before SET_OWNER", \
            lambda r=request: ask(backend, r, bytes(8), owner=False)


RING_FDS = (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR)


def wrong_fd_cases(backend, tmp):
    """Each fd-taking request with every kind of fd: only an eventfd is a ring's
    fd (and the back-end must then not spin); only a sealed or sealable memfd
    is memory; only a Unix stream socket is the back-end channel."""
    # What the daemon checks must be refused with an answer (not by hanging
    # up), but for the kinds it may take.
    takes = {r: ("an eventfd", "a saturated blocking eventfd") for r in RING_FDS}
    takes[SET_MEM_TABLE] = takes[ADD_MEM_REG] = ()
    takes[SET_BACKEND_REQ_FD] = ("a stream socket at EOF",)
    for request, payload in WITH_FD:
        for name, make in fd_kinds(tmp):
            def case(request=request, payload=payload, make=make, name=name):
                fd = make()
                try:
                    ring = request in RING_FDS
                    ack = ask(backend, request, payload, (fd,),
                              before=_ring_set_up if request == SET_VRING_KICK else None,
                              then=(lambda fe: idle(backend)) if ring else None)
                finally:
                    os.close(fd)
                if request in takes and name not in takes[request]:
                    assert ack not in (None, 0), f"request {request} with {name}: ack {ack}"
            yield f"request {request} with {name}", case
        yield f"request {request} with two fds", \
            lambda r=request, p=payload: _two_fds(backend, r, p)
        yield f"request {request} with no fd", lambda r=request, p=payload: ask(backend, r, p)


def _ring_set_up(fe):
    """Memory, size and address for queue 0 (its memory closed here: mapped)."""
    guest = Guest()
    try:
        assert fe.ack(SET_MEM_TABLE, guest.table(), (guest.fd,)) == 0
        assert fe.ack(SET_VRING_NUM, state(0, guest.num)) == 0
        assert fe.ack(SET_VRING_ADDR, guest.vring_addr()) == 0
    finally:
        guest.close()


def _two_fds(backend, request, payload):
    a, b = memfd(1 << 20), eventfd()
    try:
        ask(backend, request, payload, (a, b))
    finally:
        os.close(a)
        os.close(b)


def index_cases(backend, program):
    n = QUEUES[program]
    for index in (n, n + 1, 255, 256, 0x1_0000, 0xFFFF_FFFF):
        for request in (SET_VRING_NUM, SET_VRING_BASE, GET_VRING_BASE, SET_VRING_ENABLE):
            yield f"request {request} for queue {index}", \
                lambda r=request, i=index: ask(backend, r, state(i, 1))
        yield f"SET_VRING_ADDR for queue {index}", lambda i=index: ask(
            backend, SET_VRING_ADDR, ADDR.pack(i, 0, 0x1000, 0x2000, 0x3000, 0))
        for request in (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR):
            word = index & 0xFF | (NOFD if index > 0xFF else 0)
            yield f"request {request} for queue {index}", \
                lambda r=request, w=word: ask(backend, r, u64(w), (eventfd_kept(),))
    for num in (0, 3, 2048, 32768, 0xFFFF_FFFF):
        yield f"SET_VRING_NUM {num}", lambda v=num: ask(backend, SET_VRING_NUM, state(0, v))
    yield "SET_VRING_ENABLE 2", lambda: ask(backend, SET_VRING_ENABLE, state(0, 2))
    yield "SET_VRING_BASE 0x10000", lambda: ask(backend, SET_VRING_BASE, state(0, 0x10000))


_kept = []


def eventfd_kept():
    """An eventfd to send, closed at the end of the run (the case cannot wait)."""
    _kept.append(eventfd())
    return _kept[-1]


def memory_cases(backend):
    """Memory tables and regions the back-end must refuse (or take) safely."""
    user, page = 0x7F00_0000_0000, 4096

    def table(regions, sizes=None, seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, count=None):
        def case():
            fds = [memfd(s, seals) for s in (sizes or [1 << 20] * len(regions))]
            payload = mem_table(*regions)
            if count is not None:
                payload = struct.pack("=II", count, 0) + payload[8:]
            try:
                ask(backend, SET_MEM_TABLE, payload, fds)
            finally:
                for fd in fds:
                    os.close(fd)
        return case

    yield "8 regions", table([region(i << 20, 1 << 20, user + (i << 20)) for i in range(8)])
    yield "9 regions", table([region(i << 20, 1 << 20, user + (i << 20)) for i in range(9)][:8],
                             count=9)
    yield "0xFFFFFFFF regions", table([region(0, 1 << 20, user)], count=0xFFFF_FFFF)
    yield "an empty region", table([region(0, 0, user)])
    yield "a region past its file's end", table([region(0, 2 << 20, user)])
    yield "a region at an offset past the end", table([region(0, page, user, 4 << 20)])
    yield "an offset of 2^63", table([region(0, page, user, 1 << 63)])
    yield "an offset not page-aligned", table([region(0, page, user, 0x123)])
    yield "guest addresses that wrap", table([region((1 << 64) - page, 2 * page, user)])
    yield "user addresses that wrap", table([region(0, 2 * page, (1 << 64) - page)])
    yield "overlapping guest ranges", table([region(0, 1 << 20, user),
                                             region(page, 1 << 20, user + (2 << 20))])
    yield "an unsealable memfd", table([region(0, 1 << 20, user)], seals=None)
    yield "two regions, one fd", lambda: _one_fd_for_two(backend)
    yield "40 ADD_MEM_REG", lambda: _many_regions(backend, 40)
    yield "REM_MEM_REG of a region never added", lambda: ask(
        backend, REM_MEM_REG, single(region(0, page, user)))
    yield "a sealable memfd, shrunk after", lambda: _shrink_after(backend)


def _one_fd_for_two(backend):
    fd = memfd(2 << 20)
    try:
        ask(backend, SET_MEM_TABLE, mem_table(region(0, 1 << 20, 1 << 40),
                                              region(1 << 20, 1 << 20, 2 << 40)), (fd,))
    finally:
        os.close(fd)


def _many_regions(backend, count):
    fd = memfd(count * 4096)
    try:
        with negotiated(backend) as fe:
            acks = [fe.ack(ADD_MEM_REG, single(region(i << 20, 4096, (1 << 40) + (i << 20),
                                                      i * 4096)), (fd,)) for i in range(count)]
        assert acks == [0] * 32 + [1] * (count - 32), acks
    finally:
        os.close(fd)


def _shrink_after(backend):
    fd = memfd(1 << 20, seals=0)
    try:
        with negotiated(backend) as fe:
            assert fe.ack(SET_MEM_TABLE, mem_table(region(0, 1 << 20, 1 << 40)), (fd,)) == 0
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)


# --- rings ----------------------------------------------------------------------------------------

class Ring:
    """A negotiated connection, guest memory and queue q started on it, with
    kick, call and error eventfds (the other queues started too: vsock's rx
    must be there for tx to answer)."""

    def __init__(self, backend, program, size=1 << 20, call=None, enable=True):
        self.fe = negotiated(backend)
        self.guest = Guest(size=size)
        self.q = DATA_QUEUE[program]
        self.kick, self.err = eventfd(), eventfd()
        self.call = call if call is not None else eventfd()
        self.guest.start(self.fe, self.q, self.kick, self.call, self.err, enable)

    def post(self, head=0):
        self.guest.make_available(head)
        os.eventfd_write(self.kick, 1)

    def settle(self, timeout=0.3):
        """Until something shows (an error, an interrupt, a used entry) or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.call, self.err], [], [], 0.02)[0] or self.guest.used_idx():
                return

    def close(self):
        self.fe.close()
        for fd in (self.kick, self.call, self.err):
            os.close(fd)
        self.guest.close()


def ring_case(backend, program, describe, size=1 << 20, after=None, head=0):
    """describe(guest) writes descriptor 0's chain (and what else it likes);
    head is made available, the ring kicked, then after(ring) if given."""
    def case():
        ring = Ring(backend, program, size)
        try:
            describe(ring.guest)
            ring.post(head)
            ring.settle()
            if after:
                after(ring)
        finally:
            ring.close()
    return case


def ring_cases(backend, program):
    buf, size = Guest.BUF, 1 << 20
    table = buf + 0x8000

    def desc(*descs, table_at=None):
        def describe(g):
            for i, d in enumerate(descs):
                g.write_desc(i, *d, table=table_at)
            if table_at is not None:
                g.write_desc(0, table_at, 16 * len(descs), F_INDIRECT)
        return describe

    writable = [(buf, 64, F_WRITE)]
    shapes = {
        "a buffer past the end of RAM": desc((size, 64, F_WRITE)),
        "a buffer straddling the end": desc((size - 8, 64, F_WRITE)),
        "a buffer at 2^64 - 8": desc(((1 << 64) - 8, 64, F_WRITE)),
        "a buffer of 4 GiB - 1": desc((buf, 0xFFFF_FFFF, F_WRITE)),
        "a zero-length buffer": desc((buf, 0, F_WRITE)),
        "a chain that loops": desc((buf, 16, F_NEXT, 1), (buf, 16, F_NEXT, 0)),
        "a descriptor chained to itself": desc((buf, 16, F_NEXT | F_WRITE, 0)),
        "next past the table": desc((buf, 16, F_NEXT, 200)),
        "readable after writable": desc((buf, 16, F_WRITE | F_NEXT, 1), (buf, 16, 0)),
        "the whole table chained": desc(*[(buf, 16, F_NEXT | F_WRITE, i + 1) for i in range(7)],
                                        (buf, 16, F_WRITE)),
        "an indirect table": desc((buf, 16, F_NEXT, 1), (buf + 16, 64, F_WRITE),
                                  table_at=table),
        "an indirect table of 17 bytes": lambda g: g.write_desc(0, table, 17, F_INDIRECT),
        "an empty indirect table": lambda g: g.write_desc(0, table, 0, F_INDIRECT),
        "an indirect table outside RAM": lambda g: g.write_desc(0, size, 64, F_INDIRECT),
        "an indirect table of 65537 entries": lambda g: g.write_desc(0, 0, 65537 * 16,
                                                                     F_INDIRECT),
        "an indirect table of 4 GiB - 16": lambda g: g.write_desc(0, 0, 0xFFFF_FFF0, F_INDIRECT),
        "an indirect table in an indirect table": desc((table, 16, F_INDIRECT), table_at=table),
        "a loop in an indirect table": desc((buf, 16, F_NEXT, 1), (buf, 16, F_NEXT, 0),
                                            table_at=table),
        "indirect with NEXT set": lambda g: (g.write_desc(0, table, 16, F_INDIRECT | F_NEXT, 1),
                                             g.write_desc(0, buf, 64, F_WRITE, table=table)),
        "an indirect descriptor after a buffer": desc((buf, 16, F_NEXT, 1),
                                                      (table, 16, F_INDIRECT)),
        "the used ring's own bytes as the buffer": lambda g: g.write_desc(0, g.used, 64,
                                                                          F_WRITE),
        "the descriptor table as the buffer": lambda g: g.write_desc(0, g.desc, 128, F_WRITE),
    }
    for name, describe in shapes.items():
        yield name, ring_case(backend, program, describe)
    yield "a chain of more than 4 GiB", ring_case(
        backend, program, desc((0, 1 << 31, F_WRITE | F_NEXT, 1), (0, 1 << 31, F_WRITE)),
        size=2 << 30)
    yield "a head past the ring", ring_case(backend, program, lambda g: None, head=1000)
    yield "an avail index far ahead", ring_case(
        backend, program, desc(*writable), after=lambda r: (
            r.guest.set_avail_idx(1000), os.eventfd_write(r.kick, 1), r.settle()))
    yield "ten thousand kicks", ring_case(backend, program, desc(*writable),
                                          after=lambda r: [os.eventfd_write(r.kick, 1)
                                                           for _ in range(10000)])
    yield "a saturated blocking call eventfd", lambda: _saturated_call(backend, program)
    yield "a second kick fd", ring_case(backend, program, desc(*writable),
                                        after=lambda r: _second_kick(r))
    yield "GET_VRING_BASE, then a kick on the old fd", ring_case(
        backend, program, desc(*writable), after=lambda r: (
            r.fe.ask(GET_VRING_BASE, state(r.q, 0)), os.eventfd_write(r.kick, 1)))
    yield "RESET_DEVICE while it runs", ring_case(
        backend, program, desc(*writable), after=lambda r: (
            r.fe.ack(RESET_DEVICE), r.post(), r.settle()))
    yield "its memory removed while it runs", ring_case(
        backend, program, desc(*writable), after=lambda r: (
            r.fe.ack(REM_MEM_REG, single(region(0, r.guest.size, Guest.USER))),
            r.post(), r.settle(), _answers(r.fe)))
    yield "a new memory table while it runs", ring_case(
        backend, program, desc(*writable), after=lambda r: _new_table(r))
    yield "a ring whose addresses are outside memory", lambda: _outside(backend, program)
    yield "a ring started before any memory table", lambda: ask(
        backend, SET_VRING_KICK, u64(0), (eventfd_kept(),))
    yield "a disabled ring, kicked", lambda: _disabled(backend, program)
    yield "closing with a request posted", ring_case(backend, program, desc(*writable))


def _answers(fe):
    assert fe.u64(GET_FEATURES)


def _second_kick(ring):
    kick = eventfd()
    try:
        assert ring.fe.ack(SET_VRING_KICK, u64(ring.q), (kick,)) == 0
        os.eventfd_write(kick, 1)
        ring.settle()
    finally:
        os.close(kick)


def _new_table(ring):
    other = Guest()
    try:
        assert ring.fe.ack(SET_MEM_TABLE, other.table(), (other.fd,)) == 0
        ring.post()
        ring.settle()
        _answers(ring.fe)
    finally:
        other.close()


def _saturated_call(backend, program):
    call = os.eventfd(0)
    os.eventfd_write(call, 0xFFFF_FFFF_FFFF_FFFE)
    ring = Ring(backend, program, call=call)
    try:
        for i in range(3):
            ring.guest.write_desc(i, Guest.BUF + 64 * i, 64, F_WRITE)
            ring.post(i)
        _answers(ring.fe)
    finally:
        ring.close()


def _outside(backend, program):
    guest = Guest()
    try:
        with negotiated(backend) as fe:
            assert fe.ack(SET_MEM_TABLE, guest.table(), (guest.fd,)) == 0
            assert fe.ack(SET_VRING_NUM, state(0, 8)) == 0
            assert fe.ack(SET_VRING_ADDR, ADDR.pack(0, 0, 0x10, 0x20, 0x40, 0)) == 0
            assert fe.ack(SET_VRING_KICK, u64(0), (eventfd_kept(),)) != 0
    finally:
        guest.close()


def _disabled(backend, program):
    ring = Ring(backend, program, enable=False)
    try:
        ring.guest.write_desc(0, Guest.BUF, 64, F_WRITE)
        ring.post()
        ring.settle()
        assert ring.fe.ack(SET_VRING_ENABLE, state(ring.q, 1)) == 0
        ring.settle()
    finally:
        ring.close()


# --- what each device reads from its requests ---------------------------------------------------

def device_cases(backend, program):
    buf = Guest.BUF
    if program == "rng":
        yield "a readable buffer", ring_case(backend, program,
                                             lambda g: g.write_desc(0, buf, 64, 0))
        yield "a 512 MiB buffer", ring_case(backend, program, lambda g: g.write_desc(
            0, buf, (512 << 20) - buf, F_WRITE), size=512 << 20)
    elif program == "blk":
        yield from _blk_cases(backend)
    else:
        yield from _vsock_cases(backend)


def _blk_request(kind, sector, data_len=512, status=True, header_len=16, data_flags=F_WRITE):
    buf = Guest.BUF

    def describe(g):
        g.map[buf:buf + 16] = struct.pack("<IIQ", kind, 0, sector)
        chain = [(buf, header_len, 0)]
        if data_len:
            chain.append((buf + 0x1000, data_len, data_flags))
        if status:
            chain.append((buf + 0x100, 1, F_WRITE))
        for i, (addr, length, flags) in enumerate(chain):
            last = i == len(chain) - 1
            g.write_desc(i, addr, length, flags | (0 if last else F_NEXT), i + 1)
    return describe


def _blk_cases(backend):
    disk = (1 << 20) // 512
    for kind in (0, 1, 4, 8, 11, 13, 99, 0xFFFF_FFFF):           # IN OUT FLUSH GET_ID ...
        flags = 0 if kind in (1, 11, 13) else F_WRITE
        for sector in (0, disk - 1, disk, 1 << 60, (1 << 64) - 1):
            yield f"blk request {kind} at sector {sector}", ring_case(
                backend, "blk", _blk_request(kind, sector, data_flags=flags))
        yield f"blk request {kind} without a status byte", ring_case(
            backend, "blk", _blk_request(kind, 0, status=False, data_flags=flags))
        yield f"blk request {kind} with a short header", ring_case(
            backend, "blk", _blk_request(kind, 0, header_len=8, data_flags=flags))
        yield f"blk request {kind} with 256 MiB of data", ring_case(
            backend, "blk", _blk_request(kind, 0, data_len=(256 << 20) - 0x20000,
                                         data_flags=flags), size=256 << 20)
    for segments in (b"\xff" * 16, struct.pack("<QII", 0, 0xFFFF_FFFF, 0) * 17, b"\x01" * 15):
        def describe(g, segments=segments):
            _blk_request(11, 0, data_len=0)(g)           # header and status ...
            g.map[Guest.BUF + 0x2000:Guest.BUF + 0x2000 + len(segments)] = segments
            g.write_desc(0, Guest.BUF, 16, F_NEXT, 2)     # ... with the segments between
            g.write_desc(2, Guest.BUF + 0x2000, len(segments), F_NEXT, 1)
        yield f"blk discard of {len(segments)} bytes of segments", ring_case(
            backend, "blk", describe)


def _vsock_cases(backend):
    header = struct.Struct("<QQIIIHHIII")
    for op in range(10):
        for src_cid, length, extra in ((3, 0, 0), (3, 100, 0), (7, 0, 0), (3, 0xFFFF_FFFF, 0),
                                       (3, 0, 0x1_0000)):
            def describe(g, op=op, src_cid=src_cid, length=length, extra=extra):
                packet = header.pack(src_cid, 2, 1024, 5000 + op, length, 1, op, 0xFFFF_FFFF,
                                     0xFFFF_FFFF, extra)
                g.map[Guest.BUF:Guest.BUF + len(packet)] = packet
                g.write_desc(0, Guest.BUF, len(packet) + min(length, 100), 0)
            yield f"vsock op {op} from CID {src_cid}, length {length}", ring_case(
                backend, "vsock", describe)
    yield "vsock: a packet shorter than its header", ring_case(
        backend, "vsock", lambda g: g.write_desc(0, Guest.BUF, 10, 0))
    yield "vsock: a thousand RSTs with no rx buffers", lambda: _vsock_flood(backend)


def _vsock_flood(backend):
    ring = Ring(backend, "vsock")
    packet = struct.pack("<QQIIIHHIII", 3, 2, 1024, 6000, 0, 1, 5, 0, 4096, 0)   # RW
    ring.guest.map[Guest.BUF:Guest.BUF + len(packet)] = packet
    try:
        for i in range(1000):
            ring.guest.write_desc(i % 8, Guest.BUF, len(packet), 0)
            ring.post(i % 8)
        _answers(ring.fe)
    finally:
        ring.close()


# --- the run --------------------------------------------------------------------------------------

def warm_up(backend, program):
    """A session of every kind the cases use, so that what the run leaves
    behind is measured against a program that has done it all once."""
    for name, case in list(ring_cases(backend, program))[:3]:
        case()
    ask(backend, GET_VRING_BASE, state(0, 0))
    time.sleep(0.2)


def all_cases(backend, program, tmp):
    yield from framing_cases(backend)
    yield from garbage_cases(backend)
    yield from wrong_fd_cases(backend, tmp)
    yield from index_cases(backend, program)
    yield from memory_cases(backend)
    yield from ring_cases(backend, program)
    yield from device_cases(backend, program)


@pytest.mark.parametrize("program", ["rng", "blk", "vsock"])
def test_a_hostile_front_end_breaks_nothing(tmp_path, program, capsys):
    options = {"rng": [], "blk": ["--image", str(tmp_path / "disk.img")],
               "vsock": ["--guest-cid", "3", "--uds-path", str(tmp_path / "vm.vsock")]}
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    started = time.monotonic()
    with Backend(tmp_path, program, *options[program]) as backend:
        warm_up(backend, program)
        fds, rss = backend.settled_fds(backend.fds()), rss_kib(backend.pid)
        tried = survived = 0
        try:
            for name, case in all_cases(backend, program, tmp_path):
                tried += 1
                try:
                    case()
                except Exception as e:
                    raise AssertionError(f"case {tried}, {name}: {type(e).__name__}: {e}\n"
                                         f"{backend.log()[-1500:]}") from e
                assert backend.alive(), f"{name}: the back-end died\n{backend.log()[-2000:]}"
                assert backend.answers(DEADLINE), f"{name}: no answer to a new front-end"
                assert backend.settled_fds(fds) == fds, f"{name}: fds {fds} -> {backend.fds()}"
                survived += 1
        finally:
            for fd in _kept:
                os.close(fd)
            _kept.clear()
        fds_after = backend.settled_fds(fds)
        assert fds_after == fds, f"fds: {fds} before, {fds_after} after"
        grown = rss_kib(backend.pid) - rss
        assert grown < RSS_MARGIN_KIB, f"RSS grew by {grown} KiB"
        log = backend.log()
    assert "Traceback" not in log, log
    lines = log.splitlines()
    assert all(line.startswith("pyvmm: ") for line in lines), \
        [line for line in lines if not line.startswith("pyvmm: ")][:5]
    refusals = sum(" refused: " in line for line in lines)
    with capsys.disabled():
        print(f"\n{program}: {tried} cases tried, {survived} survived, {len(lines)} log lines "
              f"({refusals} refusals shown), fds {fds} -> {fds_after}, RSS {rss} KiB "
              f"{'+' if grown >= 0 else ''}{grown} KiB, {time.monotonic() - started:.1f} s")
    assert tried == survived
