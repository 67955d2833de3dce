"""Checks of the back-end program conventions (section M of the back-end
rules: vhost-user.rst's "Backend program conventions" and vhost-user.json),
run when pyvmm check starts the back-end itself (`pyvmm check -- COMMAND`):
each starts its own copy of the program with the options it examines.
"""

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from pyvmm.check.core import Failed, Skipped, check
from pyvmm.check.probe import Probe
from pyvmm.check.target import connect_when_listening, listening_inode
from pyvmm.sys.process import stop
from pyvmm.vhost.user.channel import Connection
from pyvmm.vhost.user.errors import ChannelError
from pyvmm.vhost.user.messages import FrontendReq as R

QUICK = 5.0                   # "fails early", "ends quickly": seconds
# vhost-user.json: VHostUserBackendType, and the features of the types that have them.
BACKEND_TYPES = ("9p", "balloon", "block", "caif", "console", "crypto", "gpu", "input", "net",
                 "rng", "rpmsg", "rproc-serial", "scsi", "vsock", "fs")
TYPE_FEATURES = {"input": ("evdev-path", "no-grab"), "gpu": ("render-node", "virgl")}
DESCRIPTION_DIRS = ("/usr/share/qemu/vhost-user", "/etc/qemu/vhost-user",
                    os.path.join(os.environ.get("XDG_CONFIG_HOME")
                                 or os.path.expanduser("~/.config"), "qemu/vhost-user"))


def command_of(ctx):
    if ctx.target.command is None:
        raise Skipped("the program conventions are checked when pyvmm check starts the "
                      "back-end (pyvmm check -- COMMAND)")
    return ctx.target.command


def run_once(argv, timeout=QUICK):
    """argv to its end; (exit status, stdout), or Failed if it outlives timeout."""
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Failed(f"`{' '.join(argv)}` was still running after {timeout:g} s") from None
    return r.returncode, r.stdout


@contextlib.contextmanager
def launched(ctx, options, pass_fds=(), quiet=False):
    """The command with options, running until the block ends; yields its Popen.
    quiet: stdin, stdout and stderr on /dev/null (BE-118)."""
    out = subprocess.DEVNULL if quiet else subprocess.PIPE
    proc = subprocess.Popen([*command_of(ctx), *options], stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT, pass_fds=pass_fds,
                            start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc, QUICK)
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # what it left behind (BE-109)
        except ProcessLookupError:
            pass
        if proc.stdout is not None:
            proc.stdout.close()


def answered(path, proc, timeout):
    """Wait for proc to listen on path; a Probe that got GET_FEATURES answered."""
    try:
        conn = connect_when_listening(path, proc, timeout)
    except ChannelError as e:
        raise Failed(str(e)) from None
    return features_answered(conn, proc)


def features_answered(conn, proc):
    """A Probe on conn (a Connection to proc) that got GET_FEATURES answered."""
    p = Probe(conn)
    try:
        reply = p.ask(R.GET_FEATURES)
    except ChannelError as e:
        p.close()
        gone = proc.poll()
        raise Failed(f"{e}" + (f" (the program exited with status {gone})"
                               if gone is not None else "")) from None
    if reply.request != R.GET_FEATURES:
        p.close()
        raise Failed(f"sent GET_FEATURES; got {reply}")
    return p


@contextlib.contextmanager
def socket_dir():
    d = tempfile.mkdtemp(prefix="pyvmm-check-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@check("BE-107", "SHOULD", "an installed back-end has a vhost-user.json description file")
def description_file(ctx):
    binary = shutil.which(command_of(ctx)[0])
    if binary is None:
        raise Skipped(f"{command_of(ctx)[0]} is not a program on PATH")
    binary = os.path.realpath(binary)
    for directory in DESCRIPTION_DIRS:
        for name in sorted(glob.glob(os.path.join(directory, "*.json"))):
            try:
                with open(name) as f:
                    description = json.load(f)
            except (OSError, ValueError):
                continue
            if not isinstance(description, dict) or not isinstance(description.get("binary"),
                                                                    str):
                continue
            if os.path.realpath(description["binary"]) != binary:
                continue
            if not os.path.isabs(description["binary"]):
                raise Failed(f"{name}: binary {description['binary']!r} is not absolute")
            if description.get("type") not in BACKEND_TYPES:
                raise Failed(f"{name}: type {description.get('type')!r} is not one of "
                             f"vhost-user.json's")
            return
    raise Failed(f"no description file in {', '.join(DESCRIPTION_DIRS)} names {binary}")


@check("BE-108", "SHOULD", "a program that cannot start fails early with a non-zero status")
def fails_early(ctx):
    status, _ = run_once([*command_of(ctx), "--socket-path=/nonexistent-pyvmm-dir/be.sock"])
    if status == 0:
        raise Failed("with --socket-path in a directory that does not exist: exit status 0")


@check("BE-109", "MUST", "the program does not daemonize itself")
def no_daemon(ctx):
    with socket_dir() as d, launched(ctx, [f"--socket-path={d}/be.sock"]) as proc:
        answered(f"{d}/be.sock", proc, ctx.timeout).close()
        if proc.poll() is not None:
            raise Failed(f"the process started exited (status {proc.returncode}) while "
                         f"something else serves the socket")
        inode = listening_inode(f"{d}/be.sock")
        fds = glob.glob(f"/proc/{proc.pid}/fd/*")
        if inode and not any(_link(fd) == f"socket:[{inode}]" for fd in fds):
            raise Failed(f"process {proc.pid} does not hold the listening socket: another "
                         f"process does")


def _link(path):
    try:
        return os.readlink(path)
    except OSError:
        return None


@check("BE-110", "MUST", "SIGTERM ends the program quickly, also with a front-end connected")
def sigterm(ctx):
    for connected in (False, True):
        with socket_dir() as d, launched(ctx, [f"--socket-path={d}/be.sock"]) as proc:
            p = answered(f"{d}/be.sock", proc, ctx.timeout)
            if not connected:
                p.close()
                time.sleep(0.1)
            proc.terminate()
            try:
                proc.wait(QUICK)
            except subprocess.TimeoutExpired:
                raise Failed(f"still running {QUICK:g} s after SIGTERM "
                             f"({'with' if connected else 'without'} a front-end)") from None
            finally:
                p.close()


@check("BE-111", "MUST", "--socket-path=PATH is where it listens")
def socket_path(ctx):
    with socket_dir() as d, launched(ctx, [f"--socket-path={d}/be.sock"]) as proc:
        answered(f"{d}/be.sock", proc, ctx.timeout).close()


@check("BE-112", "MUST", "--fd=N serves the socket it inherits as fd N (listening or connected)")
def inherited_fd(ctx):
    """The spec does not say which kind of socket fd N is: pyvmm's back-ends
    take a listening one, vhost-user-gpu a connected one. Either passes."""
    failures = []
    for kind, attempt in (("a listening socket", _listening_fd),
                          ("a connected socket (a socketpair end)", _connected_fd)):
        try:
            attempt(ctx)
            return
        except Failed as e:
            failures.append(f"with {kind}: {e}")
    raise Failed("; ".join(failures))


def _listening_fd(ctx):
    with socket_dir() as d:
        path = f"{d}/be.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        fd = listener.fileno()                 # the same number in the child (pass_fds)
        try:
            with launched(ctx, [f"--fd={fd}"], pass_fds=(fd,)) as proc:
                # The child's copy only: if it dies, the socket goes and a
                # connection is refused, instead of waiting in our own queue.
                listener.close()
                answered(path, proc, ctx.timeout).close()
        finally:
            listener.close()


def _connected_fd(ctx):
    ours, theirs = socket.socketpair()
    fd = theirs.fileno()
    try:
        with launched(ctx, [f"--fd={fd}"], pass_fds=(fd,)) as proc:
            theirs.close()                     # the child's copy only: EOF if it dies
            features_answered(Connection(ours, "the back-end", ctx.timeout), proc).close()
    finally:
        theirs.close()
        ours.close()


@check("BE-113", "SHOULD**", "--socket-path and --fd together are refused")
def exclusive(ctx):
    with socket_dir() as d:
        status, _ = run_once([*command_of(ctx), f"--socket-path={d}/be.sock", "--fd=0"])
    if status == 0:
        raise Failed("given both --socket-path and --fd: exit status 0")


def _capabilities(argv):
    status, out = run_once(argv)
    if status != 0:
        raise Failed(f"`{' '.join(argv)}`: exit status {status}")
    try:
        caps = json.loads(out)
    except ValueError:
        raise Failed(f"`{' '.join(argv)}` printed no JSON: {out[:80]!r}") from None
    if not isinstance(caps, dict):
        raise Failed(f"`{' '.join(argv)}` printed JSON that is not an object: {out[:80]!r}")
    return caps


@check("BE-114", "MUST", "--print-capabilities prints one JSON object and exits 0")
def print_capabilities(ctx):
    _capabilities([*command_of(ctx), "--print-capabilities"])


@check("BE-115", "SHOULD", "with --print-capabilities other options are ignored")
def capabilities_first(ctx):
    _capabilities([*command_of(ctx), "--print-capabilities",
                   "--socket-path=/nonexistent-pyvmm-dir/be.sock", "--bogus-pyvmm-option"])


@check("BE-116", "MUST*", "the capabilities name a vhost-user.json type (and its features)")
def capabilities_valid(ctx):
    caps = _capabilities([*command_of(ctx), "--print-capabilities"])
    kind = caps.get("type")
    if kind not in BACKEND_TYPES:
        raise Failed(f"type {kind!r} is not one of vhost-user.json's VHostUserBackendType")
    unknown = [f for f in caps.get("features", ()) if f not in TYPE_FEATURES.get(kind, ())]
    if kind in TYPE_FEATURES and unknown:
        raise Failed(f"features {unknown} are not {kind!r} features of vhost-user.json")


@check("BE-118", "SHOULD**", "with stdin, stdout and stderr on /dev/null it works")
def devnull(ctx):
    with socket_dir() as d, launched(ctx, [f"--socket-path={d}/be.sock"], quiet=True) as proc:
        answered(f"{d}/be.sock", proc, ctx.timeout).close()
