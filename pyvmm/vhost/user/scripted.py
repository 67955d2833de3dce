"""A vhost-user back-end that answers from a script: for testing front-ends.

pyvmm's front-end (and any other) must survive back-ends that refuse a
request, stall, hang up at the worst moment or talk on their channel while
a reply is due. ScriptedBackend plays such a back-end in a thread of the
test: it speaks the protocol through a Session(BACKEND), so the front-end
is held to the FE rules, answers every request the usual way (the feature
bits, queue count, config space and memory slots it was given), records
each message, and lets a test replace the answer to any request:

    be = ScriptedBackend(conn, on={FrontendReq.SET_VRING_NUM:
                                   lambda msg: REFUSE if msg.payload.index == 1 else None})
    thread = be.serve_in_thread()

An action gets the request's Message and returns None (the usual answer), a
payload to answer with, REFUSE (a non-zero ack), HANG_UP (close the
connection), STALL (never answer; go on reading) or bytes sent as they are
(an answer that breaks a rule: the back-end's session would refuse to
send it as a payload).
The fds of SET_VRING_KICK/CALL/ERR are kept (kicks, calls, errs: index ->
fd) so that a test can play the back-end's side of a ring; every other fd
is closed.
"""

import contextlib
import os
import socket
import threading

from pyvmm.vhost.user.channel import Connection
from pyvmm.vhost.user.errors import VhostUserError
from pyvmm.vhost.user.messages import (U64, VHOST_USER_F_PROTOCOL_FEATURES, BackendReq,
                                       DeviceConfig, Empty, FrontendReq as R, Inflight,
                                       VringState)
from pyvmm.vhost.user.rules import Channel
from pyvmm.vhost.user.session import NEED_DATA, Role, Session

VIRTIO_F_VERSION_1 = 32
REFUSE = "REFUSE"
HANG_UP = "HANG_UP"
STALL = "STALL"


class ScriptedBackend:
    def __init__(self, conn, features=1 << VIRTIO_F_VERSION_1, protocol=0, config=b"",
                 queues=1, max_mem_slots=32, on=None, close_on_eof=True):
        """conn: a Connection to the front-end; features: the virtio bits offered
        (bit 30 is added); protocol: the protocol features offered; on:
        {FrontendReq: action(msg)}; close_on_eof: hang up when the front-end
        does (else stay connected, as a stuck back-end would, until close())."""
        self.conn = conn
        self.session = Session(Role.BACKEND)
        self.features = features | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        self.protocol, self.config, self.queues = protocol, config, queues
        self.max_mem_slots = max_mem_slots
        self.on = dict(on or {})
        self.close_on_eof = close_on_eof
        self._closing = threading.Lock()
        self.messages = []            # every request received, in order
        self.kicks, self.calls, self.errs = {}, {}, {}
        self.bases = {}               # index -> the last SET_VRING_BASE
        self.inflight_fd = None       # the area made at GET_INFLIGHT_FD, or handed over
        self.backend_channel = None   # a Connection, once SET_BACKEND_REQ_FD came
        self.hung_up = False

    @property
    def requests(self):
        return [m.request for m in self.messages]

    # --- serving --------------------------------------------------------------------

    def serve(self, until=None):
        """Answer requests until `until` (a FrontendReq) was answered, or the
        front-end hangs up (None), or the script hangs up; the last Message."""
        while not self.hung_up:
            try:
                data, fds = self.conn.receive("a request", timeout=30)
                self.session.receive(data, fds)
                msg = self.session.next_message()
            except VhostUserError:
                if self.close_on_eof:
                    self.close()
                return None
            if msg is NEED_DATA:
                continue
            self.messages.append(msg)
            try:
                self._answer(msg)
            except VhostUserError:       # the front-end went meanwhile
                self.close()
                return None
            if msg.request is until:
                return msg
        return None

    def serve_in_thread(self, until=None):
        thread = threading.Thread(target=self.serve, args=(until,), daemon=True)
        thread.start()
        return thread

    def _answer(self, msg):
        action = self.on.get(msg.request)
        answer = action(msg) if action is not None else None
        if answer == HANG_UP:
            self._keep_fds(msg)
            self.close()
            return
        if answer is None:
            answer = self._usual(msg)
        else:
            self._keep_fds(msg)
        if answer == STALL or self.session.awaiting is not msg:
            self.session.awaiting = None      # stalled: the script may send anything later
            return
        if isinstance(answer, bytes):
            self.session.awaiting = None
            self.conn.send(answer)
            return
        if answer == REFUSE:
            answer = U64(1)
        fds = ()
        if msg.request is R.GET_INFLIGHT_FD and self.inflight_fd is not None \
                and not isinstance(answer, U64):
            fds = (self.inflight_fd,)
        self.conn.send(*self.session.send(self.session.reply_to(msg, answer, fds)))

    def _keep_fds(self, msg):
        """The fds a test may want (a ring's eventfds, the back-end channel); the
        rest are closed."""
        keep = {R.SET_VRING_KICK: self.kicks, R.SET_VRING_CALL: self.calls,
                R.SET_VRING_ERR: self.errs}.get(msg.request)
        if keep is not None and msg.fds:
            old = keep.pop(msg.payload.index, None)
            if old is not None:
                os.close(old)
            keep[msg.payload.index] = msg.fds[0]
        elif msg.request is R.SET_INFLIGHT_FD and msg.fds and self.inflight_fd is None:
            self.inflight_fd = msg.fds[0]       # an area made by a predecessor
        elif msg.request is R.SET_BACKEND_REQ_FD and msg.fds:
            self.backend_channel = Connection(socket.socket(fileno=msg.fds[0]),
                                              "the front-end (back-end channel)")
        else:
            for fd in msg.fds:
                os.close(fd)

    def _usual(self, msg):
        """What a well-behaved back-end answers (U64(0) for an ack)."""
        self._keep_fds(msg)
        request = msg.request
        if request is R.GET_FEATURES:
            return U64(self.features)
        if request is R.GET_PROTOCOL_FEATURES:
            return U64(self.protocol)
        if request is R.GET_QUEUE_NUM:
            return U64(self.queues)
        if request is R.GET_MAX_MEM_SLOTS:
            return U64(self.max_mem_slots)
        if request is R.SET_VRING_BASE:
            self.bases[msg.payload.index] = msg.payload.num
        if request is R.GET_VRING_BASE:
            return VringState(msg.payload.index, self.bases.get(msg.payload.index, 0))
        if request is R.GET_CONFIG:
            asked = msg.payload
            data = self.config[asked.offset:asked.offset + len(asked.data)]
            if len(data) < len(asked.data):
                return Empty()
            return DeviceConfig(asked.offset, 0, data)
        if request is R.GET_STATUS:
            return U64(0)
        if request is R.GET_INFLIGHT_FD:
            return self._inflight_area(msg.payload)
        return U64(0)

    def _inflight_area(self, asked):
        from pyvmm.vhost.user.backend import inflight
        if self.inflight_fd is not None:
            os.close(self.inflight_fd)
        self.inflight_fd, size = inflight.create(asked.num_queues, asked.queue_size)
        return Inflight(size, 0, asked.num_queues, asked.queue_size)

    # --- the back-end's own requests ------------------------------------------------

    def send_config_change(self, need_reply=True):
        """BACKEND_CONFIG_CHANGE_MSG on the back-end channel; the front-end's ack
        (None without need_reply)."""
        session = Session(Role.BACKEND, Channel.BACKEND, main=self.session)
        self.backend_channel.send(*session.send(
            session.request(BackendReq.CONFIG_CHANGE_MSG, need_reply=need_reply)))
        if not need_reply:
            return None
        while True:
            data, fds = self.backend_channel.receive("the ack of CONFIG_CHANGE_MSG")
            session.receive(data, fds)
            reply = session.next_message()
            if reply is not NEED_DATA:
                return reply.payload.value

    def close(self):
        """Hang up (the fds kept are closed too). From any thread, once."""
        with self._closing:
            if self.hung_up:
                return
            self.hung_up = True
            self._close()

    def _close(self):
        # shutdown first: a thread blocked reading the socket keeps it open
        # (and the front-end from seeing the hang-up) until it returns.
        with contextlib.suppress(OSError):
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        if self.backend_channel is not None:
            self.backend_channel.close()
        for fd in [*self.kicks.values(), *self.calls.values(), *self.errs.values()]:
            os.close(fd)
        self.kicks, self.calls, self.errs = {}, {}, {}
        if self.inflight_fd is not None:
            os.close(self.inflight_fd)
            self.inflight_fd = None
        self.session.close()
