"""The compiled chain walk (pyvmm/virtio/ring_walk.c through compiled_ring.py)
against the Python walk it must equal (issue 23). No KVM.

The Python walk in device_ring.py is the reference: on every descriptor
table a guest can write, the compiled walk must find the same buffers or
refuse with the same words, and move the same bytes. A guest writes the
tables here at random (hypothesis), in a back-end's memory of two regions
with a hole between them."""

import os
import struct
import subprocess
import sys

import pytest
from backends import mapped_memory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.virtio import compiled_ring
from pyvmm.virtio.device_ring import Chain, DeviceRing
from pyvmm.virtio.splitring import RingError

MiB = 1 << 20
DESC, AVAIL, USED, INDIRECT = 0x10000, 0x11000, 0x12000, 0x20000
REGIONS = [(0, 8 * MiB, 0), (9 * MiB, 7 * MiB, 9 * MiB)]      # a hole at 8 MiB
EXAMPLES = int(os.environ.get("PYVMM_FUZZ_EXAMPLES", 1500))


def outcome(memory, num, walk):
    """What walking the chain made available at head gives: its parts, or the refusal."""
    ring = DeviceRing(memory, num, DESC, AVAIL, USED, walk=walk)
    try:
        c = ring.pop()
    except RingError as e:
        return ("refused", str(e))
    return (c.head, c.buffers, c.readable_len, c.writable_len, c.n_readable)


def test_the_compiled_walk_is_built_here():
    """scripts/setup builds it (gcc is one of its packages): the compiled
    cases of the ring tests must not quietly become Python ones."""
    assert compiled_ring.available, "run scripts/setup (python -m pyvmm.virtio.compiled_ring)"
    assert compiled_ring.walker() == "compiled"


ADDRS = [0, 0x30000, INDIRECT, DESC, 8 * MiB - 16, 8 * MiB - 1, 8 * MiB, 9 * MiB - 1, 9 * MiB,
         16 * MiB - 4096, 16 * MiB, 2 ** 63, 2 ** 64 - 16, 2 ** 64 - 1]
LENGTHS = [0, 1, 15, 16, 32, 4096, MiB, 7 * MiB, 0x10000 * 16, 0x10001 * 16, 0xFFFF_FFFF]


def random_descriptor(rng):
    """(addr, len, flags, next): half the time a buffer in RAM, else a value
    that matters, or any at all; NEXT, WRITE and INDIRECT in any mix."""
    if rng.random() < 0.5:
        addr, length = rng.choice([0x100000, 9 * MiB]) + rng.randrange(0x10000), rng.randrange(4097)
        return addr, length, rng.choice([1, 1, 3, 3, 0, 2, 5]), rng.randrange(8)
    addr = rng.choice(ADDRS) if rng.random() < 0.7 else rng.getrandbits(64)
    length = rng.choice(LENGTHS) if rng.random() < 0.7 else rng.getrandbits(32)
    return addr, length, rng.randrange(8), rng.randrange(71)


def test_random_tables_are_walked_alike(memory16):
    """Each case: a descriptor table, an indirect table of up to 64
    descriptors at INDIRECT (which the head names, half the time), a head;
    the two walks must find the same chain or refuse it with the same words."""
    import random
    rng = random.Random(23)
    memory = mapped_memory(memory16, REGIONS)
    tried = refused = 0
    for _ in range(EXAMPLES):
        num = rng.choice([1, 2, 4, 8, 16, 64])
        table = [random_descriptor(rng) for _ in range(num)]
        indirect = [random_descriptor(rng) for _ in range(rng.randrange(65))]
        if indirect and rng.random() < 0.5:
            table[0] = (INDIRECT, 16 * len(indirect), 4, 0)
        memory16.write(DESC, b"".join(struct.pack("<QIHH", *d) for d in table))
        memory16.write(INDIRECT, b"".join(struct.pack("<QIHH", *d) for d in indirect))
        memory16.write(AVAIL, struct.pack("<HHH", 0, 1, rng.randrange(num)))
        memory16.write(USED, struct.pack("<HH", 0, 0))
        python = outcome(memory, num, "python")
        assert outcome(memory, num, "compiled") == python, (table, indirect)
        tried += 1
        refused += python[0] == "refused"
    memory.clear()
    print(f"ring walk: {tried} tables tried, compiled == python on all ({refused} refused "
          f"by both)")
    assert 0 < refused < tried          # both kinds of outcome were met


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 9000), min_size=1, max_size=12), n_readable=st.integers(0, 12),
       start=st.integers(0, 40000), length=st.integers(0, 40000), data=st.data())
def test_bytes_are_moved_alike(memory16, tmp_path_factory, lengths, n_readable, start, length,
                               data):
    """read, write, read_file and write_file of any part of a chain whose
    buffers lie in both regions (some across nothing: each in one region)."""
    memory = mapped_memory(memory16, REGIONS)
    n_readable = min(n_readable, len(lengths))
    addrs = [data.draw(st.sampled_from([0x100000 + 0x4000 * i, 9 * MiB + 0x4000 * i]))
             for i in range(len(lengths))]
    bufs = [(a, n, i >= n_readable) for i, (a, n) in enumerate(zip(addrs, lengths))]
    memory16.write(DESC, b"".join(
        struct.pack("<QIHH", a, n, (2 if w else 0) | (1 if i + 1 < len(bufs) else 0), i + 1)
        for i, (a, n, w) in enumerate(bufs)))
    memory16.write(AVAIL, struct.pack("<HHH", 0, 1, 0))
    path = tmp_path_factory.mktemp("io") / "file"
    content = os.urandom(50000)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        results = []
        for walk in ("python", "compiled"):
            os.pwrite(fd, content, 0)                 # each walk starts from the same file
            for a, n, _ in bufs:
                memory16.write(a, bytes(range(256)) * (n // 256) + bytes(n % 256))
            chain = DeviceRing(memory, 64, DESC, AVAIL, USED, walk=walk).pop()
            assert isinstance(chain, Chain) == (walk == "python")
            got = [chain.read(memory, start, length),
                   chain.write(memory, b"x" * length, start),
                   chain.read_file(memory, fd, 100, start, length),
                   chain.write_file(memory, fd, 200, start, length),
                   b"".join(memory16.read(a, n) for a, n, _ in bufs),
                   os.pread(fd, 50000, 0)]
            results.append(got)
        assert results[0] == results[1]
    finally:
        os.close(fd)
        memory.clear()


def test_a_chain_from_an_old_memory_table_moves_no_bytes(memory16):
    """A CompiledChain holds host addresses: after SET_MEM_TABLE (every old
    mapping closed) it refuses, rather than touch what may be unmapped."""
    memory = mapped_memory(memory16, REGIONS)
    memory16.write(DESC, struct.pack("<QIHH", 0x100000, 4096, 2, 0))
    memory16.write(AVAIL, struct.pack("<HHH", 0, 2, 0) + struct.pack("<H", 0))
    ring = DeviceRing(memory, 4, DESC, AVAIL, USED, walk="compiled")
    chain = ring.pop()
    assert chain.write(memory, b"ok") == 2
    from pyvmm.vhost.user.messages import MemoryRegion
    memory.replace([(MemoryRegion(0, 16 * MiB, 0, 0), os.dup(memory16.fd))])
    for move in (lambda: chain.write(memory, b"no"), lambda: chain.read(memory, 0, 1),
                 lambda: chain.read_file(memory, 0, 0, 0, 1),
                 lambda: chain.write_file(memory, 1, 0, 0, 1)):
        with pytest.raises(RingError, match="memory table changed"):
            move()
    assert ring.pop().buffers[0].length == 4096       # the ring itself follows the new table
    memory.clear()


def test_a_build_of_another_source_is_not_used(monkeypatch):
    """A module built from an older ring_walk.c (no scripts/setup since the
    source changed) is left alone: rings are walked in Python."""
    monkeypatch.setattr(compiled_ring, "source_hash", lambda: "00000000")
    assert compiled_ring._load() is None


def test_pyvmm_ring_walk_python_chooses_the_reference():
    code = "from pyvmm.virtio import compiled_ring as c; print(c.walker())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYVMM_RING_WALK": "python"}, check=True)
    assert out.stdout.strip() == "python"
