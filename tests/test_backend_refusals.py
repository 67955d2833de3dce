"""pyvmm's back-end programs against a front-end that sends what it should
not (issue 19, items 9-18): raw frames on a raw socket (tests/hostile.py),
the program in its own process. A request the back-end cannot carry out
is refused in one line and the connection goes on; nothing leaks, spins,
blocks or dies. No KVM."""

import contextlib
import fcntl
import os
import signal
import socket
import struct
import time

import pytest
from hostile import (
    ADD_MEM_REG, GET_CONFIG, GET_FEATURES, GET_INFLIGHT_FD, GET_MAX_MEM_SLOTS, GET_QUEUE_NUM,
    GET_VRING_BASE, INFLIGHT, SET_BACKEND_REQ_FD, SET_FEATURES, SET_INFLIGHT_FD, SET_MEM_TABLE,
    SET_OWNER, SET_STATUS, SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_CALL, SET_VRING_ERR,
    SET_VRING_KICK, SET_VRING_NUM, VERSION_1, Backend, Guest, eventfd, mem_table, memfd,
    peak_rss_kib, region, single, state, u64, wait_readable)

SET_LOG_FD = 7


@pytest.fixture
def rng(tmp_path):
    with Backend(tmp_path, "rng") as backend:
        yield backend


def refusals(backend):
    """The lines of its log that say a request was refused."""
    return [line for line in backend.log().splitlines() if " refused: " in line]


def assert_clean(backend):
    """Alive, answering, and one line per complaint: no traceback."""
    assert backend.alive(), backend.log()
    assert backend.answers(), backend.log()
    assert "Traceback" not in backend.log(), backend.log()


# --- item 12: kick, call and error fds that are not eventfds ----------------------------------

def not_eventfds(tmp_path):
    """(what, fd) for each kind of fd that is not an eventfd; the caller closes them."""
    read_end, write_end = os.pipe()
    os.close(write_end)                                   # a pipe at EOF: readable forever
    ours, theirs = socket.socketpair()
    ours.close()                                          # a socket whose peer has gone
    path = tmp_path / "file"
    path.write_bytes(b"x" * 8)
    return [("a pipe at EOF", read_end), ("a socket at EOF", theirs.detach()),
            ("a regular file", os.open(path, os.O_RDWR)),
            ("/dev/null", os.open("/dev/null", os.O_RDWR))]


@pytest.mark.parametrize("request_", [SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR])
def test_a_ring_fd_that_is_not_an_eventfd_is_refused(rng, tmp_path, request_):
    """A pipe or socket at EOF as the kick fd made the back-end spin at 100 % CPU
    (and log a line each time round); a regular file could not be watched, and
    the request was never answered. Each is refused now: a non-zero ack, one
    line, and the connection goes on."""
    guest = Guest()
    with rng.connect() as fe:
        fe.handshake()
        assert fe.ack(SET_MEM_TABLE, guest.table(), fds=(guest.fd,)) == 0
        for request, payload in ((SET_VRING_NUM, state(0, guest.num)),
                                 (SET_VRING_ADDR, guest.vring_addr())):
            assert fe.ack(request, payload) == 0
        for what, fd in not_eventfds(tmp_path):
            try:
                assert fe.ack(request_, u64(0), fds=(fd,)) != 0, what
            finally:
                os.close(fd)
        cpu = rng.cpu_seconds()
        time.sleep(0.5)
        assert rng.cpu_seconds() - cpu < 0.2                # no busy loop
        assert fe.u64(GET_FEATURES)                         # still served
    guest.close()
    assert_clean(rng)
    assert len(refusals(rng)) == 4, rng.log()


def test_the_same_complaint_again_and_again_is_a_few_lines(rng):
    """A request it does not serve, 300 times: a few lines, and a count of the
    ones left out, not 300 lines."""
    with rng.connect() as fe:
        fe.handshake()
        for _ in range(300):
            fd = eventfd()
            try:
                assert fe.ack(SET_LOG_FD, fds=(fd,)) != 0
            finally:
                os.close(fd)
    assert_clean(rng)
    lines = [line for line in rng.log().splitlines() if "SET_LOG_FD" in line]
    assert 1 <= len(lines) <= 10, rng.log()


# --- item 13: fds leaked on refusals ---------------------------------------------------------

def test_a_memory_table_it_cannot_map_leaks_no_fds(rng):
    """SET_MEM_TABLE whose first region cannot be mapped (a pipe for a memfd)
    leaked the fds of the regions after it, two here, on every message; it is
    refused now, with every fd closed."""
    baseline = rng.fds()
    for _ in range(5):
        read_end, write_end = os.pipe()
        good = [memfd(1 << 20), memfd(1 << 20)]
        table = mem_table(region(0, 1 << 20, 0x10000000), region(1 << 20, 1 << 20, 0x20000000),
                          region(2 << 20, 1 << 20, 0x30000000))
        try:
            with rng.connect() as fe:
                fe.handshake()
                assert fe.ack(SET_MEM_TABLE, table, fds=(read_end, *good)) != 0
                assert fe.u64(GET_FEATURES)
        finally:
            for fd in (read_end, write_end, *good):
                os.close(fd)
    assert rng.settled_fds(baseline) == baseline
    assert_clean(rng)


def test_a_back_end_channel_that_is_not_a_socket_is_refused(rng):
    """SET_BACKEND_REQ_FD with a pipe was never answered (the front-end waits for
    its ack for ever) and leaked the fd; it is refused now."""
    baseline = rng.fds()
    with rng.connect() as fe:
        fe.handshake()
        read_end, write_end = os.pipe()
        try:
            assert fe.ack(SET_BACKEND_REQ_FD, fds=(read_end,)) != 0
        finally:
            os.close(read_end)
            os.close(write_end)
        assert fe.u64(GET_FEATURES)
    assert rng.settled_fds(baseline) == baseline
    assert_clean(rng)


# --- item 14: memory slots ----------------------------------------------------------------------

def test_the_memory_slots_are_enforced_without_being_asked(rng):
    """BE-37: GET_MAX_MEM_SLOTS answers 32, and the 33rd ADD_MEM_REG is refused,
    whether or not the front-end asked (it took 20,000 regions before)."""
    fd = memfd(33 * 4096)
    try:
        with rng.connect() as fe:
            fe.handshake()
            for i in range(32):
                assert fe.ack(ADD_MEM_REG, single(region(i << 20, 4096, 0x10000000 + (i << 20),
                                                         i * 4096)), fds=(fd,)) == 0
            assert fe.ack(ADD_MEM_REG, single(region(32 << 20, 4096, 0x30000000, 32 * 4096)),
                          fds=(fd,)) != 0
            assert fe.u64(GET_FEATURES)
    finally:
        os.close(fd)
    assert_clean(rng)
    assert any("memory slots" in line for line in refusals(rng)), rng.log()


# --- item 10: memory the front-end could shrink -------------------------------------------------

def test_memory_that_can_be_sealed_is_sealed_against_shrinking(rng):
    """A front-end that shrank a memfd after handing it over killed the back-end
    with SIGBUS at its next access (exit -7, not a word). A memfd that allows
    sealing gets F_SEAL_SHRINK from the back-end: the shrink fails, and the
    back-end goes on serving."""
    guest = Guest(seals=0)                                # sealable, not sealed
    kick, call = eventfd(), eventfd()
    try:
        with rng.connect() as fe:
            fe.handshake()
            guest.start(fe, kick=kick, call=call)
            assert fcntl.fcntl(guest.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
            with pytest.raises(PermissionError):
                os.ftruncate(guest.fd, 0)
            guest.write_desc(0, Guest.BUF, 64, 2)         # one writable buffer
            guest.make_available(0)
            os.eventfd_write(kick, 1)
            assert wait_readable(call), rng.log()
            assert guest.used_idx() == 1
    finally:
        for fd in (kick, call):
            os.close(fd)
        guest.close()
    assert_clean(rng)


@pytest.mark.parametrize("what", ["a memfd that cannot be sealed", "a file on tmpfs",
                                  "a file shorter than the region"])
def test_memory_that_could_shrink_is_refused(rng, tmp_path, what):
    """Memory the back-end cannot make safe is refused, in one line that says
    how to fix it; so is a file that does not cover the region (its first
    access past the end would be the SIGBUS)."""
    if what == "a memfd that cannot be sealed":
        fd = memfd(1 << 20, sealing=False)
    elif what == "a file on tmpfs":
        path = "/dev/shm/pyvmm-test-" + tmp_path.name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.unlink(path)
        os.ftruncate(fd, 1 << 20)
    else:
        fd = memfd(1 << 19)
    try:
        with rng.connect() as fe:
            fe.handshake()
            assert fe.ack(SET_MEM_TABLE, mem_table(region(0, 1 << 20, 0x10000000)),
                          fds=(fd,)) != 0
            assert fe.u64(GET_FEATURES)
        assert os.fstat(fd).st_size == (1 << 19 if what.endswith("region") else 1 << 20)
    finally:
        os.close(fd)
    assert_clean(rng)
    [line] = refusals(rng)
    if what == "a file shorter than the region":
        assert "bytes up to 1048576 would be mapped" in line
    else:
        assert "SIGBUS" in line and "--allow-unsealed-memory" in line, line


def test_unsealed_memory_is_taken_from_a_trusted_front_end(tmp_path):
    """--allow-unsealed-memory: for a front-end whose memory cannot be sealed
    (QEMU's memory-backend-file on hugetlbfs, say), at its own risk."""
    with Backend(tmp_path, "rng", "--allow-unsealed-memory") as rng:
        fd = memfd(1 << 20, sealing=False)
        try:
            with rng.connect() as fe:
                fe.handshake()
                assert fe.ack(SET_MEM_TABLE, mem_table(region(0, 1 << 20, 0x10000000)),
                              fds=(fd,)) == 0
        finally:
            os.close(fd)
        assert_clean(rng)
    import subprocess
    import sys
    helped = subprocess.run([sys.executable, "-m", "pyvmm", "backend", "blk", "--help"],
                            capture_output=True, text=True, timeout=30).stdout
    assert "--allow-unsealed-memory" in helped and "SIGBUS" in helped


def test_the_inflight_area_is_sealed_both_ways(tmp_path):
    """The area GET_INFLIGHT_FD makes cannot shrink or grow; one handed back
    (SET_INFLIGHT_FD) that could shrink is refused."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    with Backend(tmp_path, "blk", "--image", str(image)) as blk:
        with blk.connect() as fe:
            fe.handshake()
            answer, fds = fe.ask(GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, 1, 64))
            [area] = fds
            try:
                size = INFLIGHT.unpack(answer)[0]
                seals = fcntl.fcntl(area, fcntl.F_GET_SEALS)
                assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
                assert fe.ack(SET_INFLIGHT_FD, INFLIGHT.pack(size, 0, 1, 64), fds=(area,)) == 0
            finally:
                os.close(area)
            loose = memfd(size, sealing=False)
            try:
                assert fe.ack(SET_INFLIGHT_FD, INFLIGHT.pack(size, 0, 1, 64), fds=(loose,)) != 0
            finally:
                os.close(loose)
        assert_clean(blk)


# --- item 11: a call eventfd that cannot take more ------------------------------------------------

def test_a_saturated_call_eventfd_does_not_block_the_back_end(rng):
    """A call eventfd whose counter is full (0xfffffffffffffffe), blocking as
    the front-end made it: the back-end's write blocked for ever, and so did
    every later front-end. It signals without waiting now (a full counter has
    an interrupt pending anyway)."""
    guest = Guest()
    kick = eventfd()
    call = os.eventfd(0)                                  # blocking ...
    os.eventfd_write(call, 0xFFFF_FFFF_FFFF_FFFE)         # ... and full
    try:
        with rng.connect(timeout=3) as fe:
            fe.handshake()
            guest.start(fe, kick=kick, call=call)
            guest.write_desc(0, Guest.BUF, 64, 2)
            guest.make_available(0)
            os.eventfd_write(kick, 1)
            assert guest.wait_used(1)
            assert fe.u64(GET_FEATURES)                   # it answers: not stuck in write()
    finally:
        for fd in (kick, call):
            os.close(fd)
        guest.close()
    assert_clean(rng)


def test_the_rate_limit_counts_what_it_leaves_out():
    """Per kind of line (format and request name), a burst, then silence
    counted, and the count on the next line that passes."""
    import logging

    from pyvmm.vhost.user.backend.logs import RateLimit
    now = [0.0]
    limit = RateLimit(burst=3, period=10, clock=lambda: now[0])

    def line(*args):
        record = logging.LogRecord("pyvmm.backend", logging.WARNING, __file__, 1,
                                   "%s refused: %s", args, None)
        return record.getMessage() if limit.filter(record) else None

    passed = [line("SET_VRING_KICK", f"because {i}") for i in range(100)]
    assert passed[:3] == [f"SET_VRING_KICK refused: because {i}" for i in range(3)]
    assert passed[3:] == [None] * 97
    assert line("SET_MEM_TABLE", "another kind") is not None
    now[0] = 10.0
    assert line("SET_VRING_KICK", "again") == \
        "SET_VRING_KICK refused: again (97 more like this left out)"


# --- item 9: a second SET_VRING_KICK ------------------------------------------------------------

def test_a_second_kick_fd_keeps_the_rings_place(rng):
    """A second SET_VRING_KICK on a started ring rebuilt it at the old base and
    served every completed request again (a blk write ran twice). The ring
    keeps its place now: the new fd replaces the old, nothing is replayed."""
    guest = Guest()
    kick, call = eventfd(), eventfd()
    new_kick = eventfd()
    try:
        with rng.connect() as fe:
            fe.handshake()
            guest.start(fe, kick=kick, call=call)
            for head in (0, 1):
                guest.write_desc(head, Guest.BUF + 64 * head, 64, 2)
                guest.make_available(head)
            os.eventfd_write(kick, 1)
            assert guest.wait_used(2)
            assert fe.ack(SET_VRING_KICK, u64(0), fds=(new_kick,)) == 0
            assert not guest.wait_used(3, timeout=0.3) and guest.used_idx() == 2   # no replay
            guest.write_desc(2, Guest.BUF + 128, 64, 2)
            guest.make_available(2)
            os.eventfd_write(new_kick, 1)
            assert guest.wait_used(3)
            answer, _ = fe.ask(GET_VRING_BASE, state(0, 0))
            assert answer == state(0, 3)
    finally:
        for fd in (kick, call, new_kick):
            os.close(fd)
        guest.close()
    assert_clean(rng)


@pytest.mark.parametrize("request_", [SET_VRING_NUM, SET_VRING_BASE])
def test_size_and_base_do_not_change_under_a_running_ring(rng, request_):
    """As vhost's VHOST_SET_VRING_NUM/BASE (EBUSY): refused while the ring runs,
    taken once GET_VRING_BASE has stopped it."""
    guest = Guest()
    kick = eventfd()
    try:
        with rng.connect() as fe:
            fe.handshake()
            guest.start(fe, kick=kick)
            assert fe.ack(request_, state(0, 4)) != 0
            fe.ask(GET_VRING_BASE, state(0, 0))
            assert fe.ack(request_, state(0, 4)) == 0
    finally:
        os.close(kick)
        guest.close()
    assert_clean(rng)


# --- item 16: amplification -----------------------------------------------------------------------

VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT = 1, 2, 4


@contextlib.contextmanager
def one_request(rng, size, post):
    """Guest memory of size bytes, queue 0 started, post(guest) writing the
    descriptors of head 0, a kick; yields (guest, call, err) and cleans up."""
    guest = Guest(size=size)
    kick, call, err = eventfd(), eventfd(), eventfd()
    try:
        with rng.connect() as fe:
            fe.handshake()
            guest.start(fe, kick=kick, call=call, err=err)
            post(guest)
            guest.make_available(0)
            os.eventfd_write(kick, 1)
            yield guest, call, err
    finally:
        for fd in (kick, call, err):
            os.close(fd)
        guest.close()


def test_an_indirect_table_is_read_a_descriptor_at_a_time(rng):
    """One descriptor naming a 255 MiB indirect table cost 540 MB of the
    back-end's memory per request (the table was copied whole). A table of
    more than 65536 descriptors is a broken ring now (as vhost says), and
    none is ever copied whole."""
    before = peak_rss_kib(rng.pid)
    with one_request(rng, 256 << 20, lambda g: g.write_desc(
            0, Guest.BUF, 255 << 20, VIRTQ_DESC_F_INDIRECT)) as (guest, call, err):
        assert wait_readable(err), "no ring error reported"
        assert guest.used_idx() == 0
        assert peak_rss_kib(rng.pid) - before < 32 << 10
    assert_clean(rng)


def test_an_indirect_table_still_works(rng):
    def post(g):
        table = Guest.BUF + 0x1000
        g.write_desc(0, Guest.BUF, 64, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1, table=table)
        g.write_desc(1, Guest.BUF + 64, 64, VIRTQ_DESC_F_WRITE, table=table)
        g.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT)
    with one_request(rng, 1 << 20, post) as (guest, call, err):
        assert wait_readable(call)
        assert guest.used_idx() == 1


def test_a_chain_longer_than_4_gib_is_a_broken_ring(rng):
    """A chain whose writable bytes pass 2^32 - 1 (two 2 GiB buffers) was never
    completed nor reported (rng made 4 GiB of random bytes); its length does
    not fit the used ring's u32, so it is a broken ring, reported at once."""
    def post(g):
        g.write_desc(0, 0, 1 << 31, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
        g.write_desc(1, 0, 1 << 31, VIRTQ_DESC_F_WRITE)
    with one_request(rng, 2 << 30, post) as (guest, call, err):
        assert wait_readable(err, timeout=3), "no ring error reported"
        assert guest.used_idx() == 0
        assert peak_rss_kib(rng.pid) < 256 << 10
    assert_clean(rng)


def test_rng_fills_at_most_64_kib_a_request(rng):
    """virtio-rng may fill less than the buffer: a 1 GiB buffer gets 64 KiB, not
    a gigabyte of random bytes made in one piece."""
    with one_request(rng, 1 << 30, lambda g: g.write_desc(
            0, Guest.BUF, (1 << 30) - Guest.BUF, VIRTQ_DESC_F_WRITE)) as (guest, call, err):
        assert wait_readable(call, timeout=3)
        assert struct.unpack_from("<II", guest.map, guest.used + 4) == (0, 64 << 10)
        assert peak_rss_kib(rng.pid) < 256 << 10
    assert_clean(rng)


# --- item 17: SIGHUP ------------------------------------------------------------------------

def blk_with_channel(tmp_path, sndbuf=None):
    """A blk back-end, a connection with CONFIG and a back-end channel (its
    SO_SNDBUF at the back-end's end set to sndbuf); (the Backend, the
    front-end, our end of the channel, the image)."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    blk = Backend(tmp_path, "blk", "--image", str(image))
    fe = blk.connect()
    fe.handshake()
    ours, theirs = socket.socketpair()
    if sndbuf is not None:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    assert fe.ack(SET_BACKEND_REQ_FD, fds=(theirs.fileno(),)) == 0
    theirs.close()
    return blk, fe, ours, image


def test_sighup_with_a_channel_gone_is_one_line(tmp_path):
    """kill -HUP (the image grew) with a back-end channel whose peer had gone
    ended the back-end with a traceback: the message was sent from inside the
    signal handler. The handler only asks now; the loop does the work, and a
    channel that is gone is one line."""
    blk, fe, ours, image = blk_with_channel(tmp_path)
    with blk:
        ours.close()
        image.write_bytes(bytes(2 << 20))
        os.kill(blk.pid, signal.SIGHUP)
        capacity, _ = fe.ask(GET_CONFIG, struct.pack("=III", 0, 8, 0) + bytes(8))
        deadline = time.monotonic() + 5
        while capacity[12:] != struct.pack("<Q", 4096) and time.monotonic() < deadline:
            capacity, _ = fe.ask(GET_CONFIG, struct.pack("=III", 0, 8, 0) + bytes(8))
        assert capacity[12:] == struct.pack("<Q", 4096)      # 2 MiB in sectors
        fe.close()
        assert_clean(blk)


def test_many_sighups_are_no_recursion(tmp_path):
    """SIGHUPs while the front-end does not read its back-end channel: once the
    channel was full, a handler blocked in its send (10 s), the next SIGHUP's
    handler ran inside it and blocked too, and so on (a traceback, or
    RecursionError). The handler only asks now; the loop sends, and gives up
    a channel that takes nothing for a second, in one line."""
    blk, fe, ours, image = blk_with_channel(tmp_path, sndbuf=1)
    with blk:
        for _ in range(100):                  # one at a time: the channel fills up
            os.kill(blk.pid, signal.SIGHUP)
            time.sleep(0.005)
        for _ in range(2000):                 # then all at once
            os.kill(blk.pid, signal.SIGHUP)
        assert fe.u64(GET_FEATURES)
        ours.settimeout(5)
        assert struct.unpack("=III", ours.recv(12))[0] == 2   # BACKEND_CONFIG_CHANGE_MSG
        fe.close()
        ours.close()
        assert_clean(blk)
    assert "the back-end channel: " in blk.log() and "no more config-change" in blk.log()


# --- item 18: the order (BE-90) -----------------------------------------------------------------

def test_before_set_owner_only_the_handshake_is_served(tmp_path):
    """BE-90: SET_OWNER starts the session. Before it, a back-end takes what
    QEMU sends before it (features, protocol features, queue count, memory
    slots, the back-end channel); anything else was accepted and is refused
    now, and accepted once SET_OWNER has come."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    guest = Guest()
    before_owner = [(SET_MEM_TABLE, guest.table(), (guest.fd,)),
                    (SET_VRING_NUM, state(0, 8), ()), (SET_STATUS, u64(1), ()),
                    (SET_FEATURES, u64(VERSION_1), ())]
    with Backend(tmp_path, "blk", "--image", str(image)) as blk:
        with blk.connect() as fe:
            features = fe.handshake(owner=False)
            assert fe.u64(GET_QUEUE_NUM) == 1 and fe.u64(GET_MAX_MEM_SLOTS) == 32
            ours, theirs = socket.socketpair()
            assert fe.ack(SET_BACKEND_REQ_FD, fds=(theirs.fileno(),)) == 0
            theirs.close()
            ours.close()
            for request, payload, fds in before_owner:
                assert fe.ack(request, payload, fds) != 0, request
            assert fe.ask(GET_CONFIG, struct.pack("=III", 0, 8, 0) + bytes(8))[0] == b""
            assert fe.ack(SET_OWNER) == 0
            for request, payload, fds in before_owner:
                assert fe.ack(request, payload, fds) == 0, request
            assert len(fe.ask(GET_CONFIG, struct.pack("=III", 0, 8, 0) + bytes(8))[0]) == 20
            assert features & VERSION_1
        assert_clean(blk)
        assert len([line for line in refusals(blk) if "(BE-90)" in line]) == 5, blk.log()
    guest.close()
