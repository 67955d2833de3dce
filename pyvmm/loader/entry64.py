"""The CPU state the 64-bit boot protocol asks for (Documentation/arch/x86/boot.rst).

"At entry, the CPU must be in 64-bit mode with paging enabled", with an
identity mapping of the kernel, the zero page and the command line; a GDT
with flat 4 GiB segments __BOOT_CS (0x10, execute/read) and __BOOT_DS (0x18,
read/write) loaded; CS = __BOOT_CS, DS/ES/SS = __BOOT_DS; interrupts off;
RSI = the zero page's address.
"""

import struct

from pyvmm.kvm import uapi

# Low-memory addresses of what this module writes (below the zero page).
BOOT_GDT_ADDR = 0x500
BOOT_IDT_ADDR = 0x520
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
BOOT_STACK_POINTER = 0x8FF0

BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20

# Control register and EFER bits (arch/x86/include/uapi/asm/processor-flags.h)
X86_CR0_PE = 1 << 0
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# Page table entry bits
PTE_PRESENT, PTE_RW, PTE_PS = 1 << 0, 1 << 1, 1 << 7

# Identity-map the first 1 GiB with 2 MiB pages: the kernel builds its own
# page tables for the rest as soon as it runs.
IDENTITY_MAPPED = 1 << 30


def gdt_entry(flags, base, limit):
    """An 8-byte segment descriptor; flags holds the access byte and the G/D/L bits."""
    return (((base & 0xFF00_0000) << 32) | ((flags & 0xF0FF) << 40)
            | ((limit & 0xF_0000) << 32) | ((base & 0xFF_FFFF) << 16) | (limit & 0xFFFF))


# index: descriptor (selector = index * 8)
GDT = {
    0: gdt_entry(0, 0, 0),
    1: gdt_entry(0, 0, 0),
    BOOT_CS // 8: gdt_entry(0xA09B, 0, 0xFFFFF),   # code: G, L (64-bit), P, S, execute/read
    BOOT_DS // 8: gdt_entry(0xC093, 0, 0xFFFFF),   # data: G, D/B, P, S, read/write
    BOOT_TSS // 8: gdt_entry(0x808B, 0, 0xFFFFF),  # TSS: G, P, busy 64-bit TSS
}


def segment_from_gdt(selector):
    """The kvm_segment (hidden part of a segment register) for a GDT selector."""
    entry = GDT[selector // 8]
    limit = (entry & 0xFFFF) | ((entry >> 32) & 0xF_0000)
    g = (entry >> 55) & 1
    return uapi.kvm_segment(
        base=((entry >> 16) & 0xFF_FFFF) | ((entry >> 32) & 0xFF00_0000),
        limit=(limit << 12) | 0xFFF if g else limit,
        selector=selector, type=(entry >> 40) & 0xF, present=(entry >> 47) & 1,
        dpl=(entry >> 45) & 3, db=(entry >> 54) & 1, s=(entry >> 44) & 1,
        l=(entry >> 53) & 1, g=g, avl=(entry >> 52) & 1)


def write_boot_tables(memory):
    """Write the GDT, an empty IDT and identity page tables into guest memory."""
    memory.write(BOOT_GDT_ADDR, b"".join(struct.pack("<Q", GDT[i]) for i in range(len(GDT))))
    memory.write(BOOT_IDT_ADDR, bytes(8))
    memory.write(PML4_ADDR, struct.pack("<Q", PDPT_ADDR | PTE_PRESENT | PTE_RW))
    memory.write(PDPT_ADDR, struct.pack("<Q", PD_ADDR | PTE_PRESENT | PTE_RW))
    pages = IDENTITY_MAPPED >> 21
    memory.write(PD_ADDR, struct.pack(f"<{pages}Q", *(
        (i << 21) | PTE_PRESENT | PTE_RW | PTE_PS for i in range(pages))))


def set_long_mode(sregs):
    """Fill kvm_sregs for 64-bit mode on the tables write_boot_tables() wrote."""
    sregs.gdt.base, sregs.gdt.limit = BOOT_GDT_ADDR, len(GDT) * 8 - 1
    sregs.idt.base, sregs.idt.limit = BOOT_IDT_ADDR, 7
    sregs.cs = segment_from_gdt(BOOT_CS)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, segment_from_gdt(BOOT_DS))
    sregs.tr = segment_from_gdt(BOOT_TSS)
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG
    sregs.cr3 = PML4_ADDR
    sregs.cr4 |= X86_CR4_PAE
    sregs.efer |= EFER_LME | EFER_LMA


def boot_regs(entry, zero_page):
    """General registers at the kernel's 64-bit entry point."""
    return uapi.kvm_regs(rip=entry, rsi=zero_page, rsp=BOOT_STACK_POINTER,
                         rbp=BOOT_STACK_POINTER, rflags=0x2)
