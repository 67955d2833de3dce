"""pyvmm boots the tiny guest with a disk served by qemu-storage-daemon (vhost-user-blk),
and the first tests again on pyvmm's own blk back-end (`pyvmm backend blk`).

The back-end runs inside the testbed next to pyvmm; the image file is on the
testbed's /tmp, where the test reads and checks it after the guest is done.
"""

import hashlib
import os
import re
import subprocess

import pytest
from backends import blk_backend, storage_daemon
from guestvm import drain, finish, start, wait_for_line

pytestmark = [pytest.mark.testbed, pytest.mark.usefixtures("transport")]

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.write(os.urandom(4 * MiB))
        f.truncate(16 * MiB)
    return path


def sha256(path, length):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(length)).hexdigest()


BACKENDS = pytest.mark.parametrize("kind", ["qemu-storage-daemon", "pyvmm"])


@BACKENDS
def test_the_guest_reads_the_disk_and_its_writes_reach_the_image(tmp_path, image, kind):
    with blk_backend(kind, str(tmp_path), image) as sock:
        trace = tmp_path / "trace.log"
        proc = start("--blk", f"vhost-user,socket={sock}", "--trace-file", str(trace),
                     guest_cmd="cat /sys/block/vda/size; "
                               "dd if=/dev/vda bs=1M count=4 2>/dev/null | sha256sum; "
                               "echo written-by-the-guest > /tmp/w; "
                               "dd if=/tmp/w of=/dev/vda bs=512 seek=10000 conv=fsync 2>/dev/null; "
                               "echo done")
        rc, out, err = finish(proc)
    assert rc == 0, out + err
    assert "vda: 16 MiB disk, 512-byte blocks, 1 queue, via vhost-user" in err
    lines = out.split()
    assert lines[0] == str(16 * MiB // 512)                       # capacity in sectors
    assert lines[1] == sha256(image, 4 * MiB)                      # the same bytes
    with open(image, "rb") as f:
        f.seek(10000 * 512)
        assert f.read(21) == b"written-by-the-guest\n"             # after conv=fsync: a FLUSH
    text = trace.read_text()
    assert "virtio-blk0 -> SET_MEM_TABLE" in text or "virtio-blk0 -> ADD_MEM_REG" in text
    assert re.search(r"virtio-blk0 -> SET_VRING_KICK \[NEED_REPLY\] index=0 \(1 fd\)", text)


@BACKENDS
def test_a_file_system_made_in_the_guest_checks_clean_on_the_host(tmp_path, image, kind):
    with blk_backend(kind, str(tmp_path), image) as sock:
        proc = start("--blk", f"vhost-user,socket={sock}",
                     guest_cmd="mke2fs -q /dev/vda && mkdir /tmp/d && mount /dev/vda /tmp/d && "
                               "head -c 1048576 /dev/urandom > /tmp/d/f && sha256sum /tmp/d/f && "
                               "umount /tmp/d && echo unmounted")
        rc, out, err = finish(proc)
    assert rc == 0 and "unmounted" in out, out + err
    r = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_two_queues_both_carry_requests(tmp_path, image):
    """Each vCPU submits on its own queue; unbinding the driver resets the device,
    and GET_VRING_BASE then tells how far the back-end got on each queue."""
    with storage_daemon(str(tmp_path), image, queues=2) as sock:
        trace = tmp_path / "trace.log"
        proc = start("--cpus", "2", "--blk", f"vhost-user,socket={sock}",
                     "--trace-file", str(trace),
                     guest_cmd="ls /sys/block/vda/mq; "
                               "taskset 1 dd if=/dev/vda of=/dev/null bs=64k count=16 2>/dev/null; "
                               "taskset 2 dd if=/dev/vda of=/dev/null bs=64k count=16 skip=32 "
                               "2>/dev/null; "
                               "echo virtio0 > /sys/bus/virtio/drivers/virtio_blk/unbind; "
                               "echo unbound")
        rc, out, err = finish(proc)
    assert rc == 0 and "unbound" in out, out + err
    assert out.split()[:2] == ["0", "1"]                          # two hardware queues
    bases = dict(re.findall(r"reply to GET_VRING_BASE: index=(\d) base=(\d+)",
                            trace.read_text()))
    assert set(bases) == {"0", "1"} and all(int(n) > 0 for n in bases.values()), bases


def test_killing_the_back_end_fails_that_disk_only(tmp_path, image):
    """qemu-storage-daemon goes away while the guest reads: the guest's reads fail
    with I/O errors, its NIC on vhost-net still answers, pyvmm says which device
    in one line, and the guest's command still decides pyvmm's exit status."""
    script = ("ping -c 1 10.10.0.1 > /dev/null && echo net-up; echo io-started; i=0; "
              "while dd if=/dev/vda of=/dev/null bs=4k count=1 skip=$((i % 1000)) "
              "iflag=direct 2>/dev/null; do i=$((i + 1)); done; "
              "echo reads-failed-after $i; "
              "dd if=/dev/vda of=/dev/null bs=4k count=1 iflag=direct 2>&1 | grep -q 'Input/output error' "
              "&& echo io-error; "
              "ping -c 2 10.10.0.1 > /dev/null && echo net-still-up; exit 42")
    with storage_daemon(str(tmp_path), image) as sock:
        proc = start("--blk", f"vhost-user,socket={sock}", "--net", "vhost-kernel",
                     guest_cmd=script)
        seen = wait_for_line(proc, "io-started")
    # The daemon is gone (SIGTERM) while the guest reads in a loop.
    rc, out, err = finish(proc)
    out = seen + out
    assert rc == 42, out + err
    assert "net-up" in out and "reads-failed-after" in out
    assert "io-error" in out and "net-still-up" in out
    failures = [line for line in err.splitlines() if "needs a reset" in line]
    assert len(failures) == 1 and failures[0].startswith("pyvmm: pyvmm.virtio: virtio-blk0: ")
    assert "Traceback" not in err


@BACKENDS
def test_a_copy_to_the_disk_survives_five_back_end_kills(tmp_path, kind):
    """reconnect=S (issue 20): the guest copies 16 MiB of random bytes onto
    vda with O_DIRECT, 4 KiB at a time, while vda's back-end is killed
    (SIGKILL) and started again five times, each after half a second of
    serving. The guest sees no I/O error, and the image ends up holding
    exactly the bytes copied."""
    import contextlib
    import time
    size = 16 * MiB
    pattern = os.urandom(size)
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(pattern)
    dst.write_bytes(bytes(size))
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    procs = []
    with contextlib.ExitStack() as outer:
        src_sock = outer.enter_context(storage_daemon(str(tmp_path / "src"), src, writable=False))
        backend = contextlib.ExitStack()
        sock = backend.enter_context(blk_backend(kind, str(tmp_path / "dst"), dst, procs=procs))
        proc = start("--stats", "--blk", f"vhost-user,socket={sock},reconnect=0.2",
                     "--blk", f"vhost-user,socket={src_sock}",
                     guest_cmd="echo copying; dd if=/dev/vdb of=/dev/vda bs=4k iflag=direct "
                               "oflag=direct && echo copied; "
                               "echo io-errors $(dmesg | grep -ci 'i/o error')")
        seen = wait_for_line(proc, "copying")
        for _ in range(5):
            time.sleep(0.5)                # the back-end serves for a while
            seen = drain(proc, seen)
            assert "copied" not in seen, "the copy ended before the kills: make it longer"
            procs[-1].kill()
            procs[-1].wait()
            backend.close()
            time.sleep(0.3)
            backend = contextlib.ExitStack()
            backend.enter_context(blk_backend(kind, str(tmp_path / "dst"), dst, procs=procs))
        with backend:
            # (about a minute when it works; a stall fails here, well inside
            # pytest's own timeout, which would end the whole tier)
            rc, out, err = finish(proc, timeout=150)
    out = seen + out
    assert rc == 0, out + err
    assert "copied" in out and "io-errors 0" in out, out + err
    assert err.count("went away") == 5 and err.count("is back") == 5, err
    assert "needs a reset" not in err and "Traceback" not in err, err
    assert sha256(dst, size) == hashlib.sha256(pattern).hexdigest()
    for image in (src, dst):       # the testbed's /tmp is memory
        image.unlink()
