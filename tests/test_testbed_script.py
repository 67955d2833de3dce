"""scripts/testbed itself: each launches_testbed test boots one testbed VM from the host."""

import os
import signal
import subprocess
import tempfile
import textwrap
import time

import pytest



def run_testbed(top, *command, timeout=300, **kw):
    return subprocess.run([str(top / "scripts" / "testbed"), *command], cwd=top,
                          capture_output=True, text=True, timeout=timeout, **kw)


def qemu_processes():
    out = subprocess.run(["pgrep", "-f", "pyvmm_testbed.job="], capture_output=True, text=True)
    return out.stdout.split()


@pytest.mark.launches_testbed
def test_command_sees_kvm_vhost_checkout_and_environment(top):
    marker = top / ".testbed-write-check"
    marker.unlink(missing_ok=True)
    script = r"""
        set -e
        test -c /dev/kvm && test -c /dev/vhost-net && test -c /dev/vhost-vsock && test -c /dev/net/tun
        test "$(cat /sys/module/kvm_amd/parameters/npt)" = N     # no nested paging (issue 24)
        python3 -c 'import pyvmm'
        echo "cwd=$(pwd) var=$PYVMM_TEST_VAR"
        echo to-stderr >&2
        touch .testbed-write-check                           # the checkout is writable
        ! touch /var/tmp/.pyvmm-testbed-ro 2>/dev/null        # the rest is read-only
        python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind("/tmp/s")'
        test "$(stat -f -c %T /tmp)" = tmpfs
        exit 3
    """
    env = dict(os.environ, PYVMM_TEST_VAR="it's passed")
    env.pop("PYVMM_TESTBED_CPU", None)
    try:
        r = run_testbed(top, "--", "sh", "-c", script, env=env)
        assert r.returncode == 3, r.stderr
        assert r.stdout == f"cwd={top} var=it's passed\n"
        assert "to-stderr\n" in r.stderr
        assert "command started" in r.stderr
        assert marker.exists()
    finally:
        marker.unlink(missing_ok=True)


@pytest.mark.launches_testbed
def test_timeout_kills_the_vm(top):
    r = run_testbed(top, "--timeout", "20", "--", "sleep", "600")
    assert r.returncode == 124
    assert "timeout" in r.stderr
    assert qemu_processes() == []


@pytest.mark.launches_testbed
def test_vm_dying_is_a_testbed_error(top):
    # Power the testbed VM off under the command: no exit status comes back.
    r = run_testbed(top, "--", "sh", "-c", "echo o > /proc/sysrq-trigger; sleep 60")
    assert r.returncode == 125
    assert "before the command reported its exit status" in r.stderr


@pytest.mark.launches_testbed
def test_interrupt_leaves_no_qemu_behind(top):
    proc = subprocess.Popen([str(top / "scripts" / "testbed"), "--", "sleep", "600"],
                            cwd=top, stderr=subprocess.PIPE, text=True)
    try:
        # Wait until the command runs inside, then press "Ctrl-C".
        for line in proc.stderr:
            if "command started" in line:
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        proc.kill()
    time.sleep(0.5)
    assert qemu_processes() == []


def test_bad_usage_is_one_line(top):
    r = run_testbed(top)
    assert r.returncode == 2
    assert "no command given" in r.stderr
    assert "Traceback" not in r.stderr


def test_refuses_to_nest(top):
    r = run_testbed(top, "--", "true", env=dict(os.environ, PYVMM_TESTBED="1"))
    assert r.returncode == 125
    assert "already inside the testbed" in r.stderr


@pytest.mark.launches_testbed
def test_a_checkout_under_tmp_works_too(top, tmp_path):
    """The testbed's /tmp is a fresh tmpfs; a checkout there is still shared."""
    clone = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(top), str(clone)], check=True)
    r = run_testbed(clone, "--", "sh", "-c", "pwd; test -x scripts/testbed && touch written")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{clone}\n"
    assert (clone / "written").exists()


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_a_cache_others_can_write_is_not_trusted(top, mode):
    cache = tempfile.mkdtemp(prefix="pyvmm-cache-test-", dir="/var/tmp")
    try:
        os.chmod(cache, mode)
        r = run_testbed(top, "--", "true", env=dict(os.environ, PYVMM_TESTBED_CACHE=cache))
        assert r.returncode == 125
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "is not yours alone" in lines[0], r.stderr
    finally:
        os.rmdir(cache)


def load_testbed(top):
    import importlib.machinery
    import importlib.util
    loader = importlib.machinery.SourceFileLoader("testbed", str(top / "scripts" / "testbed"))
    spec = importlib.util.spec_from_loader("testbed", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def beat(log, watch, *cpus):
    """testbed-init's heartbeat lines from cpus on the console log; the watch
    sees no lock-up in them."""
    with open(log, "ab") as f:
        for cpu in cpus:
            f.write(b"testbed-init: heartbeat of CPU %d, up 30.0 s\n" % cpu)
    assert watch.lockup() is None


class FakeMonitor:
    """QEMU 7.2's human monitor on tmp_path/monitor, in a thread: it greets,
    records each command it gets and answers it with answer and a prompt."""

    def __init__(self, tmp_path, answer=b""):
        import socket
        import threading
        self.answer, self.received = answer, []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(tmp_path / "monitor"))
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        with conn:
            try:
                conn.sendall(b"QEMU 7.2.0 monitor - type 'help' for more information\r\n"
                             b"(qemu) ")
                while command := conn.recv(4096):
                    self.received.append(command)
                    conn.sendall(command.replace(b"\n", b"\r\n") + self.answer + b"(qemu) ")
            except OSError:
                pass                # the client went without reading the answer

    def close(self):
        self.thread.join(5)
        self.listener.close()


def test_a_locked_up_testbed_kernel_is_noticed_from_its_console(top, tmp_path):
    testbed = load_testbed(top)
    log = tmp_path / "console.log"
    watch = testbed.ConsoleWatch(log)
    assert watch.lockup() is None                      # no console yet
    log.write_bytes(b"[    3.1] virtio_net virtio0 eth0: ...\n[ 142.9] rcu: INFO: rcu_pre")
    assert watch.lockup() is None
    with open(log, "ab") as f:                         # the line completes later
        f.write(b"empt self-detected stall on CPU\n")
    assert watch.lockup() == "rcu_preempt self-detected stall"


def test_a_silent_testbed_kernel_is_noticed_by_its_missing_heartbeat(top, tmp_path):
    testbed = load_testbed(top)
    log = tmp_path / "console.log"
    now = [0.0]
    watch = testbed.ConsoleWatch(log, clock=lambda: now[0])
    log.write_bytes(b"[    1.0] booting\n")
    now[0] = 1000.0
    assert watch.lockup() is None                      # no heartbeat yet: not armed
    beat(log, watch, 0, 1)
    now[0] += testbed.ConsoleWatch.SILENCE - 1
    assert watch.lockup() is None
    beat(log, watch, 0, 1)                             # both went on beating
    now[0] += testbed.ConsoleWatch.SILENCE - 1
    with open(log, "ab") as f:                         # a line still being written
        f.write(b"testbed-init: heartbeat of CP")
    assert watch.lockup() is None
    with open(log, "ab") as f:
        f.write(b"U 1, up 90.0 s\n")
    assert watch.lockup() is None
    now[0] += 2
    # CPU 0 halted and never woken: nothing queued on it runs, CPU 1 goes on.
    assert watch.lockup() == f"no heartbeat from its CPU 0 for " \
                             f"{testbed.ConsoleWatch.SILENCE + 1} s"


def test_the_testbed_tier_resumes_with_the_tests_not_yet_passed(pytester, monkeypatch, top):
    """--passed-file (tests/conftest.py): what passed is written down, and the
    next run (in a new testbed VM, after the last one froze) collects only
    the rest: a failure, an error in teardown and the unrun all run again.
    Laid out as the checkout is (the conftest under tests/, found through
    testpaths), and given as scripts/test gives it: "--passed-file=PATH" in
    one word. (In two, pytest's first look at the arguments, before the
    conftest adds the option, takes PATH for a test path once the file
    exists, and never loads tests/conftest.py: the option is then unknown.)"""
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\ntestpaths = ["tests"]\n')
    tests = pytester.mkdir("tests")
    (tests / "conftest.py").write_text((top / "tests" / "conftest.py").read_text())
    (tests / "test_resume.py").write_text(textwrap.dedent("""
        import os, pytest
        def test_passes(): pass
        def test_fails(): assert 0
        @pytest.fixture
        def breaks():
            yield
            raise RuntimeError("in teardown")
        def test_breaks_in_teardown(breaks): pass
        def test_freezes():
            if not os.environ.get("THAWED"):
                os._exit(125)          # the VM froze here
    """))
    passed = pytester.path / ".testbed-passed"
    option = f"--passed-file={passed}"
    pytester.runpytest_subprocess("-p", "no:cacheprovider", option)
    assert passed.read_text() == "tests/test_resume.py::test_passes\n"
    monkeypatch.setenv("THAWED", "1")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", option)
    result.assert_outcomes(passed=2, failed=1, errors=1, deselected=1)
    assert passed.read_text().split() == ["tests/test_resume.py::test_passes",
                                          "tests/test_resume.py::test_freezes"]


def test_a_lock_up_report_says_where_each_vcpu_is(top, tmp_path):
    """On a lock-up scripts/testbed asks QEMU's monitor for each vCPU's
    registers (a vCPU halted for good shows HLT=1 and a RIP that never
    moves); here a fake monitor answers as QEMU 7.2 does."""
    testbed = load_testbed(top)
    registers = "".join(
        f"CPU#{n}\r\nRAX=0000000000000000 RBX=0000000000000000\r\n"
        f"RIP={rip} RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT={hlt}\r\n"
        f"CS =0010 0000000000000000 ffffffff 00a09b00 DPL=0 CS64 [-RA]\r\n"
        f"CR0=80050033 CR2=0000000000000000 CR3={cr3} CR4=00350ef0\r\n"
        for n, rip, cr3, hlt in [(0, "ffffffff8102c3a1", "0000000001a0a000", 0),
                                 (1, "ffffffff81a592eb", "0000000006cf0000", 1)])
    monitor = FakeMonitor(tmp_path, registers.encode())
    report = testbed.vcpu_states(tmp_path, samples=2)
    monitor.close()
    assert monitor.received == [b"info registers -a\n"] * 2
    assert report.splitlines() == [
        f"  | sample {s}: CPU#{line}" for s in (0, 1) for line in (
            "0 RIP=ffffffff8102c3a1 CS=0010 CR3=0000000001a0a000 RFL=00000246 HLT=0",
            "1 RIP=ffffffff81a592eb CS=0010 CR3=0000000006cf0000 RFL=00000246 HLT=1")]
    assert "did not answer" in testbed.vcpu_states(tmp_path / "nowhere")


def test_a_rerun_test_s_first_failure_is_shown(pytester, top):
    """The testbed tier reruns a failed test once; its first failure is in the
    log too (tests/conftest.py), not only its name."""
    pytester.makeconftest((top / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_flaky="""
        def test_flaky(tmp_path_factory):
            marker = tmp_path_factory.getbasetemp() / "failed-once"
            if not marker.exists():
                marker.touch()
                assert 0, "the guest reset the machine"
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--reruns", "1")
    result.stdout.fnmatch_lines(["*1 passed, 1 rerun*"])
    result.stdout.fnmatch_lines(["*first attempt of test_flaky.py::test_flaky (call)*",
                                 "*AssertionError: the guest reset the machine*"])


def test_a_silent_cpu_gets_one_nmi_before_the_vm_is_given_up(top, tmp_path):
    """A vCPU halted and never woken (its timer interrupt lost) might be woken
    by an NMI, which ends a HLT: at WAKE seconds of silence scripts/testbed
    sends one (QEMU's monitor, `nmi`), once per silence, says so, and says
    when the CPU beats again; at SILENCE it gives the VM up as before."""
    testbed = load_testbed(top)
    log = tmp_path / "console.log"
    now = [1000.0]
    watch = testbed.ConsoleWatch(log, clock=lambda: now[0])
    log.write_bytes(b"")
    beat(log, watch, 0, 1)
    now[0] += testbed.ConsoleWatch.WAKE - 1
    beat(log, watch, 1)
    assert watch.to_wake() == []
    now[0] += 2
    beat(log, watch, 1)
    assert watch.to_wake() == [0]
    assert watch.to_wake() == [] and watch.woken() == []     # one NMI per silence
    beat(log, watch, 0)
    assert watch.woken() == [0]
    now[0] += testbed.ConsoleWatch.WAKE + 1
    assert watch.lockup() is None and watch.to_wake() == [0, 1]   # silent again: again

    monitor = FakeMonitor(tmp_path)
    testbed.monitor_command(tmp_path, b"nmi")
    monitor.close()
    assert monitor.received == [b"nmi\n"]
