"""Real vhost-user back-ends from Debian's packages, started for a test."""

import contextlib
import os
import subprocess
import time


@contextlib.contextmanager
def storage_daemon(directory, image, queues=1, writable=True):
    """qemu-storage-daemon exporting image as vhost-user-blk; yields its socket path."""
    sock = os.path.join(directory, "vub.sock")
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=file0,filename={image}",
         "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
                     f"addr.path={sock},writable={'on' if writable else 'off'},"
                     f"num-queues={queues}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"qemu-storage-daemon did not start: {proc.stdout.read()}")
            time.sleep(0.05)
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
