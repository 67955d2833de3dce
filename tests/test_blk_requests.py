"""virtio-blk's plain requests served whole in C (pyvmm/virtio/blk_requests.c,
through compiled_ring.BlkRequests) against the Python path it must equal
(issue 23). No KVM.

The Python path (Blk.serve with Vring.pop and push, on the Python walk) is
the reference. A guest fills a ring at random: reads and writes in any
layout (a header split in two, data and status in one buffer, indirect
tables, buffers in two regions), other request types, requests past the end
of the disk, a read-only disk, chains that are broken, an available index
too far ahead; with and without an inflight area. Blk.handle_queue serves
the same ring once with the ring walked in Python and once walked in C
(where the plain requests go to C and the rest to the Python path), and
once more as the daemon serves a kick (Blk.serve_kick, C signalling the
call eventfd itself): the guest's buffers and rings, the disk, the
inflight area, where the ring stopped, the refusal, if any, and whether
the driver got the interrupt it asked for must come out the same."""

import os
import random
import select
import struct
import time

import pytest
from backends import LibraryRig, mapped_memory

from pyvmm.memory import GuestMemory
from pyvmm.vhost.user.backend import faults, inflight
from pyvmm.vhost.user.backend.blk import Blk
from pyvmm.vhost.user.backend.vring import Vring
from pyvmm.virtio import compiled_ring
from pyvmm.virtio.blk import (OUTHDR, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
                              VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT)
from pyvmm.virtio.device_ring import DeviceRing
from pyvmm.virtio.splitring import (VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
                                    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, RingError)

MiB = 1 << 20
DESC, AVAIL, USED, INDIRECT = 0x10000, 0x11000, 0x12000, 0x20000
REGIONS = [(0, 8 * MiB, 0), (9 * MiB, 7 * MiB, 9 * MiB)]      # a hole at 8 MiB
SECTORS = 128                                                  # a 64 KiB disk
CASES = int(os.environ.get("PYVMM_FUZZ_EXAMPLES", 1500)) // 2


class Guest:
    """A ring of num entries at DESC/AVAIL/USED filled as a driver would, with
    buffers from two regions; what it wrote, to compare afterwards."""

    def __init__(self, rng, num):
        self.rng, self.num = rng, num
        self.writes = []                 # (gpa, bytes)
        self.buffers = []                # (gpa, length) of every buffer
        self.next_desc = 0
        self.next_indirect = INDIRECT
        self.next_buf = [0x100000, 9 * MiB + 0x1000]

    def buffer(self, data):
        """A buffer holding data (bytes) or data bytes of 0xee (an int)."""
        raw = data if isinstance(data, bytes) else b"\xee" * data
        region = self.rng.randrange(2)
        gpa = self.next_buf[region] + self.rng.choice([0, 0, 1, 64, 4095])
        self.next_buf[region] = gpa + len(raw)
        self.writes.append((gpa, raw))
        self.buffers.append((gpa, len(raw)))
        return gpa

    def chain(self, parts, indirect=False, outside=False):
        """parts: [(bytes or length, device-writable)] made into one chain; its head."""
        descs = [(self.buffer(data), len(data) if isinstance(data, bytes) else data, w)
                 for data, w in parts]
        if outside:                      # one buffer in the hole between the regions
            k = self.rng.randrange(len(descs))
            descs[k] = (8 * MiB + 16, descs[k][1] + 1, descs[k][2])
        if indirect or self.next_desc + len(descs) > self.num:
            table = self.next_indirect
            self.next_indirect += 16 * len(descs) + 64
            self.writes.append((table, self._table(descs, 0)))
            head = self._take_desc(1)
            self.writes.append((DESC + 16 * head, struct.pack(
                "<QIHH", table, 16 * len(descs), VIRTQ_DESC_F_INDIRECT, 0)))
            return head
        head = self._take_desc(len(descs))
        self.writes.append((DESC + 16 * head, self._table(descs, head)))
        return head

    def _take_desc(self, n):
        if self.next_desc + n > self.num:
            raise OverflowError
        self.next_desc += n
        return self.next_desc - n

    @staticmethod
    def _table(descs, first):
        out = b""
        for i, (gpa, length, writable) in enumerate(descs):
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (
                VIRTQ_DESC_F_NEXT if i + 1 < len(descs) else 0)
            out += struct.pack("<QIHH", gpa, length, flags, first + i + 1)
        return out


def split(rng, data):
    """data (bytes, or a length) in 1 to 3 pieces."""
    size = len(data) if isinstance(data, bytes) else data
    cuts = sorted(rng.sample(range(1, size), min(rng.randrange(3), size - 1))) if size > 1 else []
    bounds = [0, *cuts, size]
    if isinstance(data, bytes):
        return [data[a:b] for a, b in zip(bounds, bounds[1:])]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def request(rng, guest, plain=False):
    """One request of any kind into guest's ring (plain: a whole read or write
    of the disk, as C serves); its head."""
    if plain:
        kind = rng.choice([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT])
        sector, length = rng.randrange(SECTORS - 16), rng.choice([512, 1024, 4096])
    else:
        kind = rng.choice([VIRTIO_BLK_T_IN] * 4 + [VIRTIO_BLK_T_OUT] * 4 + [
            VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD, 7, "short",
            "no status"])
        sector = rng.choice([0, 1, rng.randrange(SECTORS), SECTORS - 1, SECTORS, SECTORS + 1,
                             2 ** 55, 2 ** 64 - 1])
        length = rng.choice([0, 1, 511, 512, 1024, 4096, 8192, 0x10000])
    header = OUTHDR.pack(kind if isinstance(kind, int) else VIRTIO_BLK_T_IN, 0, sector)
    if kind == "short":
        header = header[:rng.randrange(16)]
    readable = [header] if rng.random() < 0.6 else split(rng, header) if header else []
    writable = []
    if kind == VIRTIO_BLK_T_OUT:
        data = rng.randbytes(length)
        if data and rng.random() < 0.3:          # the header and data in one buffer
            readable = [header + data]
        elif data:
            readable += split(rng, data)
    elif kind == VIRTIO_BLK_T_DISCARD:
        readable += [struct.pack("<QII", rng.randrange(SECTORS), rng.randrange(4), 0)]
    elif length:
        writable += split(rng, length)
    if kind != "no status":
        if writable and rng.random() < 0.3:      # the status byte at the end of the data
            writable[-1] += 1
        else:
            writable.append(1)
    parts = [(d, False) for d in readable] + [(d, True) for d in writable]
    if not parts:
        parts = [(1, True)]
    return guest.chain(parts, indirect=rng.random() < 0.3,
                       outside=rng.random() < 0.03 and not plain)


def scenario(seed):
    """(num, first index, read-only, tracked, Guest) of a random ring."""
    rng = random.Random(seed)
    num = rng.choice([8, 16, 64])
    start = rng.choice([0, 5, 0xFFFE, rng.randrange(0x10000)])
    guest = Guest(rng, num)
    heads = []
    plain = random.Random(f"plain {seed}").random() < 0.3    # all C's (then a kick is)
    for _ in range(rng.randrange(1, num + 1)):
        try:
            heads.append(request(rng, guest, plain))
        except OverflowError:
            break
    for i, head in enumerate(heads):
        guest.writes.append((AVAIL + 4 + 2 * ((start + i) % num), struct.pack("<H", head)))
    idx = start + len(heads)
    if rng.random() < 0.05:
        idx = start + num + 1 + rng.randrange(5)     # further ahead than the ring allows
    guest.writes.append((AVAIL + 2, struct.pack("<H", idx & 0xFFFF)))
    guest.writes.append((USED + 2, struct.pack("<H", start)))
    return num, start, rng.random() < 0.15, rng.random() < 0.5, guest


def interrupts_wanted(seed, num, start):
    """(VIRTIO_RING_F_EVENT_IDX negotiated, the avail ring's flags, its used_event)
    for the scenario of seed: when its driver wants an interrupt."""
    rng = random.Random(f"interrupts {seed}")
    return (rng.random() < 0.5, rng.choice([0, 0, VIRTQ_AVAIL_F_NO_INTERRUPT]),
            (start + rng.randrange(-2, num + 2)) & 0xFFFF)


def served(tmp_path, seed, walk):
    """Blk.handle_queue on the scenario of seed, the ring walked by walk
    ("python", "compiled"; "kick": compiled, and a kick as the daemon serves
    it, Blk.serve_kick first): what it left, and whether the driver got
    the interrupt it asked for."""
    num, start, read_only, tracked, guest = scenario(seed)
    event_idx, flags, used_event = interrupts_wanted(seed, num, start)
    (tmp_path / walk).mkdir(exist_ok=True)
    image = tmp_path / walk / "disk.img"           # (GET_ID answers with its name)
    image.write_bytes(random.Random(seed).randbytes(SECTORS * 512))
    memory = GuestMemory(16 * MiB)
    for gpa, data in guest.writes:
        memory.write(gpa, data)
    memory.write(AVAIL, struct.pack("<H", flags))
    memory.write(AVAIL + 4 + 2 * num, struct.pack("<H", used_event))
    mapped = mapped_memory(memory, REGIONS)
    # One request at a time both ways: requests served at once may overlap on
    # the disk, and then either order is right (the many-requests tests
    # below serve batches, on requests of their own sectors).
    device = Blk(str(image), read_only=read_only, io_threads=1)
    ring = Vring(0, None)
    ring.device_ring = DeviceRing(mapped, num, DESC, AVAIL, USED, next_avail=start,
                                  walk="python" if walk == "python" else "compiled")
    area = None
    if tracked:
        area = bytearray(inflight.queue_region_size(num))
        ring.inflight = inflight.InflightQueue(area, 0, num)
        ring.inflight.start(num, start)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    used_before = None            # as Daemon._run notes it, for Daemon._interrupt
    try:
        if walk != "kick" or not device.serve_kick(0, ring, call, event_idx):
            used_before = ring.device_ring.used_idx()
            device.handle_queue(0, ring, mapped)
        refusal = None
    except RingError as e:
        refusal = str(e)
    finally:
        device.close()
    if used_before is not None and ring.device_ring.should_notify(used_before, event_idx):
        os.eventfd_write(call, 1)
    interrupted = bool(select.select([call], [], [], 0)[0])
    os.close(call)
    seen = [memory.read(gpa, length) for gpa, length in guest.buffers
            if not 8 * MiB <= gpa < 9 * MiB]
    seen += [memory.read(DESC, 0x30000 - DESC)]          # the table, rings, indirect tables
    out = (refusal, ring.device_ring.next_avail, bytes(area) if area else None,
           ring.inflight.counter if tracked else None, seen, image.read_bytes(), interrupted)
    mapped.clear()
    memory.close()
    return out


def test_the_compiled_path_serves_every_ring_as_the_python_path(tmp_path, monkeypatch):
    """BE-73, BE-65. CASES random rings, each served three ways: by the
    Python path, by handle_queue on the compiled walk, and as a kick
    (serve_kick, then handle_queue if C left requests to it): the same
    outcome, byte for byte, the inflight area's marks and counters too,
    and the same answer to whether the driver wanted an interrupt. The C
    path must have served (and the Python one refused or served) a good
    share of them, and the kicks both signalled and not, or the
    comparison proves little."""
    assert compiled_ring.available, "run scripts/setup (python -m pyvmm.virtio.compiled_ring)"
    in_c, whole = [], []
    serve, serve_kick = compiled_ring.BlkRequests.serve, Blk.serve_kick

    def counting(self, *args):
        result = serve(self, *args)
        in_c.append(result[1])
        return result

    def counting_kicks(self, *args):
        whole.append(serve_kick(self, *args))
        return whole[-1]
    monkeypatch.setattr(compiled_ring.BlkRequests, "serve", counting)
    monkeypatch.setattr(Blk, "serve_kick", counting_kicks)
    refused = alike = interrupted = 0
    for seed in range(CASES):
        python = served(tmp_path, seed, "python")
        compiled = served(tmp_path, seed, "compiled")
        assert compiled == python, f"seed {seed}"
        kicked = served(tmp_path, seed, "kick")
        assert kicked == python, f"seed {seed}, as a kick"
        alike += 1
        refused += python[0] is not None
        interrupted += python[-1]
    print(f"{CASES} rings tried, {alike} alike; {refused} refused; "
          f"{sum(in_c)} requests served in C; {sum(whole)} kicks whole in C; "
          f"{interrupted} interrupted")
    assert alike == CASES
    assert sum(in_c) > CASES and refused > CASES // 20
    assert CASES // 10 < sum(whole) < CASES - CASES // 10
    assert CASES // 10 < interrupted < CASES - CASES // 10


def test_an_armed_fault_point_keeps_requests_on_the_python_path(memory16, monkeypatch):
    """BE-74. --die-at points are reached per request in Python: with one
    armed, and while a dead predecessor's requests are resubmitted (oldest
    first, by the Python path), nothing goes to C."""
    mapped = mapped_memory(memory16, [(0, 16 * MiB, 0)])
    ring = Vring(0, None)
    ring.device_ring = DeviceRing(mapped, 8, DESC, AVAIL, USED, walk="compiled")
    assert ring.compiled
    monkeypatch.setattr(faults, "_armed", ["served", 5])
    assert not ring.compiled
    monkeypatch.setattr(faults, "_armed", None)
    ring.resubmit = [3]
    assert not ring.compiled
    mapped.clear()


@pytest.mark.parametrize("at_once", [1, 2, 4])
def test_a_kick_of_many_reads_and_writes_is_served_in_c(tmp_path, memory16, at_once):
    """BE-73. Many plain requests in one kick: all served by C (none by the
    Python path), in batches of at_once, each with its own data; the
    inflight area ends with nothing marked and the ring's used index."""
    check_many(*serve_many(tmp_path, memory16, at_once))


def test_two_serving_loops_share_the_pool(tmp_path):
    """Two back-ends in one process (two threads, each its own rings and
    disk) serving at once: one batch at a time goes to the pool, and each
    request still gets its own data."""
    import threading
    for round_ in range(50):
        memories = [GuestMemory(16 * MiB) for _ in range(2)]
        try:
            runs, failures = [], []

            def serve(i):
                try:
                    runs.append(serve_many(tmp_path / f"{round_}-{i}", memories[i], 4))
                except Exception as e:        # noqa: BLE001 - reported below
                    failures.append(e)
            threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert not failures and len(runs) == 2
            for run in runs:
                check_many(*run)
        finally:
            for m in memories:
                m.close()


def test_the_c_path_follows_the_ring_s_inflight_area(tmp_path, memory16):
    """BE-73. C keeps where the ring's inflight area is from one kick to the
    next: a ring given a new area has its marks kept there (the old one is
    left alone), and an area whose mmap has been closed is refused as the
    Python path would refuse it (ValueError), rather than written to."""
    import mmap
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(128 << 10))
    mapped = mapped_memory(memory16, [(0, 16 * MiB, 0)])
    guest = Guest(random.Random(2), 64)
    heads = [guest.chain([(OUTHDR.pack(VIRTIO_BLK_T_IN, 0, 8 * i), False), (4096, True),
                          (1, True)]) for i in range(6)]
    for gpa, raw in guest.writes:
        memory16.write(gpa, raw)
    for i, head in enumerate(heads):
        memory16.write(AVAIL + 4 + 2 * i, struct.pack("<H", head))
    device = Blk(str(image), io_threads=1)
    device.serve = None                       # the Python path must not be asked
    ring = Vring(0, None)
    ring.device_ring = DeviceRing(mapped, 64, DESC, AVAIL, USED, walk="compiled")
    areas = [mmap.mmap(-1, inflight.queue_region_size(64)) for _ in range(2)]

    def kick(area, available):
        if ring.inflight is None or ring.inflight.m is not area:
            counter = ring.inflight.counter if ring.inflight else 0
            ring.inflight = inflight.InflightQueue(area, 0, 64)
            ring.inflight.start(64, ring.device_ring.next_avail)
            ring.inflight.counter = counter
        memory16.write(AVAIL + 2, struct.pack("<H", available))
        device.handle_queue(0, ring, mapped)
    try:
        kick(areas[0], 2)
        kick(areas[1], 4)
        assert [inflight.HEADER.unpack_from(a)[4] for a in areas] == [2, 4]   # used_idx
        assert ring.inflight.counter == 4
        areas[1].close()
        with pytest.raises(ValueError, match="inflight area is closed"):
            kick(areas[1], 6)
        assert ring.device_ring.next_avail == 4                  # nothing more taken
        assert struct.unpack("<H", memory16.read(USED + 2, 2))[0] == 4
    finally:
        device.close()
        mapped.clear()
        areas[0].close()


def test_the_c_path_s_threads_start_with_the_device(tmp_path):
    """The pool's threads start when Blk is made (the program's start), not
    at the guest's first request, where they cost the connection's set-up
    about 10 ms inside the testbed. In a process of its own: the pool is
    the process's."""
    import subprocess
    import sys
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    script = ("import sys; from pyvmm.vhost.user.backend.blk import Blk; "
              "from pyvmm.virtio import compiled_ring as c; "
              "before = c.lib.pv_pool_start(0); Blk(sys.argv[1], io_threads=3); "
              "print(before, c.lib.pv_pool_start(0))")
    out = subprocess.run([sys.executable, "-c", script, str(image)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.split() == ["0", "2"]


def serve_many(tmp_path, memory16, at_once):
    """20 reads and writes of a page each made available in one ring,
    served by Blk.handle_queue with at_once; what check_many looks at."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(128 << 10))
    mapped = mapped_memory(memory16, [(0, 16 * MiB, 0)])
    guest = Guest(random.Random(1), 64)
    heads, data = [], {}
    for i in range(20):
        if i % 2:
            payload = os.urandom(4096)
            data[i] = payload
            heads.append(guest.chain([(OUTHDR.pack(VIRTIO_BLK_T_OUT, 0, 8 * i), False),
                                      (payload, False), (1, True)], indirect=True))
        else:
            heads.append(guest.chain([(OUTHDR.pack(VIRTIO_BLK_T_IN, 0, 8 * i), False),
                                      (4096, True), (1, True)], indirect=True))
    for gpa, raw in guest.writes:
        memory16.write(gpa, raw)
    for i, head in enumerate(heads):
        memory16.write(AVAIL + 4 + 2 * i, struct.pack("<H", head))
    memory16.write(AVAIL + 2, struct.pack("<H", len(heads)))
    device = Blk(str(image), io_threads=at_once)
    ring = Vring(0, None)
    ring.device_ring = DeviceRing(mapped, 64, DESC, AVAIL, USED, walk="compiled")
    area = bytearray(inflight.queue_region_size(64))
    ring.inflight = inflight.InflightQueue(area, 0, 64)
    ring.inflight.start(64, 0)
    device.serve = None                       # the Python path must not be asked
    try:
        device.handle_queue(0, ring, mapped)
    finally:
        device.close()
        mapped.clear()
    return image, memory16, guest, heads, data, area, ring


def check_many(image, memory16, guest, heads, data, area, ring):
    disk = image.read_bytes()
    used = [struct.unpack_from("<II", memory16.read(USED + 4 + 8 * i, 8)) for i in range(20)]
    assert [h for h, _ in used] == heads                       # in ring order
    assert [n for _, n in used] == [4097 if i % 2 == 0 else 1 for i in range(20)]
    for i, (gpa, length) in enumerate(guest.buffers):
        if length == 4096 and (i // 3) % 2 == 0:               # a read's data buffer
            sector = 8 * (i // 3)
            assert memory16.read(gpa, 4096) == disk[512 * sector:512 * sector + 4096]
        if length == 1:                                        # every status: OK
            assert memory16.read(gpa, 1) == b"\0"
    for i, payload in data.items():
        assert disk[4096 * i:4096 * i + 4096] == payload
    assert inflight.HEADER.unpack_from(area)[4] == 20          # used_idx
    assert all(area[16 + 16 * h] == 0 for h in range(64))      # nothing marked
    assert ring.inflight.counter == 20 and ring.device_ring.next_avail == 20


def test_a_kick_of_reads_and_writes_is_served_and_signalled_in_c(tmp_path, memory16,
                                                                  monkeypatch):
    """BE-65, BE-73. Through the back-end library: a kick whose requests are
    all reads and writes is served and signalled in C (Blk.serve_kick),
    with no request left to handle_queue; with VIRTIO_RING_F_EVENT_IDX the call
    eventfd is signalled for the used entry the driver asked for
    (used_event), not before."""
    assert compiled_ring.available, "run scripts/setup (python -m pyvmm.virtio.compiled_ring)"
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    python_path = []                 # handle_queue's calls with requests to serve

    def handle_queue(self, index, ring, memory):
        if ring.available():
            python_path.append(index)     # (it leaves them: the test then times out)
    monkeypatch.setattr(Blk, "handle_queue", handle_queue)
    device = Blk(str(image))
    rig = LibraryRig(memory16, device, features=1 << 32 | 1 << 29)    # VERSION_1, EVENT_IDX
    try:
        ring = rig.ring
        rig.memory.write(ring.avail_addr + 4 + 2 * ring.num, struct.pack("<H", 2))
        for i in range(3):                           # a read of sector i into page i
            header = 0x100000 + 32 * i
            rig.memory.write(header, OUTHDR.pack(VIRTIO_BLK_T_IN, 0, i))
            ring.add([(header, 16, False), (0x200000 + 4096 * i, 512, True),
                      (0x300000 + i, 1, True)])
            os.eventfd_write(rig.kick, 1)
            if i < 2:
                deadline = time.monotonic() + 5
                while ring.used_idx() != i + 1:
                    assert time.monotonic() < deadline, "the read was not served"
                    time.sleep(0.01)
                assert not select.select([rig.call], [], [], 0.1)[0], f"entry {i}: interrupted"
        assert rig.wait(rig.call) == 1                # entry 2: the one asked for
        assert ring.used_idx() == 3 and python_path == []
        on_disk = image.read_bytes()
        for i in range(3):
            assert rig.memory.read(0x200000 + 4096 * i, 512) == on_disk[512 * i:512 * (i + 1)]
            assert rig.memory.read(0x300000 + i, 1) == b"\0"
    finally:
        rig.close()
        device.close()


def test_a_subclass_s_own_handle_queue_sees_every_kick(tmp_path, memory16):
    """A Blk subclass that overrides handle_queue (a test's broken back-end, a
    user's extra work per request) gets the kicks there, C's or not."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    seen = []

    class Counting(Blk):
        def handle_queue(self, index, ring, memory):
            seen.append(ring.available())
            super().handle_queue(index, ring, memory)
    device = Counting(str(image))
    rig = LibraryRig(memory16, device)
    try:
        rig.memory.write(0x100000, OUTHDR.pack(VIRTIO_BLK_T_IN, 0, 0))
        rig.submit([(0x100000, 16, False), (0x200000, 512, True), (0x300000, 1, True)])
        assert True in seen
    finally:
        rig.close()
        device.close()


def test_c_serves_a_ring_s_kicks_until_the_loop_has_other_work(tmp_path, memory16,
                                                                 monkeypatch):
    """A stream of reads, each kicked on its own: after the first kick, C waits
    for the next ones in the daemon's event loop and serves them itself
    (Python's kick handler runs once); a message hands the loop back at
    once (answered, even during a flood of empty kicks), and the next kick
    starts again from Python."""
    from pyvmm.vhost.user.backend.daemon import Daemon
    assert compiled_ring.available, "run scripts/setup (python -m pyvmm.virtio.compiled_ring)"
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    on_kick, python_kicks = Daemon._on_kick, []

    def counting(self, ring):
        python_kicks.append(ring.index)
        on_kick(self, ring)
    monkeypatch.setattr(Daemon, "_on_kick", counting)
    device = Blk(str(image))
    rig = LibraryRig(memory16, device)
    try:
        def read(i):
            rig.memory.write(0x100000, OUTHDR.pack(VIRTIO_BLK_T_IN, 0, i))
            rig.memory.write(0x300000, b"\xff")
            rig.submit([(0x100000, 16, False), (0x200000, 512, True), (0x300000, 1, True)])
            assert rig.memory.read(0x300000, 1) == b"\0"
            assert rig.memory.read(0x200000, 512) == on_disk[512 * i:512 * (i + 1)]
        on_disk = image.read_bytes()
        for i in range(5):
            read(i)
        assert python_kicks == [0]
        started = time.monotonic()
        assert rig.fe.get_features() & 1 << 32                # answered: C handed back
        assert time.monotonic() - started < 1
        read(5)
        assert python_kicks == [0, 0]
        for _ in range(1000):                # a flood of kicks for nothing stops no one
            os.eventfd_write(rig.kick, 1)
        started = time.monotonic()
        assert rig.fe.get_features() & 1 << 32
        assert time.monotonic() - started < 1
        read(6)
    finally:
        rig.close()
        device.close()
