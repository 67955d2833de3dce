"""`pyvmm check`: it passes pyvmm's own back-ends and qemu-storage-daemon,
and every check is shown to fail against a back-end built on pyvmm's
library but broken in exactly the way that check looks for. No KVM."""

import contextlib
import os
import subprocess
import sys
import threading

import pytest
from backends import pyvmm_backend

from pyvmm.check.rules import CHECKS, Context, discover
from pyvmm.check.run import run_checks
from pyvmm.check.target import SocketTarget
from pyvmm.errors import PyvmmError
from pyvmm.vhost.user.backend.blk import Blk
from pyvmm.vhost.user.backend.daemon import Daemon, serve_forever
from pyvmm.vhost.user.channel import Connection, Listener
from pyvmm.vhost.user.errors import ChannelError, RemoteProtocolError
from pyvmm.vhost.user.messages import (HEADER, FrontendReq as R, Inflight,
                                       ProtocolFeature as PF, U64, VringState)
from pyvmm.vhost.user.wire import encode


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return path


def test_pyvmm_backend_blk_passes_every_must_rule(tmp_path, image):
    with pyvmm_backend(str(tmp_path), "blk", "--image", str(image), "--queues", "2") \
            as (sock, _):
        lines = []
        passed, failed, skipped, must_failed = run_checks(sock, "blk", lines.append)
    assert (failed, must_failed) == (0, False), "\n".join(lines)
    skipped = [line.split()[0] for line in lines if " SKIP " in line]
    # No CONFIG_WCE; a socket, not a command (nothing to kill and restart, no program).
    assert skipped == ["BE-74", "BE-78"] + PROGRAM_RULES
    assert lines[-1] == f"{len(CHECKS) - len(skipped)} passed, 0 failed, " \
                        f"{len(skipped)} skipped"


def test_json_output_and_one_rule(tmp_path, image):
    import json
    with pyvmm_backend(str(tmp_path), "rng") as (sock, _):
        r = subprocess.run([sys.executable, "-m", "pyvmm", "check", "--socket", sock, "--json",
                            "--device", "rng", "--rule", "BE-9", "--rule", "BE-75"],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert [(x["rule"], x["result"]) for x in report["results"]] == [("BE-9", "PASS"),
                                                                      ("BE-75", "SKIP")]
    assert (report["passed"], report["failed"], report["skipped"]) == (1, 0, 1)


# What qemu-storage-daemon (libvhost-user) does differently, each looked into
# (docs/vhost-user-departures.md): it executes requests on a ring that was
# never enabled or was disabled (BE-50, 52, 54, 55), which QEMU never sees,
# as it enables each ring right after SET_VRING_KICK and disables one only to
# stop it with GET_VRING_BASE; it waits for a kick to look at a new ring
# (BE-47, a SHOULD QEMU hides by kicking); it hangs up on SET_VRING_CALL
# without an fd (BE-64, a SHOULD; QEMU always sends one); it crashes on
# SET_VRING_NUM for a queue far past its last (BE-21; QEMU never asks); it
# takes one memory region more than GET_MAX_MEM_SLOTS says (BE-37); it
# refuses a new memory table while stopped rings point into the old one
# (BE-30; QEMU keeps its RAM at the same addresses).
QSD_DEPARTURES = ["BE-21", "BE-30", "BE-37", "BE-47", "BE-50", "BE-52", "BE-54", "BE-55", "BE-64"]
# Both libvhost-user daemons now and then answer GET_VRING_BASE before the
# requests they took are done (about 1 run in 10): BE-60 fails only then.
SOMETIMES = "BE-60"


def test_qemu_storage_daemon_on_the_command_line(tmp_path, image):
    """Started by the checker (--socket PATH -- COMMAND), so that it is started
    again after it crashes. Every rule that applies passes but the departures
    above; some are MUST rules: exit status 1."""
    sock = str(tmp_path / "vub.sock")
    r = subprocess.run([sys.executable, "-m", "pyvmm", "check", "--socket", sock, "--device",
                        "blk", "--", "qemu-storage-daemon",
                        "--blockdev", f"driver=file,node-name=file0,filename={image}",
                        "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,"
                                    f"addr.type=unix,addr.path={sock},writable=on"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "BE-93   SKIP" in r.stdout and "BE-92   SKIP" in r.stdout   # no STATUS, RESET_DEVICE
    failed = [line.split()[0] for line in r.stdout.splitlines() if " FAIL " in line]
    assert [rule for rule in failed if rule != SOMETIMES] == QSD_DEPARTURES, r.stdout
    # It dies of SET_VRING_NUM for queue 1024 (QEMU 7.2's libvhost-user).
    assert "the back-end was killed by SIGSEGV" in r.stdout, r.stdout


@contextlib.contextmanager
def served(path, device, daemon_class=Daemon):
    """device served on path by daemon_class, in a thread, until the block ends
    (the listener closes: one that already did is a back-end that died)."""
    listener = Listener(path)

    def serve():
        try:
            serve_forever(listener, device, daemon_class)
        except (ChannelError, OSError):
            pass
    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener
    finally:
        listener.close()


# --- back-ends broken on purpose ---------------------------------------------------------------

class Mangled:
    """A Connection whose outgoing frames go through fn(request, flags, payload)
    -> list of (request, flags, payload) (none: the frame is dropped)."""

    def __init__(self, conn, fn):
        self._conn, self._fn = conn, fn

    def send(self, data, fds=()):
        request, flags, _ = HEADER.unpack_from(data)
        for i, (request, flags, payload) in enumerate(self._fn(request, flags, data[12:])):
            self._conn.send(encode(request, flags, payload), fds if i == 0 else ())

    def __getattr__(self, name):
        return getattr(self._conn, name)


def mangling(fn):
    class Broken(Daemon):
        def __init__(self, device, conn, loop):
            super().__init__(device, Mangled(conn, fn), loop)
    return Broken


def overriding(**methods):
    return type("Broken", (Daemon,), methods)


def _double_need_reply_get_features(self, msg):
    Daemon.dispatch(self, msg)
    if msg.request is R.GET_FEATURES and msg.need_reply:
        self.conn.send(encode(R.GET_FEATURES, 0x5, U64(self.offered_features).pack()))


def _ack_set_owner_always(self, msg):
    Daemon.dispatch(self, msg)
    if msg.request is R.SET_OWNER and not msg.need_reply:
        self.conn.send(encode(R.SET_OWNER, 0x5, U64(0).pack()))


def _refuse_protocol_features_first(self, msg):
    if not self.features:
        raise RemoteProtocolError("GET_PROTOCOL_FEATURES before SET_FEATURES")
    return U64(self.offered_protocol_features)


def _base_without_stopping(self, msg):
    ring = self._ring(msg.payload.index)
    return VringState(ring.index, ring.device_ring.next_avail)


def _start_on_enable(self, msg):
    """Starts a ring at SET_VRING_ENABLE, kick fd or not."""
    from types import SimpleNamespace
    Daemon._set_vring_enable(self, msg)
    ring = self._ring(msg.payload.index)
    if not ring.started and ring.addr is not None:
        self._set_vring_kick(SimpleNamespace(payload=msg.payload, fds=[]))


def _ignore_disable(self, msg):
    if msg.payload.num:
        Daemon._set_vring_enable(self, msg)
    else:
        self.session.negotiated.ring(msg.payload.index).enabled = True   # (the session's record)


def _reset_status_only(self, msg):
    """RESET_DEVICE clears the status and nothing else: the rings run on as
    they were (the session, playing by the rules, had disabled them)."""
    for index, ring in self.session.before.rings.items():
        self.session.negotiated.ring(index).enabled = ring.enabled
    self.status = 0


def _pad_config(self, msg):
    from pyvmm.vhost.user.messages import DeviceConfig
    asked = msg.payload
    return DeviceConfig(asked.offset, 0, self.device.config().ljust(len(asked.data), b"\0")[
        asked.offset:asked.offset + len(asked.data)])


class Silent(Blk):
    """Takes requests and never answers them."""

    def handle_queue(self, index, ring, memory):
        while ring.pop() is not None:
            pass


def _ignore_kicks(self, ring):
    os.eventfd_read(ring.kick)                # drained, never served


def _no_look_at_start(self, msg):
    """Starts a ring without looking at what was queued before."""
    self._process = lambda ring: None
    try:
        Daemon._set_vring_kick(self, msg)
    finally:
        del self._process


# The daemon keeps what the messages said of a ring in its session's record
# (Vring reads it there): a broken back-end changes the record.

def _ring_state(self, msg):
    return self.session.negotiated.ring(msg.payload.index)


def _enabled_at_start(self, msg):
    _ring_state(self, msg).enabled = True
    Daemon._set_vring_kick(self, msg)


def _forget_enable_at_start(self, msg):
    _ring_state(self, msg).enabled = False
    Daemon._set_vring_kick(self, msg)


def _features_without_enabling(self, msg):
    """Without bit 30, leaves the rings disabled (the session, playing by the
    rules, has enabled them)."""
    Daemon._set_features(self, msg)
    for ring in self.session.negotiated.rings.values():
        ring.enabled = False


def _keep_first_call_fd(self, msg):
    """Goes on signalling the first call eventfd it was given."""
    if self._ring(msg.payload.index).call is not None:
        for fd in msg.fds:
            os.close(fd)
        return
    Daemon._set_vring_call(self, msg)


def _base_always_0(self, msg):
    _ring_state(self, msg).base = 0


def _no_fd_breaks_ring(self, msg):
    Daemon._set_vring_call(self, msg)
    if not msg.fds:
        self._ring(msg.payload.index).broken = True


def _keep_no_call_fd(self, msg):
    from types import SimpleNamespace
    for fd in msg.fds:
        os.close(fd)
    Daemon._set_vring_call(self, SimpleNamespace(payload=msg.payload, fds=()))


class LastQueueIgnored(Blk):
    """Two request queues, and only the first is served."""

    def __init__(self, image):
        super().__init__(image, num_queues=2)

    def handle_queue(self, index, ring, memory):
        if index == 0:
            super().handle_queue(index, ring, memory)


class WceIgnored(Blk):
    """Offers VIRTIO_BLK_F_CONFIG_WCE and drops the driver's writeback writes."""

    @property
    def features(self):
        return Blk.features.fget(self) | 1 << 11


class CapacityWritable(Blk):
    """Takes a driver's write to the read-only capacity."""

    def write_config(self, offset, data):
        if offset == 0 and len(data) == 8:
            self.size = int.from_bytes(data, "little") * 512


def _protocol_set_needs_features(self, msg):
    if not self.features:
        raise RemoteProtocolError("SET_PROTOCOL_FEATURES before SET_FEATURES")


def _protocol_features_need_bit_30(self, msg):
    Daemon._set_features(self, msg)
    if not msg.payload.value & (1 << 30):
        self.session.negotiated.protocol_acked = 0     # REPLY_ACK off with it


def _only_all_features(self, msg):
    if msg.payload.value != self.offered_features:
        raise RemoteProtocolError("SET_FEATURES must ack every offered bit")
    Daemon._set_features(self, msg)


_slots = iter(range(100, 0, -1))


def _inflight_unmappable(self, msg):
    payload, fds = Daemon._get_inflight_fd(self, msg)
    return Inflight(payload.mmap_size * 4, 0, payload.num_queues, payload.queue_size), fds


def _inflight_too_small(self, msg):
    payload, fds = Daemon._get_inflight_fd(self, msg)
    return Inflight(64, 0, payload.num_queues, payload.queue_size), fds


def _map_at_offset_0(self, msg):
    from dataclasses import replace
    self.memory.add(replace(msg.payload.region, mmap_offset=0), msg.fds[0])


def _no_new_regions_while_running(self, msg):
    if any(ring.started for ring in self.rings):
        raise RemoteProtocolError("ADD_MEM_REG while a ring runs")
    Daemon._add_mem_reg(self, msg)


def _first_table_only(self, msg):
    if self.memory.regions:
        for fd in msg.fds:
            os.close(fd)
        return
    Daemon._set_mem_table(self, msg)


def _at_most_4_regions(self, msg):
    if len(msg.payload.regions) > 4:
        raise RemoteProtocolError("more than 4 regions")
    Daemon._set_mem_table(self, msg)


class RemovesByOffsetToo(Daemon):
    """Matches REM_MEM_REG's mmap_offset too (the spec says it is ignored)."""

    def _add_mem_reg(self, msg):
        self.__dict__.setdefault("offsets", {})[msg.payload.region.guest_addr] = \
            msg.payload.region.mmap_offset
        Daemon._add_mem_reg(self, msg)

    def _rem_mem_reg(self, msg):
        r = msg.payload.region
        if self.__dict__.get("offsets", {}).get(r.guest_addr) != r.mmap_offset:
            return U64(1)
        return Daemon._rem_mem_reg(self, msg)


class UserAddressesAsGuest(Daemon):
    """Takes the ring addresses of SET_VRING_ADDR for guest addresses."""

    def __init__(self, device, conn, loop):
        super().__init__(device, conn, loop)
        self.memory.guest_address = lambda addr, size: addr


class KeepsFds(Daemon):
    """Keeps a copy of every fd the front-end sends."""

    def __init__(self, device, conn, loop):
        super().__init__(device, Leaky(conn), loop)


class FdsWithPayloadOnly(Daemon):
    """Reads a message's fds only with its payload, dropping those that came
    with the header."""

    def __init__(self, device, conn, loop):
        super().__init__(device, PayloadFds(conn.sock, conn.name), loop)


class PayloadFds(Connection):
    def receive(self, waiting_for=None, timeout=None):
        import time
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with_header = []
        header = self._read(HEADER.size, deadline, with_header, waiting_for, first=True)
        for fd in with_header:
            os.close(fd)
        fds = []
        body = self._read(HEADER.unpack(header)[2], deadline, fds, waiting_for)
        return header + body, tuple(fds)


class Leaky:
    kept = []

    def __init__(self, conn):
        self._conn = conn

    def receive(self, *args, **kwargs):
        data, fds = self._conn.receive(*args, **kwargs)
        self.kept.extend(os.dup(fd) for fd in fds)
        return data, fds

    def __getattr__(self, name):
        return getattr(self._conn, name)


def only(request, change):
    """A mangler that changes the frames of one request only."""
    def fn(r, flags, payload):
        return [change(r, flags, payload)] if r == request else [(r, flags, payload)]
    return fn


BROKEN = {
    "BE-1": mangling(lambda r, f, p: [(r, 0x1, p)]),
    "BE-2": mangling(lambda r, f, p: [(r, 0x6, p)]),
    "BE-3": mangling(lambda r, f, p: [(r, 0xD, p)]),
    "BE-4": mangling(only(R.GET_FEATURES, lambda r, f, p: (r + 1, f, p))),
    "BE-5": mangling(only(R.GET_FEATURES, lambda r, f, p: (r, f, p + bytes(4)))),
    "BE-6": overriding(dispatch=_ack_set_owner_always),
    "BE-9": mangling(only(R.GET_FEATURES, lambda r, f, p: (r, f, p[:4]))),
    "BE-10": overriding(_get_protocol_features=_refuse_protocol_features_first),
    "BE-14": overriding(offered_protocol_features=property(
        lambda self: (Daemon.offered_protocol_features.fget(self) | PF.INBAND_NOTIFICATIONS.mask)
        & ~PF.BACKEND_REQ.mask)),
    "BE-16": overriding(offered_protocol_features=property(
        lambda self: Daemon.offered_protocol_features.fget(self) & ~PF.MQ.mask)),
    "BE-17": mangling(only(R.GET_QUEUE_NUM, lambda r, f, p: (r, f, U64(0).pack()))),
    "BE-20": mangling(lambda r, f, p: [] if r == R.SET_FEATURES else [(r, f, p)]),
    "BE-22": overriding(dispatch=_double_need_reply_get_features),
    # (mangled on the wire: the library's own session refuses to send 0 slots)
    "BE-35": mangling(only(R.GET_MAX_MEM_SLOTS, lambda r, f, p: (r, f, U64(0).pack()))),
    "BE-45": overriding(_set_vring_enable=_start_on_enable),
    "BE-55": overriding(_set_vring_enable=_ignore_disable),
    "BE-76": overriding(_get_config=_pad_config),
    "BE-92": overriding(_reset_device=_reset_status_only),
    "BE-75": mangling(only(R.GET_CONFIG, lambda r, f, p: (r, f, p[:8] + bytes([4, 0, 0, 0])
                                                          + p[12:16]))),
    "BE-93": overriding(_get_status=lambda self, msg: U64(0)),
    "BE-90": overriding(_set_owner=lambda self, msg: U64(1)),
    "BE-51": Silent,
    "BE-46": overriding(_on_kick=_ignore_kicks),
    "BE-47": overriding(_set_vring_kick=_no_look_at_start),
    "BE-49": overriding(_set_vring_base=_base_always_0),
    "BE-50": overriding(_set_vring_kick=_enabled_at_start),
    "BE-52": overriding(_set_vring_kick=_enabled_at_start),
    "BE-53": overriding(_set_features=_features_without_enabling,
                        _set_vring_kick=_forget_enable_at_start),
    "BE-54": overriding(_set_vring_kick=_forget_enable_at_start),
    "BE-56": overriding(_set_vring_base=_base_always_0),
    "BE-60": Silent,
    "BE-62": overriding(_get_vring_base=_base_without_stopping),
    "BE-64": overriding(_set_vring_call=_no_fd_breaks_ring),
    "BE-65": overriding(_set_vring_call=_keep_no_call_fd),
    "BE-11": overriding(_set_protocol_features=_protocol_set_needs_features),
    "BE-12": overriding(_set_features=_protocol_features_need_bit_30),
    "BE-13": overriding(_set_features=_only_all_features),
    "BE-21": overriding(_set_vring_num=lambda self, msg: None),   # acks any queue index
    "BE-24": mangling(only(R.SET_BACKEND_REQ_FD, lambda r, f, p: (r, f, U64(1).pack()))),
    "BE-36": overriding(_get_max_mem_slots=lambda self, msg: U64(next(_slots))),
    "BE-71": overriding(_get_inflight_fd=_inflight_unmappable),
    "BE-72": overriding(_get_inflight_fd=_inflight_too_small),
    "BE-77": CapacityWritable,
    "BE-78": WceIgnored,
    "BE-91": overriding(_reset_owner=lambda self, msg: self.close()),
    "BE-7": FdsWithPayloadOnly,
    "BE-18": LastQueueIgnored,
    "BE-80": overriding(offered_protocol_features=property(
        lambda self: Daemon.offered_protocol_features.fget(self) & ~PF.CONFIG.mask)),
    "BE-26": overriding(_set_vring_call=_keep_first_call_fd),
    "BE-73": overriding(_set_inflight_fd=lambda self, msg: [os.close(fd) for fd in msg.fds]
                        and None),                        # takes the area, never tracks
    "BE-27": overriding(_add_mem_reg=_map_at_offset_0),
    "BE-28": UserAddressesAsGuest,
    "BE-29": overriding(_set_mem_table=_at_most_4_regions),
    "BE-30": overriding(_set_mem_table=_first_table_only),
    "BE-31": overriding(_add_mem_reg=_no_new_regions_while_running),
    "BE-32": overriding(_add_mem_reg=_map_at_offset_0),
    "BE-37": mangling(only(R.GET_MAX_MEM_SLOTS, lambda r, f, p: (r, f, U64(4).pack()))),
    "BE-33": RemovesByOffsetToo,
    "BE-34": KeepsFds,
    "BE-94": overriding(_set_status=lambda self, msg: setattr(
        self, "status", msg.payload.value or self.status)),
    "BE-58": overriding(_get_vring_base=lambda self, msg: VringState(
        msg.payload.index, self._stop(self._ring(msg.payload.index)) + 1)),
    "BE-48": overriding(_get_vring_base=_base_without_stopping),
}


def test_every_check_has_a_broken_back_end():
    assert sorted([*BROKEN, *RESTART_RULES], key=lambda r: int(r[3:])) + PROGRAM_RULES == [
        c.rule for c in CHECKS]


@pytest.mark.parametrize("rule", sorted(BROKEN, key=lambda r: int(r[3:])))
def test_each_check_fails_on_a_back_end_broken_its_way(tmp_path, image, rule):
    broken = BROKEN[rule]
    device, daemon_class = (broken(str(image)), Daemon) if issubclass(broken, Blk) else (
        Blk(str(image)), broken)
    offered = device.features
    path = str(tmp_path / "broken.sock")
    with served(path, device, daemon_class):
        check = next(c for c in CHECKS if c.rule == rule)
        if rule in ("BE-10", "BE-11"):    # discovery itself would trip over it
            from pyvmm.check.rules import Offer
            offer = Offer(offered | 1 << 30, PF.REPLY_ACK.mask)
        else:
            offer = discover(SocketTarget(path, timeout=1))
        ctx = Context(SocketTarget(path, timeout=1), offer, "blk", timeout=1)
        from pyvmm.check.rules import Failed
        # A back-end that stays silent or hangs up fails by the connection's
        # error (or the driver's set-up refusing it): run_checks reports it as a
        # FAIL all the same. Every other breakage must be what the check reports.
        expected = (PyvmmError if rule in ("BE-7", "BE-10", "BE-11", "BE-12", "BE-13",
                                           "BE-20", "BE-28", "BE-29", "BE-30", "BE-31",
                                           "BE-91")
                    else Failed)
        try:
            with pytest.raises(expected):
                check.run(ctx)
        finally:
            ctx.target.release()


def test_dpdk_testpmd_passes_what_applies(tmp_path):
    """DPDK's vhost PMD in icmpecho mode, which answers the net data path's
    ARP (so that a disabled ring's side effects would show): no CONFIG,
    CONFIGURE_MEM_SLOTS or INFLIGHT_SHMFD (skipped); everything else passes
    but BE-21, a SHOULD: it acks SET_VRING_ENABLE with num = 2."""
    from backends import dpdk_testpmd
    with dpdk_testpmd(str(tmp_path)) as (sock, _):
        lines = []
        passed, failed, skipped, must_failed = run_checks(sock, "net", lines.append)
    failed = [line.split()[0] for line in lines if " FAIL " in line]
    assert failed == ["BE-21"] and not must_failed, "\n".join(lines)
    assert "BE-51   PASS" in "\n".join(lines) and "BE-75   SKIP" in "\n".join(lines)


def test_the_readme_testpmd_line_is_the_one_the_tests_run(tmp_path, monkeypatch, top):
    """The README's dpdk-testpmd command line has the options the tests found
    it needs (--no-mlockall, --total-num-mbufs=8192), less what differs per
    run (the socket, the queues, --file-prefix)."""
    import re

    import backends
    started = []

    def popen(argv, **kwargs):
        started.append(argv)
        raise RuntimeError("recorded, not started")
    monkeypatch.setattr(backends.subprocess, "Popen", popen)
    with pytest.raises(RuntimeError), backends.dpdk_testpmd(str(tmp_path)):
        pass
    per_run = ("--file-prefix=", "--rxq=", "--txq=")
    tests = [a for a in started[0] if not a.startswith(per_run)]
    tests[tests.index("--vdev") + 1] = "VDEV"
    readme = re.search(r"`(dpdk-testpmd [^`]*)`", (top / "README.md").read_text()).group(1).split()
    readme[readme.index("--vdev") + 1] = "VDEV"
    assert readme == tests


def test_dpdk_testpmd_that_does_not_echo_is_not_observed(tmp_path):
    """dpdk-testpmd in rxonly mode takes TX and answers nothing: the
    side-effect rules could not observe (SKIP), where icmpecho passes them."""
    from backends import dpdk_testpmd
    with dpdk_testpmd(str(tmp_path), mode="rxonly") as (sock, _):
        results = []
        run_checks(sock, "net", lambda line: None, only={"BE-51", *SIDE_EFFECT_RULES},
                   results=results)
    assert [(r["rule"], r["result"]) for r in results] == [("BE-50", "SKIP"), ("BE-51", "PASS"),
                                                           ("BE-52", "SKIP"), ("BE-54", "SKIP"),
                                                           ("BE-55", "SKIP")], results
    assert all("could not observe" in r["detail"] for r in results if r["result"] == "SKIP")


# --- the program conventions (a command instead of a socket) -------------------------------------

PROGRAM_RULES = ["BE-107", "BE-108", "BE-109", "BE-110", "BE-111", "BE-112", "BE-113", "BE-114",
                 "BE-115", "BE-116", "BE-118"]


# Rules that kill the back-end and start it again: a command only.
RESTART_RULES = ["BE-74"]


def test_the_restart_check_passes_pyvmm_blk_and_fails_a_back_end_that_skips_requests(image):
    """BE-74 on `pyvmm backend blk` as a command: every request completes once
    across a SIGKILL at each point; one that restarts at the avail index
    (forgetting what was in flight and what was never taken) fails it."""
    script = os.path.join(os.path.dirname(__file__), "broken_program.py")
    good = _program_results([sys.executable, "-m", "pyvmm", "backend", "blk", "--image",
                             str(image)], "blk", only=RESTART_RULES)
    assert good["BE-74"][0] == "PASS", good
    bad = _program_results([sys.executable, script, "BE-74", "--image", str(image)], "blk",
                           only=RESTART_RULES)
    assert bad["BE-74"][0] == "FAIL", bad
    assert "posted, not kicked" in bad["BE-74"][1] and "never completed" in bad["BE-74"][1], bad


def _program_results(argv, device=None, only=PROGRAM_RULES):
    from pyvmm.check.target import CommandTarget
    target = CommandTarget(argv, timeout=5)
    results = []
    try:
        run_checks(target, device, lambda line: None, only=set(only), results=results)
    finally:
        target.close()
    return {r["rule"]: (r["result"], r["detail"]) for r in results}


def test_pyvmm_backend_as_a_command_passes_every_rule(tmp_path):
    """Started by the checker and restarted as needed, pyvmm's rng passes
    every check, program conventions included, but BE-107: a Python program
    installed by pip has no vhost-user.json description file (a SHOULD)."""
    results = _program_results([sys.executable, "-m", "pyvmm", "backend", "rng"], "rng",
                               only=[c.rule for c in CHECKS])
    failed = {rule: r for rule, r in results.items() if r[0] == "FAIL"}
    assert list(failed) == ["BE-107"], failed
    assert not [rule for rule, r in results.items() if r[0] == "SKIP"
                and rule in PROGRAM_RULES]


def test_virtiofsd_one_front_end_at_a_time(tmp_path):
    """virtiofsd serves one front-end and exits: the checker starts it again
    for each check. It keeps every program convention (and ships its
    description file, BE-107); it departs from the ring rules as
    qemu-storage-daemon does (both are libvhost-user), and the FUSE data
    path works."""
    (tmp_path / "share").mkdir()
    results = _program_results(["/usr/lib/qemu/virtiofsd", "-o", f"source={tmp_path}/share",
                                "-o", "cache=none"], "fs", only=[c.rule for c in CHECKS])
    failed = [rule for rule, r in results.items() if r[0] == "FAIL"]
    assert [rule for rule in failed if rule != SOMETIMES] == [
        "BE-21", "BE-30", "BE-47", "BE-50", "BE-52", "BE-54", "BE-55"], results
    assert all(results[rule][0] == "PASS" for rule in PROGRAM_RULES + ["BE-51", "BE-58"])


def test_pyvmm_vsock_backend_passes_every_rule(tmp_path):
    with pyvmm_backend(str(tmp_path), "vsock", "--guest-cid", "3", "--uds-path",
                       str(tmp_path / "host")) as (sock, _):
        lines = []
        passed, failed, skipped, must_failed = run_checks(sock, "vsock", lines.append)
    assert failed == 0 and "BE-51   PASS" in "\n".join(lines), "\n".join(lines)


@pytest.mark.parametrize("rule", PROGRAM_RULES)
def test_each_program_check_fails_on_a_program_broken_its_way(rule):
    """Each check alone (discovery would trip over some of these programs)."""
    import os

    from pyvmm.check.rules import Failed, Offer
    from pyvmm.check.target import CommandTarget
    script = os.path.join(os.path.dirname(__file__), "broken_program.py")
    target = CommandTarget([sys.executable, script, rule], timeout=5)
    try:
        with pytest.raises(Failed):
            next(c for c in CHECKS if c.rule == rule).run(Context(target, Offer(0), "rng", 5))
    finally:
        target.close()


def test_listen_for_a_back_end_that_connects(tmp_path):
    """--listen: the back-end connects (pyvmm backend --connect, which ends
    with its front-end); the checker starts it again for each check."""
    sock = str(tmp_path / "front.sock")
    r = subprocess.run([sys.executable, "-m", "pyvmm", "check", "--socket", sock, "--listen",
                        "--device", "rng", "--rule", "BE-9", "--rule", "BE-51", "--rule", "BE-54",
                        "--", sys.executable, "-m", "pyvmm", "backend", "rng", "--connect", sock],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "3 passed, 0 failed, 0 skipped", r.stdout


@pytest.mark.parametrize("argv, message", [
    (["--listen"], "--listen needs --socket PATH"),
    ([], "give --socket PATH, or the back-end's command after --"),
    (["--socket", "/x", "--rule", "BE-999"], "no check for BE-999 (pyvmm check --list"),
])
def test_bad_command_lines_are_one_line(argv, message):
    r = subprocess.run([sys.executable, "-m", "pyvmm", "check", *argv],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_nothing_there_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pyvmm", "check", "--socket",
                        str(tmp_path / "none.sock")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no socket at" in r.stderr, r.stderr


def test_list_names_every_rule_without_a_back_end():
    r = subprocess.run([sys.executable, "-m", "pyvmm", "check", "--list"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()] == [c.rule for c in CHECKS]
    assert "BE-55   MUST*     a disabled ring is served without side effects" in r.stdout


def test_a_reader_that_goes_away_is_no_traceback():
    r = subprocess.run(f"{sys.executable} -m pyvmm check --list | true", shell=True,
                       capture_output=True, text=True, timeout=60)
    assert r.stderr == "", r.stderr             # no BrokenPipeError traceback


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.rule)
def test_no_check_trips_over_a_bare_offer(check, tmp_path):
    """A back-end offering neither bit 30 nor protocol features, and no device
    type: each check skips, or fails the way run_checks reports (Failed, a
    pyvmm error), never with an error of its own (a checker bug)."""
    from pyvmm.check.rules import Failed, Offer, Skipped
    ctx = Context(SocketTarget(str(tmp_path / "none.sock"), timeout=1), Offer(1 << 32), None,
                  timeout=1)
    try:
        check.run(ctx)
    except (Skipped, Failed, PyvmmError, OSError):
        pass
    finally:
        ctx.target.release()


@pytest.mark.parametrize("argv", [
    [sys.executable, "-m", "pyvmm", "backend", "rng"],          # --fd: a listening socket
    [sys.executable, os.path.join(os.path.dirname(__file__), "broken_program.py"),
     "connected-fd"],                                           # --fd: a connected one
], ids=["listening", "connected"])
def test_fd_may_be_listening_or_connected(argv):
    """BE-112: the spec does not say which kind of socket --fd is, and
    vhost-user-gpu takes a connected one: a program that serves either kind
    passes (one that serves neither fails: broken_program.py BE-112)."""
    results = _program_results(argv, only=["BE-112"])
    assert results["BE-112"][0] == "PASS", results


# --- a back-end that dies for good (a socket: nobody starts it again) --------------------------

def _died_once(out, rule):
    """out says once that the back-end died at rule; each rule after it is
    SKIPped (not run) rather than FAILed for want of a socket."""
    lines = out.splitlines()
    assert out.count("died") == 1 and f"died at {rule}" in out, out
    after = [line for line in lines if line.startswith("BE-")]
    after = after[[line.split()[0] for line in after].index(rule) + 1:]
    assert after and all(line.split()[1] == "SKIP" and line.endswith(": not run")
                         for line in after), out
    return after


def test_qemu_storage_daemon_dying_under_socket_is_said_once(tmp_path, image):
    """qemu-storage-daemon 7.2 dies of SIGSEGV at BE-21 (SET_VRING_NUM for queue
    1024). Under --socket nobody starts it again: one line says so, the rest
    are skipped; MUST rules went unchecked, so the exit status is 1."""
    from backends import storage_daemon
    with storage_daemon(str(tmp_path), image) as sock:
        r = subprocess.run([sys.executable, "-m", "pyvmm", "check", "--socket", sock,
                            "--device", "blk"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    after = _died_once(r.stdout, "BE-21")
    assert r.stdout.count("nothing listens") == 1, r.stdout     # in BE-21's line
    assert r.stdout.splitlines()[-1].endswith(f" {r.stdout.count(' SKIP ')} skipped"), r.stdout


class DiesAtQueue1024(Daemon):
    """Breaks BE-6 (a MUST*: it acks SET_OWNER unasked, where REPLY_ACK is
    off, which is where BE-6 looks: every other check's SET_OWNER goes
    unanswered, as it should), and dies as qemu-storage-daemon does on
    SET_VRING_NUM for queue 1024: its socket goes."""
    listener = None

    def dispatch(self, msg):
        if msg.request is R.SET_VRING_NUM and msg.payload.index >= 1024:
            self.listener.close()
            self.close()
            return None
        if self.session.negotiated.has(PF.REPLY_ACK):
            return Daemon.dispatch(self, msg)
        return _ack_set_owner_always(self, msg)


def test_a_must_failure_before_the_back_end_dies_still_fails_the_run(tmp_path, image, capsys):
    from pyvmm.cli import main
    with served(str(tmp_path / "dies.sock"), Blk(str(image)), DiesAtQueue1024) as listener:
        DiesAtQueue1024.listener = listener
        status = main(["check", "--socket", listener.path, "--device", "blk", "--timeout", "2"])
    out = capsys.readouterr().out
    assert status == 1, out
    assert "BE-6    FAIL  MUST*" in out, out
    _died_once(out, "BE-21")


def test_mq_is_not_asked_of_a_back_end_without_bit_30(tmp_path):
    """BE-16: MQ is a protocol feature, and a back-end without bit 30
    (VHOST_USER_F_PROTOCOL_FEATURES) has none to offer: SKIP, not FAIL."""
    from pyvmm.check.rules import Offer, Skipped
    ctx = Context(SocketTarget(str(tmp_path / "none.sock"), timeout=1), Offer(1 << 32), None,
                  timeout=1)
    with pytest.raises(Skipped, match="bit 30"):
        next(c for c in CHECKS if c.rule == "BE-16").run(ctx)


class NoProtocolFeatures(Daemon):
    """A back-end of before bit 30: no protocol features, so no REPLY_ACK
    either; nothing but a reply tells the front-end a message was taken."""

    @property
    def offered_features(self):
        return Daemon.offered_features.fget(self) & ~(1 << 30)


def test_a_back_end_without_bit_30_fails_only_what_it_lacks(tmp_path, image):
    """Without bit 30, what needs it is SKIPped (BE-16 too) and the ring
    checks wait for the back-end to have taken each message (a GET_FEATURES
    reply) before they kick: only BE-80 fails, QEMU's need of bit 30 for blk."""
    lines = []
    with served(str(tmp_path / "old.sock"), Blk(str(image)), NoProtocolFeatures) as listener:
        run_checks(listener.path, "blk", lines.append, timeout=2)
    assert [line.split()[0] for line in lines if " FAIL " in line] == ["BE-80"], \
        "\n".join(lines)


# --- net: a side effect shows only as an answer on RX --------------------------------------------

class NetSink:
    """A vhost-user-net back-end whose wire goes nowhere: TX is taken and
    dropped, nothing ever comes back on RX (echo=True: each frame comes back
    on RX, as dpdk-testpmd's icmpecho answers)."""

    def __new__(cls, echo=False):
        from pyvmm.vhost.user.backend.device import BackendDevice
        from pyvmm.virtio import spec

        class Net(BackendDevice):
            device_id = spec.VIRTIO_ID_NET
            name = "net"
            num_queues = 2
            frames = []

            def handle_queue(self, index, ring, memory):
                if index == 1:                                     # TX
                    while (chain := ring.pop()) is not None:
                        if echo:
                            self.frames.append(b"".join(memory.read(b.addr, b.length)
                                                        for b in chain.buffers))
                        ring.push(chain.head, 0)
                    if self.frames:
                        self.daemon.wake(0)
                    return
                while self.frames and (chain := ring.pop()) is not None:     # RX
                    frame, buf = self.frames.pop(0), chain.buffers[0]
                    memory.write(buf.addr, frame[:buf.length])
                    ring.push(chain.head, min(len(frame), buf.length))

            def reset(self):
                self.frames.clear()
        return Net()


SIDE_EFFECT_RULES = ["BE-50", "BE-52", "BE-54", "BE-55"]


def _net_results(tmp_path, device, daemon_class=Daemon):
    results = []
    with served(str(tmp_path / f"{daemon_class.__name__}.sock"), device, daemon_class) as l:
        run_checks(l.path, "net", lambda line: None, timeout=2,
                   only={"BE-51", *SIDE_EFFECT_RULES}, results=results)
    return {r["rule"]: (r["result"], r["detail"]) for r in results}


def test_net_side_effects_unseen_are_not_passed(tmp_path):
    """BE-50/52/54/55 on net: a back-end that does not echo shows no side
    effect whatever it does, so those rules say they could not observe."""
    results = _net_results(tmp_path, NetSink())
    assert results.pop("BE-51")[0] == "PASS"
    assert all(result == "SKIP" and "could not observe" in detail
               for result, detail in results.values()), results


def test_net_side_effects_seen_on_an_echoing_back_end(tmp_path):
    """The same rules on a back-end that echoes: they pass, and fail on one
    that executes TX on a disabled ring (BE-55)."""
    results = _net_results(tmp_path, NetSink(echo=True))
    assert all(result == "PASS" for result, _ in results.values()), results
    results = _net_results(tmp_path, NetSink(echo=True), overriding(
        _set_vring_enable=_ignore_disable))          # a class named Broken
    assert results["BE-55"][0] == "FAIL", results


def test_side_effects_of_a_back_end_that_never_completes(tmp_path, image):
    """A back-end that takes requests and never completes them (Silent): BE-51
    fails, and the side-effect rules, with nothing to observe, say so (once
    learned, not waited for at each rule)."""
    results = []
    with served(str(tmp_path / "silent.sock"), Silent(str(image))) as listener:
        run_checks(listener.path, "blk", lambda line: None, timeout=1,
                   only={"BE-51", *SIDE_EFFECT_RULES}, results=results)
    results = {r["rule"]: (r["result"], r["detail"]) for r in results}
    assert results.pop("BE-51")[0] == "FAIL", results
    assert all(result == "SKIP" and "could not observe" in detail and "see BE-51" in detail
               for result, detail in results.values()), results
