"""Running pyvmm with a guest command from a test, and talking to the guest."""

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from pyvmm import guest

PYVMM = [sys.executable, "-m", "pyvmm"]
TOP = Path(guest.IMAGES).parent


def start(*args, guest_cmd):
    return subprocess.Popen([*PYVMM, "run", *args, "--", "sh", "-c", guest_cmd], cwd=TOP,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)


def finish(proc, timeout=240):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"pyvmm did not finish in {timeout} s\nstdout: {out[-2000:]}\n"
                             f"stderr: {err[-2000:]}")
    return proc.returncode, out, err


def connect_with_retry(addr, deadline=120, family=socket.AF_INET):
    """Connect once the guest's listener is up (the guest boots meanwhile)."""
    end = time.monotonic() + deadline
    while True:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(60)
        try:
            s.connect(addr)
            return s
        except OSError:
            s.close()
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


def guest_sha256(out):
    m = re.search(r"^([0-9a-f]{64})\s", out, re.M)
    assert m, f"no checksum in the guest's output: {out[-1000:]}"
    return m.group(1)
