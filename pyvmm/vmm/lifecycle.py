"""How a machine's run begins and ends.

The main thread runs the event loop; each vCPU runs in its own thread. Any
thread may give a reason to stop (the guest's exit status, a reset, a KVM
failure, a signal, a failing event-loop callback); the first reason wins.
Then every vCPU is kicked out of KVM_RUN and joined before anything is
closed: a vCPU thread still running would use its kvm_run mapping and
guest memory under our feet.

Signal handlers run in the main thread between two bytecodes, possibly
while that thread holds a lock; so a handler only records the signal and
wakes the loop, which does the rest.
"""

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from pyvmm.sys.eventloop import EventLoop
from pyvmm.vmm.stats import ExitStats

log = logging.getLogger("pyvmm.machine")

KICK_SIGNAL = signal.SIGUSR1
STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
# How long the vCPUs get to leave KVM_RUN and their exit handlers.
VCPU_STOP_TIMEOUT = 10.0


@dataclass
class MachineExit:
    """How the run ended. status: the guest's own exit status, if it gave one."""
    reason: str
    status: int = None
    error: bool = False          # a failure of the VMM or of KVM, not of the guest
    signal_exit: int = None      # 128 + signal number when a signal stopped us
    stats: ExitStats = field(default_factory=ExitStats)
    boot_time: float = None      # seconds from process start to the guest's init
    timeline: list = field(default_factory=list)   # (seconds from process start, what)
    queues: list = field(default_factory=list)     # lines: each running queue as it was left


def describe_error(e):
    """One line for an exception: the OS's words for an OSError."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


class Lifecycle:
    def __init__(self):
        self.loop = EventLoop(on_error=self._callback_failed)
        self.threads = []        # VcpuThread-like: start, kick, join, is_alive, name
        self.stopping = False    # read by the vCPU threads after each exit
        self.result = None       # the first MachineExit given
        self.stuck = []          # vCPU threads that did not stop in time
        self._lock = threading.Lock()
        self._pending_signal = None
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def close(self):
        self.loop.close()
        os.close(self._wake_fd)

    # --- reasons to stop (any thread) -------------------------------------

    def finish(self, result):
        """Stop the machine for this reason, unless it is stopping already."""
        with self._lock:
            if self.result is not None:
                return
            self.result = result
            self.stopping = True
        self._kick_vcpus()
        os.eventfd_write(self._wake_fd, 1)

    def fail(self, message):
        self.finish(MachineExit(message, error=True))

    def _callback_failed(self, what, e):
        log.debug("%s failed", what, exc_info=e)
        self.fail(f"{what}: {describe_error(e)}")

    def _on_signal(self, signum, frame):
        self._pending_signal = signum
        os.eventfd_write(self._wake_fd, 1)

    def _on_wake(self):
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        signum = self._pending_signal
        if signum is not None:
            self.finish(MachineExit(f"stopped by {signal.Signals(signum).name}",
                                    signal_exit=STOP_SIGNALS[signum]))

    # --- running ------------------------------------------------------------

    def run(self, start=None):
        """Start the vCPUs (after start(), if given) and dispatch events until
        a reason to stop comes; return it once every vCPU has stopped.
        Call from the main thread."""
        old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        old_handlers[KICK_SIGNAL] = signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        try:
            self.loop.add_reader(self._wake_fd, self._on_wake, "the wake-up eventfd")
            if start is not None:
                start()
            for thread in self.threads:
                thread.start()
            self.loop.run_until(lambda: self.stopping)
        finally:
            self.stop_vcpus()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        return self.result

    def _kick_vcpus(self):
        for thread in self.threads:
            thread.kick(KICK_SIGNAL)

    def stop_vcpus(self, timeout=VCPU_STOP_TIMEOUT):
        """Kick every vCPU until its thread has ended; those that do not end
        within timeout are left in self.stuck (and their fds open)."""
        self.stopping = True
        deadline = time.monotonic() + timeout
        alive = [t for t in self.threads if t.is_alive()]
        while alive and time.monotonic() < deadline:
            for thread in alive:
                thread.kick(KICK_SIGNAL)
            for thread in alive:
                thread.join(0.05)
            alive = [t for t in alive if t.is_alive()]
        self.stuck = alive
        for thread in alive:
            log.warning("vCPU thread %s did not stop within %g s; its resources are left to "
                        "the process exit", thread.name, timeout)
