"""Loading an uncompressed Linux kernel (vmlinux, an ELF file) with pyelftools.

Each PT_LOAD segment is copied to its physical address (p_paddr); the ELF
entry point is the kernel's 64-bit entry, startup_64.
"""

import io
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.construct import ConstructError
from elftools.elf.elffile import ELFFile

from pyvmm.loader.errors import LoaderError
from pyvmm.memory import GuestMemoryError

ELF_MAGIC = b"\x7fELF"


@dataclass
class LoadedKernel:
    entry: int          # guest-physical address of the 64-bit entry point
    end: int            # first guest-physical byte after the kernel image
    setup_header: bytes = b""  # a bzImage's setup header, to copy into the zero page


def load_elf(memory, path, data):
    """Copy the PT_LOAD segments of vmlinux into guest memory."""
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
            raise LoaderError(f"{path}: not an x86_64 kernel "
                              f"({elf.elfclass}-bit {elf['e_machine']})")
        if elf["e_type"] != "ET_EXEC":
            raise LoaderError(f"{path}: ELF type {elf['e_type']}, expected an executable")
        end = 0
        segments = []
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            paddr, filesz, memsz = seg["p_paddr"], seg["p_filesz"], seg["p_memsz"]
            offset = seg["p_offset"]
            if filesz > memsz or offset + filesz > len(data):
                raise LoaderError(f"{path}: segment at {paddr:#x} lies outside the file")
            try:
                dest = memory.view(paddr, memsz)
            except GuestMemoryError:
                raise LoaderError(f"{path}: segment {paddr:#x}+{memsz:#x} does not fit "
                                  f"in guest memory (give more --mem)") from None
            dest[:filesz] = data[offset:offset + filesz]
            dest[filesz:] = bytes(memsz - filesz)  # .bss
            end = max(end, paddr + memsz)
            segments.append((paddr, paddr + memsz))
        if not segments:
            raise LoaderError(f"{path}: no loadable segment")
        entry = elf["e_entry"]
    # pyelftools reports truncated or inconsistent structures in several ways.
    except (ELFError, ConstructError, ValueError, IndexError, KeyError, ArithmeticError,
            struct.error) as e:
        raise LoaderError(f"{path}: corrupt ELF file ({e or type(e).__name__})") from None
    if not any(start <= entry < stop for start, stop in segments):
        raise LoaderError(f"{path}: entry point {entry:#x} is outside the loaded segments")
    return LoadedKernel(entry=entry, end=end)
