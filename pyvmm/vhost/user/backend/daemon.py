"""The back-end library: one BackendDevice served to one front-end at a time.

Daemon pairs a Connection with a Session(BACKEND): the session checks
every request against the protocol's rules (so a front-end that breaks one
is refused with the rule named), and the daemon applies it: the memory
table is mapped from the fds, ring addresses are translated from the
front-end's addresses into guest memory, rings start at SET_VRING_KICK and
stop at GET_VRING_BASE (BE-46, BE-48), are enabled by SET_VRING_ENABLE or,
without VHOST_USER_F_PROTOCOL_FEATURES, by SET_FEATURES (BE-52, BE-53), and
REPLY_ACK is answered here, never by the device.

Its own event loop watches the socket and the kick eventfd of each started
ring: a kick on an enabled ring calls device.handle_queue(), after which
the call eventfd is signalled if the driver wants it (EVENT_IDX). A ring
the guest broke (RingError) is reported on the error eventfd and no longer
processed; the back-end goes on.

    serve_forever("/tmp/rng.sock", Rng())     # listens; one front-end at a time
"""

import logging
import os
import socket

from pyvmm.sys.eventloop import EventLoop
from pyvmm.vhost.user.backend import inflight
from pyvmm.vhost.user.backend.memory import MappedMemory
from pyvmm.vhost.user.backend.vring import Vring
from pyvmm.vhost.user.channel import Connection, Listener
from pyvmm.vhost.user.errors import (ChannelError, Disconnected, ProtocolError,
                                     RemoteProtocolError)
from pyvmm.vhost.user.messages import (
    U64, VHOST_USER_F_PROTOCOL_FEATURES, BackendReq, DeviceConfig, Empty, FrontendReq,
    Inflight, ProtocolFeature, VringState)
from pyvmm.vhost.user.rules import Channel
from pyvmm.vhost.user.session import NEED_DATA, Role, Session
from pyvmm.virtio import spec
from pyvmm.virtio.device_ring import DeviceRing
from pyvmm.virtio.splitring import RingError, avail_ring_size, desc_table_size, used_ring_size

log = logging.getLogger("pyvmm.backend")

PF = ProtocolFeature
R = FrontendReq
# What the library implements for any device.
LIBRARY_PROTOCOL_FEATURES = (PF.MQ.mask | PF.REPLY_ACK.mask | PF.CONFIGURE_MEM_SLOTS.mask
                             | PF.STATUS.mask | PF.RESET_DEVICE.mask | PF.BACKEND_REQ.mask)
MAX_MEM_SLOTS = 32


class Daemon:
    def __init__(self, device, conn, loop):
        self.device = device
        self.conn = conn
        self.loop = loop
        self.session = Session(Role.BACKEND)
        self.memory = MappedMemory()
        self.rings = [Vring(i) for i in range(device.num_queues)]
        self.inflight_area = None
        self.features = 0
        self.status = 0
        self.backend_channel = None
        self.backend_session = None       # the back-end channel's Session
        self.done = False
        loop.add_reader(conn.fileno(), self._on_socket, "the front-end's socket")
        device.attach(self)

    @property
    def offered_features(self):
        return self.device.features | (1 << VHOST_USER_F_PROTOCOL_FEATURES)

    @property
    def offered_protocol_features(self):
        offered = LIBRARY_PROTOCOL_FEATURES
        if self.device.config():
            offered |= PF.CONFIG.mask
        if self.device.inflight_tracking:
            offered |= PF.INFLIGHT_SHMFD.mask
        return offered

    def close(self):
        self.device.detach()
        for ring in self.rings:
            self._stop(ring)
            ring.close_fds()
        self.memory.clear()
        self._drop_inflight()
        self.loop.remove(self.conn.fileno())
        self.conn.close()
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.session.close()
        self.done = True

    # --- the socket -----------------------------------------------------------------

    def _on_socket(self):
        try:
            data, fds = self.conn.receive("the rest of a request")
            self.session.receive(data, fds)
            while (msg := self.session.next_message()) is not NEED_DATA:
                self.dispatch(msg)
        except Disconnected:
            log.info("the front-end disconnected")
            self.close()
        except (ProtocolError, ChannelError) as e:
            log.warning("the front-end: %s; closing the connection", e)
            self.close()

    def dispatch(self, msg):
        """Apply one request; answer it when an answer is due."""
        handler = getattr(self, f"_{msg.request.name.lower()}", None)
        answer, fds = U64(0), ()
        if handler is None:
            for fd in msg.fds:
                os.close(fd)
            log.warning("%s is not served; answering 'refused' where an answer is due",
                        msg.request.spec_name)
            answer = U64(1)
        else:
            answer = handler(msg) or U64(0)
            if isinstance(answer, tuple):         # a payload and fds to pass
                answer, fds = answer
        try:
            if self.session.awaiting is msg:
                self.conn.send(*self.session.send(self.session.reply_to(msg, answer, fds)))
        finally:
            for fd in fds:
                os.close(fd)

    # --- negotiation --------------------------------------------------------------------

    def _get_features(self, msg):
        return U64(self.offered_features)

    def _set_features(self, msg):
        self.features = msg.payload.value
        if not self.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            for ring in self.rings:          # BE-53
                ring.enabled = True
        self.device.start(self.features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES))

    def _get_protocol_features(self, msg):
        return U64(self.offered_protocol_features)

    def _set_protocol_features(self, msg):
        pass                                  # the session keeps what was acked

    def _set_owner(self, msg):
        pass

    def _reset_owner(self, msg):
        self._reset_device(msg)

    def _get_queue_num(self, msg):
        return U64(self.device.num_queues)

    def _get_max_mem_slots(self, msg):
        return U64(MAX_MEM_SLOTS)

    def _set_backend_req_fd(self, msg):
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = Connection(socket.socket(fileno=msg.fds[0]),
                                          "the front-end (back-end channel)")
        self.backend_session = None

    def _get_status(self, msg):
        return U64(self.status)

    def _set_status(self, msg):
        self.status = msg.payload.value & 0xFF

    def _reset_device(self, msg):
        """BE-92: every ring stopped and disabled, the device as new, ownership kept."""
        for ring in self.rings:
            self._stop(ring)
            ring.enabled = False
        self.status = 0
        self._drop_inflight()             # a reset device starts with a new area
        self.device.reset()

    def _get_config(self, msg):
        config = self.device.config()
        asked = msg.payload
        end = asked.offset + len(asked.data)
        if end > len(config):
            return Empty()                    # BE-76: the error form
        return DeviceConfig(asked.offset, 0, config[asked.offset:end])

    def _set_config(self, msg):
        self.device.write_config(msg.payload.offset, msg.payload.data)

    # --- inflight tracking (inflight.py) ------------------------------------------------

    def _get_inflight_fd(self, msg):
        asked = msg.payload
        if not asked.num_queues or not asked.queue_size or asked.num_queues > len(self.rings):
            raise RemoteProtocolError(f"GET_INFLIGHT_FD for {asked.num_queues} queues of "
                                      f"{asked.queue_size}; the device has {len(self.rings)}")
        fd, size = inflight.create(asked.num_queues, asked.queue_size)
        return Inflight(size, 0, asked.num_queues, asked.queue_size), [fd]

    def _set_inflight_fd(self, msg):
        self._drop_inflight()
        self.inflight_area = inflight.InflightArea(msg.fds[0], msg.payload)
        for ring in self.rings:
            ring.inflight = self.inflight_area.queue(ring.index)

    def _drop_inflight(self):
        for ring in self.rings:
            ring.inflight = None
        if self.inflight_area is not None:
            self.inflight_area.close()
            self.inflight_area = None

    # --- memory -------------------------------------------------------------------------

    def _set_mem_table(self, msg):
        self.memory.clear()
        for region, fd in zip(msg.payload.regions, msg.fds):
            self.memory.add(region, fd)

    def _add_mem_reg(self, msg):
        self.memory.add(msg.payload.region, msg.fds[0])

    def _rem_mem_reg(self, msg):
        for fd in msg.fds:                    # BE-34: an fd here is closed unused
            os.close(fd)
        self.memory.remove(msg.payload.region)

    # --- rings ----------------------------------------------------------------------------

    def _ring(self, index):
        if index >= len(self.rings):
            raise RemoteProtocolError(f"queue {index}: the device has {len(self.rings)}",
                                      "FE-16")
        return self.rings[index]

    def _set_vring_num(self, msg):
        ring = self._ring(msg.payload.index)
        if msg.payload.num > self.device.max_queue_size:
            raise RemoteProtocolError(f"queue {ring.index}: {msg.payload.num} entries, at most "
                                      f"{self.device.max_queue_size}")
        ring.num = msg.payload.num

    def _set_vring_base(self, msg):
        self._ring(msg.payload.index).base = msg.payload.num

    def _set_vring_addr(self, msg):
        self._ring(msg.payload.index).addr = msg.payload

    def _set_fd(self, msg, attribute):
        ring = self._ring(msg.payload.index)
        old = getattr(ring, attribute)
        if old is not None:
            if attribute == "kick":
                self.loop.remove(old)
            os.close(old)
        setattr(ring, attribute, msg.fds[0] if msg.fds else None)
        return ring

    def _set_vring_kick(self, msg):
        """BE-46: the kick fd starts the ring."""
        ring = self._set_fd(msg, "kick")
        a = ring.addr
        m = self.memory
        try:
            ring.start(DeviceRing(
                m, ring.num, m.guest_address(a.desc, desc_table_size(ring.num)),
                m.guest_address(a.avail, avail_ring_size(ring.num)),
                m.guest_address(a.used, used_ring_size(ring.num)), ring.base))
        except RingError as e:
            raise RemoteProtocolError(f"queue {ring.index}: {e}") from None
        if ring.resubmit:
            log.info("queue %d: resubmitting %d requests a previous back-end left in flight",
                     ring.index, len(ring.resubmit))
        if ring.kick is not None:
            self.loop.add_reader(ring.kick, lambda: self._on_kick(ring),
                                 f"queue {ring.index}'s kick")
        self._process(ring)                   # BE-47: what was queued before the kick fd

    def _set_vring_call(self, msg):
        self._set_fd(msg, "call")

    def _set_vring_err(self, msg):
        self._set_fd(msg, "err")

    def _set_vring_enable(self, msg):
        ring = self._ring(msg.payload.index)
        ring.enabled = bool(msg.payload.num)
        if ring.enabled:
            self._process(ring)

    def _get_vring_base(self, msg):
        """BE-48: stop the ring; BE-60: nothing is in flight (requests finish in
        handle_queue), so where it stopped is where the next one starts."""
        ring = self._ring(msg.payload.index)
        return VringState(ring.index, self._stop(ring))

    def _stop(self, ring):
        if ring.started and ring.kick is not None:
            self.loop.remove(ring.kick)
        return ring.stop()

    # --- what a device may ask for ----------------------------------------------------------

    def wake(self, index):
        """Run the device's handle_queue for queue index, if it can run now."""
        self._process(self.rings[index])

    def config_changed(self):
        """BACKEND_CONFIG_CHANGE_MSG: the front-end should read the config space
        again (sent without NEED_REPLY: waiting here could deadlock a front-end
        that is itself waiting for this back-end). False without a channel."""
        if self.backend_channel is None or not self.session.negotiated.has(PF.CONFIG):
            return False
        if self.backend_session is None:
            self.backend_session = Session(Role.BACKEND, Channel.BACKEND, main=self.session)
        self.backend_channel.send(*self.backend_session.send(
            self.backend_session.request(BackendReq.CONFIG_CHANGE_MSG)))
        return True

    # --- the data path --------------------------------------------------------------------

    def _on_kick(self, ring):
        try:
            os.eventfd_read(ring.kick)
        except BlockingIOError:
            pass
        self._process(ring)

    def _process(self, ring):
        """Let the device work on a started, enabled, unbroken ring; interrupt the driver."""
        dr = ring.device_ring
        if dr is None or not ring.enabled or ring.broken:
            return
        used_before = dr.used_idx()
        try:
            self.device.handle_queue(ring.index, ring, self.memory)
        except RingError as e:
            log.warning("queue %d: %s; the ring is broken", ring.index, e)
            ring.broken = True
            if ring.err is not None:
                os.eventfd_write(ring.err, 1)
        event_idx = self.features & spec.bit(spec.VIRTIO_RING_F_EVENT_IDX)
        if ring.call is not None and dr.should_notify(used_before, event_idx):
            os.eventfd_write(ring.call, 1)


def serve_connection(device, conn, daemon_class=Daemon):
    """Serve one connected front-end until it goes away (daemon_class: a
    Daemon subclass, say one broken on purpose to test a checker)."""
    loop = EventLoop(on_error=lambda what, e: log.error("%s: %s", what, e))
    daemon = daemon_class(device, conn, loop)
    try:
        loop.run_until(lambda: daemon.done)
    finally:
        if not daemon.done:
            daemon.close()
        loop.close()
        device.reset()


def serve_forever(listener, device, daemon_class=Daemon):
    """Serve one front-end after another on listener (a Listener, or a path to
    listen on) until interrupted; the socket file goes at the end."""
    if not isinstance(listener, Listener):
        listener = Listener(listener)
    try:
        while True:
            serve_connection(device, listener.accept("the front-end"), daemon_class)
    finally:
        listener.close()
