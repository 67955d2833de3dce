"""pyvmm as the front-end of a vhost-user back-end.

VhostUserFrontend speaks the protocol over one Connection, with a
Session(FRONTEND) checking every message both ways. It implements the same
VhostBackend interface as the kernel's vhost drivers (set_owner,
set_mem_table, set_vring_*, get_vring_base, ...), plus what only
vhost-user has: protocol features, queue count, config space, status,
device reset and the back-end's request channel.

Each call sends one request and, when one is due, waits for its reply
(one request at a time, under a lock). With REPLY_ACK negotiated, pyvmm
asks for an ack on every request that has no reply of its own, so that a
back-end's refusal shows up at the request that caused it; a non-zero ack
raises PeerRefused, and the connection goes on.

Anything else that goes wrong on the socket (the back-end hung up, did not
answer in time, broke a rule) leaves the connection dead: a reply that
comes late would answer the wrong request, so no request is sent on it
again (`dead` says why, and every later call raises ConnectionDead at
once). pyvmm shuts down its sending side, so that the back-end reads EOF
and stops its rings; the socket stays open until close(), so that the
back-end's own hang-up can still be seen.

While it waits for a reply, the front-end also serves the back-end's
request channel: a back-end may send a request there and wait for its ack
before it answers (QEMU serves it the same way), and would otherwise wait
for pyvmm while pyvmm waits for it.
"""

import contextlib
import logging
import os
import select
import socket
import threading
import time

from pyvmm.vhost.backend import VhostBackend
from pyvmm.vhost.user.channel import DEFAULT_TIMEOUT, Connection
from pyvmm.vhost.user.errors import (ChannelTimeout, ConnectionDead, Disconnected, PeerRefused,
                                     Truncated, VhostUserError)
from pyvmm.vhost.user.messages import (
    MAX_MEM_TABLE_REGIONS, U64, VHOST_USER_F_PROTOCOL_FEATURES, DeviceConfig, Empty, FrontendReq,
    Inflight, MemoryRegion, MemTable, ProtocolFeature, SingleMemRegion, VringAddress, VringFd,
    VringState)
from pyvmm.vhost.user.rules import Channel, Reply
from pyvmm.vhost.user.session import NEED_DATA, Role, Session

log = logging.getLogger("pyvmm.vhost-user")

PF = ProtocolFeature
R = FrontendReq

# What pyvmm implements, and so the most it acks (never a bit it does not: FE-10).
SUPPORTED_PROTOCOL_FEATURES = (PF.MQ.mask | PF.REPLY_ACK.mask | PF.BACKEND_REQ.mask
                               | PF.CONFIG.mask | PF.RESET_DEVICE.mask
                               | PF.CONFIGURE_MEM_SLOTS.mask | PF.STATUS.mask
                               | PF.INFLIGHT_SHMFD.mask)


class VhostUserFrontend(VhostBackend):
    def __init__(self, connection, tracer=None):
        """connection: a connected Connection; tracer(direction, message), if
        given, sees every message ("->" sent, "<-" received)."""
        super().__init__()
        self.conn = connection
        self.session = Session(Role.FRONTEND)
        self.tracer = tracer
        self._lock = threading.Lock()
        self.vring_bases = {}        # index -> where GET_VRING_BASE said the ring stopped
        self.backend_channel = None  # our end of SET_BACKEND_REQ_FD's socketpair
        self._regions_sent = []      # MemoryRegions the back-end has (ADD_MEM_REG mode)
        self.dead = None             # why no request can be sent any more, once so
        self.hung_up = False         # ... and that was the back-end closing the connection
        self._deadline = None        # monotonic time by which a sequence must be done
        # The back-end channel: its session, the lock that lets one thread read
        # it at a time, and what answers its requests (message -> ack status,
        # never a round trip on the main socket: one may be under way).
        self._backend_session = None
        self._backend_lock = threading.Lock()
        self.on_backend_request = lambda message: 1
        self.backend_broken = None   # why the back-end channel was given up, once it was

    @classmethod
    def connect(cls, path, name=None, timeout=DEFAULT_TIMEOUT, tracer=None):
        return cls(Connection.connect(path, name, timeout), tracer)

    @property
    def negotiated(self):
        return self.session.negotiated

    def has(self, feature):
        return self.negotiated.has(feature)

    def close(self):
        self.conn.close()
        self.close_backend_channel()
        self.session.close()

    def close_backend_channel(self):
        with self._backend_lock:
            if self.backend_channel is not None:
                self.backend_channel.close()
                self.backend_channel = None
            if self._backend_session is not None:
                self._backend_session.close()

    @contextlib.contextmanager
    def deadline(self, seconds):
        """Every call inside must be answered within seconds of now, together
        (a vCPU waits for a whole activation or reset, not per message)."""
        outer, self._deadline = self._deadline, time.monotonic() + seconds
        if outer is not None:
            self._deadline = min(outer, self._deadline)
        try:
            yield
        finally:
            self._deadline = outer

    def _left(self):
        """Seconds the next read may wait: the connection's timeout, or less
        inside a deadline()."""
        if self._deadline is None:
            return self.conn.timeout
        return max(0.0, min(self.conn.timeout, self._deadline - time.monotonic()))

    def die(self, error, hung_up=False):
        """The connection cannot be used any more: say so on every later call,
        and let the back-end read EOF (it stops its rings when it does).
        hung_up: the back-end closed it (as a Disconnected error says too)."""
        if self.dead is None:
            self.dead = str(error)
            self.hung_up = hung_up or isinstance(error, Disconnected)
            with contextlib.suppress(OSError):
                self.conn.sock.shutdown(socket.SHUT_WR)

    # --- one request, and its reply -------------------------------------------------

    def call(self, request, payload=None, fds=()):
        """Send request; return its reply Message (None when none is due).
        A non-zero ack raises PeerRefused; any other failure leaves the
        connection dead (ConnectionDead from then on)."""
        with self._lock:
            if self.dead is not None:
                raise ConnectionDead(f"{request.spec_name} not sent: the connection to "
                                     f"{self.conn.name} is dead ({self.dead})")
            try:
                rule = self.session.channel.rules[request]
                need_reply = rule.reply is Reply.ACK and self.has(PF.REPLY_ACK)
                message = self.session.request(request, payload, fds, need_reply)
                data, fds = self.session.send(message)
                self._trace("->", message)
                if self._deadline is not None and self._left() <= 0:
                    raise ChannelTimeout(f"{self.conn.name} took too long over a sequence of "
                                         f"requests; {request.spec_name} was next")
                self.conn.send(data, fds)
                if self.session.awaiting is not message:
                    return None
                reply = self._read_reply(f"the reply to {request.spec_name}")
            except VhostUserError as e:
                self.die(e)
                raise
            self._trace("<-", reply)
        if rule.reply is Reply.ACK and reply.payload.value != 0:
            raise PeerRefused(f"the back-end refused {request.spec_name} "
                              f"(REPLY_ACK status {reply.payload.value:#x})", "BE-21")
        return reply

    def _read_reply(self, what):
        """The reply on the main socket, serving the back-end channel meanwhile."""
        budget = self._left()
        deadline = time.monotonic() + budget
        while True:
            left = max(0.0, deadline - time.monotonic())
            channel = self.backend_channel
            if channel is not None and self.backend_broken is None:
                ready = select.select([self.conn.sock, channel.sock], [], [], left)[0]
                if not ready:
                    raise ChannelTimeout(f"{self.conn.name} did not send {what} within "
                                         f"{budget:g} s")
                if channel.sock in ready:
                    self.serve_backend_channel()
                    if self.conn.sock not in ready:
                        continue
            data, fds = self.conn.receive(what, timeout=max(left, 0.001))
            self.session.receive(data, fds)
            reply = self.session.next_message()
            if reply is not NEED_DATA:
                return reply

    # --- the back-end's request channel -------------------------------------------------

    def serve_backend_channel(self):
        """Read and answer one request from the back-end channel, if one is there
        (from any thread: the event loop's, or one waiting for a reply). A
        channel that breaks (hangs up, breaks a rule) is given up, in one line:
        `backend_broken` says why, and the main connection goes on."""
        with self._backend_lock:
            channel = self.backend_channel
            if channel is None or self.backend_broken is not None \
                    or not select.select([channel.sock], [], [], 0)[0]:
                return          # nothing there (another thread took it)
            if self._backend_session is None:
                self._backend_session = Session(Role.FRONTEND, Channel.BACKEND,
                                                main=self.session)
            session = self._backend_session
            try:
                data, fds = channel.receive("the rest of a back-end request", timeout=1.0)
                session.receive(data, fds)
                message = session.next_message()
                if message is NEED_DATA:
                    return
                self._trace("<=", message)
                for fd in message.fds:       # no request pyvmm serves takes an fd
                    os.close(fd)
                status = self.on_backend_request(message)
                if session.awaiting is message:
                    reply = session.reply_to(message, U64(status))
                    self._trace("=>", reply)
                    channel.send(*session.send(reply))
            except VhostUserError as e:
                self.backend_broken = str(e)
                # A clean hang-up comes with the back-end's going: said elsewhere.
                clean = isinstance(e, Disconnected) and not isinstance(e, Truncated)
                (log.debug if clean else log.warning)(
                    "%s: its back-end channel: %s; pyvmm no longer listens to it "
                    "(the device goes on)", self.conn.name, e)

    def _trace(self, direction, message):
        if self.tracer is not None:
            self.tracer(direction, message)

    def _u64(self, request):
        return self.call(request).payload.value

    # --- negotiation (connect time) ----------------------------------------------------

    def negotiate(self, want_protocol=SUPPORTED_PROTOCOL_FEATURES, backend_channel=True):
        """The start of every connection, in QEMU's order: features, protocol
        features, queue count, memory slots, the back-end channel, SET_OWNER.
        Returns the back-end's virtio feature bits."""
        features = self.get_features()
        if features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            offered = self._u64(R.GET_PROTOCOL_FEATURES)
            acked = offered & want_protocol
            if not backend_channel:
                acked &= ~PF.BACKEND_REQ.mask
            self.call(R.SET_PROTOCOL_FEATURES, U64(acked))
        if self.has(PF.MQ):
            self._u64(R.GET_QUEUE_NUM)
        if self.has(PF.CONFIGURE_MEM_SLOTS):
            self._u64(R.GET_MAX_MEM_SLOTS)
        if self.has(PF.BACKEND_REQ):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.call(R.SET_BACKEND_REQ_FD, fds=(theirs.fileno(),))
            finally:
                theirs.close()
            self.backend_channel = Connection(ours, f"{self.conn.name} (back-end channel)")
        self.set_owner()
        return features

    @property
    def max_queues(self):
        """The back-end's queue count (GET_QUEUE_NUM), or None without MQ."""
        return self.negotiated.max_queues

    # --- the VhostBackend interface ------------------------------------------------------

    def set_owner(self):
        """SET_OWNER: this connection is the back-end's session."""
        self.call(R.SET_OWNER)

    def get_features(self):
        """GET_FEATURES: the virtio feature bits the back-end offers (and bit 30)."""
        return self._u64(R.GET_FEATURES)

    def set_features(self, features):
        """SET_FEATURES: the guest's bits; bit 30 stays on while the back-end offers it."""
        offered = self.negotiated.features_offered or 0
        self.call(R.SET_FEATURES, U64(features | (offered & 1 << VHOST_USER_F_PROTOCOL_FEATURES)))

    def set_mem_table(self, memory):
        """Every region of guest RAM, each with the memfd and its offset in it."""
        self.memory = memory
        regions = [MemoryRegion(r.guest_phys_addr, r.size, r.host_addr, r.memfd_offset)
                   for r in memory.regions]
        if self.has(PF.CONFIGURE_MEM_SLOTS):
            slots, why = self.negotiated.max_mem_slots, "its GET_MAX_MEM_SLOTS"
        else:
            slots, why = MAX_MEM_TABLE_REGIONS, "SET_MEM_TABLE's limit"
        if slots is not None and len(regions) > slots:
            raise VhostUserError(f"guest RAM is {len(regions)} regions, and the back-end "
                                 f"takes {slots} ({why})")
        if self.has(PF.CONFIGURE_MEM_SLOTS):
            for old in [r for r in self._regions_sent if r not in regions]:
                self.call(R.REM_MEM_REG, SingleMemRegion(old))
                self._regions_sent.remove(old)
            for new in [r for r in regions if r not in self._regions_sent]:
                self.call(R.ADD_MEM_REG, SingleMemRegion(new), fds=(memory.fd,))
                self._regions_sent.append(new)
        else:
            self.call(R.SET_MEM_TABLE, MemTable(tuple(regions)), fds=(memory.fd,) * len(regions))

    def _set_mem_table(self, regions):
        raise AssertionError("set_mem_table() sends the table itself")

    def _set_vring_num(self, index, num):
        self.call(R.SET_VRING_NUM, VringState(index, num))

    def set_vring_base(self, index, base):
        self.call(R.SET_VRING_BASE, VringState(index, base))

    def get_vring_base(self, index):
        """GET_VRING_BASE: stop the ring; where it stopped (kept for a reconnect)."""
        base = self.call(R.GET_VRING_BASE, VringState(index, 0)).payload.num
        self.vring_bases[index] = base
        return base

    def _set_vring_addr(self, index, desc, avail, used, log):
        self.call(R.SET_VRING_ADDR, VringAddress(index, 1 if log is not None else 0,
                                                 desc, used, avail, log or 0))

    def _set_vring_fd(self, request, index, fd):
        self.call(request, VringFd(index, no_fd=fd is None), fds=() if fd is None else (fd,))

    def set_vring_kick(self, index, fd):
        """SET_VRING_KICK: the eventfd the guest's notifications arrive on; starts the ring."""
        self._set_vring_fd(R.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index, fd):
        """SET_VRING_CALL: the eventfd the back-end signals to interrupt the guest."""
        self._set_vring_fd(R.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index, fd):
        """SET_VRING_ERR: the eventfd the back-end signals when the ring is broken."""
        self._set_vring_fd(R.SET_VRING_ERR, index, fd)

    # --- vhost-user only ------------------------------------------------------------------

    def set_vring_enable(self, index, enabled):
        """SET_VRING_ENABLE (with bit 30): let the back-end process the ring, or not."""
        self.call(R.SET_VRING_ENABLE, VringState(index, int(enabled)))

    def get_config(self, size, offset=0):
        """GET_CONFIG: size bytes of the device's config space."""
        reply = self.call(R.GET_CONFIG, DeviceConfig(offset, 0, bytes(size))).payload
        if isinstance(reply, Empty) or len(reply.data) != size:
            raise VhostUserError(f"the back-end could not give {size} bytes of config space "
                                 f"at offset {offset} (GET_CONFIG failed)")
        return reply.data

    def set_config(self, offset, data):
        """SET_CONFIG: a driver's write into the device's config space."""
        self.call(R.SET_CONFIG, DeviceConfig(offset, 0, bytes(data)))

    def get_status(self):
        return self._u64(R.GET_STATUS)

    def set_status(self, status):
        """SET_STATUS (STATUS): the virtio device status byte, e.g. DRIVER_OK."""
        self.call(R.SET_STATUS, U64(status))

    def reset_device(self):
        """RESET_DEVICE: back to the initial state, ownership kept."""
        self.call(R.RESET_DEVICE)

    def get_inflight_fd(self, num_queues, queue_size):
        """GET_INFLIGHT_FD (INFLIGHT_SHMFD): a new inflight area from the back-end,
        as (Inflight description, fd), fd None if the back-end has none."""
        reply = self.call(R.GET_INFLIGHT_FD, Inflight(0, 0, num_queues, queue_size))
        return reply.payload, (reply.fds[0] if reply.fds else None)

    def set_inflight_fd(self, description, fd):
        """SET_INFLIGHT_FD: hand the area back (to this back-end or its successor)
        before the rings start."""
        self.call(R.SET_INFLIGHT_FD, description, fds=(fd,))
