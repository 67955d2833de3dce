"""Loading a compressed Linux kernel (bzImage) for the 64-bit boot protocol.

Documentation/arch/x86/boot.rst: the file starts with the real-mode setup
code ((setup_sects + 1) sectors, with the setup header at 0x1f1); the rest
is the protected-mode kernel, which goes to 1 MiB. Its 64-bit entry point is
0x200 bytes in. The setup header is copied into the zero page.
"""

import ctypes

from pyvmm.loader.bootparams import (HDRS_MAGIC, SETUP_HEADER_OFFSET, XLF_KERNEL_64,
                                     setup_header)
from pyvmm.loader.elf import LoadedKernel
from pyvmm.loader.errors import LoaderError
from pyvmm.memory import GuestMemoryError

# Where the protected-mode kernel is loaded (setup_header.code32_start's default).
BZIMAGE_LOAD_ADDR = 0x10_0000
ENTRY_64_OFFSET = 0x200
MIN_BOOT_PROTOCOL = 0x020C  # 2.12: xloadflags, and with it XLF_KERNEL_64
# The first bytes of the file: the boot sector and the setup header.
HEADER_BYTES = SETUP_HEADER_OFFSET + ctypes.sizeof(setup_header)


def parse_setup_header(path, data):
    """The setup header of a bzImage (data: its first bytes), checked for what pyvmm needs."""
    if len(data) < HEADER_BYTES:
        raise LoaderError(f"{path}: too short to be a kernel")
    hdr = setup_header.from_buffer_copy(data, SETUP_HEADER_OFFSET)
    if hdr.header != HDRS_MAGIC:
        raise LoaderError(f"{path}: neither an ELF vmlinux nor a bzImage (no 'HdrS' header)")
    if hdr.version < MIN_BOOT_PROTOCOL:
        raise LoaderError(f"{path}: boot protocol {hdr.version >> 8}.{hdr.version & 0xff:02} "
                          f"is too old, pyvmm needs 2.12 or later")
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise LoaderError(f"{path}: this bzImage has no 64-bit entry point")
    return hdr


def load_bzimage(memory, image):
    """Read the protected-mode kernel of a bzImage (an open Image) to 1 MiB."""
    head = image.read_at(0, min(image.size, HEADER_BYTES))
    hdr = parse_setup_header(image.path, head)
    pm_offset = ((hdr.setup_sects or 4) + 1) * 512
    if pm_offset >= image.size:
        raise LoaderError(f"{image.path}: truncated: no protected-mode kernel after the setup code")
    kernel_size = image.size - pm_offset
    # The kernel decompresses itself into init_size bytes from its runtime
    # address (pref_address); all of that must be guest RAM.
    end = max(BZIMAGE_LOAD_ADDR + kernel_size, hdr.pref_address + hdr.init_size)
    try:
        memory.view(BZIMAGE_LOAD_ADDR, end - BZIMAGE_LOAD_ADDR)
    except GuestMemoryError:
        raise LoaderError(f"{image.path}: needs {end >> 20} MiB of guest memory to decompress "
                          f"(give more --mem)") from None
    image.read_into(pm_offset, memory.view(BZIMAGE_LOAD_ADDR, kernel_size))
    # The header ends where the jump at 0x200 (a short jmp: 0xEB, offset) lands.
    header_end = min(0x202 + head[0x201], len(head))
    return LoadedKernel(entry=BZIMAGE_LOAD_ADDR + ENTRY_64_OFFSET, end=end,
                        setup_header=bytes(head[SETUP_HEADER_OFFSET:header_end]),
                        segments=[(BZIMAGE_LOAD_ADDR, BZIMAGE_LOAD_ADDR + kernel_size)])
