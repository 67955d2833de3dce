"""`pyvmm trace`: the proxy between a front-end and a back-end, no VM. It
forwards every frame and fd unchanged (the disk still works through it),
prints each message decoded, and flags a broken rule with its id."""

import os
import subprocess
import sys
import threading
import time

from backends import pyvmm_backend, storage_daemon
from test_vhost_user_blk import VIRTIO_BLK_T_IN, DATA, request, start_driver
from test_virtio import RecordingVm, w32

from pyvmm.devices.virtio import mmio
from pyvmm.vhost.user import proxy
from pyvmm.vmm.virtio_devices import BlkConfig, plan_blk


def traced(listen, connect):
    """The proxy in a thread for one front-end; (thread, lines, result)."""
    lines, result = [], {}

    def run():
        result["broken"] = proxy.serve(listen, connect, lines.append, once=True)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not os.path.exists(listen):
        assert time.monotonic() < deadline, "the proxy did not listen"
        time.sleep(0.01)
    return thread, lines, result


def test_pyvmm_and_qemu_storage_daemon_through_the_proxy(tmp_path, memory16):
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    listen = str(tmp_path / "trace.sock")
    with storage_daemon(str(tmp_path), image) as sock:
        thread, lines, result = traced(listen, sock)
        device, _, summary = plan_blk(BlkConfig(listen), 0, None)
        assert summary.startswith("vda: 1 MiB disk")
        t = mmio.VirtioMmio(device, RecordingVm(), memory16, 0xD000_0000, 5)
        ring = start_driver(t, memory16, device.features)
        assert request(t, ring, memory16, VIRTIO_BLK_T_IN, 0, 4096) == 0
        assert memory16.read(DATA, 4096) == image.read_bytes()[:4096]     # data went through
        w32(t, mmio.STATUS, 0)                                            # a reset: stop
        t.close()
        device.close()
        thread.join(10)
    assert result["broken"] == 0
    text = "\n".join(lines)
    for expected in ("-> GET_FEATURES", "<- reply to GET_FEATURES: features=0x",
                     "-> SET_PROTOCOL_FEATURES", "-> SET_BACKEND_REQ_FD", "-> GET_CONFIG",
                     "-> SET_MEM_TABLE" if "SET_MEM_TABLE" in text else "-> ADD_MEM_REG",
                     "-> SET_VRING_KICK", "(1 fd)", "-> GET_VRING_BASE",
                     "-- the front-end closed its connection"):
        assert expected in text, text
    assert not any(line.startswith("!!") for line in lines)


def test_a_broken_rule_is_flagged_and_forwarding_goes_on(tmp_path):
    """A front-end that sends SET_VRING_ADDR before any memory table (FE-50):
    the proxy names the rule; the back-end's own refusal then reaches the
    front-end through it (the connection closes)."""
    from pyvmm.vhost.user.channel import Connection
    from pyvmm.vhost.user.frontend import VhostUserFrontend
    from pyvmm.vhost.user.messages import FrontendReq, VringAddress
    from pyvmm.vhost.user.wire import encode
    listen = str(tmp_path / "trace.sock")
    with pyvmm_backend(str(tmp_path), "rng") as (sock, _):
        thread, lines, result = traced(listen, sock)
        fe = VhostUserFrontend(Connection.connect(listen, "the proxy", timeout=5))
        fe.negotiate()
        raw = fe.session.request(FrontendReq.SET_VRING_ADDR,
                                 VringAddress(0, 0, 0x1000, 0x3000, 0x2000))
        fe.conn.send(encode(raw.request, raw.flags, raw.payload.pack()))
        thread.join(10)
        fe.close()
    assert result["broken"] == 1
    flagged = [line for line in lines if line.startswith("!! RULE BROKEN by the front-end")]
    assert len(flagged) == 1 and "FE-50" in flagged[0], lines


def test_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pyvmm", "trace", "--listen",
                        str(tmp_path / "t.sock"), "--connect", str(tmp_path / "none.sock"),
                        "--once", "--output", "/nonexistent/dir/trace.log"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "pyvmm: error: --output /nonexistent/dir/trace.log: No such file or directory"]


def raw_back_end(path):
    """A listening socket standing in for a back-end (the test reads and writes it)."""
    import socket
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    server.settimeout(10)
    return server


def serving(listen, connect, **options):
    """The proxy in a thread, serving one front-end after another (options:
    serve()'s); its lines."""
    lines = []
    thread = threading.Thread(target=proxy.serve, args=(listen, connect, lines.append),
                              kwargs=options, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not os.path.exists(listen):
        assert time.monotonic() < deadline, "the proxy did not listen"
        time.sleep(0.01)
    return thread, lines


def connect(path):
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def test_frames_of_any_size_are_forwarded_unchanged(tmp_path):
    """A 10000-byte payload (over the 4 KiB any defined message needs) goes
    through whole, and so does the frame after it: the proxy is flagged the
    oversized frame, it does not cut it."""
    from pyvmm.vhost.user.messages import U64, FrontendReq as R
    from pyvmm.vhost.user.wire import encode
    listen, backend_path = str(tmp_path / "trace.sock"), str(tmp_path / "be.sock")
    server = raw_back_end(backend_path)
    thread, lines = serving(listen, backend_path)
    big = encode(R.SET_CONFIG, 0x1, os.urandom(10000))
    after = encode(R.SET_FEATURES, 0x1, U64(1 << 32).pack())
    front = connect(listen)
    back, _ = server.accept()
    back.settimeout(10)
    front.sendall(big + after)
    got = b""
    while len(got) < len(big + after):
        chunk = back.recv(65536)
        assert chunk, "the proxy hung up"
        got += chunk
    assert got == big + after
    assert any("!! RULE BROKEN by the front-end" in line and "10000 bytes" in line
               for line in lines), lines
    front.close()
    back.close()
    server.close()


def test_the_next_front_end_is_served_after_the_back_end_hangs_up(tmp_path):
    """The back-end stops reading (its side of the socket shut): forwarding the
    front-end's next frame fails. The proxy ends that pair with a line and
    serves the next front-end, as its help says."""
    import socket

    from pyvmm.vhost.user.messages import FrontendReq as R
    from pyvmm.vhost.user.wire import encode
    listen, backend_path = str(tmp_path / "trace.sock"), str(tmp_path / "be.sock")
    server = raw_back_end(backend_path)
    thread, lines = serving(listen, backend_path)
    first = connect(listen)
    back, _ = server.accept()
    back.settimeout(10)
    first.sendall(encode(R.GET_FEATURES, 0x1))
    assert back.recv(12) == encode(R.GET_FEATURES, 0x1)
    back.shutdown(socket.SHUT_RD)                  # the back-end takes nothing more
    first.sendall(encode(R.SET_OWNER, 0x1))
    assert first.recv(1) == b""                     # the proxy closed that front-end
    back.close()
    second = connect(listen)                        # and serves the next one
    back2, _ = server.accept()
    back2.settimeout(10)
    second.sendall(encode(R.GET_FEATURES, 0x1))
    assert back2.recv(12) == encode(R.GET_FEATURES, 0x1)
    assert thread.is_alive()
    assert any(line.startswith("-- forwarding to the back-end") for line in lines), lines
    for s in (second, back2, server):
        s.close()


def test_trace_names_the_feature_bits_of_the_device_it_is_told(tmp_path):
    """`pyvmm trace --device blk`: blk's own bits by name (FLUSH, not bit9)."""
    from pyvmm.vhost.user.messages import U64, FrontendReq as R
    from pyvmm.vhost.user.wire import encode
    from pyvmm.virtio.blk import BLK_FEATURE_NAMES
    listen, backend_path = str(tmp_path / "trace.sock"), str(tmp_path / "be.sock")
    server = raw_back_end(backend_path)
    thread, lines = serving(listen, backend_path, once=True, device_names=BLK_FEATURE_NAMES)
    front = connect(listen)
    back, _ = server.accept()
    back.settimeout(10)
    front.sendall(encode(R.GET_FEATURES, 0x1))
    assert back.recv(12) == encode(R.GET_FEATURES, 0x1)
    back.sendall(encode(R.GET_FEATURES, 0x5, U64(1 << 32 | 1 << 9).pack()))
    assert len(front.recv(20)) == 20
    front.close()
    thread.join(10)
    assert "<- reply to GET_FEATURES: features=0x100000200 (FLUSH|VERSION_1)" in lines, lines
    back.close()
    server.close()
