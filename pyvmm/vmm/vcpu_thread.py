"""One thread per vCPU: KVM_RUN in a loop, each exit handed to a bus or the machine.

KVM_RUN releases the GIL (ctypes does), so vCPUs run in parallel while
Python handles an exit on another one. To stop a vCPU, the machine sets
kvm_run.immediate_exit and sends the thread SIGUSR1: a vCPU inside the
guest leaves KVM_RUN with EINTR, one about to enter returns at once.
"""

import logging
import signal
import threading

from pyvmm.kvm import uapi
from pyvmm.vmm.stats import ExitStats

log = logging.getLogger("pyvmm.vcpu")


def describe_internal_error(vcpu):
    run = vcpu.run_struct
    what = uapi.INTERNAL_ERRORS.get(run.internal.suberror, f"sub-error {run.internal.suberror}")
    data = " ".join(f"{run.internal.data[i]:#x}" for i in range(min(run.internal.ndata, 16)))
    try:
        rip = f" at RIP {vcpu.get_regs().rip:#x}"
    except OSError:
        rip = ""
    return f"KVM internal error on vCPU {vcpu.id}: {what}{rip}" + (f" (data: {data})" if data else "")


class VcpuThread(threading.Thread):
    def __init__(self, vcpu, machine):
        super().__init__(name=f"vcpu{vcpu.id}", daemon=True)
        self.vcpu = vcpu
        self.machine = machine
        self.stats = ExitStats()

    def kick(self, signum):
        """Make KVM_RUN return now or on its next entry (called from another thread)."""
        self.vcpu.run_struct.immediate_exit = 1
        if self.ident is not None and self.is_alive():
            try:
                signal.pthread_kill(self.ident, signum)
            except ProcessLookupError:
                pass

    def run(self):
        if self.vcpu.id == 0:
            self.machine.mark("first KVM_RUN")
        try:
            while not self.machine.stopping:
                if not self.vcpu.run():
                    self.stats.count(uapi.KVM_EXIT_INTR)
                    continue
                self._handle_exit()
        except Exception as e:  # never let a vCPU die silently
            log.debug("vCPU %d failed", self.vcpu.id, exc_info=True)
            self.machine.fail(f"vCPU {self.vcpu.id}: {e}")

    def _handle_exit(self):
        run = self.vcpu.run_struct
        reason = run.exit_reason
        if reason == uapi.KVM_EXIT_IO:
            self._handle_io(run.io)
        elif reason == uapi.KVM_EXIT_MMIO:
            self._handle_mmio(run.mmio)
        else:
            self._handle_other_exit(run, reason)

    def _handle_other_exit(self, run, reason):
        """Everything but I/O: rare exits, most of them the end of the VM."""
        self.stats.count(reason)
        if reason == uapi.KVM_EXIT_INTR:
            pass
        elif reason == uapi.KVM_EXIT_SHUTDOWN:
            # A triple fault: how Linux reboots with reboot=t.
            self.machine.guest_reset("the guest reset the machine (triple fault)")
        elif reason == uapi.KVM_EXIT_SYSTEM_EVENT:
            kind = run.system_event.type
            if kind == uapi.KVM_SYSTEM_EVENT_CRASH:
                self.machine.fail("the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)")
            else:
                self.machine.guest_reset(f"the guest asked for a power event ({kind})")
        elif reason == uapi.KVM_EXIT_INTERNAL_ERROR:
            self.machine.fail(describe_internal_error(self.vcpu))
        elif reason == uapi.KVM_EXIT_FAIL_ENTRY:
            self.machine.fail(f"KVM could not enter the guest on vCPU {self.vcpu.id} "
                              f"(hardware reason {run.fail_entry.hardware_entry_failure_reason:#x})")
        elif reason == uapi.KVM_EXIT_HLT:
            # Only without an in-kernel irqchip; then a halt is final.
            self.machine.guest_reset("the guest halted")
        else:
            name = uapi.EXIT_REASONS.get(reason, str(reason))
            self.machine.fail(f"unexpected KVM exit '{name}' on vCPU {self.vcpu.id}")

    def _handle_io(self, io):
        bus = self.machine.pio
        entry = bus.find(io.port)
        if entry is None:
            self.stats.count_unclaimed(uapi.KVM_EXIT_IO, io.port)
        else:
            self.stats.count_access(uapi.KVM_EXIT_IO, entry, 0)
        data = memoryview(self.vcpu.io_data()).cast("B")
        size = io.size
        mask = (1 << (8 * size)) - 1
        # count > 1 for string instructions (rep outsb / insb).
        for start in range(0, size * io.count, size):
            if io.direction == uapi.KVM_EXIT_IO_OUT:
                bus.write(entry, io.port, size, int.from_bytes(data[start:start + size], "little"))
            else:
                value = bus.read(entry, io.port, size)
                data[start:start + size] = (value & mask).to_bytes(size, "little")

    def _handle_mmio(self, mmio):
        bus = self.machine.mmio
        entry = bus.find(mmio.phys_addr)
        if entry is None:
            self.stats.count_unclaimed(uapi.KVM_EXIT_MMIO, mmio.phys_addr)
        else:
            self.stats.count_access(uapi.KVM_EXIT_MMIO, entry, mmio.phys_addr - entry.base)
        size = min(mmio.len, 8)
        if mmio.is_write:
            bus.write(entry, mmio.phys_addr, size, int.from_bytes(bytes(mmio.data[:size]), "little"))
        else:
            value = bus.read(entry, mmio.phys_addr, size)
            mmio.data[:size] = list((value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
