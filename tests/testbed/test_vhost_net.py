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
from guestvm import (connect_with_retry, data_path_exits, finish, guest_sha256, msix_interrupts,
                     start)

pytestmark = [pytest.mark.testbed, pytest.mark.usefixtures("transport")]

HOST_IP, GUEST_IP = "10.10.0.1", "10.10.0.2"
SIZE = 4 << 20


def test_ping_the_host_and_stats_show_no_queue_notify_exits(transport):
    proc = start("--net", "vhost-kernel", "--stats",
                 guest_cmd=f"ping -c 3 {HOST_IP} && echo ping-ok && cat /proc/interrupts")
    rc, out, err = finish(proc)
    assert rc == 0, out + err
    assert "ping-ok" in out and "3 packets received" in out
    assert "tap pyvmm0 via vhost-net, guest 10.10.0.2, host 10.10.0.1" in err
    exits = data_path_exits(err, "virtio-net0", transport)
    if transport == "mmio":
        assert "QueueNotify" not in exits and "InterruptACK" not in exits
        assert exits["InterruptStatus"]    # interrupts did arrive, through the irqfd
    else:
        # No exit at all on the data path, and the replies came in by MSI-X.
        assert exits == {}, err
        assert msix_interrupts(out, "virtio0-input.0") >= 3


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


def test_tcp_guest_to_host_arrives_intact_with_no_queue_notify_exits(transport):
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
    exits = data_path_exits(err, "virtio-net0", transport)
    assert "QueueNotify" not in exits and "notify" not in exits


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


def test_two_queue_pairs_both_carry_traffic():
    """--net vhost-kernel,queues=2 with 2 vCPUs (issue 21, item 2): a
    multiqueue tap and a vhost-net per pair. The guest's driver asks for
    both pairs (VQ_PAIRS_SET, served by pyvmm, which attaches the second tap
    queue) and sends a stream from each CPU: XPS puts each on its CPU's
    transmit queue, and the tap answers each flow on the queue it came from.
    Both streams arrive intact, and --stats shows every ring of both pairs
    used."""
    import re
    import threading
    listeners, received = [], {}

    def receive(listener, port):
        digest, n = hashlib.sha256(), 0
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(120)
            while chunk := conn.recv(1 << 16):
                digest.update(chunk)
                n += len(chunk)
        received[port] = (digest.hexdigest(), n)

    try:
        for port in (5001, 5002):
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("0.0.0.0", port))
            listener.listen(1)
            listener.settimeout(180)
            listeners.append(listener)
        threads = [threading.Thread(target=receive, args=(listener, port), daemon=True)
                   for listener, port in zip(listeners, (5001, 5002))]
        for t in threads:
            t.start()
        proc = start("--cpus", "2", "--net", "vhost-kernel,queues=2", "--stats",
                     guest_cmd=f"head -c {SIZE} /dev/urandom > /tmp/d && sha256sum /tmp/d && "
                               f"ls /sys/class/net/eth0/queues/ && "
                               f"(taskset 1 nc {HOST_IP} 5001 < /tmp/d & "
                               f" taskset 2 nc {HOST_IP} 5002 < /tmp/d; wait)")
        try:
            for t in threads:
                t.join(200)
        finally:
            rc, out, err = finish(proc)
    finally:
        for listener in listeners:
            listener.close()
    assert rc == 0, out + err
    assert "tap pyvmm0 (2 queue pairs) via vhost-net" in err, err
    assert "rx-1" in out and "tx-1" in out, out               # the guest has two of each
    sent = guest_sha256(out)
    assert received == {5001: (sent, SIZE), 5002: (sent, SIZE)}, (received, out + err)
    used = {int(q): int(u) for q, u in
            re.findall(r"virtio-net0 queue (\d+): avail idx \d+, used idx (\d+)", err)}
    print("used index per queue:", used)
    assert all(used.get(q, 0) > 10 for q in range(4)), (used, err)


def test_queues_on_a_tap_that_is_not_multiqueue_is_one_clear_line():
    import subprocess
    subprocess.run(["ip", "tuntap", "add", "single0", "mode", "tap", "vnet_hdr"], check=True)
    try:
        proc = start("--net", "vhost-kernel,tap=single0,queues=2", guest_cmd="true")
        rc, out, err = finish(proc)
    finally:
        subprocess.run(["ip", "tuntap", "del", "single0", "mode", "tap"], check=True)
    assert rc == 1, out + err
    assert err.strip().splitlines()[-1] == (
        "pyvmm: error: cannot create tap 'single0': Invalid argument (it exists and is not "
        "multiqueue: queues=2 needs one made with 'ip tuntap add single0 mode tap multi_queue "
        "vnet_hdr')"), err
