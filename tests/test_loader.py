"""The Linux loader: the shipped images load right; bad kernels fail with one clear line."""

import ctypes
import gzip
import os
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm import guest
from pyvmm.loader import LoaderError, load_linux
from pyvmm.loader.bootparams import E820_RAM, boot_params
from pyvmm.loader.linux import CMDLINE_ADDR, ZERO_PAGE_ADDR
from pyvmm.loader.mptable import MPTABLE_START, build_mptable
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import MiB


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory(256 * MiB)
    yield m
    m.close()


def zero_page(mem):
    return boot_params.from_buffer_copy(mem.read(ZERO_PAGE_ADDR, ctypes.sizeof(boot_params)))


def make_elf(segments, entry, machine=62, elfclass=2, etype=2):
    """A minimal ELF64 file: header, program headers, then segment data."""
    phoff, phnum = 64, len(segments)
    data_off = phoff + 56 * phnum
    header = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", elfclass, 1, 1, 0, 0,
                         etype, machine, 1, entry, phoff, 0, 0, 64, 56, phnum, 64, 0, 0)
    phdrs, blobs = b"", b""
    for paddr, data, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, data_off + len(blobs), paddr, paddr,
                             len(data), memsz, 0x1000)
        blobs += data
    return header + phdrs + blobs


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- the shipped images ---------------------------------------------------------

@pytest.mark.parametrize("kernel", [guest.VMLINUX, guest.BZIMAGE], ids=["vmlinux", "bzImage"])
def test_shipped_kernels_load(mem, kernel):
    info = load_linux(mem, kernel, guest.INITRAMFS, "console=ttyS0 quiet", ncpus=2)
    params = zero_page(mem)
    hdr = params.hdr
    assert hdr.header == 0x53726448 and hdr.type_of_loader == 0xFF
    assert mem.read(CMDLINE_ADDR, 20) == b"console=ttyS0 quiet\0"
    assert hdr.cmd_line_ptr == CMDLINE_ADDR
    # The initrd sits page-aligned at the top of RAM, after the kernel.
    size = Path(guest.INITRAMFS).stat().st_size
    assert (hdr.ramdisk_image, hdr.ramdisk_size) == info.initrd == (info.initrd[0], size)
    assert hdr.ramdisk_image % 4096 == 0 and hdr.ramdisk_image >= info.kernel_end
    assert hdr.ramdisk_image + size <= 256 * MiB
    assert mem.read(hdr.ramdisk_image, size) == Path(guest.INITRAMFS).read_bytes()
    e820 = [(params.e820_table[i].addr, params.e820_table[i].size, params.e820_table[i].type)
            for i in range(params.e820_entries)]
    assert e820 == [(0, 0x9FC00, E820_RAM), (0x100000, 255 * MiB, E820_RAM)]


def test_vmlinux_entry_is_the_elf_entry(mem):
    info = load_linux(mem, guest.VMLINUX, None, "", 1)
    assert info.entry == 0x1000000 + (info.entry & 0xFFF)
    assert info.initrd is None and zero_page(mem).hdr.ramdisk_image == 0


def test_bzimage_entry_is_64_bit_entry(mem):
    info = load_linux(mem, guest.BZIMAGE, None, "", 1)
    assert info.entry == 0x100200
    assert zero_page(mem).hdr.version >= 0x20C


def test_mptable_checksums_and_cpus():
    blob = build_mptable(4)
    assert blob[:4] == b"_MP_" and sum(blob[:16]) % 256 == 0
    physptr = struct.unpack_from("<I", blob, 4)[0]
    table = blob[physptr - MPTABLE_START:]
    assert table[:4] == b"PCMP"
    length = struct.unpack_from("<H", table, 4)[0]
    assert sum(table[:length]) % 256 == 0
    cpus = [table[i:i + 20] for i in range(44, 44 + 4 * 20, 20)]
    assert [c[0] for c in cpus] == [0] * 4 and [c[1] for c in cpus] == [0, 1, 2, 3]
    assert cpus[0][3] == 3 and all(c[3] == 1 for c in cpus[1:])  # BSP flag on CPU 0 only


def test_command_line_too_long(mem):
    with pytest.raises(LoaderError, match="command line is 3000 bytes"):
        load_linux(mem, guest.VMLINUX, None, "x" * 3000, 1)


def test_memory_too_small_for_kernel():
    m = GuestMemory(16 * MiB)
    try:
        with pytest.raises(LoaderError, match="does not fit in guest memory"):
            load_linux(m, guest.VMLINUX, guest.INITRAMFS, "", 1)
    finally:
        m.close()


def test_memory_too_small_for_initrd(tmp_path):
    m = GuestMemory(40 * MiB)
    try:
        big = write(tmp_path, "big.img", bytes(20 * MiB))
        with pytest.raises(LoaderError, match=r"need \d+ MiB.*--mem"):
            load_linux(m, guest.VMLINUX, big, "", 1)
    finally:
        m.close()


def test_missing_files(mem, tmp_path):
    with pytest.raises(LoaderError, match="kernel .* does not exist"):
        load_linux(mem, tmp_path / "nope", None, "", 1)
    with pytest.raises(LoaderError, match="initrd .* does not exist"):
        load_linux(mem, guest.VMLINUX, tmp_path / "nope", "", 1)
    with pytest.raises(LoaderError, match="is a directory"):
        load_linux(mem, tmp_path, None, "", 1)


# --- bad ELF files -------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(machine=3), "not an x86_64 kernel"),
    (dict(elfclass=1), "corrupt ELF|not an x86_64"),
    (dict(etype=3), "expected an executable"),
    (dict(entry=0x5000000), "entry point .* outside"),
])
def test_bad_elf_headers(mem, tmp_path, kwargs, message):
    args = dict(segments=[(0x100000, b"\x90" * 64, 64)], entry=0x100000)
    args.update(kwargs)
    with pytest.raises(LoaderError, match=message):
        load_linux(mem, write(tmp_path, "k", make_elf(**args)), None, "", 1)


def test_elf_segment_beyond_memory(mem, tmp_path):
    elf = make_elf([(255 * MiB, b"\x90", 2 * MiB)], entry=255 * MiB)
    with pytest.raises(LoaderError, match="does not fit in guest memory"):
        load_linux(mem, write(tmp_path, "k", elf), None, "", 1)


def test_elf_segment_beyond_file(mem, tmp_path):
    elf = bytearray(make_elf([(0x100000, b"\x90" * 64, 64)], entry=0x100000))
    struct.pack_into("<Q", elf, 64 + 32, 1 << 40)  # p_filesz of the first header
    struct.pack_into("<Q", elf, 64 + 40, 1 << 41)  # p_memsz
    with pytest.raises(LoaderError):
        load_linux(mem, write(tmp_path, "k", bytes(elf)), None, "", 1)


def test_elf_without_segments(mem, tmp_path):
    with pytest.raises(LoaderError, match="no loadable segment"):
        load_linux(mem, write(tmp_path, "k", make_elf([], entry=0)), None, "", 1)


def test_minimal_elf_loads(mem, tmp_path):
    elf = make_elf([(0x200000, b"\xf4" * 16, 4096)], entry=0x200000)
    info = load_linux(mem, write(tmp_path, "k", elf), None, "", 1)
    assert info.entry == 0x200000 and info.kernel_end == 0x201000
    assert mem.read(0x200000, 17) == b"\xf4" * 16 + b"\0"


# --- bad bzImages ---------------------------------------------------------------------

def bzimage_with(**fields):
    data = bytearray(Path(guest.BZIMAGE).read_bytes())
    offsets = {"header": (0x202, "<I"), "version": (0x206, "<H"), "xloadflags": (0x236, "<H")}
    for name, value in fields.items():
        off, fmt = offsets[name]
        struct.pack_into(fmt, data, off, value)
    return bytes(data)


@pytest.mark.parametrize("data,message", [
    (b"", "too short"),
    (b"\0" * 4096, "neither an ELF vmlinux nor a bzImage"),
    (bzimage_with(version=0x0204), r"boot protocol 2\.04 is too old"),
    (bzimage_with(xloadflags=0), "no 64-bit entry point"),
    (Path(guest.BZIMAGE).read_bytes()[:0x800], "truncated"),
])
def test_bad_bzimages(mem, tmp_path, data, message):
    with pytest.raises(LoaderError, match=message):
        load_linux(mem, write(tmp_path, "bz", data), None, "", 1)


def test_gzip_file_is_not_a_kernel(mem, tmp_path):
    data = gzip.compress(random.Random(1).randbytes(10000))
    with pytest.raises(LoaderError, match="neither an ELF"):
        load_linux(mem, write(tmp_path, "x.gz", data), None, "", 1)


# --- fuzzing: anything at all gives a LoaderError, never another exception -----------

VMLINUX_HEAD = Path(guest.VMLINUX).read_bytes()[:4096]


@settings(max_examples=int(os.environ.get("PYVMM_FUZZ_EXAMPLES", 400)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=600).map(lambda b: b"\x7fELF" + b),
    st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=12).map(
        lambda edits: bytes(b if all(i != j for j, _ in edits) else dict(edits)[i]
                            for i, b in enumerate(VMLINUX_HEAD))),
    st.binary(max_size=2048).map(lambda b: bzimage_with()[:0x1F1] + b),
))
def test_fuzzed_kernels_never_crash_the_loader(mem, tmp_path, data):
    path = tmp_path / "fuzz"
    path.write_bytes(data)
    try:
        load_linux(mem, path, None, "", 1)
    except LoaderError as e:
        assert "\n" not in str(e)


# --- what kind of file, and how big (issue 10, item 4) --------------------------------

def test_devices_fifos_and_directories_are_refused_at_once(mem, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, kind in (("/dev/zero", "a character device"), (fifo, "a FIFO"),
                       (tmp_path, "a directory")):
        with pytest.raises(LoaderError, match=f"kernel {path} is {kind}, not a regular file"):
            load_linux(mem, path, None, "", 1)
        with pytest.raises(LoaderError, match=f"initrd {path} is {kind}, not a regular file"):
            load_linux(mem, guest.VMLINUX, path, "", 1)


def test_an_initrd_larger_than_guest_memory_is_refused_unread(mem, tmp_path):
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(300 * MiB)            # sparse: refused by its size alone
    with pytest.raises(LoaderError, match=r"initrd .* is 300 MiB, more than the guest's 256 MiB"):
        load_linux(mem, guest.VMLINUX, big, "", 1)


def test_a_kernel_file_larger_than_guest_memory_loads_if_its_segments_fit(mem, tmp_path):
    """A vmlinux with debug information is much bigger than what it loads."""
    path = write(tmp_path, "k", make_elf([(0x200000, b"\xf4" * 16, 4096)], entry=0x200000))
    with open(path, "r+b") as f:
        f.truncate(300 * MiB)
    assert load_linux(mem, path, None, "", 1).entry == 0x200000


@pytest.mark.parametrize("paddr,what", [(0x7000, "the zero page"), (0x9000, "the boot page tables"),
                                        (0x20000, "the kernel command line"),
                                        (0x500, "the boot GDT and IDT"),
                                        (0xF0000, "the BIOS area")])
def test_elf_segments_over_the_boot_data_are_refused(mem, tmp_path, paddr, what):
    elf = make_elf([(paddr, b"\x90" * 16, 0x100)], entry=paddr)
    with pytest.raises(LoaderError, match=f"overlaps {what}"):
        load_linux(mem, write(tmp_path, "k", elf), None, "", 1)


def test_the_elf_reader_agrees_with_pyelftools():
    """pyvmm reads the two ELF structs itself; pyelftools is the reference."""
    from elftools.elf.elffile import ELFFile

    from pyvmm.loader.elf import program_headers, read_elf_header
    from pyvmm.loader.image import Image

    with Image(guest.VMLINUX, "kernel") as image:
        ehdr = read_elf_header(image)
        ours = [(p.p_type, p.p_offset, p.p_paddr, p.p_filesz, p.p_memsz)
                for p in program_headers(image, ehdr)]
    with open(guest.VMLINUX, "rb") as f:
        elf = ELFFile(f)
        theirs = [(ELF_SEGMENT_TYPES[s["p_type"]], s["p_offset"], s["p_paddr"], s["p_filesz"],
                   s["p_memsz"]) for s in elf.iter_segments()]
        assert ehdr.e_entry == elf["e_entry"]
    assert ours == theirs and any(t == 1 for t, *_ in ours)


ELF_SEGMENT_TYPES = {"PT_NULL": 0, "PT_LOAD": 1, "PT_DYNAMIC": 2, "PT_INTERP": 3, "PT_NOTE": 4,
                     "PT_PHDR": 6, "PT_TLS": 7, "PT_GNU_STACK": 0x6474E551}
