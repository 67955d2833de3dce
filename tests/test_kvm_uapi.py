"""pyvmm/kvm/uapi.py against the kernel headers: compile a C probe and compare."""

import ctypes

import pytest
from cprobe import c_values

from pyvmm.kvm import uapi
from pyvmm.loader import bootparams

IOCTLS = ["KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE",
          "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION",
          "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR", "KVM_CREATE_IRQCHIP", "KVM_IRQ_LINE",
          "KVM_IRQFD", "KVM_IOEVENTFD", "KVM_SET_GSI_ROUTING", "KVM_CAP_IRQ_ROUTING",
          "KVM_IRQ_ROUTING_IRQCHIP", "KVM_IRQ_ROUTING_MSI", "KVM_IRQCHIP_PIC_MASTER",
          "KVM_IRQCHIP_PIC_SLAVE", "KVM_IRQCHIP_IOAPIC", "KVM_IOAPIC_NUM_PINS", "KVM_CREATE_PIT2", "KVM_RUN", "KVM_GET_REGS",
          "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_GET_MSRS", "KVM_SET_MSRS",
          "KVM_GET_FPU", "KVM_SET_FPU", "KVM_GET_LAPIC", "KVM_SET_LAPIC", "KVM_SET_CPUID2",
          "KVM_CAP_IRQCHIP", "KVM_CAP_USER_MEMORY", "KVM_CAP_SET_TSS_ADDR", "KVM_CAP_EXT_CPUID",
          "KVM_CAP_NR_VCPUS", "KVM_CAP_IRQFD", "KVM_CAP_PIT2", "KVM_CAP_IOEVENTFD",
          "KVM_CAP_MAX_VCPUS", "KVM_CAP_IMMEDIATE_EXIT", "KVM_EXIT_IO", "KVM_EXIT_MMIO",
          "KVM_EXIT_SHUTDOWN", "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_SYSTEM_EVENT",
          "KVM_IOEVENTFD_FLAG_DATAMATCH", "KVM_IOEVENTFD_FLAG_PIO", "KVM_API_VERSION"]
STRUCTS = ["kvm_regs", "kvm_sregs", "kvm_segment", "kvm_fpu", "kvm_msr_entry",
           "kvm_cpuid_entry2", "kvm_lapic_state", "kvm_pit_config",
           "kvm_userspace_memory_region", "kvm_irq_level", "kvm_ioeventfd", "kvm_irqfd",
           "kvm_irq_routing_entry", "kvm_irq_routing_msi"]
OFFSETS = [("kvm_run", "exit_reason"), ("kvm_run", "immediate_exit"), ("kvm_run", "io"),
           ("kvm_run", "mmio"), ("kvm_sregs", "efer"), ("kvm_sregs", "apic_base"),
           ("kvm_fpu", "mxcsr"), ("kvm_ioeventfd", "fd"), ("kvm_segment", "unusable"),
           ("kvm_irq_routing_entry", "u")]
BOOTPARAM_OFFSETS = ["e820_entries", "hdr", "e820_table"]
SETUP_HEADER_OFFSETS = ["cmd_line_ptr", "ramdisk_image", "xloadflags", "init_size",
                        "kernel_info_offset"]


@pytest.fixture(scope="module")
def kernel_values(tmp_path_factory):
    """name -> value, as the C compiler sees <linux/kvm.h> and <asm/bootparam.h>."""
    offsets = (OFFSETS + [("boot_params", f) for f in BOOTPARAM_OFFSETS]
               + [("setup_header", f) for f in SETUP_HEADER_OFFSETS])
    return c_values(tmp_path_factory.mktemp("uapi"), ["linux/kvm.h", "asm/bootparam.h"],
                    IOCTLS, STRUCTS + ["boot_params", "setup_header", "kvm_irq_routing"], offsets, signed=False)


@pytest.mark.parametrize("name", IOCTLS)
def test_numbers_match(kernel_values, name):
    assert getattr(uapi, name) == kernel_values[name]


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_sizes_match(kernel_values, name):
    assert ctypes.sizeof(getattr(uapi, name)) == kernel_values[f"sizeof {name}"]


@pytest.mark.parametrize("struct,field", OFFSETS)
def test_field_offsets_match(kernel_values, struct, field):
    assert getattr(getattr(uapi, struct), field).offset == kernel_values[f"offsetof {struct}.{field}"]


def test_flexible_array_structs_match(kernel_values):
    assert ctypes.sizeof(uapi.kvm_msrs(0)) == 8 and ctypes.sizeof(uapi.kvm_cpuid2(0)) == 8
    assert ctypes.sizeof(uapi.kvm_irq_routing(0)) == kernel_values["sizeof kvm_irq_routing"]


def test_zero_page_layout_matches(kernel_values):
    assert ctypes.sizeof(bootparams.boot_params) == kernel_values["sizeof boot_params"]
    assert ctypes.sizeof(bootparams.setup_header) == kernel_values["sizeof setup_header"]
    for field in BOOTPARAM_OFFSETS:
        assert getattr(bootparams.boot_params, field).offset == \
            kernel_values[f"offsetof boot_params.{field}"]
    for field in SETUP_HEADER_OFFSETS:
        assert getattr(bootparams.setup_header, field).offset == \
            kernel_values[f"offsetof setup_header.{field}"]
