"""Loading an uncompressed Linux kernel (vmlinux, an ELF file).

Each PT_LOAD segment is read from the file straight to its physical address
(p_paddr); the ELF entry point is the kernel's 64-bit entry, startup_64.
Only the ELF header and the program headers are needed, so they are read
here as the two structs of <elf.h> (Elf64_Ehdr, Elf64_Phdr) rather than
with a general ELF library: importing pyelftools costs seconds at every
start in the testbed, and the tests check this reader against it.
"""

import ctypes
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64
from dataclasses import dataclass, field

from pyvmm.loader.errors import LoaderError
from pyvmm.memory import GuestMemoryError

ELF_MAGIC = b"\x7fELF"
EI_CLASS, EI_DATA = 4, 5
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PN_XNUM = 0xFFFF          # e_phnum escape value: the real count is elsewhere
MACHINES = {3: "EM_386", 40: "EM_ARM", 62: "EM_X86_64", 183: "EM_AARCH64", 243: "EM_RISCV"}


class Elf64_Ehdr(ctypes.LittleEndianStructure):
    _fields_ = [("e_ident", c_uint8 * 16), ("e_type", c_uint16), ("e_machine", c_uint16),
                ("e_version", c_uint32), ("e_entry", c_uint64), ("e_phoff", c_uint64),
                ("e_shoff", c_uint64), ("e_flags", c_uint32), ("e_ehsize", c_uint16),
                ("e_phentsize", c_uint16), ("e_phnum", c_uint16), ("e_shentsize", c_uint16),
                ("e_shnum", c_uint16), ("e_shstrndx", c_uint16)]


class Elf64_Phdr(ctypes.LittleEndianStructure):
    _fields_ = [("p_type", c_uint32), ("p_flags", c_uint32), ("p_offset", c_uint64),
                ("p_vaddr", c_uint64), ("p_paddr", c_uint64), ("p_filesz", c_uint64),
                ("p_memsz", c_uint64), ("p_align", c_uint64)]


@dataclass
class LoadedKernel:
    entry: int          # guest-physical address of the 64-bit entry point
    end: int            # first guest-physical byte after the kernel image
    setup_header: bytes = b""  # a bzImage's setup header, to copy into the zero page
    segments: list = field(default_factory=list)   # (start, end) of what was loaded


def read_elf_header(image):
    """The ELF header, checked for an x86_64 executable."""
    if image.size < ctypes.sizeof(Elf64_Ehdr):
        raise LoaderError(f"{image.path}: corrupt ELF file (header truncated)")
    ehdr = Elf64_Ehdr.from_buffer_copy(image.read_at(0, ctypes.sizeof(Elf64_Ehdr)))
    elfclass = {1: "32-bit", 2: "64-bit"}.get(ehdr.e_ident[EI_CLASS], "unknown class")
    if (ehdr.e_ident[EI_CLASS] != ELFCLASS64 or ehdr.e_ident[EI_DATA] != ELFDATA2LSB
            or ehdr.e_machine != EM_X86_64):
        machine = MACHINES.get(ehdr.e_machine, f"machine {ehdr.e_machine}")
        raise LoaderError(f"{image.path}: not an x86_64 kernel ({elfclass} {machine})")
    if ehdr.e_type != ET_EXEC:
        raise LoaderError(f"{image.path}: ELF type {ehdr.e_type}, expected an executable "
                          f"(ET_EXEC)")
    if ehdr.e_phentsize != ctypes.sizeof(Elf64_Phdr) or ehdr.e_phnum == PN_XNUM:
        raise LoaderError(f"{image.path}: corrupt ELF file (program header size "
                          f"{ehdr.e_phentsize}, count {ehdr.e_phnum})")
    return ehdr


def program_headers(image, ehdr):
    size = ctypes.sizeof(Elf64_Phdr)
    table = image.read_at(ehdr.e_phoff, size * ehdr.e_phnum)
    return [Elf64_Phdr.from_buffer_copy(table, i * size) for i in range(ehdr.e_phnum)]


def load_elf(memory, image):
    """Copy the PT_LOAD segments of vmlinux (an open Image) into guest memory."""
    ehdr = read_elf_header(image)
    segments = []
    for ph in program_headers(image, ehdr):
        if ph.p_type != PT_LOAD:
            continue
        paddr, filesz, memsz = ph.p_paddr, ph.p_filesz, ph.p_memsz
        if filesz > memsz or ph.p_offset + filesz > image.size:
            raise LoaderError(f"{image.path}: segment at {paddr:#x} lies outside the file")
        try:
            dest = memory.view(paddr, memsz)
        except GuestMemoryError:
            raise LoaderError(f"{image.path}: segment {paddr:#x}+{memsz:#x} does not fit "
                              f"in guest memory (give more --mem)") from None
        image.read_into(ph.p_offset, dest[:filesz])
        dest[filesz:] = bytes(memsz - filesz)  # .bss
        segments.append((paddr, paddr + memsz))
    if not segments:
        raise LoaderError(f"{image.path}: no loadable segment")
    entry = ehdr.e_entry
    if not any(start <= entry < stop for start, stop in segments):
        raise LoaderError(f"{image.path}: entry point {entry:#x} is outside the loaded segments")
    return LoadedKernel(entry=entry, end=max(stop for _, stop in segments), segments=segments)
