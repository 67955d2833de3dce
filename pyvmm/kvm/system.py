"""/dev/kvm: the KVM subsystem, and the checks that it can run a Linux guest."""

import errno
import os

from pyvmm.errors import PyvmmError
from pyvmm.kvm import uapi
from pyvmm.kvm.vm import Vm
from pyvmm.sys.chardev import open_chardev
from pyvmm.sys.ioctl import ioctl

# Capabilities pyvmm cannot work without, and what each one is for.
REQUIRED_CAPS = {
    uapi.KVM_CAP_USER_MEMORY: "KVM_CAP_USER_MEMORY (guest memory from a memfd mapping)",
    uapi.KVM_CAP_IRQCHIP: "KVM_CAP_IRQCHIP (in-kernel PIC, IOAPIC and local APICs)",
    uapi.KVM_CAP_PIT2: "KVM_CAP_PIT2 (in-kernel timer)",
    uapi.KVM_CAP_SET_TSS_ADDR: "KVM_CAP_SET_TSS_ADDR",
    uapi.KVM_CAP_EXT_CPUID: "KVM_CAP_EXT_CPUID (KVM_GET_SUPPORTED_CPUID)",
    uapi.KVM_CAP_IOEVENTFD: "KVM_CAP_IOEVENTFD (queue notifications without exits)",
    uapi.KVM_CAP_IRQFD: "KVM_CAP_IRQFD (interrupts from eventfds)",
    uapi.KVM_CAP_IMMEDIATE_EXIT: "KVM_CAP_IMMEDIATE_EXIT (stopping vCPUs cleanly)",
}

TESTBED_HINT = "run pyvmm inside the testbed VM: scripts/testbed -- python3 -m pyvmm run ..."


class KvmError(PyvmmError):
    """KVM is missing or unfit; the message is one line for the user."""


def paravirtual_kvm(sys_module="/sys/module"):
    """The name of a paravirtual KVM module, if this host's KVM is one.

    kvm_pvm runs guests without hardware virtualization, through shadow page
    tables; a stock Linux kernel does not boot under it (see
    ../shared/HOST-FACTS.md), so pyvmm refuses it instead of hanging.
    """
    if os.path.exists(os.path.join(sys_module, "kvm_pvm")):
        return "kvm_pvm"
    return None


class Kvm:
    """An open /dev/kvm."""

    def __init__(self, path="/dev/kvm"):
        self.fd = open_chardev(
            path, KvmError, missing=f"this host has no KVM (load kvm_intel or kvm_amd, or "
                                    f"{TESTBED_HINT})",
            no_permission="add your user to the 'kvm' group or run as root")
        version = ioctl(self.fd, uapi.KVM_GET_API_VERSION, name="KVM_GET_API_VERSION")
        if version != uapi.KVM_API_VERSION:
            raise KvmError(f"{path} speaks KVM API {version}, pyvmm needs {uapi.KVM_API_VERSION}")

    def close(self):
        os.close(self.fd)

    def check_extension(self, cap):
        """KVM_CHECK_EXTENSION: 0 if unsupported, else a capability-specific value."""
        return ioctl(self.fd, uapi.KVM_CHECK_EXTENSION, cap, name="KVM_CHECK_EXTENSION")

    def require_linux_guest_support(self, sys_module="/sys/module"):
        """Fail with one clear line unless this KVM can boot a Linux guest."""
        pvm = paravirtual_kvm(sys_module)
        if pvm:
            raise KvmError(f"this host's KVM is the paravirtual {pvm}, which cannot boot a "
                           f"stock Linux kernel; {TESTBED_HINT}")
        missing = [desc for cap, desc in REQUIRED_CAPS.items() if not self.check_extension(cap)]
        if missing:
            raise KvmError("this KVM lacks " + ", ".join(missing))

    def max_vcpus(self):
        """The most vCPUs a VM may have (KVM_CAP_MAX_VCPUS, else KVM_CAP_NR_VCPUS)."""
        return (self.check_extension(uapi.KVM_CAP_MAX_VCPUS)
                or self.check_extension(uapi.KVM_CAP_NR_VCPUS) or 4)

    def vcpu_mmap_size(self):
        """Size of the kvm_run area each vCPU fd maps (KVM_GET_VCPU_MMAP_SIZE)."""
        return ioctl(self.fd, uapi.KVM_GET_VCPU_MMAP_SIZE, name="KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can offer a guest."""
        n = 64
        while True:
            cpuid = uapi.kvm_cpuid2(n)(nent=n)
            try:
                ioctl(self.fd, uapi.KVM_GET_SUPPORTED_CPUID, cpuid, name="KVM_GET_SUPPORTED_CPUID")
            except OSError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2  # the kernel says how many it has only by refusing
                    continue
                raise
            return [uapi.kvm_cpuid_entry2.from_buffer_copy(cpuid.entries[i])
                    for i in range(cpuid.nent)]

    def create_vm(self):
        fd = ioctl(self.fd, uapi.KVM_CREATE_VM, 0, name="KVM_CREATE_VM")
        return Vm(self, fd)

