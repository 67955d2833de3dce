"""The chain walk and a request's byte moves in C (ring_walk.c), and
virtio-blk's plain reads and writes served whole (blk_requests.c), for speed.

A back-end in Python spends most of a request's time walking its chain:
about 15 us per descriptor inside the testbed VM, more than the copy of
the 4 KiB the descriptor carries (`scripts/bench ring`). ring_walk.c does
the same walk, with the same checks and the same refusals, and moves the
request's bytes (preadv/pwritev, copies) straight to and from the buffers
it found, so that Python's work per request no longer grows with its
descriptors. blk_requests.c goes further for the one device measured
against a C back-end (`scripts/bench blk-backend`): a read or write of the
disk is taken, done and given back in C, as the Python path would do it
(BlkRequests).

It is optional. `python -m pyvmm.virtio.compiled_ring` (scripts/setup runs
it) compiles it with cffi next to this file, unless a build of the present
source is there already (a build carries its source's hash); where there is
no compiler, no cffi, only a build of other C sources, or
PYVMM_RING_WALK=python in the environment, DeviceRing walks in Python
(device_ring.py) and pyvmm backend blk serves every request in Python
(blk.py): the references the C is tested against.

A CompiledChain holds host addresses of guest memory: it is good only
while the memory's table is the one it was walked in (its generation);
after a change it refuses to move bytes (RingError) instead of touching a
mapping that may be gone.
"""

import os
import sys
import zlib

from pyvmm.virtio.splitring import RingError

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(HERE, name) for name in ("ring_walk.c", "blk_requests.c")]
MODULE = "pyvmm.virtio._ring_walk"

CDEF = """
struct pv_region { uint64_t start, end; char *host; };
struct pv_buf { uint64_t addr; char *host; uint32_t len; uint32_t writable; };
struct pv_chain { uint32_t n, n_readable; uint64_t readable_len, writable_len;
                  int error; uint64_t e1, e2; };
struct iovec { void *iov_base; size_t iov_len; };
int pv_walk(const struct pv_region *, int, const char *, uint32_t, uint32_t,
            struct pv_buf *, struct pv_chain *);
int64_t pv_file_io(int, int, int64_t, const struct pv_buf *, uint32_t, uint64_t, uint64_t,
                   struct iovec *);
uint64_t pv_copy(int, char *, uint64_t, const struct pv_buf *, uint32_t, uint64_t);
struct pv_queue { char *desc, *avail, *used; uint32_t num; uint16_t next_avail;
                  char *inflight; uint64_t counter; int stopped; };
struct pv_disk { int fd, read_only; uint64_t size; uint32_t failed; int error; };
struct pv_io { int fd, to_file; int64_t offset; const struct pv_buf *bufs; uint32_t n;
               uint64_t start, length; struct iovec *iov; int64_t done; };
int pv_pool_start(int);
uint32_t pv_blk_kick(const struct pv_region *, int, struct pv_queue *, struct pv_disk *,
                     struct pv_buf *, struct iovec *, struct pv_io *, struct pv_chain *,
                     uint16_t *, uint32_t, int, int, int, int);
extern const char pv_source_hash[];
"""


def _source():
    """The C sources as one (blk_requests.c uses ring_walk.c's walk)."""
    text = []
    for path in SOURCES:
        with open(path) as f:
            text.append(f.read())
    return "\n".join(text)


def source_hash():
    """What a build is of: the C sources and the declarations."""
    return f"{zlib.crc32((_source() + CDEF).encode()):08x}"


def build():
    """Compile the C sources into a module next to this file; its path."""
    import shutil
    import tempfile

    import cffi
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(MODULE, _source() + f'\nconst char pv_source_hash[] = "{source_hash()}";\n',
                   extra_compile_args=["-O2"])
    with tempfile.TemporaryDirectory() as tmp:
        built = ffi.compile(tmpdir=tmp)
        target = os.path.join(HERE, os.path.basename(built))
        shutil.copy(built, target + ".tmp")
        os.replace(target + ".tmp", target)     # a running process keeps the old one
    return target


def built():
    """The compiled module if there is one built from these C sources and
    these declarations, else None."""
    try:
        from pyvmm.virtio import _ring_walk
    except ImportError:
        return None
    if _ring_walk.ffi.string(_ring_walk.lib.pv_source_hash).decode() != source_hash():
        return None           # built from other sources
    return _ring_walk


def _load():
    """The compiled module to walk with, or None (see the module's docstring)."""
    if os.environ.get("PYVMM_RING_WALK", "compiled") == "python":
        return None
    return built()


_module = _load()
available = _module is not None
if available:
    ffi, lib = _module.ffi, _module.lib
    _new = ffi.new_allocator(should_clear_after_alloc=False)


def walker():
    """Which walk DeviceRing uses: "compiled" or "python"."""
    return "compiled" if available else "python"


# What each of ring_walk.c's errors says: the words of device_ring.py's walk.
_ERRORS = {
    1: lambda c, head: f"descriptor {c.e1} is outside a table of {c.e2}",
    2: lambda c, head: "an indirect descriptor inside a chain or an indirect table",
    3: lambda c, head: (f"indirect table at {c.e1:#x}+{c.e2:#x} is not whole descriptors "
                        f"inside guest RAM"),
    4: lambda c, head: f"an indirect table of {c.e1} descriptors (at most {1 << 16})",
    5: lambda c, head: f"buffer at {c.e1:#x}+{c.e2:#x} is not inside guest RAM",
    6: lambda c, head: "a device-readable buffer after a device-writable one",
    7: lambda c, head: f"the chain at head {head} has more than 4 GiB of device-readable bytes",
    8: lambda c, head: f"the chain at head {head} has more than 4 GiB of device-writable bytes",
    9: lambda c, head: f"the chain at head {head} is longer than the table (a loop)",
}


class Regions:
    """memory's regions as ring_walk.c takes them, for one generation of its table."""

    def __init__(self, memory):
        self.memory, self.generation = memory, memory.generation
        table = memory.host_regions()
        self.array = ffi.new("struct pv_region[]", [(s, e, ffi.cast("char *", h))
                                                    for s, e, h in table])
        self.count = len(table)


def walk(regions, table, num, head):
    """The chain at head of the num-entry descriptor table at host address
    table: a CompiledChain, or RingError as device_ring.py's walk raises it."""
    bufs = _new("struct pv_buf[]", num + 1)
    c = _new("struct pv_chain *")
    if lib.pv_walk(regions.array, regions.count, ffi.cast("char *", table), num, head, bufs, c):
        raise RingError(_ERRORS[c.error](c, head))
    return CompiledChain(head, bufs, c.n, c.n_readable, c.readable_len, c.writable_len,
                         regions)


class CompiledChain:
    """A chain as the compiled walk found it: what device_ring.Chain offers
    (its buffers made only when asked for), and the byte moves done in C."""

    __slots__ = ("head", "readable_len", "writable_len", "n_readable", "_bufs", "_n",
                 "_regions", "_buffers")

    def __init__(self, head, bufs, n, n_readable, readable_len, writable_len, regions):
        self.head, self._bufs, self._n, self.n_readable = head, bufs, n, n_readable
        self.readable_len, self.writable_len = readable_len, writable_len
        self._regions = regions
        self._buffers = None

    def _made(self, first, end):
        """Buffers first..end-1 as device_ring.Buffer tuples (only when asked for)."""
        from pyvmm.virtio.device_ring import Buffer
        return tuple(Buffer(b.addr, b.len, bool(b.writable)) for b in self._bufs[first:end])

    @property
    def buffers(self):
        if self._buffers is None:
            self._buffers = self._made(0, self._n)
        return self._buffers

    @property
    def readable(self):
        """The device-readable buffers (made without the others)."""
        return self._made(0, self.n_readable)

    @property
    def writable(self):
        return self._made(self.n_readable, self._n)

    def _part(self, memory, writable):
        """(first buffer, count) of the device-readable or -writable part, once
        the memory is known to be the table the chain was walked in."""
        if memory is not self._regions.memory or memory.generation != self._regions.generation:
            raise RingError("the guest memory table changed since the chain was taken")
        if writable:
            return self._bufs + self.n_readable, self._n - self.n_readable
        return self._bufs, self.n_readable

    def read(self, memory, start, length):
        """Bytes [start, start+length) of the device-readable part, as one bytes."""
        bufs, n = self._part(memory, False)
        out = bytearray(max(0, min(length, self.readable_len - start)))
        done = lib.pv_copy(0, ffi.from_buffer(out), len(out), bufs, n, start) if out else 0
        return bytes(out[:done])

    def write(self, memory, data, start=0):
        """data into the device-writable part from start; returns the bytes written."""
        bufs, n = self._part(memory, True)
        if not data:
            return 0
        return lib.pv_copy(1, ffi.from_buffer(data), len(data), bufs, n, start)

    def read_file(self, memory, fd, offset, start, length):
        """preadv: the file's bytes at offset into device-writable bytes [start,
        start+length); returns the bytes read (OSError as os.preadv raises it)."""
        bufs, n = self._part(memory, True)
        return _file_io(fd, 0, offset, bufs, n, start, length)

    def write_file(self, memory, fd, offset, start, length):
        """pwritev: device-readable bytes [start, start+length) to the file at offset."""
        bufs, n = self._part(memory, False)
        return _file_io(fd, 1, offset, bufs, n, start, length)


def _file_io(fd, to_file, offset, bufs, n, start, length):
    if not n or length <= 0:
        return 0
    done = lib.pv_file_io(fd, to_file, offset, bufs, n, start, length,
                          _new("struct iovec[]", n))
    if done < 0:
        raise OSError(-done, os.strerror(-done))
    return done


class BlkRequests:
    """blk_requests.c serving one ring (a DeviceRing walked in C): the plain
    reads and writes at its front served whole in C, on a disk, keeping the
    inflight area as Vring.pop and push do; up to at_once of them at a
    time, their I/O at once on as many threads. What C needs is made once
    here, and its host addresses again only when the memory table changes."""

    def __init__(self, ring, at_once=1):
        self.ring = ring
        at_once = max(1, min(at_once, ring.num))
        if at_once > 1:
            at_once = min(at_once, lib.pv_pool_start(at_once - 1) + 1)   # (fewer: no threads)
        room = at_once * (ring.num + 1)
        self._q, self._disk = ffi.new("struct pv_queue *"), ffi.new("struct pv_disk *")
        self._args = (self._q, self._disk, ffi.new("struct pv_buf[]", room),
                      ffi.new("struct iovec[]", room), ffi.new("struct pv_io[]", at_once),
                      ffi.new("struct pv_chain[]", at_once), ffi.new("uint16_t[]", at_once),
                      at_once)
        self._q.num = ring.num
        self._regions = None
        self._inflight = None       # the InflightQueue q.inflight points into
        self._disk_set = None       # the (fd, size, read_only) in self._disk

    def serve(self, inflight, fd, size, read_only, call=None, event_idx=False, wait=None):
        """Serve what C can (inflight: the ring's InflightQueue, or None), up to
        the first request of another kind, or not whole, or broken, which it
        leaves untaken: the Python path serves or refuses that one. Then, if
        call (the ring's call eventfd) is given, signal it if the driver
        wants to hear of what was used (Daemon._interrupt's test; event_idx:
        VIRTIO_RING_F_EVENT_IDX negotiated). wait: (the event loop's epoll
        fd, the ring's kick eventfd) to go on serving the ring's kicks in C
        until something else is ready in the loop (or a request is left to
        Python, or one failed). Returns (whether it stopped at such a
        request, requests served, how many of them failed, the errno of the
        last failure or 0 for a short count). This runs at every kick: C's
        structs are written only where what they hold changed."""
        ring, q, disk = self.ring, self._q, self._disk
        regions, desc, avail, used = ring.host_layout()
        if regions is not self._regions:             # a new memory table
            q.desc, q.avail, q.used = (ffi.cast("char *", a) for a in (desc, avail, used))
            self._regions = regions
        if inflight is not self._inflight:
            q.inflight = ffi.NULL if inflight is None else ffi.cast("char *", inflight.host_addr)
            self._inflight = inflight
        if (fd, size, read_only) != self._disk_set:
            disk.fd, disk.size, disk.read_only = self._disk_set = (fd, size, read_only)
        q.next_avail = ring.next_avail
        if inflight is not None:
            # An area closed under the ring fails as the Python path would
            # (ValueError), rather than C writing where it was mapped.
            if getattr(inflight.m, "closed", False):  # (tests' areas: bytearrays)
                raise ValueError("the inflight area is closed")
            q.counter = inflight.counter
        try:
            served = lib.pv_blk_kick(regions.array, regions.count, *self._args,
                                     -1 if call is None else call, 1 if event_idx else 0,
                                     *(wait or (-1, -1)))
        finally:
            ring.next_avail = q.next_avail
            if inflight is not None:
                inflight.counter = q.counter
        failed = disk.failed
        return bool(q.stopped), served, failed, disk.error if failed else 0


if __name__ == "__main__":
    # (scripts/setup: builds only when there is no build of this source yet)
    if built() is not None:
        sys.exit(0)
    print("pyvmm: building the compiled ring walk (cffi, gcc)", file=sys.stderr, flush=True)
    try:
        print(f"pyvmm: built {os.path.basename(build())}")
    except Exception as e:     # noqa: BLE001 - no compiler, no cffi: Python walks instead
        print(f"pyvmm: the compiled ring walk was not built ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}); rings are walked in Python",
              file=sys.stderr)
