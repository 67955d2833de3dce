"""The Intel MultiProcessor table: how a guest without ACPI finds its CPUs.

MultiProcessor Specification 1.4, as Linux reads it (arch/x86/kernel/mpparse.c,
structs in arch/x86/include/asm/mpspec_def.h). The floating pointer and the
configuration table go in the BIOS area at 0xF0000, which Linux scans for
"_MP_"; the e820 map does not offer that area as RAM.
"""

import ctypes
from ctypes import c_char, c_uint8, c_uint16, c_uint32

from pyvmm.loader.errors import LoaderError

MPTABLE_START = 0xF_0000
MPTABLE_LIMIT = 0x10_0000

APIC_DEFAULT_PHYS_BASE = 0xFEE0_0000
IO_APIC_DEFAULT_PHYS_BASE = 0xFEC0_0000
APIC_VERSION = 0x14        # integrated local APIC, as KVM's in-kernel one reports
IOAPIC_VERSION = 0x11
IOAPIC_PINS = 24           # KVM's in-kernel IOAPIC
MAX_APIC_ID = 0xFE         # 0xFF is the broadcast id

MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = 0, 1, 2, 3, 4
CPU_ENABLED, CPU_BOOTPROCESSOR = 1, 2
MPC_APIC_USABLE = 1
MP_INT, MP_NMI, MP_EXTINT = 0, 1, 3
MP_IRQPOL_DEFAULT = 0      # "conforms to the bus": ISA is edge, active high


class _Packed(ctypes.LittleEndianStructure):
    _pack_ = 1


class mpf_intel(_Packed):
    _fields_ = [("signature", c_char * 4), ("physptr", c_uint32), ("length", c_uint8),
                ("specification", c_uint8), ("checksum", c_uint8), ("feature1", c_uint8),
                ("feature2", c_uint8), ("feature3", c_uint8), ("feature4", c_uint8),
                ("feature5", c_uint8)]


class mpc_table(_Packed):
    _fields_ = [("signature", c_char * 4), ("length", c_uint16), ("spec", c_uint8),
                ("checksum", c_uint8), ("oem", c_char * 8), ("productid", c_char * 12),
                ("oemptr", c_uint32), ("oemsize", c_uint16), ("oemcount", c_uint16),
                ("lapic", c_uint32), ("reserved", c_uint32)]


class mpc_cpu(_Packed):
    _fields_ = [("type", c_uint8), ("apicid", c_uint8), ("apicver", c_uint8),
                ("cpuflag", c_uint8), ("cpufeature", c_uint32), ("featureflag", c_uint32),
                ("reserved", c_uint32 * 2)]


class mpc_bus(_Packed):
    _fields_ = [("type", c_uint8), ("busid", c_uint8), ("bustype", c_char * 6)]


class mpc_ioapic(_Packed):
    _fields_ = [("type", c_uint8), ("apicid", c_uint8), ("apicver", c_uint8),
                ("flags", c_uint8), ("apicaddr", c_uint32)]


class mpc_intsrc(_Packed):
    _fields_ = [("type", c_uint8), ("irqtype", c_uint8), ("irqflag", c_uint16),
                ("srcbus", c_uint8), ("srcbusirq", c_uint8), ("dstapic", c_uint8),
                ("dstirq", c_uint8)]


class mpc_lintsrc(_Packed):
    _fields_ = [("type", c_uint8), ("irqtype", c_uint8), ("irqflag", c_uint16),
                ("srcbusid", c_uint8), ("srcbusirq", c_uint8), ("destapic", c_uint8),
                ("destapiclint", c_uint8)]


def _checksum(data):
    """The byte that makes data sum to zero (mod 256)."""
    return -sum(data) & 0xFF


def build_mptable(ncpus, base=MPTABLE_START):
    """The MP floating pointer followed by the configuration table, as bytes.

    vCPU i has local APIC id i; the IOAPIC takes the next id. ISA IRQs 0-23
    go to the same-numbered IOAPIC pins, matching KVM's default GSI routing.
    """
    if not 1 <= ncpus <= MAX_APIC_ID:
        raise LoaderError(f"the MP table can describe 1 to {MAX_APIC_ID} CPUs, not {ncpus}")
    ioapic_id = ncpus
    entries = []
    for cpu in range(ncpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        # CPU signature: family 6 (any model); feature flags: FPU and APIC.
        entries.append(mpc_cpu(type=MP_PROCESSOR, apicid=cpu, apicver=APIC_VERSION,
                               cpuflag=flags, cpufeature=0x600, featureflag=(1 << 0) | (1 << 9)))
    entries.append(mpc_bus(type=MP_BUS, busid=0, bustype=b"ISA   "))
    entries.append(mpc_ioapic(type=MP_IOAPIC, apicid=ioapic_id, apicver=IOAPIC_VERSION,
                              flags=MPC_APIC_USABLE, apicaddr=IO_APIC_DEFAULT_PHYS_BASE))
    for irq in range(IOAPIC_PINS):
        entries.append(mpc_intsrc(type=MP_INTSRC, irqtype=MP_INT, irqflag=MP_IRQPOL_DEFAULT,
                                  srcbus=0, srcbusirq=irq, dstapic=ioapic_id, dstirq=irq))
    # The 8259 PIC reaches every local APIC's LINT0; NMIs come in on LINT1.
    entries.append(mpc_lintsrc(type=MP_LINTSRC, irqtype=MP_EXTINT, irqflag=MP_IRQPOL_DEFAULT,
                               srcbusid=0, srcbusirq=0, destapic=0xFF, destapiclint=0))
    entries.append(mpc_lintsrc(type=MP_LINTSRC, irqtype=MP_NMI, irqflag=MP_IRQPOL_DEFAULT,
                               srcbusid=0, srcbusirq=0, destapic=0xFF, destapiclint=1))

    body = b"".join(bytes(e) for e in entries)
    table_addr = base + ctypes.sizeof(mpf_intel)
    header = mpc_table(signature=b"PCMP", length=ctypes.sizeof(mpc_table) + len(body), spec=4,
                       oem=b"PYVMM", productid=b"PYVMM", oemcount=len(entries),
                       lapic=APIC_DEFAULT_PHYS_BASE)
    header.checksum = _checksum(bytes(header) + body)
    table = bytes(header) + body

    mpf = mpf_intel(signature=b"_MP_", physptr=table_addr, length=1, specification=4)
    mpf.checksum = _checksum(bytes(mpf))
    blob = bytes(mpf) + table
    if base + len(blob) > MPTABLE_LIMIT:
        raise LoaderError(f"{ncpus} CPUs do not fit in the MP table area")
    return blob
