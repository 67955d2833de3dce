"""pytest fixtures for testing a vhost-user back-end, registered through the
pytest11 entry point: installing pyvmm is enough.

    def test_reads(vhost_user_driver):
        d = vhost_user_driver(["my-blk", "--socket-path", "{socket}"], config_size=60)
        q = d.start(queues=[(0, 128)])[0]
        assert blk_read(d, q, sector=0, length=512)[0] == 0

vhost_user_backend(command)   starts a back-end program ("{socket}" in its
                              arguments becomes a fresh socket path), waits
                              for it to listen, stops it after the test;
                              returns the socket path. .kill(path) and
                              .restart(path): a crash, and the same program
                              started again (then driver.reconnect())
vhost_user_driver(command or  a guest-less Driver (pyvmm.driver) connected
    socket path)              to it, closed after the test
pyvmm_guest(option, socket,   boots pyvmm's tiny guest with the back-end as
    guest_cmd)                --OPTION vhost-user,socket=PATH, runs guest_cmd;
                              (exit status, output). Needs a KVM that can
                              boot Linux (scripts/testbed where there is none)
vhost_user_check(command or   `pyvmm check` on a back-end: a program the
    socket path, device)      checker starts (again whenever it exits) with
                              --socket-path, or as given if "{socket}" is in
                              its arguments; or the socket of one already
                              running (vhost_user_backend's, say):
                              {rule: (PASS|FAIL|SKIP, detail)}

A program that cannot be started or reached fails the test in one line.
"""

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from pyvmm.sys.process import stop

START_TIMEOUT = 30


@pytest.fixture
def vhost_user_socket():
    """path(name="backend.sock"): a fresh socket path, in a directory of its
    own, removed after the test. Not under tmp_path: a Unix socket's path
    must fit in 108 bytes, and pytest's tmp_path of a long test name does not."""
    directory = tempfile.mkdtemp(prefix="vhost-user-")
    numbers = itertools.count()

    def path(name="backend.sock"):
        own = os.path.join(directory, str(next(numbers)))
        os.mkdir(own)
        return os.path.join(own, name)
    yield path
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def vhost_user_backend(vhost_user_socket):
    """start(command): run a back-end program ("{socket}" in its arguments
    becomes a fresh socket path) until the test ends; the socket path.
    start.kill(path) kills it (SIGKILL, as a crash would) and
    start.restart(path) runs the same command on the same socket again:
    for testing what a reconnecting front-end (driver.reconnect()) finds."""
    started = {}                       # socket path -> [argv, Popen]

    def spawn(argv, sock, timeout):
        from pyvmm.check.target import ready
        if os.path.lexists(sock):
            os.unlink(sock)            # a killed back-end's: wait for the new one's
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
        except OSError as e:
            fail(cannot_start(argv, e))
        started[sock] = [argv, proc]
        deadline = time.monotonic() + timeout
        while not ready(sock):           # (listening: not only its file there)
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out = proc.communicate()[0]
                fail(f"{argv[0]} did not listen on {sock} within {timeout} s "
                     f"(exit status {proc.returncode}):\n{out[-2000:]}")
            time.sleep(0.02)
        return sock

    def start(command, socket_name="backend.sock", timeout=START_TIMEOUT):
        sock = vhost_user_socket(socket_name)
        return spawn(with_socket(command, sock), sock, timeout)

    def kill(sock):
        proc = started[sock][1]
        proc.kill()
        proc.communicate()

    def restart(sock, timeout=START_TIMEOUT):
        argv, proc = started[sock]
        stop(proc)
        return spawn(argv, sock, timeout)

    start.kill, start.restart = kill, restart
    yield start
    for _, proc in started.values():
        stop(proc)


@pytest.fixture
def vhost_user_driver(vhost_user_backend):
    """connect(command or socket path, config_size=0): a guest-less Driver
    (pyvmm.driver) on that back-end; call .start(queues=...) on it."""
    drivers = []

    def connect(backend, config_size=0, timeout=10.0):
        from pyvmm.driver import vhost_user
        sock = backend if isinstance(backend, str) else vhost_user_backend(backend)
        driver = vhost_user(sock, config_size=config_size, timeout=timeout)
        drivers.append(driver)
        return driver

    yield connect
    for driver in drivers:
        driver.close()


@pytest.fixture
def pyvmm_guest(vhost_user_backend):
    """boot(option, command or socket path, guest_cmd): pyvmm's tiny guest with
    --OPTION vhost-user,socket=PATH running guest_cmd; (exit status, output)."""
    def boot(option, backend, guest_cmd, timeout=300, extra=()):
        sock = backend if isinstance(backend, str) else vhost_user_backend(backend)
        r = subprocess.run([sys.executable, "-m", "pyvmm", "run", f"--{option}",
                            f"vhost-user,socket={sock}", *extra, "--", "sh", "-c", guest_cmd],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
        return r.returncode, r.stdout + r.stderr
    return boot


@pytest.fixture
def vhost_user_check(vhost_user_socket):
    """check(command or socket path, device=None, rules=None): the conformance
    checks of `pyvmm check` ({rule: (result, detail)}). A command is started
    by the checker, again whenever it exits: with --socket-path=PATH added
    (and the program conventions checked), or as given where "{socket}" is
    in it (qemu-storage-daemon's addr.path=, say). A path (str) is the
    socket of a back-end that is already running. must_failures(results)
    lists the MUST rules that failed."""
    from pyvmm.check.run import run_checks
    from pyvmm.check.target import CommandTarget, SocketTarget
    from pyvmm.errors import PyvmmError

    def check(backend, device=None, rules=None, timeout=5.0):
        if isinstance(backend, str):
            target = SocketTarget(backend, timeout)
        elif any("{socket}" in arg for arg in backend):
            sock = vhost_user_socket()
            target = CommandTarget(with_socket(backend, sock), sock, timeout=timeout)
        else:
            target = CommandTarget(backend, timeout=timeout)
        results = []
        try:
            run_checks(target, device, lambda line: None, timeout=timeout,
                       only=set(rules) if rules else None, results=results)
        except FileNotFoundError as e:
            fail(cannot_start(backend, e))
        except (PyvmmError, OSError) as e:
            fail(f"pyvmm check: {target}: {e}")
        finally:
            target.close()
        return {r["rule"]: (r["result"], r["detail"]) for r in results}
    return check


def with_socket(command, sock):
    """command with "{socket}" in its arguments replaced by sock."""
    return [arg.replace("{socket}", sock) for arg in command]


def fail(message):
    """Fail the test with message alone: no traceback, nor the exception it
    came from."""
    failure = pytest.fail.Exception(message, pytrace=False)
    failure.__suppress_context__ = True
    raise failure


def cannot_start(argv, e):
    """One line for a program that could not be started."""
    if isinstance(e, FileNotFoundError):
        return f"{argv[0]}: no such program (not on PATH, or no such file)"
    return f"{argv[0]}: cannot start it: {e.strerror or e}"


def must_failures(results):
    """The MUST and MUST* rules that failed in vhost_user_check's results."""
    from pyvmm.check.rules import CHECKS, MUST_LEVELS
    levels = {c.rule: c.level for c in CHECKS}
    return {rule: detail for rule, (result, detail) in results.items()
            if result == "FAIL" and levels[rule] in MUST_LEVELS}
