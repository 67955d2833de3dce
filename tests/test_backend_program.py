"""`pyvmm backend DEVICE`: the conventions of the spec's "Back-end program
conventions" (capabilities, --socket-path, --fd, SIGTERM, no daemonizing)
and one clear line for a bad option. No KVM."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from backends import pyvmm_backend

from pyvmm.vhost.user.frontend import VhostUserFrontend

PYVMM = [sys.executable, "-m", "pyvmm", "backend"]


@pytest.mark.parametrize("device, kind", [("rng", "rng"), ("blk", "block"), ("vsock", "vsock")])
def test_print_capabilities(device, kind):
    """BE-114."""
    out = subprocess.run(PYVMM + [device, "--print-capabilities"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    assert json.loads(out.stdout) == {"type": kind}


@pytest.mark.parametrize("args, message", [
    (["blk", "--socket-path", "/tmp/x.sock"], "blk needs --image FILE"),
    (["blk", "--socket-path", "/tmp/x.sock", "--image", "/nonexistent"],
     "--image /nonexistent: No such file or directory"),
    (["blk", "--socket-path", "/tmp/x.sock", "--image", "/dev/null"],
     "--image /dev/null: not a regular file or block device"),
    (["blk", "--socket-path", "/tmp/x.sock", "--image", "/etc/hostname", "--queues", "0"],
     "--queues 0: give 1 to 64"),
    (["blk", "--socket-path", "/tmp/x.sock", "--image", "/etc/hostname", "--io-threads", "0"],
     "--io-threads 0: give 1 to 64"),
    (["rng"], "give --socket-path PATH, --fd N or --connect PATH"),
    (["vsock", "--socket-path", "/tmp/x.sock", "--guest-cid", "3"],
     "vsock needs --guest-cid N and --uds-path PATH"),
    (["vsock", "--socket-path", "/tmp/x.sock", "--guest-cid", "2", "--uds-path", "/tmp/v"],
     "--guest-cid 2: CIDs 0-2 and 2^32-1 are reserved"),
    (["vsock", "--socket-path", "/tmp/x.sock", "--guest-cid", "3", "--uds-path", "/nonexistent/v"],
     "--uds-path /nonexistent/v: No such file or directory"),
    (["rng", "--socket-path", "/nonexistent/dir/x.sock"], "/nonexistent/dir/x.sock"),
])
def test_a_bad_option_is_one_line(args, message):
    """BE-108: a failed start is a non-zero exit, one line."""
    out = subprocess.run(PYVMM + args, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("pyvmm") and message in last


def test_sigterm_ends_it_cleanly_and_removes_the_socket(tmp_path):
    """BE-110, BE-111."""
    with pyvmm_backend(str(tmp_path), "rng") as (sock, proc):
        fe = VhostUserFrontend.connect(sock)
        fe.negotiate()
        assert fe.get_features() & (1 << 32)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        fe.close()
        assert not os.path.exists(sock)


def test_a_listening_socket_passed_as_fd_with_stdio_on_dev_null(tmp_path):
    """--fd N (BE-112), and nothing written to fds 0-2 matters (BE-118)."""
    path = str(tmp_path / "passed.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    proc = subprocess.Popen(PYVMM + ["rng", "--fd", str(listener.fileno())],
                            pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    listener.close()
    try:
        fe = VhostUserFrontend.connect(path)
        fe.negotiate()
        assert fe.max_queues == 1
        fe.close()
        time.sleep(0.2)
        assert proc.poll() is None                 # one front-end gone, it waits for the next
        fe = VhostUserFrontend.connect(path)
        fe.negotiate()
        fe.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
