"""scripts/bench's transfer helpers on loopback: a failed run is a RunFailed
that the other runs survive, never a TypeError or a deadline meant for
something else."""

import importlib.machinery
import importlib.util
import socket
import subprocess
import threading
import time

import pytest

from conftest import TOP


def load_bench():
    loader = importlib.machinery.SourceFileLoader("bench", str(TOP / "scripts" / "bench"))
    spec = importlib.util.spec_from_loader("bench", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


bench = load_bench()


@pytest.fixture
def vmm():
    """A process standing in for the VMM: alive, printing nothing."""
    proc = subprocess.Popen(["sleep", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield proc, bench.Output(proc)
    proc.kill()
    proc.wait()


def test_a_connection_that_brings_nothing_is_a_failed_run():
    a, b = socket.socketpair()
    b.close()
    with a, pytest.raises(bench.RunFailed, match="closed before any data"):
        bench.receive_all(a, 1 << 20, check=lambda when: None)


def test_a_transfer_gets_its_own_deadline_not_the_connects(vmm):
    """Connecting may take at most connect_timeout; the send that follows may
    take longer than that (64 MiB at nested speeds), up to its own timeout."""
    proc, out = vmm
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    got = []

    def slow_reader():
        conn, _ = listener.accept()
        time.sleep(2.5)                    # longer than the connect timeout below
        with conn:
            while chunk := conn.recv(1 << 16):
                got.append(len(chunk))
    reader = threading.Thread(target=slow_reader)
    reader.start()
    data = bytes(4 << 20)
    bench.send_to_guest(listener.getsockname(), data, proc, out, timeout=60,
                        connect_timeout=0.5)
    reader.join(30)
    listener.close()
    assert sum(got) == len(data)


def test_a_vmm_that_dies_during_a_send_fails_the_run(vmm):
    proc, out = vmm
    a, b = socket.socketpair()
    proc.kill()
    proc.wait()
    with a, b, pytest.raises(bench.RunFailed, match="exited"):
        bench.send_all(a, bytes(16 << 20),
                       lambda when: bench.check_alive(proc, out, None, when))


def test_a_boot_that_fails_is_a_failed_run():
    with pytest.raises(bench.RunFailed, match="before the guest printed its ready line"):
        bench.measure(["false"])


def test_streams_in_parallel_give_their_results_or_the_first_failure():
    """bench net --queues N receives and sends N streams at once: each
    stream's result comes back in order, and a failed one fails the run
    once all have ended."""
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    with a, b, c, d:
        for sender, data in ((b, b"x" * 1000), (d, b"y" * 2000)):
            sender.sendall(data)
            sender.shutdown(socket.SHUT_WR)
        first, second = bench.in_parallel([
            lambda: bench.receive_all(a, 1000, check=lambda when: None),
            lambda: bench.receive_all(c, 2000, check=lambda when: None)])
    assert (first[0], second[0]) == (1000, 2000) and first[2] <= first[3]

    def fails():
        raise bench.RunFailed("stream 1 broke")
    with pytest.raises(bench.RunFailed, match="stream 1 broke"):
        bench.in_parallel([lambda: time.sleep(0.2), fails])


def test_the_ring_benchmark_runs_here_with_no_vm(capsys):
    """`scripts/bench ring` is the back-end's request path alone: it needs no
    KVM, serves every request (bench_ring checks each used element) and says
    what a descriptor costs."""
    bench.bench_ring(1)
    out = capsys.readouterr().out
    assert "86-descriptor read chains" in out
    assert float(out.split("Python's part")[1].split(",")[1].split()[0]) > 0, out
    assert "whole in C, less the preadv" in out        # the compiled walk is built here


def test_bench_connect_measures_both_back_ends(capsys):
    """bench connect on this host, a short run: both back-ends served every
    connection (a failed one would print FAILED and end in SystemExit), and
    the table has a CPU time for each and their ratio."""
    bench.bench_connect(1, later=3)
    out, err = capsys.readouterr()
    assert "FAILED" not in err
    rows = {line[:22].strip(): line[22:].split() for line in out.splitlines()
            if line.startswith(("first connection", "later, each"))}
    assert set(rows) == {"first connection", "later, each"}
    for qsd, _, pyvmm, _, ratio in rows.values():
        assert float(qsd) > 0 and float(pyvmm) > 0 and float(ratio) > 0
