"""`pyvmm run --blk` against back-ends that misbehave during the handshake:
each ends pyvmm with one line that names the request, a non-zero exit, and
within the read timeout (no KVM needed: the back-end is met first)."""

import socket
import subprocess
import sys
import threading
import time

import pytest

from pyvmm.vhost.user.messages import HEADER, FrontendReq, U64
from pyvmm.vhost.user.wire import encode

R = FrontendReq
FEATURES = U64(1 << 32 | 1 << 30).pack()


def fake_back_end(path, answer):
    """Listen on path; for each request read, answer(request, flags) gives the bytes
    to send back (b"" for none), or None to hang up, or "stall" to go silent."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        with conn:
            while True:
                header = conn.recv(12, socket.MSG_WAITALL)
                if len(header) < 12:
                    return
                request, flags, size = HEADER.unpack(header)
                if size:
                    conn.recv(size, socket.MSG_WAITALL)
                reply = answer(request, flags)
                if reply is None:
                    return
                if reply == "stall":
                    time.sleep(30)
                    return
                conn.sendall(reply)
    threading.Thread(target=serve, daemon=True).start()
    return server


def good_then(bad_at, bad):
    """Answer correctly until request bad_at, then do bad."""
    def answer(request, flags):
        if request == bad_at:
            return bad
        if request == R.GET_FEATURES:
            return encode(R.GET_FEATURES, 0x5, FEATURES)
        if request == R.GET_PROTOCOL_FEATURES:
            return encode(request, 0x5, U64(0).pack())
        return b""
    return answer


@pytest.mark.parametrize("answer,message", [
    (good_then(R.GET_FEATURES, None),
     "closed the connection instead of sending the reply to VHOST_USER_GET_FEATURES"),
    (good_then(R.GET_PROTOCOL_FEATURES, None),
     "closed the connection instead of sending the reply to VHOST_USER_GET_PROTOCOL_FEATURES"),
    (good_then(R.GET_FEATURES, "stall"),
     "did not send the reply to VHOST_USER_GET_FEATURES within 0.5 s"),
    (good_then(R.GET_FEATURES, encode(R.GET_PROTOCOL_FEATURES, 0x5, FEATURES)),
     "a reply to GET_PROTOCOL_FEATURES arrived, but GET_FEATURES was due (BE-4)"),
    (good_then(R.GET_FEATURES, encode(R.GET_FEATURES, 0x5, FEATURES[:4])),
     "the reply to GET_FEATURES: U64 is 8 bytes, got 4 (BE-5)"),
    (good_then(R.GET_FEATURES, encode(R.GET_FEATURES, 0xD, FEATURES)),
     "the reply to GET_FEATURES has flags 0xd, not 0x5 (BE-3)"),
])
def test_a_misbehaving_back_end_is_one_line(tmp_path, answer, message):
    path = str(tmp_path / "bad.sock")
    server = fake_back_end(path, answer)
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--blk",
                        f"vhost-user,socket={path},timeout=0.5", "--", "true"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    server.close()
    assert time.monotonic() - started < 20
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert lines[0].startswith(f"pyvmm: error: --blk socket={path}: ")
