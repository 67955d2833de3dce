"""Running pyvmm with a guest command from a test, and talking to the guest."""

import hashlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pyvmm import guest

PYVMM = [sys.executable, "-m", "pyvmm"]
TOP = Path(guest.IMAGES).parent


def start(*args, guest_cmd):
    return subprocess.Popen([*PYVMM, "run", *args, "--", "sh", "-c", guest_cmd], cwd=TOP,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)


def finish(proc, timeout=240):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGINT first: pyvmm stops the guest and, with --stats, says where
        # each virtio queue was left (which tells a lost interrupt from a
        # back-end that never answered).
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"pyvmm did not finish in {timeout} s\nstdout: {out[-2000:]}\n"
                             f"stderr: {err[-2000:]}")
    return proc.returncode, out, err


def connect_with_retry(addr, deadline=120, family=socket.AF_INET):
    """Connect once the guest's listener is up (the guest boots meanwhile)."""
    end = time.monotonic() + deadline
    while True:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(60)
        try:
            s.connect(addr)
            return s
        except OSError:
            s.close()
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


def guest_sha256(out):
    m = re.search(r"^([0-9a-f]{64})\s", out, re.M)
    assert m, f"no checksum in the guest's output: {out[-1000:]}"
    return m.group(1)


def qemu_microvm(kernel, *append, devices=(), timeout=120, shared_memory=False):
    """Boot the tiny guest with QEMU -M microvm; return the CompletedProcess.

    shared_memory: guest RAM in a shared memfd and modern virtio-mmio, as
    vhost-user back-ends need (HOST-FACTS section 5)."""
    machine, memory = "microvm,acpi=off", []
    if shared_memory:
        machine += ",memory-backend=mem"
        memory = ["-object", "memory-backend-memfd,id=mem,size=256M,share=on",
                  "-global", "virtio-mmio.force-legacy=false"]
    cmd = [
        "qemu-system-x86_64", "-M", machine, "-accel", "kvm", "-cpu", "host",
        "-m", "256M", *memory, "-smp", "2", "-nodefaults", "-no-reboot", "-display", "none",
        "-serial", "stdio", "-device", f"isa-debug-exit,iobase={guest.EXIT_PORT:#x},iosize=4",
        "-kernel", str(kernel), "-initrd", str(guest.INITRAMFS),
        "-append", " ".join([guest.BASE_CMDLINE, *append]), *devices,
    ]
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)


def qemu_exit_status(guest_status):
    """isa-debug-exit makes QEMU exit with (status << 1) | 1."""
    return (guest_status << 1) | 1


class HybridVsockHost:
    """The host side of a vsock back-end in the hybrid model (`pyvmm backend
    vsock --uds-path UDS`): a program listening on UDS_5000 for the guest,
    and one reaching the guest's port 5001 with CONNECT 5001. With the guest
    running guest_script(size): size random bytes each way, checked."""

    def __init__(self, uds, size):
        self.uds, self.size = uds, size
        self.to_guest, self.from_guest = os.urandom(size), hashlib.sha256()
        self.errors = []
        self.threads = [threading.Thread(target=f, daemon=True)
                        for f in (self._listen, self._connect)]

    @staticmethod
    def guest_script(size):
        return (f"vsock listen 5001 < /dev/null > /tmp/r && sha256sum /tmp/r && "
                f"head -c {size} /dev/urandom > /tmp/d && sha256sum /tmp/d && "
                f"vsock connect 2 5000 < /tmp/d && echo sent")

    def start(self):
        for t in self.threads:
            t.start()

    def _listen(self):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
                listener.bind(f"{self.uds}_5000")
                listener.listen(1)
                listener.settimeout(200)
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(60)
                    while chunk := conn.recv(1 << 16):
                        self.from_guest.update(chunk)
        except OSError as e:
            self.errors.append(f"host port 5000: {e}")

    def _connect(self):
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(60)
                try:
                    s.connect(self.uds)
                    s.sendall(b"CONNECT 5001\n")
                    answer = s.recv(64)
                except OSError:
                    answer = b""
                if answer.startswith(b"OK "):
                    s.sendall(self.to_guest)
                    return
            time.sleep(0.5)                   # the guest is not listening yet
        self.errors.append("the guest never accepted CONNECT 5001")

    def check(self, out):
        """After the guest ran guest_script: both streams arrived intact."""
        for t in self.threads:
            t.join(60)
        assert not self.errors, self.errors
        sums = re.findall(r"^([0-9a-f]{64})\s", out, re.M)
        assert sums == [hashlib.sha256(self.to_guest).hexdigest(),
                        self.from_guest.hexdigest()], out
        assert "sent" in out


def wait_for_line(proc, text, timeout=240):
    """Read the guest's output until text appears (the output so far). Straight
    from the pipe: a buffered readline() could keep the line select() waits for."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, f"no {text!r}; saw {seen[-2000:]!r}"
        if select.select([proc.stdout], [], [], left)[0]:
            seen += os.read(proc.stdout.fileno(), 65536)
    return seen.decode(errors="replace")


def drain(proc, seen):
    """What the guest printed since (without waiting)."""
    while select.select([proc.stdout], [], [], 0)[0]:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        seen += chunk.decode(errors="replace")
    return seen


# The registers a guest touches per request or interrupt, when it does.
DATA_PATH_REGISTERS = {"mmio": ("QueueNotify", "InterruptStatus", "InterruptACK"),
                       "pci": ("notify", "ISR")}


def data_path_exits(err, device, transport):
    """{register: exits} that pyvmm's --stats counted on device's data-path
    registers (virtio-mmio: QueueNotify, InterruptStatus, InterruptACK;
    virtio-pci: the notify and ISR structures)."""
    mmio = next((line for line in err.splitlines() if line.strip().startswith("mmio")), "")
    return {register: int(n) for register in DATA_PATH_REGISTERS[transport]
            for n in re.findall(rf"{device} {register} (\d+)", mmio)}


def msix_interrupts(out, name):
    """The guest's count of MSI-X interrupts on the vector called name
    (e.g. virtio0-input.0), from a `cat /proc/interrupts` in its output."""
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[-1] == name and "PCI-MSIX" in line:
            return sum(int(f) for f in fields[1:] if f.isdigit())
    raise AssertionError(f"no MSI-X vector {name} in the guest's /proc/interrupts:\n{out}")
