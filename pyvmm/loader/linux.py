"""Booting Linux: kernel, initrd, command line, zero page, e820 map, MP table.

Low guest memory after load_linux():

    0x0500  GDT, then an empty IDT          (entry64.py)
    0x7000  zero page (struct boot_params)
    0x8ff0  boot stack (grows down)
    0x9000  PML4, PDPT, PD: identity map of the first 1 GiB
    0x20000 kernel command line
    0x9fc00 .. 0x100000  not RAM for the guest (EBDA, VGA, BIOS area);
    0xf0000 MP table
    0x100000  a bzImage's protected-mode code (vmlinux: its own p_paddr,
              16 MiB for x86_64)
    top of low RAM: the initrd

The kernel is entered through the 64-bit boot protocol, for ELF and bzImage
alike: one path, one zero page. (The ELF's Xen PVH note would allow a
32-bit entry with paging off, but then the loader would need a second
structure, hvm_start_info, for what the zero page already carries.)
"""

import ctypes
from dataclasses import dataclass

from pyvmm.loader import entry64
from pyvmm.loader.bootparams import (BOOT_FLAG_MAGIC, CAN_USE_HEAP, E820_RAM, HDRS_MAGIC,
                                     LOADER_TYPE_UNDEFINED, boot_params)
from pyvmm.loader.bzimage import load_bzimage
from pyvmm.loader.elf import ELF_MAGIC, load_elf
from pyvmm.loader.errors import LoaderError
from pyvmm.loader.image import Image
from pyvmm.loader.mptable import MPTABLE_START, build_mptable
from pyvmm.memory import GuestMemoryError

ZERO_PAGE_ADDR = 0x7000
CMDLINE_ADDR = 0x2_0000
EBDA_START = 0x9_FC00
HIMEM_START = 0x10_0000
PAGE_SIZE = 4096

# x86's COMMAND_LINE_SIZE, for a vmlinux (a bzImage states its own limit).
DEFAULT_CMDLINE_SIZE = 2048
# The highest initrd address a kernel accepts when it does not say.
DEFAULT_INITRD_ADDR_MAX = 0x7FFF_FFFF


@dataclass
class BootInfo:
    entry: int          # where the boot vCPU starts
    zero_page: int      # RSI at entry
    kernel_end: int
    initrd: tuple = None  # (address, size)


def load_kernel(memory, path):
    """An ELF vmlinux or a bzImage, told apart by their first bytes."""
    with Image(path, "kernel") as image:
        if image.read_at(0, min(4, image.size)) == ELF_MAGIC:
            return load_elf(memory, image)
        return load_bzimage(memory, image)


def boot_data_areas(cmdline_size):
    """(start, end, what) of guest memory that load_linux fills after the kernel."""
    return [
        (entry64.BOOT_GDT_ADDR, entry64.BOOT_IDT_ADDR + 8, "the boot GDT and IDT"),
        (ZERO_PAGE_ADDR, ZERO_PAGE_ADDR + PAGE_SIZE, "the zero page"),
        (ZERO_PAGE_ADDR + PAGE_SIZE, entry64.BOOT_STACK_POINTER, "the boot stack"),
        (entry64.PML4_ADDR, entry64.PD_ADDR + PAGE_SIZE, "the boot page tables"),
        (CMDLINE_ADDR, CMDLINE_ADDR + cmdline_size + 1, "the kernel command line"),
        (EBDA_START, HIMEM_START, "the BIOS area (not RAM for the guest; the MP table)"),
    ]


def check_no_overlap(path, segments, cmdline_size):
    """Refuse a kernel whose segments the boot data would overwrite."""
    for start, end in segments:
        for area_start, area_end, what in boot_data_areas(cmdline_size):
            if start < area_end and area_start < end:
                raise LoaderError(f"{path}: the segment at {start:#x}-{end:#x} overlaps "
                                  f"{what} at {area_start:#x}-{area_end:#x}")


def e820_map(memory):
    """Guest RAM as the kernel should see it: everything except 0x9fc00-1 MiB."""
    entries = []
    for region in memory.regions:
        if region.guest_phys_addr == 0:
            entries.append((0, EBDA_START, E820_RAM))
            if region.size > HIMEM_START:
                entries.append((HIMEM_START, region.size - HIMEM_START, E820_RAM))
        else:
            entries.append((region.guest_phys_addr, region.size, E820_RAM))
    return entries


def place_initrd(memory, size, kernel_end, addr_max):
    """The highest page-aligned address in low RAM that holds size bytes."""
    low_end = memory.regions[0].end
    top = min(low_end, addr_max + 1)
    addr = (top - size) & ~(PAGE_SIZE - 1)
    first_free = (kernel_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    if addr < first_free:
        need = first_free + size
        raise LoaderError(f"guest memory too small: the kernel and initrd need "
                          f"{(need + (1 << 20) - 1) >> 20} MiB before the guest even starts "
                          f"(give --mem 128M or more)")
    return addr


def load_linux(memory, kernel, initrd=None, cmdline="", ncpus=1):
    """Load everything a Linux guest needs; return where to start it."""
    try:
        loaded = load_kernel(memory, kernel)
        params = boot_params()
        hdr = params.hdr
        if loaded.setup_header:
            # A bzImage: start from its own header (version, sizes, flags).
            ctypes.memmove(ctypes.addressof(hdr), loaded.setup_header, len(loaded.setup_header))
        else:
            hdr.boot_flag = BOOT_FLAG_MAGIC
            hdr.header = HDRS_MAGIC
            hdr.initrd_addr_max = DEFAULT_INITRD_ADDR_MAX
            hdr.cmdline_size = DEFAULT_CMDLINE_SIZE - 1
        hdr.type_of_loader = LOADER_TYPE_UNDEFINED
        hdr.loadflags |= CAN_USE_HEAP
        hdr.heap_end_ptr = 0xFE00

        encoded = cmdline.encode()
        limit = hdr.cmdline_size or (DEFAULT_CMDLINE_SIZE - 1)
        if len(encoded) > limit:
            raise LoaderError(f"kernel command line is {len(encoded)} bytes, "
                              f"this kernel takes at most {limit}")
        check_no_overlap(kernel, loaded.segments, limit)
        memory.write(CMDLINE_ADDR, encoded + b"\0")
        hdr.cmd_line_ptr = CMDLINE_ADDR

        initrd_range = None
        if initrd is not None:
            with Image(initrd, "initrd", limit=memory.size) as image:
                addr = place_initrd(memory, image.size, loaded.end,
                                    hdr.initrd_addr_max or DEFAULT_INITRD_ADDR_MAX)
                image.read_into(0, memory.view(addr, image.size))
            hdr.ramdisk_image, hdr.ramdisk_size = addr, image.size
            initrd_range = (addr, image.size)

        e820 = e820_map(memory)
        params.e820_entries = len(e820)
        for i, (addr, size, kind) in enumerate(e820):
            params.e820_table[i].addr, params.e820_table[i].size = addr, size
            params.e820_table[i].type = kind
        memory.write(ZERO_PAGE_ADDR, bytes(params))
        memory.write(MPTABLE_START, build_mptable(ncpus))
        entry64.write_boot_tables(memory)
    except GuestMemoryError as e:
        raise LoaderError(f"guest memory too small to boot: {e}") from None
    return BootInfo(entry=loaded.entry, zero_page=ZERO_PAGE_ADDR, kernel_end=loaded.end,
                    initrd=initrd_range)
