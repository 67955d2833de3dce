"""A raw vhost-user connection for the checker: it sends what it is told,
flags and all, and reads frames without judging them, since judging them
is the checker's job (a Session would refuse the very things the checks
look for)."""

import select

from pyvmm.vhost.user.messages import (HEADER, VHOST_USER_NEED_REPLY_MASK, VHOST_USER_VERSION,
                                       U64)
from pyvmm.vhost.user.wire import encode

NEED_REPLY = VHOST_USER_NEED_REPLY_MASK


class Reply:
    def __init__(self, frame, fds):
        self.request, self.flags, self.size = HEADER.unpack_from(frame)
        self.payload = bytes(frame[HEADER.size:])
        self.fds = fds

    @property
    def u64(self):
        return U64.unpack(self.payload).value if len(self.payload) == 8 else None

    def __str__(self):
        return (f"reply request={self.request} flags={self.flags:#x} size={self.size}"
                f" payload={self.payload[:16].hex(' ')}{'...' if len(self.payload) > 16 else ''}")


class Probe:
    def __init__(self, conn):
        """conn: a connected Connection (closed by whoever opened it)."""
        self.conn = conn
        self.sent = []                 # what was sent, for failure messages

    def send(self, request, payload=b"", flags=0, fds=()):
        if not isinstance(payload, bytes):
            payload = payload.pack()
        self.sent.append(f"{request.name} flags={VHOST_USER_VERSION | flags:#x} "
                         f"size={len(payload)}")
        self.conn.send(encode(request, VHOST_USER_VERSION | flags, payload), fds)

    def reply(self, what="a reply", timeout=None):
        frame, fds = self.conn.receive(what, timeout)
        return Reply(frame, fds)

    def ask(self, request, payload=b"", flags=0, fds=()):
        self.send(request, payload, flags, fds)
        return self.reply(f"the reply to {request.name}")

    def quiet(self, seconds=0.2):
        """True if nothing arrives for that long (and the peer is still there)."""
        return not select.select([self.conn.sock], [], [], seconds)[0]

    def close(self):
        self.conn.close()
