"""The fds a front-end hands over, checked before the back-end relies on them.

Each check raises BadFd with one line saying what is wrong and, where it
helps, how to fix it; the daemon refuses the request with it.

- kick, call and error fds must be eventfds: a pipe or socket at EOF is
  readable forever (a busy loop), a regular file cannot be watched at all,
  and a full pipe blocks its writer. They are made non-blocking (the flag
  is the open file's, so the front-end's copy is non-blocking too; QEMU
  and pyvmm create them EFD_NONBLOCK anyway): a kick read or a call write
  must never wait, and a call eventfd whose counter is full already has an
  interrupt pending.
- memory (guest RAM regions, the inflight area) must be a regular file
  (a memfd, say) that covers what is mapped and can no longer shrink: a
  Python process cannot survive SIGBUS, and touching a page past the end of
  a file that shrank is one. F_SEAL_SHRINK is added here when the memfd
  allows sealing; memory that cannot be sealed is refused unless the
  program was told to trust its front-end (allow_unsealed).
- the back-end channel must be a Unix stream socket.
"""

import errno
import fcntl
import os
import socket
import stat

from pyvmm.vhost.user.backend.device import Refused

EVENTFD = "anon_inode:[eventfd]"       # readlink of /proc/self/fd/N for an eventfd

UNSEALED_HELP = ("create it with MFD_ALLOW_SEALING or seal it with F_SEAL_SHRINK (QEMU's "
                 "memory-backend-memfd does, seal=on being its default), or start the back-end "
                 "with --allow-unsealed-memory if the front-end is trusted")


class BadFd(Refused):
    """An fd that cannot be used for what it came with (one line)."""


def _target(fd):
    """What /proc says fd is: "anon_inode:[eventfd]", "pipe:[123]", a path ..."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise BadFd(f"fd {fd} cannot be looked at: {e.strerror}") from None


def eventfd(fd, what):
    """fd, an eventfd (else BadFd), now non-blocking; what: "kick", "call", "error"."""
    target = _target(fd)
    if target != EVENTFD:
        raise BadFd(f"the {what} fd is a {_describe(target)}, not an eventfd")
    os.set_blocking(fd, False)
    return fd


def _describe(target):
    """'pipe', 'socket', 'eventfd' ... or "file '/a/path'" for a readlink of
    /proc/self/fd/N (a path quoted: it may hold any character, newlines too)."""
    for prefix, name in (("pipe:", "pipe"), ("socket:", "socket"), ("anon_inode:", "")):
        if target.startswith(prefix):
            return name or target[len(prefix):].strip("[]")
    return f"file {target!r}"


def memory(fd, offset, size, allow_unsealed=False):
    """Check that fd can back bytes [offset, offset + size) for as long as they
    are mapped (else BadFd); seals it against shrinking if it can."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise BadFd(f"its fd cannot be looked at: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadFd(f"its fd is a {_describe(_target(fd))}, not a memory file (a memfd)")
    _seal_shrink(fd, allow_unsealed)
    st = os.fstat(fd)                    # again: it may have shrunk before the seal
    if st.st_size < offset + size:
        raise BadFd(f"its file has {st.st_size} bytes, and bytes up to {offset + size} "
                    f"would be mapped")


def _seal_shrink(fd, allow_unsealed):
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise BadFd(f"its seals cannot be read: {e.strerror}") from None
        seals = None                     # not a memfd: a file anyone may truncate
    if seals is not None and seals & fcntl.F_SEAL_SHRINK:
        return
    if seals is not None and not seals & fcntl.F_SEAL_SEAL:
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            return
        except OSError:
            pass
    if allow_unsealed:
        return
    what = "a memfd that can no longer be sealed" if seals is not None else "not a memfd"
    raise BadFd(f"it is {what}, so the front-end could shrink it and kill the back-end "
                f"(SIGBUS); {UNSEALED_HELP}")


def unix_stream(fd):
    """A socket object over fd, a Unix stream socket (else BadFd; fd stays open)."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise BadFd(f"the back-end channel's fd is a {_describe(_target(fd))}, not a socket")
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise BadFd(f"the back-end channel's fd: {e.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise BadFd("the back-end channel's fd is not a Unix stream socket")
    return sock
