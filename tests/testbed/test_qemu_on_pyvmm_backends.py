"""pyvmm's own back-ends (`pyvmm backend ...`) with QEMU as the front-end:
an independent implementation of the other side of the protocol, and the
guest's own drivers on top. QEMU -M microvm with shared memfd RAM."""

import hashlib
import os

import pytest
from backends import pyvmm_backend
from guestvm import HybridVsockHost, qemu_exit_status, qemu_microvm

from pyvmm import guest

pytestmark = pytest.mark.testbed

MiB = 1 << 20
SIZE = 2 * MiB


def run_guest(script, *devices):
    r = qemu_microvm(guest.BZIMAGE, guest.command_arg(["sh", "-c", script]),
                     devices=list(devices), shared_memory=True, timeout=240)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == qemu_exit_status(0), out + r.stderr.decode(errors="replace")
    return out


def chardev(sock):
    return ["-chardev", f"socket,id=c0,path={sock}"]


def test_the_guest_reads_random_bytes_from_the_rng_back_end(tmp_path):
    with pyvmm_backend(str(tmp_path), "rng") as (sock, _):
        out = run_guest("cat /sys/class/misc/hw_random/rng_current; "
                        "head -c 4096 /dev/hwrng > /tmp/r && wc -c < /tmp/r && "
                        "gzip -c /tmp/r | wc -c",
                        *chardev(sock), "-device", "vhost-user-rng,chardev=c0")
    lines = out.split()
    assert lines[-3].startswith("virtio_rng")
    assert lines[-2] == "4096"
    assert int(lines[-1]) > 4096              # random bytes do not compress


def test_the_guest_reads_and_writes_a_disk_on_the_blk_back_end(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(4 * MiB) + bytes(12 * MiB))
    with pyvmm_backend(str(tmp_path), "blk", "--image", str(image), "--queues", "2") \
            as (sock, _):
        out = run_guest("cat /sys/block/vda/size; ls /sys/block/vda/mq | wc -l; "
                        "dd if=/dev/vda bs=1M count=4 2>/dev/null | sha256sum; "
                        "echo written-by-the-guest > /tmp/w; "
                        "dd if=/tmp/w of=/dev/vda bs=512 seek=10000 conv=fsync 2>/dev/null; "
                        "echo done",
                        *chardev(sock), "-device", "vhost-user-blk,chardev=c0,num-queues=2")
    lines = out.split()
    i = lines.index(str(16 * MiB // 512))
    assert lines[i + 1] == "2"                                      # two queues
    assert lines[i + 2] == hashlib.sha256(image.read_bytes()[:4 * MiB]).hexdigest()
    assert "done" in lines
    with open(image, "rb") as f:
        f.seek(10000 * 512)
        assert f.read(21) == b"written-by-the-guest\n"


def test_vsock_streams_carry_data_intact_both_ways(tmp_path):
    """The guest listens on port 5001 for a host program (CONNECT 5001), then
    connects to the host's port 5000 (the Unix socket UDS_5000)."""
    uds = str(tmp_path / "vm.vsock")
    host = HybridVsockHost(uds, SIZE)
    with pyvmm_backend(str(tmp_path), "vsock", "--guest-cid", "3", "--uds-path", uds) \
            as (sock, _):
        host.start()
        out = run_guest(HybridVsockHost.guest_script(SIZE),
                        *chardev(sock), "-device", "vhost-user-vsock-device,chardev=c0")
        host.check(out)
