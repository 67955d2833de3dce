"""pyvmm's vhost-user front-end driving a real qemu-storage-daemon, no VM.

Guest memory is a GuestMemory memfd; the guest's part (a virtio-blk driver
putting requests on a split ring) is played with DriverRing; the kick and
call eventfds are plain eventfds. A write and a read-back go through the
back-end and the image file on the host.
"""

import os
import select
import struct
import time

import pytest
from backends import storage_daemon

from pyvmm.vhost import VringAddr
from pyvmm.vhost.user.errors import ChannelError, RemoteProtocolError
from pyvmm.vhost.user.frontend import VhostUserFrontend
from pyvmm.vhost.user.messages import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature
from pyvmm.virtio.splitring import DriverRing

MiB = 1 << 20
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT = 0, 1
VIRTIO_BLK_S_OK = 0
SECTOR = 512
RING, HEADER, DATA, STATUS = 0x10000, 0x100000, 0x101000, 0x102000


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(1 * MiB)
    return path


def eventfd():
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def blk_request(ring, memory, kind, sector, length, call):
    """One virtio-blk request through the ring; the status byte the device wrote."""
    memory.write(HEADER, struct.pack("<IIQ", kind, 0, sector))
    memory.write(STATUS, b"\xff")
    head = ring.add([(HEADER, 16, False), (DATA, length, kind == VIRTIO_BLK_T_IN),
                     (STATUS, 1, True)])
    return head


def wait_used(ring, call, timeout=10):
    """The used entries after the next interrupt that brings some. (libvhost-user
    signals the call fd once when it gets it, with nothing used: not an error.)"""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([call], [], [], left)[0], \
            "no interrupt with used buffers from the back-end"
        os.eventfd_read(call)
        used = ring.pop_used()
        if used:
            return used


def test_negotiation_memory_table_one_queue_write_and_read_back(tmp_path, image, memory16):
    memory = memory16
    with storage_daemon(str(tmp_path), image) as sock:
        fe = VhostUserFrontend.connect(sock, "qemu-storage-daemon")
        try:
            features = fe.negotiate()
            assert features & VIRTIO_F_VERSION_1
            assert features & 1 << VHOST_USER_F_PROTOCOL_FEATURES
            for feature in (ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG,
                            ProtocolFeature.MQ):
                assert fe.has(feature)
            assert fe.max_queues == 1
            capacity = struct.unpack("<Q", fe.get_config(8))[0]
            assert capacity == MiB // SECTOR

            fe.set_features(VIRTIO_F_VERSION_1)
            fe.set_mem_table(memory)
            ring = DriverRing(memory, RING, 128)
            kick, call, err = eventfd(), eventfd(), eventfd()
            fe.start_vring(0, 128, VringAddr(ring.desc_addr, ring.avail_addr, ring.used_addr),
                           kick, call, err)
            fe.set_vring_enable(0, True)

            data = os.urandom(4096)
            memory.write(DATA, data)
            head = blk_request(ring, memory, VIRTIO_BLK_T_OUT, 8, 4096, call)
            os.eventfd_write(kick, 1)
            assert wait_used(ring, call) == [(head, 1)]           # only the status byte
            assert memory.read(STATUS, 1)[0] == VIRTIO_BLK_S_OK

            memory.write(DATA, bytes(4096))
            head = blk_request(ring, memory, VIRTIO_BLK_T_IN, 8, 4096, call)
            os.eventfd_write(kick, 1)
            assert wait_used(ring, call) == [(head, 4097)]
            assert memory.read(STATUS, 1)[0] == VIRTIO_BLK_S_OK
            assert memory.read(DATA, 4096) == data                # read back through the ring
            with open(image, "rb") as f:                          # and on the host's file
                f.seek(8 * SECTOR)
                assert f.read(4096) == data

            assert fe.get_vring_base(0) == 2                       # two requests consumed
            assert fe.vring_bases == {0: 2}
            for fd in (kick, call, err):
                os.close(fd)
        finally:
            fe.close()


def test_a_back_end_that_is_not_there(tmp_path):
    with pytest.raises(ChannelError, match="no socket at"):
        VhostUserFrontend.connect(tmp_path / "nothing.sock")


def test_a_back_end_that_answers_garbage(tmp_path):
    """A peer that speaks something else: one clean protocol error."""
    import socket
    import threading
    path = str(tmp_path / "garbage.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def garbage():
        conn, _ = server.accept()
        conn.recv(100)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()
    threading.Thread(target=garbage, daemon=True).start()
    fe = VhostUserFrontend.connect(path)
    with pytest.raises((RemoteProtocolError, ChannelError)) as e:
        fe.negotiate()
    assert "\n" not in str(e.value)
    fe.close()
    server.close()
