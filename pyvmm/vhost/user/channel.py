"""The only socket code of vhost-user: a Unix stream socket carrying frames.

Sending attaches the fds (SCM_RIGHTS) to the sendmsg() that carries the
first byte of the header (FE-3). Receiving reads the 12-byte header, with
whatever fds come with it, then exactly `size` bytes of payload, so a
recvmsg never spans two messages and the fds belong to the message whose
header carried them. Every read and write has a deadline; a peer that
hangs up or stops answering becomes Disconnected or ChannelTimeout, with a
message that says so in one line.

The socket stays blocking, but every recvmsg and sendmsg is made with
MSG_DONTWAIT and only waits, in poll(), when the kernel has nothing ready.
A message that is already there costs one system call, where a socket
timeout costs three (set the timeout, poll, then the call): inside the
testbed that was a third of a back-end's set-up time.
"""

import array
import errno
import os
import select
import socket
import stat
import time

from pyvmm.vhost.user.errors import ChannelError, ChannelTimeout, Disconnected, Truncated
from pyvmm.vhost.user.messages import HEADER, HEADER_SIZE, MAX_FDS, MAX_PAYLOAD_SIZE
from pyvmm.vhost.user.wire import close_fds

# How long a peer may take to answer, by default. qemu-storage-daemon and
# friends answer in microseconds; a peer silent for this long is stuck.
DEFAULT_TIMEOUT = 10.0
_FD_SIZE = array.array("i").itemsize
_ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)
# socket's MSG_ constants are enum flags; plain ints cost less per call.
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
_SEND_FLAGS = int(socket.MSG_DONTWAIT)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


class Connection:
    """A connected Unix stream socket; `name` says which peer, in errors."""

    def __init__(self, sock, name, timeout=DEFAULT_TIMEOUT):
        self.sock = sock
        self.name = name
        self.timeout = timeout
        sock.setblocking(True)

    @classmethod
    def connect(cls, path, name=None, timeout=DEFAULT_TIMEOUT):
        """Connect to a back-end listening on path."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            _connect(sock, str(path), timeout)
        except FileNotFoundError:
            sock.close()
            raise ChannelError(f"no socket at {path}: is the back-end running?") from None
        except ConnectionRefusedError:
            sock.close()
            raise ChannelError(f"nothing listens on {path} (a stale socket file?)") from None
        except OSError as e:
            sock.close()
            raise ChannelError(f"cannot connect to {path}: {e.strerror or e}") from None
        return cls(sock, name or str(path), timeout)

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.sock.close()

    # --- sending ----------------------------------------------------------------

    def send(self, data, fds=()):
        """Write one frame; its fds go with the first byte."""
        deadline = time.monotonic() + self.timeout
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                      array.array("i", fds).tobytes())] if fds else []
        sent = 0
        try:
            while sent < len(data):
                try:
                    # The fds go with the first byte; a first call that
                    # sends nothing (EAGAIN) did not send them either.
                    sent += self.sock.sendmsg([data[sent:]], [] if sent else ancillary,
                                              _SEND_FLAGS)
                except BlockingIOError:
                    if not self._wait(select.POLLOUT, deadline):
                        raise TimeoutError from None
        except (BrokenPipeError, ConnectionResetError):
            raise Disconnected(f"{self.name} closed the connection") from None
        except TimeoutError:
            raise ChannelTimeout(f"{self.name} did not take a message for "
                                 f"{self.timeout:g} s") from None
        except OSError as e:
            raise ChannelError(f"writing to {self.name}: {e.strerror or e}") from None

    # --- receiving --------------------------------------------------------------

    def receive(self, waiting_for=None, timeout=None):
        """One frame's bytes and fds. waiting_for names what we expect, for
        the timeout's message (e.g. "the reply to GET_FEATURES")."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        fds = []
        try:
            header = self._read(HEADER_SIZE, deadline, fds, waiting_for, first=True, limit=limit)
            _, _, size = HEADER.unpack(header)
            # A size beyond the limit is refused by the frame reader; do not
            # wait for bytes that will never be read.
            body = self._read(min(size, MAX_PAYLOAD_SIZE), deadline, None, waiting_for,
                              limit=limit) if size else b""
        except BaseException:
            close_fds(fds)
            raise
        return header + body, tuple(fds)

    def read(self, length, timeout=None):
        """Exactly length more bytes of a message (what receive() left of one
        larger than MAX_PAYLOAD_SIZE: a proxy forwards it all)."""
        limit = self.timeout if timeout is None else timeout
        return self._read(length, time.monotonic() + limit, None, None, limit=limit)

    def _read(self, length, deadline, fds, waiting_for, first=False, limit=None):
        """Exactly length bytes; fds (a list) collects SCM_RIGHTS fds, or None
        where fds are not allowed (they would belong to no header); limit: the
        seconds allowed, for the timeout's message."""
        data = bytearray()
        while len(data) < length:
            try:
                chunk, ancillary, flags, _ = self.sock.recvmsg(
                    length - len(data), _ANCILLARY_SIZE, _RECV_FLAGS)
            except BlockingIOError:
                if not self._wait(select.POLLIN, deadline):
                    raise ChannelTimeout(f"{self.name} did not send "
                                         f"{waiting_for or 'the rest of a message'} within "
                                         f"{self.timeout if limit is None else limit:.3g} s") \
                        from None
                continue
            except ConnectionResetError:
                chunk, ancillary, flags = b"", [], 0
            except OSError as e:
                raise ChannelError(f"reading from {self.name}: {e.strerror or e}") from None
            if ancillary:
                received = _fds_of(ancillary)
                if fds is None:
                    close_fds(received)
                    if received:
                        raise ChannelError(f"{self.name} sent fds in the middle of a message "
                                           f"(FE-3)")
                else:
                    fds.extend(received)
            if flags & _MSG_CTRUNC:
                raise ChannelError(f"{self.name} sent more than {MAX_FDS} fds with one message")
            if not chunk:
                if first and not data:
                    raise Disconnected(f"{self.name} closed the connection"
                                       + (f" instead of sending {waiting_for}"
                                          if waiting_for else ""))
                raise Truncated(f"{self.name} closed the connection in the middle of a "
                                f"message ({len(data)} of {length} bytes)")
            if not data and len(chunk) == length:
                return chunk                  # (the usual case: all of it at once)
            data += chunk
        return bytes(data)

    def _wait(self, events, deadline):
        """Wait until the socket is ready for events (POLLIN or POLLOUT), or
        has hung up; False when the deadline passed first."""
        while (left := deadline - time.monotonic()) > 0:
            poller = select.poll()
            poller.register(self.sock, events)
            if poller.poll(left * 1000):
                return True
        return False


def _connect(sock, path, timeout):
    """connect(), waiting up to timeout while the listener's backlog is full
    (a Unix socket with a timeout answers EAGAIN at once, not EINPROGRESS)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return sock.connect(path)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the backlog of {path} stayed full") from None
            time.sleep(0.01)


def _fds_of(ancillary):
    fds = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds


class Listener:
    """A Unix socket pyvmm listens on (server mode), mode 0600, removed at close."""

    @classmethod
    def from_socket(cls, sock):
        """A socket already listening (inherited, say); its file is not ours to remove."""
        listener = cls.__new__(cls)
        listener.path, listener.sock = None, sock
        return listener

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # The socket file gets this mode (less the umask) when bound.
            os.fchmod(self.sock.fileno(), 0o600)
            if os.path.lexists(self.path) and not _stale(self.path):
                raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
            # Bound and listening under another name first, then renamed
            # into place (over a stale socket file, if any): a client that
            # waits for the file to appear can connect at once. Bound under
            # its own name, the file would exist before listen(), and such
            # a client got ECONNREFUSED in between.
            temporary = f"{self.path}.{os.getpid()}~"
            if len(os.fsencode(temporary)) >= MAX_SOCKET_PATH:
                temporary = None          # (no room for a longer name: bind in place)
                if os.path.lexists(self.path):
                    os.unlink(self.path)  # a socket file nobody listens on any more
            self.sock.bind(temporary or self.path)
            try:
                self.sock.listen(1)
                if temporary:
                    os.rename(temporary, self.path)
            except OSError:
                if temporary:
                    os.unlink(temporary)
                raise
        except OSError as e:
            self.sock.close()
            raise ChannelError(f"cannot listen on {self.path}: {e.strerror or e}") from None

    def fileno(self):
        return self.sock.fileno()

    def accept(self, name, timeout=None):
        """Wait for the back-end (timeout None: as long as it takes)."""
        self.sock.settimeout(timeout)
        try:
            sock, _ = self.sock.accept()
        except TimeoutError:
            raise ChannelTimeout(f"no back-end connected to {self.path} within "
                                 f"{timeout:g} s") from None
        return Connection(sock, name)

    def close(self):
        self.sock.close()
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass


# sun_path: 108 bytes with the NUL.
MAX_SOCKET_PATH = 108


def _stale(path):
    """A socket file at path that nobody listens on (never another kind of file)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
        return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
