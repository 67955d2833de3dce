"""Where the checked back-end is, and how each check gets a fresh connection.

    SocketTarget   a back-end listening on a path (it must accept one
                   connection after another)
    ListenTarget   pyvmm check listens; the back-end connects (and must
                   connect again after each check)
    CommandTarget  a back-end program pyvmm check starts itself, and starts
                   again whenever it has exited: back-ends that serve one
                   front-end and exit (virtiofsd) are checked this way.
                   Without a socket of its own, the program is given
                   --socket-path (the program conventions, which the BE-107
                   to BE-118 checks then examine)

A check calls connect() for each connection it needs, one at a time;
release() closes what it opened and, for a command, waits for a
one-client back-end to go.
"""

import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from pyvmm.sys.process import stop
from pyvmm.vhost.user.channel import Connection, Listener
from pyvmm.vhost.user.errors import ChannelError

START_WAIT = 10.0             # seconds a started back-end has to listen or connect


class Target:
    command = None          # the program's argv, where the program conventions apply
    can_restart = False     # kill() and a later connect() give a fresh back-end

    def __init__(self, timeout):
        self.timeout = timeout
        self._opened = []

    def connect(self):
        conn = self._connect()
        self._opened.append(conn)
        return conn

    def release(self):
        """The check is over: close every connection it opened."""
        for conn in self._opened:
            conn.close()
        self._opened.clear()

    def close(self):
        self.release()

    def gone(self):
        """Why the back-end is no longer there (say, after a crash), or None:
        its socket file went, or nothing listens on it any more. /proc first:
        a probing connection is one more that a back-end serving one
        front-end at a time must take before the next check's."""
        if not os.path.lexists(self.path):
            return f"is gone: no socket at {self.path} any more"
        if listening_inode(self.path) or listening_inode(os.path.abspath(self.path)):
            return None
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                              | socket.SOCK_CLOEXEC)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            return f"is gone: nothing listens on {self.path} any more"
        except OSError:
            pass                          # EAGAIN: its backlog is full, so it listens
        finally:
            probe.close()
        return None

    def dead(self):
        """Why no later check can reach the back-end, or None: it is gone and
        nobody starts it again."""
        return self.gone()


class SocketTarget(Target):
    def __init__(self, path, timeout=5.0):
        super().__init__(timeout)
        self.path = path

    def __str__(self):
        return f"back-end at {self.path}"

    def _connect(self):
        return Connection.connect(self.path, "the back-end", self.timeout)


class ListenTarget(Target):
    def __init__(self, path, timeout=5.0):
        super().__init__(timeout)
        self.path = path
        self.listener = Listener(path)

    def __str__(self):
        return f"back-end connecting to {self.path}"

    def _connect(self):
        return self.listener.accept("the back-end", self.timeout)

    def gone(self):
        return None                   # a back-end that connects: nothing to ask

    def close(self):
        super().close()
        self.listener.close()


class CommandTarget(Target):
    """argv started as needed. socket: where it listens (or, with listen,
    where pyvmm check listens for it); None: a path of ours, given to the
    program as --socket-path."""

    can_restart = True

    def __init__(self, argv, socket=None, listen=False, timeout=5.0):
        super().__init__(timeout)
        self.argv = list(argv)
        self.workdir = tempfile.mkdtemp(prefix="pyvmm-check-")
        if socket is None:
            self.command = self.argv
            socket = os.path.join(self.workdir, "backend.sock")
            self.run_argv = [*self.argv, f"--socket-path={socket}"]
        else:
            self.run_argv = self.argv
        self.path = socket
        self.listener = Listener(socket) if listen else None
        self.proc = None
        self.one_client = None      # learned after the first check: does it exit?
        self.log = os.path.join(self.workdir, "backend.log")

    def __str__(self):
        return f"back-end `{' '.join(self.run_argv)}`"

    def start(self):
        if self.listener is None and os.path.lexists(self.path) and self.command is not None:
            os.unlink(self.path)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.run_argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def output(self, lines=5):
        try:
            with open(self.log, errors="replace") as f:
                return " | ".join(f.read().strip().splitlines()[-lines:])
        except OSError:
            return ""

    def _connect(self):
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        if self.listener is None:
            return connect_when_listening(self.path, self.proc, self.timeout, self.output)
        wait = max(self.timeout, START_WAIT)
        deadline = time.monotonic() + wait
        while not select.select([self.listener], [], [], 0.05)[0]:
            if self.proc.poll() is not None:
                raise ChannelError(f"the back-end exited with status {self.proc.returncode} "
                                   f"before it connected: {self.output() or 'no output'}")
            if time.monotonic() > deadline:
                raise ChannelError(f"the back-end did not connect within {wait:g} s")
        return self.listener.accept("the back-end", self.timeout)

    def connect(self):
        """A check holds one connection at a time: a second one first lets a
        back-end that serves one front-end per run go, and starts it again."""
        if self._opened and self.one_client is not False:
            super().release()
            self._settle()
        return super().connect()

    def release(self):
        opened = bool(self._opened)
        super().release()
        if opened:
            self._settle()

    def _settle(self):
        """The connections are closed: wait for a one-client back-end to exit."""
        if self.proc is None:
            return
        if self.one_client is None:              # the first time: does it go?
            try:
                self.proc.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
            self.one_client = self.proc.poll() is not None
        elif self.one_client:
            try:
                self.proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self.stop()

    def gone(self):
        """A crash: killed by a signal (exiting is how some hang up)."""
        if self.proc is not None:
            try:
                status = self.proc.wait(0.5)
            except subprocess.TimeoutExpired:
                return None
            return f"was killed by {signal.Signals(-status).name}" if status < 0 else None
        return super().gone()

    def dead(self):
        return None                   # started again by the next check

    def kill(self):
        """SIGKILL the back-end, as a crash (the next connect() starts it again)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stop(self):
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def close(self):
        super().close()
        self.stop()
        if self.listener is not None:
            self.listener.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _bound_to(path):
    """[(flags, inode)] of the Unix sockets bound to path, from /proc/net/unix
    (None: no /proc to say)."""
    try:
        with open("/proc/net/unix") as f:
            lines = f.readlines()[1:]
    except OSError:
        return None
    return [(int(fields[3], 16), fields[6]) for fields in map(str.split, lines)
            if len(fields) >= 8 and fields[7] == path]


_SO_ACCEPTCON = 0x10000           # a listening socket, in /proc/net/unix's flags


def listening_inode(path):
    """The inode of the socket listening on path, from /proc/net/unix (None:
    none, or no /proc to say)."""
    for flags, inode in _bound_to(path) or ():
        if flags & _SO_ACCEPTCON:
            return inode
    return None


def ready(path):
    """Whether the program that made the socket file at path can take a
    connection there now, for a caller that just started it and removed
    any stale file first. Not when the file appears: qemu-storage-daemon
    binds in place, so its file is there before it listens, and a
    connection in between is refused. /proc/net/unix then lists a socket
    bound to path that does not listen yet. pyvmm's Listener binds under
    another name and renames the file once it listens, so nothing is
    listed under path itself: the file is the sign."""
    if not os.path.exists(path):
        return False
    bound = _bound_to(path)
    return not bound or any(flags & _SO_ACCEPTCON for flags, _ in bound)


def connect_when_listening(path, proc, timeout, output=lambda: ""):
    """A Connection to path once the just-started proc listens there
    (start-up may take START_WAIT s); ChannelError if it exits first."""
    wait = max(timeout, START_WAIT)
    deadline = time.monotonic() + wait
    while True:
        try:
            return Connection.connect(path, "the back-end", timeout)
        except ChannelError:
            time.sleep(0.05)
        if proc.poll() is not None:
            raise ChannelError(f"the back-end exited with status {proc.returncode} before "
                               f"it listened on {path}: {output() or 'no output'}")
        if time.monotonic() > deadline:
            raise ChannelError(f"nothing listened on {path} within {wait:g} s")
