"""AF_VSOCK between the guest and the testbed through the kernel's vhost-vsock."""

import hashlib
import os
import socket
import subprocess
import time

import pytest
from guestvm import PYVMM, TOP, connect_with_retry, finish, guest_sha256, start

pytestmark = [pytest.mark.testbed, pytest.mark.usefixtures("transport")]

CID = 7
SIZE = 2 << 20


def test_guest_to_host_stream():
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as listener:
        listener.bind((socket.VMADDR_CID_ANY, 5000))
        listener.listen(1)
        listener.settimeout(180)
        proc = start("--vsock", f"vhost-kernel,cid={CID}",
                     guest_cmd=f"head -c {SIZE} /dev/urandom > /tmp/d && sha256sum /tmp/d && "
                               f"vsock connect 2 5000 < /tmp/d")
        received = hashlib.sha256()
        try:
            conn, (peer_cid, _) = listener.accept()
            with conn:
                conn.settimeout(120)
                while chunk := conn.recv(1 << 16):
                    received.update(chunk)
        finally:
            rc, out, err = finish(proc)
    assert rc == 0, out + err
    assert peer_cid == CID
    assert guest_sha256(out) == received.hexdigest()


def test_host_to_guest_stream():
    proc = start("--vsock", f"vhost-kernel,cid={CID}",
                 guest_cmd="vsock listen 5001 < /dev/null > /tmp/r && sha256sum /tmp/r")
    data = os.urandom(SIZE)
    try:
        with connect_with_retry((CID, 5001), family=socket.AF_VSOCK) as s:
            s.sendall(data)
    finally:
        rc, out, err = finish(proc)
    assert rc == 0, out + err
    assert guest_sha256(out) == hashlib.sha256(data).hexdigest()


def test_cid_taken_is_one_clear_line():
    first = start("--vsock", f"vhost-kernel,cid={CID}", guest_cmd="sleep 600")
    try:
        deadline = time.monotonic() + 120
        # The first VM holds the CID from its start-up on; wait for its boot line.
        while "vsock CID" not in (line := first.stderr.readline()):
            assert line and time.monotonic() < deadline, "first VM did not start"
        r = subprocess.run([*PYVMM, "run", "--vsock", f"vhost-kernel,cid={CID}", "--", "true"],
                           capture_output=True, text=True, timeout=120, cwd=TOP)
        assert r.returncode == 1
        assert r.stderr.strip().splitlines()[-1] == (
            f"pyvmm: error: vsock CID {CID} is already taken by another VM; "
            "pick another with --vsock vhost-kernel,cid=N")
    finally:
        first.kill()
        first.wait()
