"""A KVM virtual CPU: its registers, CPUID, MSRs, local APIC, and KVM_RUN."""

import ctypes
import errno
import mmap
import os

from pyvmm.kvm import uapi
from pyvmm.sys.ioctl import ioctl


class Vcpu:
    def __init__(self, vm, fd, vcpu_id):
        self.vm = vm
        self.fd = fd
        self.id = vcpu_id
        # struct kvm_run is shared with the kernel: KVM_RUN reports each exit
        # there, and we answer in place (I/O data, immediate_exit).
        self._run_map = mmap.mmap(fd, vm.vcpu_mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct = uapi.kvm_run.from_buffer(self._run_map)
        self._run_addr = ctypes.addressof(self.run_struct)

    def close(self):
        del self.run_struct
        self._run_map.close()
        os.close(self.fd)

    def _ioctl(self, request, arg, name):
        return ioctl(self.fd, request, arg, name=name)

    def run(self):
        """KVM_RUN until the next exit; returns False if a signal interrupted it."""
        try:
            self._ioctl(uapi.KVM_RUN, 0, "KVM_RUN")
        except OSError as e:
            if e.errno in (errno.EINTR, errno.EAGAIN):
                return False
            raise
        return True

    def io_data(self):
        """The data buffer of a KVM_EXIT_IO exit: size * count bytes inside kvm_run."""
        io = self.run_struct.io
        return (ctypes.c_uint8 * (io.size * io.count)).from_address(self._run_addr + io.data_offset)

    def _get(self, request, struct, name):
        value = struct()
        self._ioctl(request, value, name)
        return value

    def get_regs(self):
        return self._get(uapi.KVM_GET_REGS, uapi.kvm_regs, "KVM_GET_REGS")

    def set_regs(self, regs):
        self._ioctl(uapi.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self):
        return self._get(uapi.KVM_GET_SREGS, uapi.kvm_sregs, "KVM_GET_SREGS")

    def set_sregs(self, sregs):
        self._ioctl(uapi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self):
        return self._get(uapi.KVM_GET_FPU, uapi.kvm_fpu, "KVM_GET_FPU")

    def set_fpu(self, fpu):
        self._ioctl(uapi.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def get_lapic(self):
        return self._get(uapi.KVM_GET_LAPIC, uapi.kvm_lapic_state, "KVM_GET_LAPIC")

    def set_lapic(self, lapic):
        self._ioctl(uapi.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")

    def set_cpuid2(self, entries):
        """KVM_SET_CPUID2: the CPUID leaves this vCPU's guest sees."""
        cpuid = uapi.kvm_cpuid2(len(entries))(nent=len(entries))
        for i, entry in enumerate(entries):
            cpuid.entries[i] = entry
        self._ioctl(uapi.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def set_msrs(self, msrs):
        """KVM_SET_MSRS from {index: value}; every one must be accepted."""
        arg = uapi.kvm_msrs(len(msrs))(nmsrs=len(msrs))
        for i, (index, data) in enumerate(msrs.items()):
            arg.entries[i].index = index
            arg.entries[i].data = data
        done = self._ioctl(uapi.KVM_SET_MSRS, arg, "KVM_SET_MSRS")
        if done != len(msrs):
            bad = list(msrs)[done]
            raise OSError(errno.EINVAL, f"KVM_SET_MSRS: KVM refused MSR {bad:#x}")

    def get_msrs(self, indices):
        """KVM_GET_MSRS: {index: value} for the given MSR indices."""
        arg = uapi.kvm_msrs(len(indices))(nmsrs=len(indices))
        for i, index in enumerate(indices):
            arg.entries[i].index = index
        done = self._ioctl(uapi.KVM_GET_MSRS, arg, "KVM_GET_MSRS")
        return {arg.entries[i].index: arg.entries[i].data for i in range(done)}
