"""pyvmm/vmm on the host: exit dispatch, the end of a run, the console,
exit statistics and CPUID, with stand-ins for what needs KVM.

The stand-ins are a vCPU whose KVM_RUN plays back a script of exits in a
real struct kvm_run, and vCPU threads that stop (or refuse to) on a kick.
The real vCPUs run in tests/testbed/.
"""

import ctypes
import errno
import logging
import os
import signal
import threading
import time

import pytest

from pyvmm.devices.bus import Bus
from pyvmm.kvm import uapi
from pyvmm.vmm import console as console_mod
from pyvmm.vmm.console import Console, OutputBuffer
from pyvmm.vmm.cpu import vcpu_cpuid
from pyvmm.vmm.lifecycle import Lifecycle, MachineExit
from pyvmm.vmm.stats import UNCLAIMED_BUCKETS, ExitStats
from pyvmm.vmm.vcpu_thread import VcpuThread

IO_DATA_OFFSET = 4096


# --- a vCPU that plays back exits -----------------------------------------------

class ScriptedVcpu:
    """KVM_RUN returns the next exit of a script; when it runs out the machine stops."""

    def __init__(self, machine, script, vcpu_id=0):
        self.id = vcpu_id
        self.machine = machine
        self._page = ctypes.create_string_buffer(2 * IO_DATA_OFFSET)
        self.run_struct = uapi.kvm_run.from_buffer(self._page)
        self.script = list(script)

    def run(self):
        if not self.script:
            self.machine.stopping = True
            return False          # as when a kick interrupts KVM_RUN
        self.script.pop(0)(self.run_struct, self)
        return True

    def io_data(self):
        io = self.run_struct.io
        return (ctypes.c_uint8 * (io.size * io.count)).from_buffer(self._page, io.data_offset)

    def data(self, length):
        return self._page.raw[IO_DATA_OFFSET:IO_DATA_OFFSET + length]

    def get_regs(self):
        return uapi.kvm_regs(rip=0xFFFF_FFFF_8100_0000)


def io_out(port, data, size=1):
    def step(run, vcpu):
        run.exit_reason = uapi.KVM_EXIT_IO
        run.io.direction, run.io.size, run.io.port = uapi.KVM_EXIT_IO_OUT, size, port
        run.io.count, run.io.data_offset = len(data) // size, IO_DATA_OFFSET
        ctypes.memmove(ctypes.addressof(vcpu._page) + IO_DATA_OFFSET, data, len(data))
    return step


def io_in(port, size=1, count=1):
    def step(run, vcpu):
        run.exit_reason = uapi.KVM_EXIT_IO
        run.io.direction, run.io.size, run.io.port = uapi.KVM_EXIT_IO_IN, size, port
        run.io.count, run.io.data_offset = count, IO_DATA_OFFSET
    return step


def mmio_access(addr, length, value=None):
    def step(run, vcpu):
        run.exit_reason = uapi.KVM_EXIT_MMIO
        run.mmio.phys_addr, run.mmio.len = addr, length
        run.mmio.is_write = value is not None
        if value is not None:
            run.mmio.data[:length] = list(value.to_bytes(length, "little"))
    return step


def other_exit(reason, **fields):
    def step(run, vcpu):
        run.exit_reason = reason
        for name, value in fields.items():
            obj, attr = name.split("__")
            setattr(getattr(run, obj), attr, value)
    return step


class Recorder:
    """A device that records accesses and answers reads with a fixed value."""

    def __init__(self, answer=0, fail=False):
        self.answer, self.fail, self.accesses = answer, fail, []

    def read(self, offset, size):
        self.accesses.append(("read", offset, size))
        return self.answer

    def write(self, offset, size, value):
        if self.fail:
            raise ValueError("device broke")
        self.accesses.append(("write", offset, size, value))

    def describe(self, offset):
        return f"reg{offset:#x}"


class FakeMachine:
    def __init__(self):
        self.pio, self.mmio = Bus("port I/O"), Bus("MMIO")
        self.stopping = False
        self.ends = []

    def guest_reset(self, reason):
        self.ends.append(("reset", reason))

    def fail(self, message):
        self.ends.append(("fail", message))

    def mark(self, what):
        pass


def run_script(machine, *script):
    vcpu = ScriptedVcpu(machine, script)
    thread = VcpuThread(vcpu, machine)
    thread.run()          # in this thread, until the script runs out
    return thread, vcpu


# --- exit dispatch ---------------------------------------------------------------

def test_port_io_reaches_the_device_both_ways():
    m = FakeMachine()
    dev = Recorder(answer=0x1234_5678)
    m.pio.add(0x3F8, 8, dev, "serial")
    thread, vcpu = run_script(m, io_out(0x3F8, b"abc"),          # rep outsb: three writes
                              io_out(0x3FB, b"\x34\x12", size=2),
                              io_in(0x3F9, size=2, count=2))
    assert dev.accesses == [("write", 0, 1, 0x61), ("write", 0, 1, 0x62), ("write", 0, 1, 0x63),
                            ("write", 3, 2, 0x1234), ("read", 1, 2), ("read", 1, 2)]
    assert vcpu.data(4) == b"\x78\x56\x78\x56"                   # each read cut to 2 bytes
    assert thread.stats.report()[0].split() == ["io", "3", "(serial", "3)"]


def test_mmio_reaches_the_device_and_unclaimed_reads_float():
    m = FakeMachine()
    dev = Recorder(answer=7)
    m.mmio.add(0xD000_0000, 0x1000, dev, "virtio-net0")
    thread, vcpu = run_script(m, mmio_access(0xD000_0070, 4, value=0xF),
                              mmio_access(0xD000_0060, 4),
                              mmio_access(0xC000_0000, 4))
    assert dev.accesses == [("write", 0x70, 4, 0xF), ("read", 0x60, 4)]
    assert list(vcpu.run_struct.mmio.data[:4]) == [0xFF] * 4    # nobody there: all ones
    line = thread.stats.report()[0]
    assert line.startswith("mmio") and "virtio-net0 reg0x70 1" in line
    assert "page 0xc0000000 1" in line


@pytest.mark.parametrize("step,end", [
    (other_exit(uapi.KVM_EXIT_SHUTDOWN), ("reset", "the guest reset the machine (triple fault)")),
    (other_exit(uapi.KVM_EXIT_HLT), ("reset", "the guest halted")),
    (other_exit(uapi.KVM_EXIT_SYSTEM_EVENT, system_event__type=uapi.KVM_SYSTEM_EVENT_CRASH),
     ("fail", "the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)")),
    (other_exit(uapi.KVM_EXIT_INTERNAL_ERROR, internal__suberror=1, internal__ndata=1),
     ("fail", "KVM internal error on vCPU 0: instruction emulation failed at RIP "
              "0xffffffff81000000 (data: 0x0)")),
    (other_exit(uapi.KVM_EXIT_FAIL_ENTRY, fail_entry__hardware_entry_failure_reason=0x21),
     ("fail", "KVM could not enter the guest on vCPU 0 (hardware reason 0x21)")),
    (other_exit(99), ("fail", "unexpected KVM exit '99' on vCPU 0")),
])
def test_exits_that_end_the_machine(step, end):
    m = FakeMachine()
    thread, _ = run_script(m, step)
    assert m.ends == [end]


def test_a_device_that_raises_fails_the_machine_in_one_line():
    m = FakeMachine()
    m.pio.add(0xF4, 1, Recorder(fail=True), "exit-port")
    run_script(m, io_out(0xF4, b"\x07"), io_out(0xF4, b"\x07"))
    assert m.ends == [("fail", "vCPU 0: device broke")]


# --- exit statistics ---------------------------------------------------------------

def test_a_guest_sweeping_the_mmio_hole_cannot_grow_the_statistics():
    stats = ExitStats()
    for page in range(100_000):
        stats.count_unclaimed(uapi.KVM_EXIT_MMIO, 0xC000_0000 + (page << 12))
    assert len(stats.by_place) == UNCLAIMED_BUCKETS + 1
    line = stats.report()[0]
    assert line.split()[:2] == ["mmio", "100000"]
    assert f"other unclaimed {100_000 - UNCLAIMED_BUCKETS}" in line


def test_statistics_merge_and_name_places_only_when_printed():
    m = FakeMachine()
    m.pio.add(0x60, 5, Recorder(), "i8042")
    a, b = ExitStats(), ExitStats()
    entry = m.pio.find(0x60)
    a.count_access(uapi.KVM_EXIT_IO, entry, 0)
    b.count_access(uapi.KVM_EXIT_IO, entry, 0)
    b.count_unclaimed(uapi.KVM_EXIT_IO, 0x2F9)
    b.count(uapi.KVM_EXIT_INTR)
    a.merge(b)
    assert all(isinstance(key[0], int) and isinstance(key[2], int) for key in a.by_place)
    assert a.report() == ["io                     3  (i8042 2, port 0x2f9 1)",
                          "intr                   1"]


def test_unclaimed_accesses_are_logged_a_few_lines_a_second(caplog):
    bus = Bus("MMIO")
    with caplog.at_level(logging.DEBUG, logger="pyvmm.bus"):
        for addr in range(0xC000_0000, 0xC000_0000 + 5000 * 4, 4):
            assert bus.read(None, addr, 4) == 0xFFFF_FFFF
    assert 1 <= len(caplog.records) <= 20


# --- the end of a run ---------------------------------------------------------------

class FakeThread:
    """A vCPU thread that ends when kicked (after `stubborn` kicks, or never)."""

    def __init__(self, name, stubborn=0):
        self.name, self.stubborn, self.kicks = name, stubborn, 0
        self.started = False
        self._done = threading.Event()

    def start(self):
        self.started = True

    def kick(self, signum):
        self.kicks += 1
        if self.started and self.stubborn is not None and self.kicks > self.stubborn:
            self._done.set()

    def is_alive(self):
        return self.started and not self._done.is_set()

    def join(self, timeout=None):
        self._done.wait(timeout)


@pytest.fixture
def lifecycle():
    lc = Lifecycle()
    yield lc
    lc.close()


def test_the_first_reason_to_stop_wins_and_every_vcpu_is_stopped(lifecycle):
    lifecycle.threads += [FakeThread("vcpu0"), FakeThread("vcpu1", stubborn=3)]
    result = lifecycle.run(start=lambda: (
        lifecycle.finish(MachineExit("the guest reported exit status 3", status=3)),
        lifecycle.fail("too late")))
    assert (result.reason, result.status) == ("the guest reported exit status 3", 3)
    assert lifecycle.stuck == []
    assert not any(t.is_alive() for t in lifecycle.threads)


def test_a_vcpu_that_never_stops_is_reported_not_closed(lifecycle, caplog):
    lifecycle.threads += [FakeThread("vcpu0"), FakeThread("vcpu1", stubborn=None)]
    lifecycle.threads[0].start(), lifecycle.threads[1].start()
    lifecycle.finish(MachineExit("done", status=0))
    lifecycle.stop_vcpus(timeout=0.3)
    assert [t.name for t in lifecycle.stuck] == ["vcpu1"]
    assert "vcpu1 did not stop" in caplog.text


def test_a_signal_only_wakes_the_loop_which_then_stops(lifecycle):
    """The handler runs while the main thread holds the lifecycle's lock: no deadlock."""
    def start():
        with lifecycle._lock:
            os.kill(os.getpid(), signal.SIGTERM)   # handled here, inside the lock
            os.kill(os.getpid(), signal.SIGINT)    # and a second one
    lifecycle.threads.append(FakeThread("vcpu0"))
    before = signal.getsignal(signal.SIGINT)
    result = lifecycle.run(start)
    assert result.signal_exit in (130, 143) and result.reason.startswith("stopped by SIG")
    assert signal.getsignal(signal.SIGINT) is before            # handlers given back


def test_a_failing_event_loop_callback_ends_the_vm_with_one_line(lifecycle):
    r, w = os.pipe()
    try:
        def on_input():
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        lifecycle.loop.add_reader(r, on_input, "console input")
        os.write(w, b"x")
        result = lifecycle.run()
    finally:
        os.close(r), os.close(w)
    assert result.error and result.reason == "console input: Input/output error"


def test_event_loop_callbacks_may_add_and_remove_sources(lifecycle):
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    seen = []
    try:
        def first():
            seen.append(os.read(r1, 10))
            lifecycle.loop.remove(r1)
            lifecycle.loop.add_reader(r2, second, "second")
            os.write(w2, b"2")

        def second():
            seen.append(os.read(r2, 10))
            lifecycle.finish(MachineExit("done", status=0))
        lifecycle.loop.add_reader(r1, first, "first")
        os.write(w1, b"1")
        assert lifecycle.run().status == 0
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)
    assert seen == [b"1", b"2"]


# --- the console ---------------------------------------------------------------------

def test_console_escape_filter():
    quits = []
    c = Console(out_fd=1)
    c._on_quit = lambda: quits.append(True)
    assert c._filter_escape(b"ab\x01\x01c") == b"ab\x01c"     # Ctrl-A Ctrl-A sends Ctrl-A
    assert c._filter_escape(b"d\x01") == b"d" and not quits    # an escape split across reads
    assert c._filter_escape(b"xyz") == b"" and quits == [True]  # ... then x quits


def test_a_stalled_reader_costs_dropped_output_never_a_blocked_vcpu():
    r, w = os.pipe()
    os.set_blocking(w, True)
    out = OutputBuffer(w, limit=64 << 10)
    errors = []
    out.start(errors.append)
    try:
        started = time.monotonic()
        for _ in range(1 << 20):          # 1 MiB of single bytes; nobody reads the pipe
            out.put(b"x")
        assert time.monotonic() - started < 30
        assert out.dropped > 0
        out.close(timeout=0.2)            # the reader never comes: give up quickly
        assert errors == []
    finally:
        os.close(r)                       # the blocked writer gets EPIPE and ends ...
        out._thread.join(5)
        assert not out._thread.is_alive()
        os.close(w)                       # ... before its fd number can be reused


def test_console_output_reaches_the_reader_in_order():
    r, w = os.pipe()
    c = Console(out_fd=w)
    c._output.start(lambda e: None)
    for byte in b"hello, world\n":
        c.output(byte)
    c.close()
    os.close(w)
    assert os.read(r, 100) == b"hello, world\n" and c.dropped == 0
    os.close(r)


def test_a_hung_up_console_output_ends_the_vm_with_one_line():
    r, w = os.pipe()
    os.close(r)                           # EPIPE on the next write
    errors = []
    c = Console(out_fd=w)
    c.start(loop=None, serial=None, on_quit=None, on_error=errors.append)
    c.output(ord("x"))
    deadline = time.monotonic() + 5
    while not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    c.close()
    os.close(w)
    assert errors == ["console output: Broken pipe"]


def test_output_limit_default_is_bounded():
    assert console_mod.OUTPUT_BUFFER_LIMIT <= 1 << 20


# --- CPUID ----------------------------------------------------------------------------

def leaf(function, index=0, **regs):
    return uapi.kvm_cpuid_entry2(function=function, index=index, **regs)


@pytest.mark.parametrize("ncpus", [1, 2, 64, 65, 200, 254])
def test_cpuid_topology_fields_fit_their_bits(ncpus):
    supported = [leaf(0x1, ebx=0x0000_0800), leaf(0x4, eax=0x0000_0121),
                 leaf(0xB, 0), leaf(0xB, 1), leaf(0x8000_0008, ecx=0x0000_F000)]
    for vcpu_id in (0, ncpus - 1):
        by_leaf = {(e.function, e.index): e for e in vcpu_cpuid(supported, vcpu_id, ncpus)}
        one, four = by_leaf[(0x1, 0)], by_leaf[(0x4, 0)]
        assert one.ebx >> 24 == vcpu_id and (one.ebx >> 16) & 0xFF == min(ncpus, 255)
        assert one.ebx & 0xFFFF == 0x0800                         # the rest kept
        assert four.eax >> 26 == min(ncpus - 1, 63)               # 6 bits, no overflow
        assert four.eax & 0x03FF_FFFF == 0x121                    # cache type and level kept
        assert by_leaf[(0xB, 1)].ebx == ncpus and by_leaf[(0xB, 0)].edx == vcpu_id
        assert by_leaf[(0x8000_0008, 0)].ecx & 0xFF == ncpus - 1


def test_the_guest_finds_its_devices_by_the_transport_it_was_given():
    from pyvmm.vmm.machine import guest_cmdline
    from pyvmm.vmm.virtio_devices import PlannedDevice
    devices = [PlannedDevice(None, 0xD000_0000, 5, ["pyvmm.net=eth0,"], "a NIC"),
               PlannedDevice(None, 0xD000_1000, 6, [], "a disk")]
    assert guest_cmdline("console=ttyS0", "pci", devices) == "console=ttyS0 pyvmm.net=eth0,"
    assert guest_cmdline("console=ttyS0", "mmio", devices) == (
        "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 "
        "pyvmm.net=eth0,")
