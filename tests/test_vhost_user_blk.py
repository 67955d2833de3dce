"""The virtio-blk model on a vhost-user back-end, through the virtio-mmio
transport, against a real qemu-storage-daemon (and pyvmm's own blk
back-end); no VM.

The test plays the guest's driver on the transport's registers (as Linux's
virtio_mmio does) and on a DriverRing, and plays KVM by writing the queue's
kick eventfd and reading its call eventfd.
"""

import io
import os
import select
import struct
import time

import pytest
from backends import blk_backend, storage_daemon
from test_vhost_user_devices import start_driver as start_queues
from test_virtio import RecordingVm, r32, w32

from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.device import DeviceError
from pyvmm.devices.virtio.blk import VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VirtioBlk
from pyvmm.vhost.user.trace import Tracer
from pyvmm.vhost.user.scripted import ScriptedBackend
from pyvmm.virtio import spec
from pyvmm.virtio.splitring import DriverRing
from pyvmm.sys.eventloop import EventLoop
from pyvmm.vmm.virtio_devices import BlkConfig, plan_blk

MiB = 1 << 20
RING, HEADER, DATA, STATUS = 0x10000, 0x100000, 0x101000, 0x102000
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH = 0, 1, 4


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.write(os.urandom(64 << 10))
        f.truncate(8 * MiB)
    return path


def start_driver(t, memory, features, size=64):
    """DRIVER_OK with one queue (at RING); its DriverRing."""
    return start_queues(t, memory, [0], size, features)[0]


def request(t, ring, memory, kind, sector, length):
    """One virtio-blk request; waits for it; returns the status byte."""
    q = t.queues[0]
    memory.write(HEADER, struct.pack("<IIQ", kind, 0, sector))
    memory.write(STATUS, b"\xff")
    buffers = [(HEADER, 16, False)]
    if length:
        buffers.append((DATA, length, kind == VIRTIO_BLK_T_IN))
    buffers.append((STATUS, 1, True))
    head = ring.add(buffers)
    os.eventfd_write(q.kick_fd, 1)                # what KVM's ioeventfd does
    deadline = time.monotonic() + 10
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([q.call_fd], [], [], left)[0], "no interrupt"
        os.eventfd_read(q.call_fd)                # what KVM's irqfd would take
        used = ring.pop_used()
        if used:
            assert [h for h, _ in used] == [head]
            return memory.read(STATUS, 1)[0]


@pytest.mark.parametrize("kind", ["qemu-storage-daemon", "pyvmm"])
def test_the_blk_model_on_a_back_end_through_the_transport(tmp_path, image, memory16, kind):
    memory = memory16
    trace = io.StringIO()
    with blk_backend(kind, str(tmp_path), image) as sock:
        device, _, summary = plan_blk(BlkConfig(sock), 0, Tracer(trace).for_device)
        t = mmio.VirtioMmio(device, RecordingVm(), memory, 0xD000_0000, 5)
        try:
            assert summary.startswith("vda: 8 MiB disk, 512-byte blocks, 1 queue")
            assert r32(t, mmio.DEVICE_ID) == spec.VIRTIO_ID_BLOCK
            assert t.read(mmio.CONFIG, 4) == 8 * MiB // 512          # capacity, from the cache
            offered = device.features
            assert offered & spec.bit(VIRTIO_BLK_F_FLUSH)
            assert not offered & spec.bit(VIRTIO_BLK_F_RO)
            ring = start_driver(t, memory, offered)
            assert t.active

            with open(image, "rb") as f:
                on_disk = f.read(4096)
            assert request(t, ring, memory, VIRTIO_BLK_T_IN, 0, 4096) == 0
            assert memory.read(DATA, 4096) == on_disk
            data = os.urandom(4096)
            memory.write(DATA, data)
            assert request(t, ring, memory, VIRTIO_BLK_T_OUT, 16, 4096) == 0
            assert request(t, ring, memory, VIRTIO_BLK_T_FLUSH, 0, 0) == 0
            with open(image, "rb") as f:
                f.seek(16 * 512)
                assert f.read(4096) == data

            w32(t, mmio.STATUS, 0)                     # the guest resets the device
            assert device.backend.frontend.vring_bases == {0: 3}
        finally:
            t.close()
            device.close()
    lines = trace.getvalue().splitlines()
    assert lines[0] == "virtio-blk0 -> GET_FEATURES"
    assert lines[1].startswith("virtio-blk0 <- reply to GET_FEATURES: features=0x")
    assert "VERSION_1" in lines[1] and "FLUSH" in lines[1]
    assert any("-> SET_VRING_KICK [NEED_REPLY] index=0 (1 fd)" in line for line in lines)
    assert any("<- reply to GET_VRING_BASE: index=0 base=3" in line for line in lines)


def test_a_back_end_that_goes_away_fails_its_device_only(tmp_path, image, memory16, caplog):
    """DEVICE_NEEDS_RESET and one line; then pyvmm answers each request with
    VIRTIO_BLK_S_IOERR, so that the guest sees errors instead of waiting forever."""
    memory = memory16
    with storage_daemon(str(tmp_path), image) as sock:
        device, _, _ = plan_blk(BlkConfig(sock), 0, None)
        t = mmio.VirtioMmio(device, RecordingVm(), memory, 0xD000_0000, 5)
        loop = EventLoop(on_error=lambda what, e: pytest.fail(f"{what}: {e}"))
        t.watch(loop)
        ring = start_driver(t, memory, device.features)
        assert request(t, ring, memory, VIRTIO_BLK_T_IN, 0, 512) == 0
    # The storage daemon is gone now.
    loop.run_until(lambda: r32(t, mmio.STATUS) & spec.VIRTIO_CONFIG_S_NEEDS_RESET, timeout=10)
    assert r32(t, mmio.INTERRUPT_STATUS) & mmio.VIRTIO_MMIO_INT_CONFIG
    assert "virtio-blk0: the vhost-user back-end at" in caplog.text
    assert "closed its connection; the device needs a reset" in caplog.text

    q = t.queues[0]
    if select.select([q.call_fd], [], [], 0)[0]:
        os.eventfd_read(q.call_fd)                     # an interrupt from before
    memory.write(HEADER, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
    memory.write(STATUS, b"\xff")
    head = ring.add([(HEADER, 16, False), (DATA, 512, True), (STATUS, 1, True)])
    os.eventfd_write(q.kick_fd, 1)                     # as KVM does on QueueNotify
    loop.run_until(lambda: ring.used_idx() == 2, timeout=5)
    assert ring.pop_used() == [(head, 1)]
    assert memory.read(STATUS, 1) == b"\x01"           # VIRTIO_BLK_S_IOERR
    assert select.select([q.call_fd], [], [], 0)[0]    # and an interrupt for it

    w32(t, mmio.STATUS, 0)                             # a reset does not hang on a dead socket
    assert not t._taken_over                           # and gives the queues back
    loop.close()
    t.close()
    device.close()


def test_server_mode_waits_for_the_back_end(tmp_path, image):
    """With server, pyvmm listens and waits; a back-end that never comes ends the
    wait with one line, and the socket file goes."""
    from pyvmm.vmm import virtio_devices
    old = virtio_devices.BACKEND_CONNECT_TIMEOUT
    virtio_devices.BACKEND_CONNECT_TIMEOUT = 0.3
    try:
        with pytest.raises(DeviceError, match="no back-end connected to .* within 0.3 s"):
            plan_blk(BlkConfig(str(tmp_path / "s.sock"), server=True), 0, None)
    finally:
        virtio_devices.BACKEND_CONNECT_TIMEOUT = old
    assert not (tmp_path / "s.sock").exists()


def test_server_mode_and_a_config_change_from_the_back_end(tmp_path, memory16):
    """pyvmm listens; a back-end connects to it, and later announces a bigger disk
    on its request channel: pyvmm reads the config again and interrupts the guest."""
    import struct
    import threading


    from pyvmm.vhost.user.channel import Connection
    from pyvmm.vhost.user.messages import FrontendReq, ProtocolFeature as PF
    path = tmp_path / "pyvmm.sock"
    config = struct.pack("<Q", 2048).ljust(60, b"\0")
    fake = {}

    def back_end():
        while not path.exists():
            time.sleep(0.01)
        conn = Connection.connect(path, "pyvmm")
        fake["be"] = be = ScriptedBackend(conn, features=1 << 32,
                                      protocol=(PF.REPLY_ACK.mask | PF.CONFIG.mask
                                                | PF.BACKEND_REQ.mask), config=config)
        be.serve(FrontendReq.GET_CONFIG)
    thread = threading.Thread(target=back_end)
    thread.start()
    device, _, summary = plan_blk(BlkConfig(str(path), server=True), 0, None)
    thread.join(10)
    assert summary.startswith("vda: 1 MiB disk")
    assert not path.exists()                         # the listening socket is gone
    t = mmio.VirtioMmio(device, RecordingVm(), memory16, 0xD000_0000, 5)
    loop = EventLoop(on_error=lambda what, e: pytest.fail(f"{what}: {e}"))
    t.watch(loop)
    be = fake["be"]
    be.config = struct.pack("<Q", 4096).ljust(60, b"\0")
    generation = r32(t, mmio.CONFIG_GENERATION)
    acked = []

    def announce():
        acked.append(be.send_config_change())
    announcer = threading.Thread(target=announce)
    announcer.start()
    # pyvmm's GET_CONFIG arrives on the main socket while the ack is due.
    serve = threading.Thread(target=be.serve, args=(FrontendReq.GET_CONFIG,))
    serve.start()
    loop.run_until(lambda: r32(t, mmio.CONFIG_GENERATION) != generation, timeout=10)
    serve.join(10)
    announcer.join(10)
    assert acked == [0]
    assert t.read(mmio.CONFIG, 4) == 4096                  # the new capacity, from the cache
    assert r32(t, mmio.INTERRUPT_STATUS) & mmio.VIRTIO_MMIO_INT_CONFIG
    loop.close()
    t.close()
    device.close()


def test_a_back_end_gone_before_driver_ok_is_one_line(tmp_path, image, memory16, caplog):
    with storage_daemon(str(tmp_path), image) as sock:
        device, _, _ = plan_blk(BlkConfig(sock), 0, None)
    t = mmio.VirtioMmio(device, RecordingVm(), memory16, 0xD000_0000, 5)
    loop = EventLoop(on_error=lambda what, e: pytest.fail(f"{what}: {e}"))
    t.watch(loop)
    features = device.features
    status = spec.VIRTIO_CONFIG_S_ACKNOWLEDGE | spec.VIRTIO_CONFIG_S_DRIVER
    w32(t, mmio.STATUS, status)
    w32(t, mmio.DRIVER_FEATURES_SEL, 1)
    w32(t, mmio.DRIVER_FEATURES, features >> 32)
    w32(t, mmio.STATUS, status | spec.VIRTIO_CONFIG_S_FEATURES_OK)
    w32(t, mmio.STATUS, status | spec.VIRTIO_CONFIG_S_FEATURES_OK | spec.VIRTIO_CONFIG_S_DRIVER_OK)
    assert r32(t, mmio.STATUS) & spec.VIRTIO_CONFIG_S_NEEDS_RESET
    deadline = time.monotonic() + 0.5           # let the hang-up watch fire, if it would
    loop.run_until(lambda: time.monotonic() > deadline, timeout=0.1)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "virtio-blk0: cannot start the device" in warnings[0].message
    loop.close()
    t.close()
    device.close()


def test_start_and_stop_in_order_with_status_and_reset_device(tmp_path, memory16):
    """The message order of VhostUserBackend against a back-end that offers
    STATUS and RESET_DEVICE (qemu-storage-daemon offers neither)."""
    import socket
    import threading


    from pyvmm.devices.virtio.device import Queue
    from pyvmm.devices.virtio.vhost_user import VhostUserBackend
    from pyvmm.vhost.user.channel import Connection
    from pyvmm.vhost.user.frontend import VhostUserFrontend
    from pyvmm.vhost.user.messages import FrontendReq as R, ProtocolFeature as PF
    ours, theirs = socket.socketpair()
    fake = ScriptedBackend(Connection(theirs, "pyvmm"), features=1 << 32,
                       protocol=PF.REPLY_ACK.mask | PF.STATUS.mask | PF.RESET_DEVICE.mask)
    server = threading.Thread(target=fake.serve, args=(R.RESET_DEVICE,))
    server.start()
    frontend = VhostUserFrontend(Connection(ours, "the back-end"))
    frontend.negotiate()
    backend = VhostUserBackend(frontend, "a test back-end")
    ring = DriverRing(memory16, RING, 64)
    fds = [os.eventfd(0) for _ in range(3)]
    queue = Queue(0, 64, True, ring.desc_addr, ring.avail_addr, ring.used_addr, *fds)
    backend.start(memory16, 1 << 32, [queue])
    backend.stop()
    server.join(10)
    order = [m.request.name for m in fake.messages]
    assert order[order.index("SET_OWNER") + 1:] == [
        "SET_FEATURES", "SET_MEM_TABLE", "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR",
        "SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_KICK", "SET_VRING_ENABLE", "SET_STATUS",
        "SET_VRING_ENABLE", "GET_VRING_BASE", "SET_STATUS", "RESET_DEVICE"]
    statuses = [m.payload.value for m in fake.messages if m.request is R.SET_STATUS]
    assert statuses == [0xF, 0]                 # DRIVER_OK with all before it; then reset
    assert os.eventfd_read(fds[0]) == 1         # the kick injected after enabling (FE-45)
    for fd in fds:
        os.close(fd)
    frontend.close()


def test_pyvmm_listens_its_blk_back_end_connects_and_announces_a_bigger_disk(tmp_path,
                                                                              memory16):
    """`pyvmm backend blk --connect` to pyvmm's server socket; after the image
    grows, SIGHUP makes the back-end send CONFIG_CHANGE_MSG, and pyvmm reads
    the new capacity and interrupts the guest."""
    import signal
    import subprocess
    import sys
    path, image = tmp_path / "pyvmm.sock", tmp_path / "grow.img"
    image.write_bytes(bytes(MiB))
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "backend", "blk", "--connect",
                             str(path), "--image", str(image)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        device, _, summary = plan_blk(BlkConfig(str(path), server=True), 0, None)
        assert summary.startswith("vda: 1 MiB disk")
        t = mmio.VirtioMmio(device, RecordingVm(), memory16, 0xD000_0000, 5)
        loop = EventLoop(on_error=lambda what, e: pytest.fail(f"{what}: {e}"))
        t.watch(loop)
        generation = r32(t, mmio.CONFIG_GENERATION)
        with open(image, "ab") as f:
            f.truncate(3 * MiB)
        proc.send_signal(signal.SIGHUP)
        loop.run_until(lambda: r32(t, mmio.CONFIG_GENERATION) != generation, timeout=10)
        assert t.read(mmio.CONFIG, 4) == 3 * MiB // 512
        assert r32(t, mmio.INTERRUPT_STATUS) & mmio.VIRTIO_MMIO_INT_CONFIG
        loop.close()
        t.close()
        device.close()
        assert proc.wait(timeout=10) == 0           # its front-end went: it ends
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert "back-end connected to" in out
