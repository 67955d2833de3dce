"""A Machine: guest memory, vCPUs, devices and the event loop, from boot to exit.

    machine = Machine(MachineConfig(kernel=..., initrd=..., cmdline=...), console)
    result = machine.run()        # blocks until the guest ends or is stopped

Threads: the main thread runs the event loop (console input, signals); one
thread per vCPU runs KVM_RUN and handles its exits. The machine ends when
the guest reports an exit status (port 0xf4), resets (triple fault, i8042),
on a fatal KVM exit, a failing event-loop callback, or a signal
(lifecycle.py: how the end is decided and the vCPUs stopped).
"""

import logging
import time
from dataclasses import dataclass, field

from pyvmm.devices.bus import Bus
from pyvmm.devices.debug_ports import DebugCon, ExitPort
from pyvmm.devices.i8042 import I8042, I8042_COMMAND_PORT, I8042_DATA_PORT
from pyvmm.devices.pci.root import PCI_CONFIG_PORT, PCI_CONFIG_PORTS, PciRoot
from pyvmm.devices.serial import COM1_IRQ, COM1_PORT, Serial
from pyvmm.devices.virtio.mmio import MMIO_SIZE, VirtioMmio, mmio_cmdline
from pyvmm.guest import EXIT_PORT, INIT_MARK_PORT
from pyvmm.kvm import Kvm, KvmError
from pyvmm.loader import load_linux
from pyvmm.loader.mptable import MAX_APIC_ID
from pyvmm.memory import GuestMemory
from pyvmm.vmm import DEFAULT_TRANSPORT
from pyvmm.vmm.cpu import configure_vcpu
from pyvmm.vmm.lifecycle import Lifecycle, MachineExit
from pyvmm.vmm.vcpu_thread import VcpuThread
from pyvmm.vmm.virtio_devices import VIRTIO_PCI_BAR_BASE, plan_devices

log = logging.getLogger("pyvmm.machine")


@dataclass
class MachineConfig:
    kernel: str
    initrd: str = None
    cmdline: str = ""
    mem_size: int = 256 << 20
    cpus: int = 1
    hugepages: bool = False
    nets: list = field(default_factory=list)   # NetConfig or VhostUserConfig per --net
    vsock: object = None                       # VsockConfig or VhostUserConfig
    blks: list = field(default_factory=list)   # VhostUserConfig per --blk
    rngs: list = field(default_factory=list)   # VhostUserConfig per --rng
    fss: list = field(default_factory=list)    # VhostUserConfig per --fs
    generic: list = field(default_factory=list)  # VhostUserConfig per --device
    scsis: list = field(default_factory=list)  # ScsiConfig per --scsi
    tracer: object = None                      # a vhost-user Tracer (--trace vhost-user)
    transport: str = DEFAULT_TRANSPORT         # how the guest finds virtio devices: pci or mmio


def guest_cmdline(base, transport, devices):
    """The kernel command line: base, how the guest finds the devices
    (PlannedDevices) on transport, and what each device's guest end needs."""
    # On PCI the guest finds the devices by scanning bus 0; virtio-mmio
    # devices are announced here.
    announce = [] if transport == "pci" else [mmio_cmdline(p.base, p.gsi) for p in devices]
    return " ".join([base] + announce + [arg for p in devices for arg in p.guest_args])


class Machine:
    def __init__(self, config, console, started_at=None):
        """started_at: time.monotonic() of the process start, for the boot time."""
        self.config = config
        self.console = console
        self.started_at = time.monotonic() if started_at is None else started_at
        self.init_reached_at = None
        self.timeline = []          # (time.monotonic(), what): where start-up time goes
        self.mark("Python started, pyvmm imported")
        self._closers = []
        self.transports = []
        self.lifecycle = Lifecycle()
        self._closers.append(self.lifecycle.close)
        self.threads = self.lifecycle.threads
        try:
            self._build(config)
        except BaseException:
            self.close()
            raise

    @property
    def stopping(self):
        return self.lifecycle.stopping

    def mark(self, what):
        """Note a step of the start-up for --stats (any thread)."""
        self.timeline.append((time.monotonic(), what))

    def _build(self, config):
        # Memory, the devices' host side and the kernel first: a wrong path,
        # a missing /dev/vhost-net or too little memory is reported before
        # anything is asked of KVM.
        self.memory = GuestMemory(config.mem_size, hugepages=config.hugepages)
        self._closers.append(self.memory.close)
        self.devices = plan_devices(config.nets, config.vsock, config.blks,
                                    tracer=config.tracer.for_device if config.tracer else None,
                                    rngs=config.rngs, generic=config.generic,
                                    fss=config.fss, scsis=config.scsis)
        for planned in self.devices:
            self._closers.append(planned.device.close)
        self.mark("guest memory and the devices' host side")
        cmdline = guest_cmdline(config.cmdline, config.transport, self.devices)
        self.boot = load_linux(self.memory, config.kernel, config.initrd, cmdline, config.cpus)
        self.mark("kernel and initrd loaded")

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
        self.mark("KVM VM created (irqchip, timer, memory)")

        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self.serial = Serial(lambda level: self.vm.irq_line(COM1_IRQ, level),
                             self.console.output)
        self.pio.add(COM1_PORT, 8, self.serial, "serial")
        self.pio.add(I8042_DATA_PORT, I8042_COMMAND_PORT - I8042_DATA_PORT + 1,
                     I8042(self._i8042_reset), "i8042")
        self.pio.add(EXIT_PORT, 1, ExitPort(self._guest_exit), "exit-port")
        self.pio.add(INIT_MARK_PORT, 1, DebugCon(self._debugcon), "debugcon")
        # The PCI bus is there on both transports: a guest with PCI support
        # that finds no bus at all says so on the console ("PCI: Fatal: No
        # config space access function found"), even with quiet.
        self.pci = PciRoot()
        self.pio.add(PCI_CONFIG_PORT, PCI_CONFIG_PORTS, self.pci, "PCI config")
        if config.transport == "pci":
            self._add_pci_devices()
        else:
            for planned in self.devices:
                transport = VirtioMmio(planned.device, self.vm, self.memory, planned.base,
                                       planned.gsi)
                self._closers.append(transport.close)
                self.mmio.add(planned.base, MMIO_SIZE, transport, planned.device.name)
                self.transports.append(transport)

        supported = self.kvm.supported_cpuid()
        for i in range(config.cpus):
            vcpu = self.vm.create_vcpu(i)
            self._closers.append(vcpu.close)
            configure_vcpu(vcpu, supported, config.cpus, boot=self.boot if i == 0 else None)
            self.threads.append(VcpuThread(vcpu, self))
        self.mark("devices and vCPUs set up")

    def _add_pci_devices(self):
        """Each device as a function on the PCI root bus, its BAR placed from
        VIRTIO_PCI_BAR_BASE up, its MSI-X vectors GSIs routed by the guest's
        messages."""
        from pyvmm.devices.virtio.pci import BAR_SIZE, VirtioPci
        from pyvmm.kvm.irq_routing import GsiRoutes
        self.gsi_routes = GsiRoutes(self.vm)
        for i, planned in enumerate(self.devices):
            transport = VirtioPci(planned.device, self.vm, self.memory, self.gsi_routes,
                                  self.mmio, VIRTIO_PCI_BAR_BASE + i * BAR_SIZE)
            self._closers.append(transport.close)
            self.pci.add(transport)
            self.transports.append(transport)

    # --- how the run ends (any thread) -------------------------------------

    def _guest_exit(self, status):
        self.lifecycle.finish(MachineExit(f"the guest reported exit status {status}",
                                          status=status))

    def _i8042_reset(self):
        self.guest_reset("the guest reset the machine (i8042)")

    def guest_reset(self, reason):
        self.lifecycle.finish(MachineExit(reason))

    def fail(self, message):
        self.lifecycle.fail(message)

    def _debugcon(self, byte):
        if self.init_reached_at is None:
            self.init_reached_at = time.monotonic()
            self.mark("the guest reached init")
            log.debug("guest reached init %.3f s after pyvmm started",
                      self.init_reached_at - self.started_at)

    # --- running -----------------------------------------------------------

    def run(self):
        """Run the guest to its end; return a MachineExit. Call from the main thread."""
        loop = self.lifecycle.loop

        def start():
            for transport in self.transports:
                transport.watch(loop)
            self.console.start(loop, self.serial,
                               on_quit=lambda: self.lifecycle.finish(
                                   MachineExit("quit from the console", signal_exit=130)),
                               on_error=self.lifecycle.fail)
        try:
            result = self.lifecycle.run(start)
        finally:
            self.console.close()
        for thread in self.threads:
            result.stats.merge(thread.stats)
        if self.init_reached_at is not None:
            result.boot_time = self.init_reached_at - self.started_at
        result.timeline = [(t - self.started_at, what) for t, what in self.timeline]
        result.queues = [line for t in self.transports for line in t.queue_report()]
        return result

    def close(self):
        if self.lifecycle.stuck:
            # A vCPU thread is still running: closing its fds or unmapping
            # memory under it could crash the process. The exit frees all.
            log.warning("not closing the VM: %d vCPU thread(s) still running",
                        len(self.lifecycle.stuck))
            return
        for closer in reversed(self._closers):
            closer()
        self._closers.clear()
