"""A KVM virtual machine: memory slots, the in-kernel irqchip, eventfd wiring."""

import ctypes
import os

from pyvmm.kvm import uapi
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.sys.ioctl import ioctl

# Three pages below 4 GiB that Intel VMX needs for real-mode emulation; they
# must not overlap guest RAM or devices (QEMU and Firecracker use these).
KVM_TSS_ADDRESS = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDRESS = 0xFFFB_C000


class Vm:
    def __init__(self, kvm, fd):
        self.kvm = kvm
        self.fd = fd
        self.vcpu_mmap_size = kvm.vcpu_mmap_size()

    def close(self):
        os.close(self.fd)

    def _ioctl(self, request, arg, name):
        return ioctl(self.fd, request, arg, name=name)

    def set_user_memory_region(self, slot, guest_phys_addr, memory_size, userspace_addr, flags=0):
        """KVM_SET_USER_MEMORY_REGION: back guest-physical memory with host memory."""
        region = uapi.kvm_userspace_memory_region(
            slot=slot, flags=flags, guest_phys_addr=guest_phys_addr,
            memory_size=memory_size, userspace_addr=userspace_addr)
        self._ioctl(uapi.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def set_tss_addr(self, addr=KVM_TSS_ADDRESS):
        """KVM_SET_TSS_ADDR: where VMX may keep its real-mode TSS (3 pages)."""
        self._ioctl(uapi.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr=KVM_IDENTITY_MAP_ADDRESS):
        """KVM_SET_IDENTITY_MAP_ADDR: the identity page table page VMX may use."""
        self._ioctl(uapi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr),
                    "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self):
        """KVM_CREATE_IRQCHIP: PIC, IOAPIC and a local APIC per vCPU, all in the kernel."""
        self._ioctl(uapi.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self):
        """KVM_CREATE_PIT2: the i8254 timer in the kernel (port 0x61 speaker as a dummy)."""
        config = uapi.kvm_pit_config(flags=uapi.KVM_PIT_SPEAKER_DUMMY)
        self._ioctl(uapi.KVM_CREATE_PIT2, config, "KVM_CREATE_PIT2")

    def irq_line(self, irq, level):
        """KVM_IRQ_LINE: drive an interrupt line (GSI) of the in-kernel irqchip."""
        self._ioctl(uapi.KVM_IRQ_LINE, uapi.kvm_irq_level(irq=irq, level=level), "KVM_IRQ_LINE")

    def ioeventfd(self, fd, addr, length, datamatch=None, pio=False, deassign=False):
        """KVM_IOEVENTFD: a guest write to addr signals fd instead of exiting to us.

        With datamatch, only writes of that value do (e.g. one queue index).
        """
        flags = 0
        if datamatch is not None:
            flags |= uapi.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= uapi.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= uapi.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg = uapi.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd,
                                 flags=flags)
        self._ioctl(uapi.KVM_IOEVENTFD, arg, "KVM_IOEVENTFD")

    def irqfd(self, fd, gsi, deassign=False):
        """KVM_IRQFD: a write to eventfd fd raises interrupt gsi, without us."""
        flags = uapi.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        self._ioctl(uapi.KVM_IRQFD, uapi.kvm_irqfd(fd=fd, gsi=gsi, flags=flags), "KVM_IRQFD")

    def set_gsi_routing(self, entries):
        """KVM_SET_GSI_ROUTING: the whole routing table at once (kvm_irq_routing_entry list)."""
        table = uapi.kvm_irq_routing(len(entries))(nr=len(entries))
        for i, entry in enumerate(entries):
            table.entries[i] = entry
        self._ioctl(uapi.KVM_SET_GSI_ROUTING, table, "KVM_SET_GSI_ROUTING")

    def create_vcpu(self, vcpu_id):
        """KVM_CREATE_VCPU: vcpu_id is also its local APIC id."""
        fd = self._ioctl(uapi.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        return Vcpu(self, fd, vcpu_id)
