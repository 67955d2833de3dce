"""ctypes bindings for /dev/kvm: the system, VM and vCPU objects.

    kvm = Kvm(); kvm.require_linux_guest_support()
    vm = kvm.create_vm(); vcpu = vm.create_vcpu(0)
"""

from pyvmm.kvm.system import Kvm, KvmError, paravirtual_kvm
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.kvm.vm import Vm

__all__ = ["Kvm", "KvmError", "Vcpu", "Vm", "paravirtual_kvm"]
