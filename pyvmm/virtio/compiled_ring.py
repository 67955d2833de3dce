"""The chain walk and a request's byte moves in C (ring_walk.c), for speed.

A back-end in Python spends most of a request's time walking its chain:
about 15 us per descriptor inside the testbed VM, more than the copy of
the 4 KiB the descriptor carries (`scripts/bench ring`). ring_walk.c does
the same walk, with the same checks and the same refusals, and moves the
request's bytes (preadv/pwritev, copies) straight to and from the buffers
it found, so that Python's work per request no longer grows with its
descriptors.

It is optional. `python -m pyvmm.virtio.compiled_ring` (scripts/setup runs
it) compiles it with cffi next to this file, unless a build of the present
source is there already (a build carries its source's hash); where there is
no compiler, no cffi, only a build of another ring_walk.c, or
PYVMM_RING_WALK=python in the environment, DeviceRing walks in Python
(device_ring.py), which stays the reference the compiled walk is tested
against.

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
SOURCE = os.path.join(HERE, "ring_walk.c")
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
extern const char pv_source_hash[];
"""


def source_hash():
    """What a build is of: the C source and the declarations."""
    with open(SOURCE, "rb") as f:
        return f"{zlib.crc32(f.read() + CDEF.encode()):08x}"


def build():
    """Compile ring_walk.c into a module next to this file; its path."""
    import shutil
    import tempfile

    import cffi
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    with open(SOURCE) as f:
        source = f.read()
    ffi.set_source(MODULE, source + f'\nconst char pv_source_hash[] = "{source_hash()}";\n',
                   extra_compile_args=["-O2"])
    with tempfile.TemporaryDirectory() as tmp:
        built = ffi.compile(tmpdir=tmp)
        target = os.path.join(HERE, os.path.basename(built))
        shutil.copy(built, target + ".tmp")
        os.replace(target + ".tmp", target)     # a running process keeps the old one
    return target


def built():
    """The compiled module if there is one built from this ring_walk.c and
    these declarations, else None."""
    try:
        from pyvmm.virtio import _ring_walk
    except ImportError:
        return None
    if _ring_walk.ffi.string(_ring_walk.lib.pv_source_hash).decode() != source_hash():
        return None           # built from another ring_walk.c
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
