"""pyvmm boots the tiny guest under real KVM (inside scripts/testbed)."""

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvmm import guest

pytestmark = pytest.mark.testbed

PYVMM = [sys.executable, "-m", "pyvmm"]
TOP = Path(guest.IMAGES).parent


def pyvmm_run(*args, timeout=180):
    return subprocess.run([*PYVMM, "run", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=TOP, stdin=subprocess.DEVNULL)


def test_command_exit_status_comes_back(transport):
    """Only the command's output, on either transport (a guest kernel with
    PCI that found no bus at all would print an error first)."""
    r = pyvmm_run("--", "sh", "-c", "echo 'from the guest'; exit 7")
    assert r.returncode == 7, r.stderr
    assert r.stdout == "from the guest\n"


def test_two_cpus_and_512m_of_memory():
    r = pyvmm_run("--cpus", "2", "--mem", "512M", "--",
                  "sh", "-c", "test $(nproc) = 2 && grep MemTotal /proc/meminfo")
    assert r.returncode == 0, r.stdout + r.stderr
    kib = int(re.search(r"MemTotal:\s+(\d+) kB", r.stdout).group(1))
    assert abs(kib * 1024 - (512 << 20)) <= 0.1 * (512 << 20)


def test_bzimage_boots_too():
    r = pyvmm_run("--kernel", str(guest.BZIMAGE), "--", "uname", "-r")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("6.12.")


def test_memory_above_the_4g_hole():
    r = pyvmm_run("--mem", "5G", "--", "grep", "MemTotal", "/proc/meminfo")
    assert r.returncode == 0, r.stderr
    kib = int(re.search(r"MemTotal:\s+(\d+) kB", r.stdout).group(1))
    assert kib * 1024 > 4.5 * (1 << 30)


def test_stats_show_boot_time_and_exits():
    r = pyvmm_run("--stats", "--", "true")
    assert r.returncode == 0, r.stderr
    assert re.search(r"guest init reached after \d+\.\d+ s", r.stderr)
    io_line = next(line for line in r.stderr.splitlines() if line.strip().startswith("io "))
    assert "serial" in io_line and "exit-port 1" in io_line


def test_console_to_a_file(tmp_path):
    log = tmp_path / "console.log"
    r = pyvmm_run("--console", f"file:{log}", "--", "echo", "into the file")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert "into the file\n" in log.read_text()


def test_reset_without_status_is_reported():
    # reboot -f skips the init's exit report: the guest just resets.
    r = pyvmm_run("--", "reboot", "-f")
    assert r.returncode == 125
    assert "reset the machine" in r.stderr
    assert "Traceback" not in r.stderr


def test_sigint_stops_a_running_guest():
    proc = subprocess.Popen([*PYVMM, "run", "--", "sh", "-c", "echo ready; sleep 600"],
                            cwd=TOP, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        assert "stopped by SIGINT" in proc.stderr.read()
    finally:
        proc.kill()


class Terminal:
    """pyvmm on a pseudo-terminal, as a user at a shell prompt would run it."""

    def __init__(self, *args, stderr_path=None):
        """stderr_path: send pyvmm's stderr there instead of to the terminal."""
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.chdir(TOP)
            if stderr_path:
                os.dup2(os.open(stderr_path, os.O_WRONLY | os.O_CREAT, 0o600), 2)
            os.execv(sys.executable, [*PYVMM, "run", *args])
        self.seen = b""

    def expect(self, pattern, timeout=120):
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.seen):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {pattern!r}; saw {self.seen[-500:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:  # EIO: pyvmm exited and closed the terminal
                    break
        assert re.search(pattern, self.seen), f"no {pattern!r} in {self.seen[-500:]!r}"

    def type(self, text):
        os.write(self.fd, text)

    def exit_status(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining so pyvmm never blocks on a full terminal
                if select.select([self.fd], [], [], 0.2)[0]:
                    self.seen += os.read(self.fd, 4096)
            except OSError:
                time.sleep(0.2)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"pyvmm did not exit; saw {self.seen[-500:]!r}")


def test_interactive_shell_then_poweroff():
    term = Terminal()
    term.expect(rb"Ctrl-A x quits")
    term.expect(rb"/root # ")
    term.type(b"echo $((6 * 7)) > /tmp/x; cat /tmp/x\r")
    term.expect(rb"\r\n42\r\n")
    term.type(b"poweroff\r")
    assert term.exit_status() == 0


def test_interactive_ctrl_a_x_quits():
    term = Terminal("--cpus", "2")
    term.expect(rb"/root # ")
    term.type(b"\x01x")
    assert term.exit_status() == 130


def test_a_hung_up_terminal_ends_the_vm_cleanly(tmp_path):
    """The terminal goes away under an interactive session (an ssh drop): one
    line and an exit, no traceback from restoring a terminal that is gone."""
    err = tmp_path / "stderr"
    term = Terminal(stderr_path=err)
    term.expect(rb"/root # ")
    os.close(term.fd)                           # hang up
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pid, status = os.waitpid(term.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.2)
    else:
        os.kill(term.pid, signal.SIGKILL)
        raise AssertionError(f"pyvmm did not exit after the hang-up: {err.read_text()}")
    assert os.waitstatus_to_exitcode(status) in (125, 129), err.read_text()
    assert "Traceback" not in err.read_text()


def test_a_console_nobody_reads_does_not_stop_the_guest():
    """stdout is a pipe nobody reads: once it is full, the guest's output is
    dropped and counted, and the guest still runs to its end."""
    proc = subprocess.Popen([*PYVMM, "run", "--", "sh", "-c",
                             "head -c 150000 /dev/zero | tr '\\0' x; echo; exit 3"],
                            cwd=TOP, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        status = proc.wait(timeout=300)       # nothing reads stdout meanwhile
    finally:
        proc.kill()
    out, err = proc.stdout.read(), proc.stderr.read().decode()
    assert status == 3, err
    assert len(out) >= 64 << 10               # a full pipe's worth came through
    assert "Traceback" not in err
