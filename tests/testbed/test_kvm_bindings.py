"""pyvmm.kvm against real KVM, with a few bytes of real-mode code instead of Linux."""

import os

import pytest

from pyvmm.kvm import Kvm, uapi
from pyvmm.memory import GuestMemory

pytestmark = pytest.mark.testbed

# mov al, 0x2a; out 0xf4, al; hlt
PROGRAM = bytes([0xB0, 0x2A, 0xE6, 0xF4, 0xF4])
CODE_ADDR = 0x1000


@pytest.fixture
def machine():
    """A VM with 1 MiB of memory, PROGRAM at 0x1000 and one real-mode vCPU there."""
    kvm = Kvm()
    vm = kvm.create_vm()
    mem = GuestMemory(1 << 20)
    region = mem.regions[0]
    vm.set_user_memory_region(0, region.guest_phys_addr, region.size, region.host_addr)
    mem.write(CODE_ADDR, PROGRAM)
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    vcpu.set_sregs(sregs)
    vcpu.set_regs(uapi.kvm_regs(rip=CODE_ADDR, rflags=2))
    yield kvm, vm, vcpu
    vcpu.close()
    vm.close()
    mem.close()
    kvm.close()


def test_port_write_exits_to_us_then_hlt(machine):
    kvm, vm, vcpu = machine
    kvm.require_linux_guest_support()
    assert vcpu.run()
    run = vcpu.run_struct
    assert run.exit_reason == uapi.KVM_EXIT_IO
    assert (run.io.port, run.io.size, run.io.direction) == (0xF4, 1, uapi.KVM_EXIT_IO_OUT)
    assert bytes(vcpu.io_data()) == b"\x2a"
    assert vcpu.run()
    assert run.exit_reason == uapi.KVM_EXIT_HLT   # no in-kernel irqchip: HLT comes to us
    assert vcpu.get_regs().rip == CODE_ADDR + len(PROGRAM)


def test_ioeventfd_takes_the_write_without_an_exit(machine):
    kvm, vm, vcpu = machine
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.ioeventfd(efd, 0xF4, 1, datamatch=0x2A, pio=True)
        assert vcpu.run()
        assert vcpu.run_struct.exit_reason == uapi.KVM_EXIT_HLT
        assert os.eventfd_read(efd) == 1
        vm.ioeventfd(efd, 0xF4, 1, datamatch=0x2A, pio=True, deassign=True)
    finally:
        os.close(efd)


def test_immediate_exit_returns_at_once(machine):
    kvm, vm, vcpu = machine
    vcpu.run_struct.immediate_exit = 1
    assert vcpu.run() is False
    assert vcpu.get_regs().rip == CODE_ADDR    # nothing ran


def test_irqchip_irqfd_and_cpuid():
    kvm = Kvm()
    vm = kvm.create_vm()
    efd = os.eventfd(0)
    try:
        assert kvm.max_vcpus() >= 1
        leaves = {e.function for e in kvm.supported_cpuid()}
        assert {0x0, 0x1, 0x4000_0000} <= leaves    # KVM's own signature leaf too
        vm.create_irqchip()                          # before any vCPU exists
        vm.irqfd(efd, 5)
        vm.irqfd(efd, 5, deassign=True)
    finally:
        os.close(efd)
        vm.close()
        kvm.close()


def test_vms_come_and_go_without_the_kernel_patching_its_text():
    """scripts/testbed-init's two idle VMs hold KVM's static keys
    (apic_sw_disabled, kvm_has_noapic_vcpu) at 1: a VM with an in-kernel
    APIC and one without, made and closed, patch no kernel text (4 patches
    per pyvmm boot before; patching text under TCG is where lock-ups were
    found). Counted with ftrace on text_poke_bp_batch."""
    import time
    tracing = "/sys/kernel/tracing"
    if not os.path.exists(f"{tracing}/trace"):
        assert os.system(f"mount -t tracefs none {tracing}") == 0
    with open(f"{tracing}/set_ftrace_filter", "w") as f:
        f.write("text_poke_bp_batch\n")
    with open(f"{tracing}/current_tracer", "w") as f:
        f.write("function\n")
    try:
        with open(f"{tracing}/trace", "w"):
            pass                                    # (empties it)
        kvm = Kvm()
        for irqchip in (True, False):
            vm = kvm.create_vm()
            if irqchip:
                vm.create_irqchip()
            vcpu = vm.create_vcpu(0)
            vcpu.close()
            vm.close()
        kvm.close()
        time.sleep(2)        # KVM's APIC keys are deferred: they drop 1 s after the last user
        with open(f"{tracing}/trace") as f:
            pokes = [line for line in f if "text_poke_bp_batch" in line]
    finally:
        with open(f"{tracing}/current_tracer", "w") as f:
            f.write("nop\n")
        with open(f"{tracing}/set_ftrace_filter", "w") as f:
            f.write("\n")
    assert pokes == [], "".join(pokes)
