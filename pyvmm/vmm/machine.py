"""A Machine: guest memory, vCPUs, devices and the event loop, from boot to exit.

    machine = Machine(MachineConfig(kernel=..., initrd=..., cmdline=...), console)
    result = machine.run()        # blocks until the guest ends or is stopped

Threads: the main thread runs the event loop (console input, signals); one
thread per vCPU runs KVM_RUN and handles its exits. The machine ends when
the guest reports an exit status (port 0xf4), resets (triple fault, i8042),
on a fatal KVM exit, or on a signal.
"""

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.devices.bus import Bus
from pyvmm.devices.debug_ports import DebugCon, ExitPort
from pyvmm.devices.i8042 import I8042, I8042_COMMAND_PORT, I8042_DATA_PORT
from pyvmm.devices.serial import COM1_IRQ, COM1_PORT, Serial
from pyvmm.devices.virtio.mmio import MMIO_SIZE, VirtioMmio, mmio_cmdline
from pyvmm.guest import EXIT_PORT, INIT_MARK_PORT
from pyvmm.kvm import Kvm, KvmError
from pyvmm.loader import load_linux
from pyvmm.loader.mptable import MAX_APIC_ID
from pyvmm.memory import GuestMemory
from pyvmm.vmm.cpu import configure_vcpu
from pyvmm.vmm.eventloop import EventLoop
from pyvmm.vmm.stats import ExitStats
from pyvmm.vmm.vcpu_thread import VcpuThread
from pyvmm.vmm.virtio_devices import VsockConfig, plan_devices

log = logging.getLogger("pyvmm.machine")

KICK_SIGNAL = signal.SIGUSR1
STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


@dataclass
class MachineConfig:
    kernel: Path
    initrd: Path = None
    cmdline: str = ""
    mem_size: int = 256 << 20
    cpus: int = 1
    hugepages: bool = False
    nets: list = field(default_factory=list)   # NetConfig per --net
    vsock: VsockConfig = None


@dataclass
class MachineExit:
    """How the run ended. status: the guest's own exit status, if it gave one."""
    reason: str
    status: int = None
    error: bool = False          # a failure of the VMM or of KVM, not of the guest
    signal_exit: int = None      # 128 + signal number when a signal stopped us
    stats: ExitStats = field(default_factory=ExitStats)
    boot_time: float = None      # seconds from process start to the guest's init


class Machine:
    def __init__(self, config, console, started_at=None):
        """started_at: time.monotonic() of the process start, for the boot time."""
        self.config = config
        self.console = console
        self.started_at = time.monotonic() if started_at is None else started_at
        self.init_reached_at = None
        self.stopping = False
        self._result = None
        self._lock = threading.Lock()
        self._closers = []
        self.threads = []
        self.transports = []
        try:
            self._build(config)
        except BaseException:
            self.close()
            raise

    def _build(self, config):
        # Memory, the devices' host side and the kernel first: a wrong path,
        # a missing /dev/vhost-net or too little memory is reported before
        # anything is asked of KVM.
        self.memory = GuestMemory(config.mem_size, hugepages=config.hugepages)
        self._closers.append(self.memory.close)
        self.devices = plan_devices(config.nets, config.vsock)
        for planned in self.devices:
            self._closers.append(planned.device.close)
        cmdline = " ".join([config.cmdline] + [
            arg for p in self.devices for arg in [mmio_cmdline(p.base, p.gsi), *p.guest_args]])
        self.boot = load_linux(self.memory, config.kernel, config.initrd, cmdline, config.cpus)

        self.kvm = Kvm()
        self._closers.append(self.kvm.close)
        self.kvm.require_linux_guest_support()
        kvm_limit = self.kvm.max_vcpus()
        if config.cpus > min(kvm_limit, MAX_APIC_ID):
            raise KvmError(f"--cpus {config.cpus}: at most {min(kvm_limit, MAX_APIC_ID)} "
                           f"(KVM allows {kvm_limit}, the MP table {MAX_APIC_ID})")

        self.vm = self.kvm.create_vm()
        self._closers.append(self.vm.close)
        self.vm.set_tss_addr()
        self.vm.set_identity_map_addr()
        self.vm.create_irqchip()
        self.vm.create_pit2()
        for slot, region in enumerate(self.memory.regions):
            self.vm.set_user_memory_region(slot, region.guest_phys_addr, region.size,
                                           region.host_addr)

        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self.serial = Serial(lambda level: self.vm.irq_line(COM1_IRQ, level),
                             self.console.output)
        self.pio.add(COM1_PORT, 8, self.serial, "serial")
        self.pio.add(I8042_DATA_PORT, I8042_COMMAND_PORT - I8042_DATA_PORT + 1,
                     I8042(self._i8042_reset), "i8042")
        self.pio.add(EXIT_PORT, 1, ExitPort(self._guest_exit), "exit-port")
        self.pio.add(INIT_MARK_PORT, 1, DebugCon(self._debugcon), "debugcon")
        for planned in self.devices:
            transport = VirtioMmio(planned.device, self.vm, self.memory, planned.base, planned.gsi)
            self._closers.append(transport.close)
            self.mmio.add(planned.base, MMIO_SIZE, transport, planned.device.name)
            self.transports.append(transport)

        supported = self.kvm.supported_cpuid()
        for i in range(config.cpus):
            vcpu = self.vm.create_vcpu(i)
            self._closers.append(vcpu.close)
            configure_vcpu(vcpu, supported, config.cpus, boot=self.boot if i == 0 else None)
            self.threads.append(VcpuThread(vcpu, self))

        self.loop = EventLoop()
        self._closers.append(self.loop.close)
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._closers.append(lambda: os.close(self._wake_fd))

    # --- how the run ends (any thread) -------------------------------------

    def _finish(self, result):
        with self._lock:
            if self._result is not None:
                return
            self._result = result
            self.stopping = True
        for thread in self.threads:
            thread.kick(KICK_SIGNAL)
        os.eventfd_write(self._wake_fd, 1)

    def _guest_exit(self, status):
        self._finish(MachineExit(f"the guest reported exit status {status}", status=status))

    def _i8042_reset(self):
        self.guest_reset("the guest reset the machine (i8042)")

    def guest_reset(self, reason):
        self._finish(MachineExit(reason))

    def fail(self, message):
        self._finish(MachineExit(message, error=True))

    def _debugcon(self, byte):
        if self.init_reached_at is None:
            self.init_reached_at = time.monotonic()
            log.debug("guest reached init %.3f s after pyvmm started",
                      self.init_reached_at - self.started_at)

    def _on_signal(self, signum, frame):
        self._finish(MachineExit(f"stopped by {signal.Signals(signum).name}",
                                 signal_exit=STOP_SIGNALS[signum]))

    # --- running -----------------------------------------------------------

    def run(self):
        """Run the guest to its end; return a MachineExit. Call from the main thread."""
        old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        old_handlers[KICK_SIGNAL] = signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        try:
            self.loop.add_reader(self._wake_fd, lambda: os.eventfd_read(self._wake_fd))
            for transport in self.transports:
                for fd, callback in transport.event_sources():
                    self.loop.add_reader(fd, callback)
            self.console.start(self.loop, self.serial,
                               lambda: self._finish(MachineExit("quit from the console",
                                                                signal_exit=130)))
            for thread in self.threads:
                thread.start()
            self.loop.run_until(lambda: self.stopping)
            for thread in self.threads:
                thread.join(timeout=5)
                if thread.is_alive():
                    log.warning("vCPU thread %s did not stop", thread.name)
        finally:
            self.console.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        result = self._result
        for thread in self.threads:
            result.stats.merge(thread.stats)
        if self.init_reached_at is not None:
            result.boot_time = self.init_reached_at - self.started_at
        return result

    def close(self):
        for closer in reversed(self._closers):
            closer()
        self._closers.clear()
