"""What each vCPU needs before its first KVM_RUN: CPUID, MSRs, FPU, LAPIC, registers."""

import struct

from pyvmm.kvm import uapi
from pyvmm.loader import entry64

# MSRs (arch/x86/include/asm/msr-index.h)
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_DEF_TYPE_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6

# CPUID bits
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_HTT = 1 << 28
LEAF_0B_LEVEL_SMT, LEAF_0B_LEVEL_CORE = 1, 2

# Local APIC registers (arch/x86/include/asm/apicdef.h)
APIC_LVT0, APIC_LVT1 = 0x350, 0x360
APIC_MODE_MASK = 0x700
APIC_MODE_NMI = 0x400
APIC_MODE_EXTINT = 0x700


def vcpu_cpuid(supported, vcpu_id, ncpus):
    """KVM's supported CPUID, made to describe this vCPU in an ncpus machine.

    Every vCPU is one core of a single socket, one thread per core; its APIC
    id is its vCPU id (which is what KVM gives its local APIC).
    """
    core_bits = max(ncpus - 1, 0).bit_length()
    entries = []
    for src in supported:
        e = uapi.kvm_cpuid_entry2.from_buffer_copy(src)
        if e.function == 0x1:
            # EBX[31:24] initial APIC id, EBX[23:16] logical processors per package
            e.ebx = (e.ebx & 0xFFFF) | (min(ncpus, 255) << 16) | (vcpu_id << 24)
            e.ecx |= CPUID_1_ECX_HYPERVISOR
            e.edx = e.edx | CPUID_1_EDX_HTT if ncpus > 1 else e.edx & ~CPUID_1_EDX_HTT
        elif e.function == 0x4:
            # Intel: EAX[31:26] cores per package - 1, six bits (as Linux
            # reads it: a maximum, not an exact count, above 64 cores)
            e.eax = (e.eax & 0x03FF_FFFF) | (min(ncpus - 1, 0x3F) << 26)
        elif e.function == 0xB:
            # Intel extended topology: x2APIC id in EDX, one level per sub-leaf
            e.edx = vcpu_id
            if e.index == 0:
                e.eax, e.ebx, e.ecx = 0, 1, (LEAF_0B_LEVEL_SMT << 8)
            elif e.index == 1:
                e.eax, e.ebx, e.ecx = core_bits, ncpus, (LEAF_0B_LEVEL_CORE << 8) | 1
            else:
                e.eax, e.ebx, e.ecx = 0, 0, e.index
        elif e.function == 0x8000_0008:
            # AMD: ECX[7:0] cores - 1, ECX[15:12] APIC id bits for the core
            e.ecx = (e.ecx & ~0xF0FF) | (ncpus - 1) | (core_bits << 12)
        elif e.function == 0x8000_001E:
            # AMD: EAX extended APIC id; EBX[7:0] core id, EBX[15:8] threads per core - 1
            e.eax = vcpu_id
            e.ebx = (e.ebx & ~0xFFFF) | vcpu_id
        entries.append(e)
    return entries


def set_lint(lapic):
    """LINT0 takes the 8259 PIC's interrupts (ExtINT), LINT1 takes NMIs."""
    for offset, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        (lvt,) = struct.unpack_from("<I", lapic.regs, offset)
        struct.pack_into("<I", lapic.regs, offset, (lvt & ~APIC_MODE_MASK) | mode)


def configure_vcpu(vcpu, supported_cpuid, ncpus, boot=None):
    """Set up one vCPU; the boot vCPU (boot = BootInfo) also gets its entry state.

    The others wait in the in-kernel local APIC for the INIT/SIPI that the
    guest sends when it brings them up.
    """
    vcpu.set_cpuid2(vcpu_cpuid(supported_cpuid, vcpu.id, ncpus))
    vcpu.set_msrs({
        MSR_IA32_MISC_ENABLE: MSR_IA32_MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_DEF_TYPE_ENABLE | MTRR_TYPE_WRBACK,
    })
    fpu = uapi.kvm_fpu(fcw=0x37F, mxcsr=0x1F80)
    vcpu.set_fpu(fpu)
    lapic = vcpu.get_lapic()
    set_lint(lapic)
    vcpu.set_lapic(lapic)
    if boot is not None:
        sregs = vcpu.get_sregs()
        entry64.set_long_mode(sregs)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(entry64.boot_regs(boot.entry, boot.zero_page))
