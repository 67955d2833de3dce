"""The blk back-end (pyvmm/vhost/user/backend/blk.py) driven by pyvmm's
front-end over a socketpair: each request type, a read-only disk, bad
requests, several queues and inflight tracking. No KVM."""

import mmap
import os
import struct

import pytest
from backends import LibraryRig

from pyvmm.vhost.user.backend import inflight
from pyvmm.vhost.user.backend.blk import Blk
from pyvmm.vhost.user.frontend import SUPPORTED_PROTOCOL_FEATURES
from pyvmm.vhost.user.messages import ProtocolFeature
from pyvmm.virtio import spec
from pyvmm.virtio.blk import (CONFIG, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR,
                              VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
                              VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
                              VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES)

pytestmark = pytest.mark.usefixtures("ring_walk")   # C and Python (conftest)

HEADER, DATA, STATUS = 0x100000, 0x101000, 0x180000
MiB = 1 << 20
VERSION_1 = 1 << 32


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(MiB))
    return path


def blk_request(rig, kind, sector=0, data_len=0, data=None, queue=0, split_header=False):
    """One request, answered; returns (status, used length)."""
    m = rig.memory
    m.write(HEADER, struct.pack("<IIQ", kind, 0, sector))
    m.write(STATUS, b"\xff")
    if split_header:              # the header over two buffers is allowed (no framing)
        buffers = [(HEADER, 4, False), (HEADER + 4, 12, False)]
    else:
        buffers = [(HEADER, 16, False)]
    if data is not None:
        m.write(DATA, data)
        buffers.append((DATA, len(data), False))
    elif data_len:
        buffers.append((DATA, data_len, True))
    buffers.append((STATUS, 1, True))
    rig.last_head, used = rig.submit(buffers, queue)
    return m.read(STATUS, 1)[0], used


@pytest.fixture
def rig(memory16, image):
    device = Blk(str(image))
    r = LibraryRig(memory16, device)
    yield r
    r.close()
    device.close()


def test_read_write_flush_and_get_id(rig, image):
    on_disk = image.read_bytes()
    assert blk_request(rig, VIRTIO_BLK_T_IN, 8, 4096) == (VIRTIO_BLK_S_OK, 4097)
    assert rig.memory.read(DATA, 4096) == on_disk[8 * 512:8 * 512 + 4096]
    data = os.urandom(8192)
    assert blk_request(rig, VIRTIO_BLK_T_OUT, 100, data=data, split_header=True) == (0, 1)
    assert blk_request(rig, VIRTIO_BLK_T_FLUSH) == (VIRTIO_BLK_S_OK, 1)
    assert image.read_bytes()[100 * 512:100 * 512 + 8192] == data
    assert blk_request(rig, VIRTIO_BLK_T_GET_ID, 0, 20) == (VIRTIO_BLK_S_OK, 21)
    assert rig.memory.read(DATA, 20) == b"disk.img".ljust(20, b"\0")


def test_the_config_space_describes_the_disk(rig):
    config = CONFIG.unpack(rig.fe.get_config(CONFIG.size))
    assert config[0] == MiB // 512            # capacity in sectors
    assert config[6] == 512                   # blk_size
    assert config[13] == 1                    # num_queues
    assert rig.fe.get_features() & spec.bit(VIRTIO_BLK_F_DISCARD)


def test_bad_requests_get_an_error_status_not_a_crash(rig):
    assert blk_request(rig, VIRTIO_BLK_T_IN, MiB // 512 - 1, 1024)[0] == VIRTIO_BLK_S_IOERR
    assert blk_request(rig, VIRTIO_BLK_T_OUT, 1 << 60, data=b"x" * 512)[0] == VIRTIO_BLK_S_IOERR
    assert blk_request(rig, 99)[0] == VIRTIO_BLK_S_UNSUPP
    # A header cut short: an error, written to the status byte.
    rig.memory.write(STATUS, b"\xff")
    assert rig.submit([(HEADER, 8, False), (STATUS, 1, True)])[1] == 1
    assert rig.memory.read(STATUS, 1)[0] == VIRTIO_BLK_S_IOERR
    # No writable byte for a status: returned with nothing written.
    assert rig.submit([(HEADER, 16, False)])[1] == 0
    # And the disk still works.
    assert blk_request(rig, VIRTIO_BLK_T_IN, 0, 512)[0] == VIRTIO_BLK_S_OK


def test_discard_and_write_zeroes_leave_zeros(rig, image):
    segment = struct.pack("<QII", 8, 16, 0)
    assert blk_request(rig, VIRTIO_BLK_T_DISCARD, data=segment)[0] == VIRTIO_BLK_S_OK
    assert blk_request(rig, VIRTIO_BLK_T_WRITE_ZEROES,
                       data=struct.pack("<QII", 64, 8, 0) + struct.pack("<QII", 128, 8, 1)
                       )[0] == VIRTIO_BLK_S_OK
    disk = image.read_bytes()
    for sector, count in ((8, 16), (64, 8), (128, 8)):
        assert disk[sector * 512:(sector + count) * 512] == bytes(count * 512)
    assert disk[24 * 512:25 * 512] != bytes(512)
    # A discard with flags, and a segment past the end, are refused.
    assert blk_request(rig, VIRTIO_BLK_T_DISCARD,
                       data=struct.pack("<QII", 0, 1, 1))[0] == VIRTIO_BLK_S_UNSUPP
    assert blk_request(rig, VIRTIO_BLK_T_DISCARD,
                       data=struct.pack("<QII", MiB // 512, 1, 0))[0] == VIRTIO_BLK_S_IOERR


def test_a_read_only_disk_refuses_writes(memory16, image):
    device = Blk(str(image), read_only=True)
    rig = LibraryRig(memory16, device)
    try:
        assert rig.fe.get_features() & spec.bit(VIRTIO_BLK_F_RO)
        assert not rig.fe.get_features() & spec.bit(VIRTIO_BLK_F_DISCARD)
        before = image.read_bytes()
        assert blk_request(rig, VIRTIO_BLK_T_OUT, 0, data=b"x" * 512)[0] == VIRTIO_BLK_S_IOERR
        assert blk_request(rig, VIRTIO_BLK_T_IN, 0, 512)[0] == VIRTIO_BLK_S_OK
        assert image.read_bytes() == before
    finally:
        rig.close()
        device.close()


def test_each_queue_serves_requests(memory16, image):
    """BE-18."""
    device = Blk(str(image), num_queues=2)
    rig = LibraryRig(memory16, device, queues=2)
    try:
        assert CONFIG.unpack(rig.fe.get_config(CONFIG.size))[13] == 2
        for queue in (0, 1):
            assert blk_request(rig, VIRTIO_BLK_T_IN, queue, 512, queue=queue)[0] == 0
        assert rig.fe.get_vring_base(0) == 1 and rig.fe.get_vring_base(1) == 1
    finally:
        rig.close()
        device.close()


def test_a_readable_buffer_after_a_writable_one_breaks_the_ring(rig):
    """A wrong-direction chain is the guest's fault: the error eventfd, and the
    back-end goes on answering the front-end."""
    rig.ring.add([(HEADER, 16, False), (DATA, 512, True), (STATUS, 1, False)])
    os.eventfd_write(rig.kick, 1)
    assert rig.wait(rig.err) == 1
    assert rig.ring.pop_used() == []
    assert rig.fe.get_features() & VERSION_1


# --- inflight tracking ---------------------------------------------------------------------

WITH_INFLIGHT = SUPPORTED_PROTOCOL_FEATURES | ProtocolFeature.INFLIGHT_SHMFD.mask


class Area:
    """The front-end's side of the inflight area: it keeps the fd and can look inside."""

    def __init__(self, num_queues=1, queue_size=64):
        self.num_queues, self.queue_size = num_queues, queue_size
        self.description = self.fd = None

    def __call__(self, fe):
        if self.fd is None:
            self.description, self.fd = fe.get_inflight_fd(self.num_queues, self.queue_size)
            assert self.description.mmap_size >= inflight.queue_region_size(self.queue_size)
        fe.set_inflight_fd(self.description, os.dup(self.fd))

    def header(self, queue=0):
        with mmap.mmap(self.fd, self.description.mmap_size) as m:
            return inflight.HEADER.unpack_from(m, queue * inflight.queue_region_size(
                self.queue_size))

    def set_desc(self, head, inflight_, counter, nxt=0, queue=0):
        with mmap.mmap(self.fd, self.description.mmap_size) as m:
            inflight.DESC.pack_into(m, queue * inflight.queue_region_size(self.queue_size)
                                    + 16 + 16 * head, inflight_, nxt, counter)

    def set_header(self, last_batch_head, used_idx, queue=0):
        with mmap.mmap(self.fd, self.description.mmap_size) as m:
            struct.pack_into("<HH", m, queue * inflight.queue_region_size(self.queue_size) + 12,
                             last_batch_head, used_idx)

    def desc(self, head, queue=0):
        with mmap.mmap(self.fd, self.description.mmap_size) as m:
            return inflight.DESC.unpack_from(m, queue * inflight.queue_region_size(
                self.queue_size) + 16 + 16 * head)


def test_the_inflight_area_follows_each_request(memory16, image):
    """BE-71, BE-73. Fresh area: version 1 and the ring's used index at start; after each
    completion nothing is marked and used_idx is the ring's."""
    device, area = Blk(str(image)), Area()
    rig = LibraryRig(memory16, device, protocol=WITH_INFLIGHT, inflight=area)
    try:
        assert rig.fe.has(ProtocolFeature.INFLIGHT_SHMFD)
        for _ in range(3):
            assert blk_request(rig, VIRTIO_BLK_T_IN, 0, 512)[0] == 0
        features, version, desc_num, last_batch_head, used_idx = area.header()
        assert (version, desc_num, used_idx) == (1, 64, 3)
        assert last_batch_head == rig.last_head      # the last head completed
        assert all(area.desc(h)[0] == 0 for h in range(64))
        assert area.desc(rig.last_head)[2] == 2      # counters in fetch order
    finally:
        rig.close()
        device.close()


def test_a_successor_resubmits_what_was_in_flight_oldest_first(memory16, image):
    """BE-74. The state a back-end killed mid-request leaves: two heads taken (counters 7
    and 5) and never used. The next back-end, given the same area, serves
    both, the one taken first first, and starts after them."""
    area = Area()
    first = Blk(str(image))
    rig = LibraryRig(memory16, first, protocol=WITH_INFLIGHT, inflight=area)
    rig.close()
    first.close()

    # Two requests the dead back-end had taken: heads 0 and 1 of a fresh ring.
    from pyvmm.virtio.splitring import DriverRing
    ring = DriverRing(memory16, LibraryRig.RINGS, 64)
    data = os.urandom(512)
    memory16.write(DATA, data)
    memory16.write(HEADER, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 10))
    memory16.write(HEADER + 16, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 10))
    h_out = ring.add([(HEADER, 16, False), (DATA, 512, False), (STATUS, 1, True)])
    h_in = ring.add([(HEADER + 16, 16, False), (DATA + 4096, 512, True), (STATUS + 1, 1, True)])
    area.set_desc(h_out, 1, 5)
    area.set_desc(h_in, 1, 7)
    memory16.write(STATUS, b"\xff\xff")

    second = Blk(str(image))                   # the same memory and ring, a new back-end
    rig = LibraryRig(memory16, second, protocol=WITH_INFLIGHT, inflight=area, rings=[ring])
    try:
        rig.wait(rig.call)
        used = ring.pop_used()
        assert [h for h, _ in used] == [h_out, h_in]      # counter 5 before 7
        assert memory16.read(STATUS, 2) == b"\0\0"
        assert memory16.read(DATA + 4096, 512) == data    # the read saw the write
        assert area.header()[4] == 2 and area.desc(h_in)[0] == 0
        assert rig.fe.get_vring_base(0) == 2              # and goes on after them
    finally:
        rig.close()
        second.close()


def test_a_batch_used_but_not_yet_cleared_is_not_resubmitted(memory16, image):
    """BE-74. Killed between publishing the used index and clearing the inflight mark:
    the area's used_idx is behind the ring's, and last_batch_head is done."""
    area = Area()
    first = Blk(str(image))
    rig = LibraryRig(memory16, first, protocol=WITH_INFLIGHT, inflight=area)
    assert blk_request(rig, VIRTIO_BLK_T_IN, 0, 512)[0] == 0      # head 0, used_idx 1
    rig.close()
    first.close()
    area.set_desc(0, 1, 0)          # as if the back-end died before clearing it
    area.set_header(0, 0)           # ... and before copying the used index
    second = Blk(str(image))
    rig2 = LibraryRig(memory16, second, protocol=WITH_INFLIGHT, inflight=area,
                      rings=[rig.ring], base=1)
    try:
        assert area.header()[4] == 1 and area.desc(0)[0] == 0
        assert rig.ring.pop_used() == []                   # nothing served twice
        assert blk_request(rig2, VIRTIO_BLK_T_IN, 0, 512)[0] == 0
    finally:
        rig2.close()
        second.close()


def test_a_ring_larger_than_the_inflight_area_is_served_untracked(memory16, image, caplog):
    """QEMU sizes the area by its queue-size (128) while its virtio-mmio lets the
    guest make rings of 1024: heads past the area must not be written there."""
    device, area = Blk(str(image)), Area(queue_size=32)
    rig = LibraryRig(memory16, device, protocol=WITH_INFLIGHT, inflight=area, size=64)
    try:
        assert blk_request(rig, VIRTIO_BLK_T_IN, 0, 512)[0] == VIRTIO_BLK_S_OK
        assert "a ring of 64 entries, but the inflight area was made for 32" in caplog.text
        with mmap.mmap(area.fd, area.description.mmap_size) as m:
            assert m[:] == bytes(len(m))                    # untouched
    finally:
        rig.close()
        device.close()


# --- requests served at once (issue 23) ------------------------------------------
# The Python path's I/O threads: with the ring walked in C, reads and writes
# are served whole in C instead (test_blk_requests.py), so these walk in Python.

python_path = pytest.mark.parametrize("ring_walk", ["python"], indirect=True)


def reads_at_once(rig, n):
    """n one-page reads made available together, one kick; their used entries."""
    q = rig.queues[0]
    heads = []
    for i in range(n):
        rig.memory.write(HEADER + 16 * i, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, i))
        heads.append(q.send([(HEADER + 16 * i, 16, False), (DATA + 4096 * i, 4096, True),
                             (STATUS + i, 1, True)], kick=False))
    os.eventfd_write(rig.kick, 1)
    used = []
    while len(used) < n:
        rig.wait(rig.call)
        used += q.used()
    return heads, used


@python_path
def test_requests_made_available_together_are_served_at_once(memory16, image):
    """Three reads in one kick are all inside serve() at the same time (a
    barrier of three lets none through alone); each is answered once, with
    its own data."""
    import threading
    device = Blk(str(image), io_threads=3)
    barrier, serve = threading.Barrier(3, timeout=5), device.serve
    device.serve = lambda chain, memory: barrier.wait() is None or serve(chain, memory)
    rig = LibraryRig(memory16, device)
    try:
        heads, used = reads_at_once(rig, 3)
        assert sorted(used) == sorted((h, 4097) for h in heads)
        on_disk = image.read_bytes()
        for i in range(3):
            assert rig.memory.read(DATA + 4096 * i, 4096) == on_disk[512 * i:512 * i + 4096]
            assert rig.memory.read(STATUS + i, 1) == bytes([VIRTIO_BLK_S_OK])
        assert len([t for t in threading.enumerate() if t.name.startswith("blk-io")]) == 2
    finally:
        rig.close()
        device.close()


@python_path
def test_a_device_failure_on_an_io_thread_breaks_the_ring_after_the_batch(memory16, image):
    """What one request of a batch raised on an I/O thread reaches the loop
    (the ring is broken, the error eventfd signalled) once the others are
    back, answered."""
    device = Blk(str(image), io_threads=3)
    serve, heads = device.serve, []

    def failing(chain, memory):
        if chain.head == heads[1]:
            raise ValueError("a bug")
        return serve(chain, memory)
    device.serve = failing
    rig = LibraryRig(memory16, device)
    try:
        q = rig.queues[0]
        rig.memory.write(HEADER, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
        heads += [q.send([(HEADER, 16, False), (DATA + 4096 * i, 4096, True),
                          (STATUS + i, 1, True)], kick=False) for i in range(3)]
        os.eventfd_write(rig.kick, 1)
        rig.wait(rig.err)
        assert sorted(h for h, _ in q.used()) == sorted([heads[0], heads[2]])
    finally:
        rig.close()
        device.close()


@python_path
def test_leaving_a_batch_early_waits_for_the_io_threads(memory16, image):
    """SIGTERM's SystemExit (here KeyboardInterrupt) in the loop's thread
    mid-batch: handle_queue leaves only after the I/O threads are out of
    guest memory, which the daemon unmaps right after."""
    import threading
    import time
    device = Blk(str(image), io_threads=2)
    finished = threading.Event()

    def serve(chain, memory):
        if chain == "first":
            raise KeyboardInterrupt
        time.sleep(0.3)
        finished.set()
        return 1

    class Ring:
        chains = ["first", "second"]
        resubmitting = compiled = False

        def pop(self):
            return self.chains.pop(0) if self.chains else None

        def push(self, head, written):
            raise AssertionError("nothing is pushed")

    device.serve = serve
    try:
        with pytest.raises(KeyboardInterrupt):
            device.handle_queue(0, Ring(), memory16)
        assert finished.is_set()
    finally:
        device.close()
