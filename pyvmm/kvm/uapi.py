"""The KVM user API: ioctl numbers, constants and structs, as ctypes.

Names and layouts mirror <linux/kvm.h> and <asm/kvm.h> (x86_64); the header
each one comes from is noted. Documentation/virt/kvm/api.rst explains them.
"""

import ctypes
from ctypes import c_char, c_int32, c_uint8, c_uint16, c_uint32, c_uint64

from pyvmm.sys.ioctl import _IO, _IOR, _IOW, _IOWR

KVMIO = 0xAE
KVM_API_VERSION = 12


# --- asm/kvm.h: registers -----------------------------------------------------

class kvm_regs(ctypes.Structure):
    _fields_ = [(name, c_uint64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", c_uint64), ("limit", c_uint32), ("selector", c_uint16), ("type", c_uint8),
        ("present", c_uint8), ("dpl", c_uint8), ("db", c_uint8), ("s", c_uint8),
        ("l", c_uint8), ("g", c_uint8), ("avl", c_uint8), ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [(name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
    _fields_ += [("gdt", kvm_dtable), ("idt", kvm_dtable)]
    _fields_ += [(name, c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
    _fields_ += [("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8), ("fcw", c_uint16), ("fsw", c_uint16), ("ftwx", c_uint8),
        ("pad1", c_uint8), ("last_opcode", c_uint16), ("last_ip", c_uint64),
        ("last_dp", c_uint64), ("xmm", (c_uint8 * 16) * 16), ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


def kvm_msrs(n):
    """struct kvm_msrs with room for n entries (a flexible array in C)."""
    class kvm_msrs(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", kvm_msr_entry * n)]
    return kvm_msrs


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", c_uint32), ("index", c_uint32), ("flags", c_uint32), ("eax", c_uint32),
        ("ebx", c_uint32), ("ecx", c_uint32), ("edx", c_uint32), ("padding", c_uint32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1  # (sic) the index field selects a sub-leaf


def kvm_cpuid2(n):
    """struct kvm_cpuid2 with room for n entries (a flexible array in C)."""
    class kvm_cpuid2(ctypes.Structure):
        _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", kvm_cpuid_entry2 * n)]
    return kvm_cpuid2


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(ctypes.Structure):
    # char regs[] in C; bytes here, so that ctypes does not stop at a NUL.
    _fields_ = [("regs", c_uint8 * KVM_APIC_REG_SIZE)]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


# --- linux/kvm.h: VM-wide structs ---------------------------------------------

class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32), ("flags", c_uint32), ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64), ("userspace_addr", c_uint64),
    ]


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", c_uint64), ("addr", c_uint64), ("len", c_uint32), ("fd", c_int32),
        ("flags", c_uint32), ("pad", c_uint8 * 36),
    ]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class kvm_irqfd(ctypes.Structure):
    _fields_ = [
        ("fd", c_uint32), ("gsi", c_uint32), ("flags", c_uint32), ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

KVM_PIT_SPEAKER_DUMMY = 1


# GSI routing: which interrupt a GSI (an irqfd's, say) raises. KVM_SET_GSI_ROUTING
# replaces the whole table, so the IOAPIC and PIC routes go with the MSI ones.
class kvm_irq_routing_irqchip(ctypes.Structure):
    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class kvm_irq_routing_msi(ctypes.Structure):
    _fields_ = [("address_lo", c_uint32), ("address_hi", c_uint32), ("data", c_uint32),
                ("devid", c_uint32)]


class _kvm_irq_routing_u(ctypes.Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi),
                ("pad", c_uint32 * 8)]


class kvm_irq_routing_entry(ctypes.Structure):
    _fields_ = [("gsi", c_uint32), ("type", c_uint32), ("flags", c_uint32), ("pad", c_uint32),
                ("u", _kvm_irq_routing_u)]


def kvm_irq_routing(n):
    """struct kvm_irq_routing with room for n entries (a flexible array in C)."""
    class kvm_irq_routing(ctypes.Structure):
        _fields_ = [("nr", c_uint32), ("flags", c_uint32), ("entries", kvm_irq_routing_entry * n)]
    return kvm_irq_routing


KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_IOAPIC_NUM_PINS = 24


# --- linux/kvm.h: struct kvm_run, shared with the kernel through mmap ----------

KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1


class _kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", c_uint8), ("size", c_uint8), ("port", c_uint16),
                ("count", c_uint32), ("data_offset", c_uint64)]


class _kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32),
                ("is_write", c_uint8)]


class _kvm_run_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class _kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class _kvm_run_ex(ctypes.Structure):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class _kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("hw", _kvm_run_hw), ("fail_entry", _kvm_run_fail_entry), ("ex", _kvm_run_ex),
        ("io", _kvm_run_io), ("mmio", _kvm_run_mmio), ("internal", _kvm_run_internal),
        ("system_event", _kvm_run_system_event), ("padding", c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    _anonymous_ = ("exit",)
    _fields_ = [
        # in
        ("request_interrupt_window", c_uint8), ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        # out
        ("exit_reason", c_uint32), ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8), ("flags", c_uint16),
        # in (pre_kvm_run), out (post_kvm_run)
        ("cr8", c_uint64), ("apic_base", c_uint64),
        ("exit", _kvm_run_exit),
    ]


# Exit reasons (KVM_EXIT_*) that pyvmm names; the rest print as numbers.
EXIT_REASONS = {
    0: "unknown", 1: "exception", 2: "io", 3: "hypercall", 4: "debug", 5: "hlt", 6: "mmio",
    7: "irq_window_open", 8: "shutdown", 9: "fail_entry", 10: "intr", 11: "set_tpr",
    12: "tpr_access", 16: "nmi", 17: "internal_error", 24: "system_event",
    26: "ioapic_eoi", 29: "x86_rdmsr", 30: "x86_wrmsr", 33: "x86_bus_lock", 37: "notify",
}
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

# KVM_EXIT_INTERNAL_ERROR sub-errors
INTERNAL_ERRORS = {
    1: "instruction emulation failed",              # KVM_INTERNAL_ERROR_EMULATION
    2: "exception while delivering an exception",   # KVM_INTERNAL_ERROR_SIMUL_EX
    3: "failed to deliver an event",                # KVM_INTERNAL_ERROR_DELIVERY_EV
    4: "unexpected exit reason from hardware",      # KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON
}

# KVM_EXIT_SYSTEM_EVENT types
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3


# --- Capabilities (KVM_CHECK_EXTENSION) ----------------------------------------

KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IMMEDIATE_EXIT = 136


# --- ioctls ----------------------------------------------------------------------

# on /dev/kvm
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2(0))

# on a VM
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, kvm_irq_level)
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6A, kvm_irq_routing(0))
KVM_IRQFD = _IOW(KVMIO, 0x76, kvm_irqfd)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, kvm_ioeventfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)

# on a vCPU
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs(0))
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs(0))
KVM_GET_FPU = _IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2(0))
