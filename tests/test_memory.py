"""Guest memory: layout around the MMIO hole, memfd sharing, bounds checks."""

import fcntl
import mmap
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.memory import GuestMemory, GuestMemoryError
from pyvmm.memory import guest_memory
from pyvmm.memory.guest_memory import GiB, MiB, MMIO_HOLE_END, MMIO_HOLE_START


@pytest.fixture
def mem():
    m = GuestMemory(64 * MiB)
    yield m
    m.close()


def test_small_guest_is_one_region(mem):
    assert [(r.guest_phys_addr, r.size, r.memfd_offset) for r in mem.regions] == [(0, 64 * MiB, 0)]


def test_big_guest_skips_the_mmio_hole():
    m = GuestMemory(5 * GiB)  # sparse: nothing is touched
    try:
        low, high = m.regions
        assert (low.guest_phys_addr, low.size) == (0, MMIO_HOLE_START)
        assert (high.guest_phys_addr, high.size, high.memfd_offset) == (MMIO_HOLE_END, 2 * GiB, 3 * GiB)
        assert high.host_addr == low.host_addr + 3 * GiB
        m.write(MMIO_HOLE_END + 5, b"high")
        assert m.read(MMIO_HOLE_END + 5, 4) == b"high"
        with pytest.raises(GuestMemoryError):
            m.read(MMIO_HOLE_START + 4096, 1)
    finally:
        m.close()


def test_the_memfd_shows_the_same_bytes(mem):
    """What a vhost back-end would see when it maps the fd."""
    mem.write(0x1234, b"shared")
    other = mmap.mmap(mem.fd, 64 * MiB, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        assert other[0x1234:0x123A] == b"shared"
    finally:
        other.close()


def test_memfd_is_sealed_against_shrinking(mem):
    with pytest.raises(PermissionError):
        os.ftruncate(mem.fd, 4096)


@pytest.mark.parametrize("gpa,length", [(64 * MiB - 1, 2), (64 * MiB, 1), (-1, 1),
                                        (0, 64 * MiB + 1), (2**64, 1)])
def test_out_of_bounds_is_refused(mem, gpa, length):
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.write(gpa, b"x" * length)


def test_negative_length_is_refused(mem):
    with pytest.raises(GuestMemoryError):
        mem.view(0, -1)


def test_view_is_zero_copy(mem):
    v = mem.view(4096, 4)
    v[:] = b"abcd"
    assert mem.read(4096, 4) == b"abcd"


@pytest.mark.parametrize("size", [0, 4095, -4096])
def test_bad_sizes(size):
    with pytest.raises(GuestMemoryError):
        GuestMemory(size)


def huge_page_pool(tmp_path, monkeypatch, free):
    """A stand-in for /sys/kernel/mm/hugepages/hugepages-2048kB with `free` pages."""
    (tmp_path / "free_hugepages").write_text(f"{free}\n")
    monkeypatch.setattr(guest_memory, "HUGEPAGES_2MB_SYSFS", str(tmp_path))


def test_hugepages_refused_clearly_when_too_few_are_free(tmp_path, monkeypatch):
    huge_page_pool(tmp_path, monkeypatch, free=16)       # 32 MiB
    with pytest.raises(GuestMemoryError, match="32 MiB free, 64 MiB needed.*nr_hugepages"):
        GuestMemory(64 * MiB, hugepages=True)


def test_hugepages_counted_from_the_2mb_pool(tmp_path, monkeypatch):
    """Not from /proc/meminfo's Hugepagesize, which is the default size (1 GiB on some hosts)."""
    huge_page_pool(tmp_path, monkeypatch, free=32)
    assert guest_memory.free_huge_pages_bytes() == 64 * MiB
    try:
        GuestMemory(64 * MiB, hugepages=True).close()
    except GuestMemoryError as e:   # the pool was faked; the kernel's may be empty
        assert "cannot allocate" in str(e)


def test_no_2mb_pool_means_no_huge_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(guest_memory, "HUGEPAGES_2MB_SYSFS", str(tmp_path / "missing"))
    assert guest_memory.free_huge_pages_bytes() == 0


F_SEAL_FUTURE_WRITE = 0x0010   # <linux/fcntl.h>; not in Python's fcntl module


def test_memfd_seals_are_sealed(mem):
    """A back-end holding the fd cannot add F_SEAL_FUTURE_WRITE (or any seal) and so
    break every later writable mapping (a reconnecting or second back-end)."""
    seals = fcntl.fcntl(mem.fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SEAL and seals & fcntl.F_SEAL_SHRINK
    with pytest.raises(PermissionError):
        fcntl.fcntl(mem.fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
    other = mmap.mmap(mem.fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    other.close()


@pytest.fixture(scope="module")
def shared_mem():
    m = GuestMemory(64 * MiB)
    yield m
    m.close()


@settings(max_examples=300, deadline=None)
@given(gpa=st.integers(min_value=-2**65, max_value=2**65), length=st.integers(-10, 2**33))
def test_every_access_is_inside_or_refused(shared_mem, gpa, length):
    m = shared_mem
    inside = length >= 0 and gpa >= 0 and gpa + length <= 64 * MiB
    try:
        view = m.view(gpa, length)
    except GuestMemoryError:
        assert not inside
    else:
        assert inside and len(view) == length

