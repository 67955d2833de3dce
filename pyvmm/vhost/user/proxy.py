"""`pyvmm trace`: a transparent proxy between a vhost-user front-end and its
back-end, which prints every message decoded and flags each broken rule.

The front-end connects to the proxy's socket as if it were the back-end;
the proxy connects to the real back-end and forwards each frame unchanged,
its fds with it, in the order it came. Beside the forwarding, a
Session(OBSERVER) reads both directions with the protocol's rules: each
message becomes one line (as `pyvmm run --trace vhost-user` prints them),
and the first rule either side breaks becomes a line naming the side and
the rule. After that the session cannot follow the conversation any more;
the proxy goes on forwarding without decoding. Frames are forwarded whole
whatever their size, a payload larger than any message needs (which the
session flags) included.

When either side hangs up, or a frame cannot be read from one side or
written to the other, the proxy closes both connections with one line and
waits for the next front-end.

A fault for the front-end's own tests (drop_at, `--drop-at N`): the
proxy hangs up on both sides when the front-end sends its Nth message on
a connection, traced but not forwarded. The front-end sees its back-end
go at that point (does it reconnect, at start-up too?), the back-end sees
its front-end go (does it take the next one?). The next connection is
forwarded whole, or dropped at the next --drop-at given.

The back-end's request channel (the socket SET_BACKEND_REQ_FD passes) is
forwarded as an fd like any other, so its messages go directly from one
side to the other and are not traced.
"""

import os
import select

from pyvmm.vhost.user.channel import DEFAULT_TIMEOUT, Connection, Listener
from pyvmm.vhost.user.errors import Disconnected, VhostUserError
from pyvmm.vhost.user.messages import HEADER, HEADER_SIZE
from pyvmm.vhost.user.rules import Side
from pyvmm.vhost.user.session import NEED_DATA, Role, Session
from pyvmm.vhost.user.trace import describe

# No deadline on the sides between frames (a quiet guest leaves the front-end
# quiet for hours); once a frame has begun, the rest must follow promptly.
PATIENT = 24 * 3600.0
FRAME_TIMEOUT = DEFAULT_TIMEOUT
CHUNK = 1 << 16           # how much of an oversized payload is forwarded at a time


class Proxy:
    """One front-end and one back-end, joined; write(line) gets the trace."""

    def __init__(self, front, back, write, device_names=None, drop_at=None):
        """device_names: {bit: name} of the device's own feature bits, if known;
        drop_at: hang up on both sides at the front-end's message drop_at."""
        self.sides = {Side.FRONTEND: front, Side.BACKEND: back}
        self.write = write
        self.device_names = device_names
        self.drop_at = drop_at
        self.session = Session(Role.OBSERVER)
        self.broken = []             # the rule broken, as its line (at most one)
        self.messages = 0
        self.frontend_frames = 0

    def run(self):
        """Forward until either side hangs up; returns why, in a few words."""
        by_fd = {conn.fileno(): side for side, conn in self.sides.items()}
        while True:
            ready, _, _ = select.select(list(by_fd), [], [])
            for fd in ready:
                side = by_fd[fd]
                why = self._forward(side)
                if why is not None:
                    return why

    def _forward(self, side):
        """One frame from side to the other, whole; None, or why to stop."""
        source = self.sides[side]
        to = Side.BACKEND if side is Side.FRONTEND else Side.FRONTEND
        try:
            data, fds = source.receive(timeout=FRAME_TIMEOUT)
        except Disconnected:
            return f"the {side.value} closed its connection"
        except VhostUserError as e:
            return f"reading from the {side.value}: {e}"
        try:
            self._observe(side, data, fds)
            if side is Side.FRONTEND:
                self.frontend_frames += 1
                if self.frontend_frames == self.drop_at:
                    return (f"both connections dropped at the front-end's message "
                            f"{self.drop_at} (--drop-at), which was not forwarded")
            self.sides[to].send(data, fds)
            left = HEADER.unpack_from(data)[2] - (len(data) - HEADER_SIZE)
            while left > 0:                    # a payload receive() did not take whole
                chunk = source.read(min(left, CHUNK), timeout=FRAME_TIMEOUT)
                self.sides[to].send(chunk)
                left -= len(chunk)
        except VhostUserError as e:
            return f"forwarding to the {to.value}: {e}"
        finally:
            for f in fds:
                os.close(f)
        return None

    def _observe(self, side, data, fds):
        if self.broken:
            return
        copies = [os.dup(f) for f in fds]
        try:
            self.session.receive(data, copies, sender=side)
            while (msg := self.session.next_message(sender=side)) is not NEED_DATA:
                self.messages += 1
                self.write(describe("->" if side is Side.FRONTEND else "<-", msg,
                                    self.device_names))
                for f in msg.fds:
                    os.close(f)
        except VhostUserError as e:
            line = f"!! RULE BROKEN by the {side.value}: {e}; forwarding without decoding from here"
            self.broken.append(line)
            self.write(line)

    def close(self):
        for conn in self.sides.values():
            conn.close()
        self.session.close()


def serve(listen, connect, write, once=False, device_names=None, drop_at=()):
    """Listen on `listen`; for each front-end, connect to the back-end at
    `connect` and trace until one side goes (the first only, with once).
    drop_at: the message each connection in turn is dropped at (Proxy).
    Returns the number of rules broken."""
    listener = Listener(listen)
    broken = 0
    drops = list(drop_at)
    try:
        while True:
            front = listener.accept("the front-end", timeout=None)
            front.timeout = PATIENT
            try:
                back = Connection.connect(connect, "the back-end")
            except VhostUserError as e:
                write(f"!! {e}; closing the front-end's connection")
                front.close()
                if once:
                    return broken + 1
                continue
            back.timeout = PATIENT
            write(f"-- a front-end connected; tracing it to {connect}")
            proxy = Proxy(front, back, write, device_names, drops.pop(0) if drops else None)
            try:
                why = proxy.run()
            finally:
                proxy.close()
            broken += len(proxy.broken)
            write(f"-- {why} after {proxy.messages} messages")
            if once:
                return broken
    finally:
        listener.close()

