"""`pyvmm trace` between QEMU and qemu-storage-daemon: the whole start-up is
printed, no rule is flagged, and QEMU's guest still reads its disk."""

import hashlib
import os
import re
import subprocess
import sys
import time

import pytest
from backends import storage_daemon
from guestvm import qemu_exit_status, qemu_microvm

from pyvmm import guest

pytestmark = pytest.mark.testbed

MiB = 1 << 20


def test_qemu_and_qemu_storage_daemon_through_the_trace_proxy(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(4 * MiB))
    listen, trace = str(tmp_path / "trace.sock"), tmp_path / "trace.log"
    with storage_daemon(str(tmp_path), image) as sock:
        proxy = subprocess.Popen([sys.executable, "-m", "pyvmm", "trace", "--listen", listen,
                                  "--connect", sock, "--once", "--output", str(trace)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(listen):
            assert proxy.poll() is None and time.monotonic() < deadline, proxy.stdout.read()
            time.sleep(0.05)
        r = qemu_microvm(guest.BZIMAGE, guest.command_arg(
                             ["sh", "-c", "dd if=/dev/vda bs=1M count=4 2>/dev/null | sha256sum"]),
                         devices=["-chardev", f"socket,id=c0,path={listen}",
                                  "-device", "vhost-user-blk,chardev=c0"],
                         shared_memory=True, timeout=240)
        assert proxy.wait(timeout=30) == 0, trace.read_text()[-3000:]
    out = r.stdout.decode(errors="replace")
    assert r.returncode == qemu_exit_status(0), out
    assert hashlib.sha256(image.read_bytes()).hexdigest() in out
    text = trace.read_text()
    for request in ("GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
                    "GET_QUEUE_NUM", "SET_OWNER", "GET_CONFIG", "SET_FEATURES",
                    "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
                    "SET_VRING_CALL"):
        assert re.search(rf"^-> {request}\b", text, re.M), f"{request} not traced:\n{text}"
    assert re.search(r"^-> (SET_MEM_TABLE|ADD_MEM_REG)\b", text, re.M)
    assert "!!" not in text
