"""The guest's network through the kernel's vhost-net (inside scripts/testbed).

Each test boots the tiny guest with `--net vhost-kernel`: a fresh tap
pyvmm0, 10.10.0.1/30 on the host (the testbed), 10.10.0.2/30 in the guest.
Transfers are a few MiB: enough to prove integrity through TCP
segmentation offload and many ring wrap-arounds; the 64 MiB runs belong to
scripts/bench (nested vhost under TCG moves well under 1 MB/s).
"""

import hashlib
import os
import socket

import pytest
from guestvm import connect_with_retry, finish, guest_sha256, start

pytestmark = pytest.mark.testbed

HOST_IP, GUEST_IP = "10.10.0.1", "10.10.0.2"
SIZE = 4 << 20


def test_ping_the_host_and_stats_show_no_queue_notify_exits():
    proc = start("--net", "vhost-kernel", "--stats",
                 guest_cmd=f"ping -c 3 {HOST_IP} && echo ping-ok")
    rc, out, err = finish(proc)
    assert rc == 0, out + err
    assert "ping-ok" in out and "3 packets received" in out
    assert "tap pyvmm0 via vhost-net, guest 10.10.0.2, host 10.10.0.1" in err
    mmio = next(line for line in err.splitlines() if line.strip().startswith("mmio"))
    assert "QueueNotify" not in mmio and "InterruptACK" not in mmio
    assert "InterruptStatus" in mmio   # interrupts did arrive, through the irqfd


def test_tcp_host_to_guest_arrives_intact():
    proc = start("--net", "vhost-kernel",
                 guest_cmd="nc -l -p 5000 > /tmp/r; sha256sum /tmp/r; wc -c < /tmp/r")
    data = os.urandom(SIZE)
    try:
        with connect_with_retry((GUEST_IP, 5000)) as s:
            s.sendall(data)
    finally:
        rc, out, err = finish(proc)
    assert rc == 0, out + err
    assert guest_sha256(out) == hashlib.sha256(data).hexdigest(), out


def test_tcp_guest_to_host_arrives_intact_with_no_queue_notify_exits():
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", 5001))
        listener.listen(1)
        listener.settimeout(180)
        proc = start("--net", "vhost-kernel", "--stats",
                     guest_cmd=f"head -c {SIZE} /dev/urandom > /tmp/d && sha256sum /tmp/d && "
                               f"nc {HOST_IP} 5001 < /tmp/d")
        received = hashlib.sha256()
        n = 0
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(120)
                while n < SIZE:
                    chunk = conn.recv(1 << 16)
                    assert chunk, f"connection closed after {n} of {SIZE} bytes"
                    received.update(chunk)
                    n += len(chunk)
        finally:
            rc, out, err = finish(proc)
    assert rc == 0, out + err
    assert guest_sha256(out) == received.hexdigest()
    mmio = next(line for line in err.splitlines() if line.strip().startswith("mmio"))
    assert "QueueNotify" not in mmio


def test_two_nics():
    proc = start("--net", "vhost-kernel", "--net", "vhost-kernel,host-ip=192.168.77.1/24",
                 guest_cmd="ping -c 1 10.10.0.1 && ping -c 1 192.168.77.1 && "
                           "ip -o -4 addr show eth1")
    rc, out, err = finish(proc)
    assert rc == 0, out + err
    assert "inet 192.168.77.2/24" in out
    assert "tap pyvmm1 via vhost-net, guest 192.168.77.2, host 192.168.77.1" in err


def test_driver_unbind_and_rebind_gets_a_working_device():
    drv = "/sys/bus/virtio/drivers/virtio_net"
    proc = start("--net", "vhost-kernel",
                 guest_cmd=f"ping -c 1 {HOST_IP} && "
                           f"echo virtio0 > {drv}/unbind && ! ip link show eth0 2>/dev/null && "
                           f"echo virtio0 > {drv}/bind && ip link set eth0 up && "
                           f"ip addr add {GUEST_IP}/30 dev eth0 && "
                           f"ping -c 2 {HOST_IP} && echo rebound-ok")
    rc, out, err = finish(proc)
    assert rc == 0, out + err
    assert "rebound-ok" in out


def test_user_named_tap_and_mac():
    proc = start("--net", "vhost-kernel,tap=mytap0,mac=02:00:00:aa:bb:cc,host-ip=10.99.0.1/30",
                 guest_cmd="cat /sys/class/net/eth0/address && ping -c 1 10.99.0.1")
    rc, out, err = finish(proc)
    assert rc == 0, out + err
    assert "02:00:00:aa:bb:cc" in out


def test_tap_that_cannot_be_created_is_one_clear_line():
    proc = start("--net", "vhost-kernel,tap=lo", guest_cmd="true")
    rc, out, err = finish(proc)
    assert rc == 1
    assert err.strip().splitlines()[-1].startswith("pyvmm: error: cannot create tap 'lo': ")
