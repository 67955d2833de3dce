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
the call eventfd is signalled if the driver wants it (EVENT_IDX); a device
that can serve a kick whole, signal included (blk's reads and writes, in
C), does so first in serve_kick(), with no Python per request (blk's C
then serves the ring's next kicks too, waiting in this loop's epoll set,
until anything else is ready there). A ring
the guest broke (RingError) is reported on the error eventfd and no longer
processed; the back-end goes on.

A request the back-end cannot carry out (an fd of the wrong kind, memory
it cannot map, a queue it does not have) is refused (Refused): answered
"no" where an answer is due (a non-zero ack, or the request's error form),
logged in one line, its fds closed, and the connection goes on. What was
refused changes nothing, neither here nor in what the session recorded. A
stream that cannot be read any further (broken framing, a broken rule of
the protocol) ends the connection instead.

    serve_forever("/tmp/rng.sock", Rng())     # listens; one front-end at a time
"""

import functools
import os

from pyvmm.sys.eventloop import EventLoop
from pyvmm.vhost.user.backend import faults
from pyvmm.vhost.user.backend import fds as checked
from pyvmm.vhost.user.backend import inflight
from pyvmm.vhost.user.backend.device import Refused
from pyvmm.vhost.user.backend.logs import backend_log
from pyvmm.vhost.user.backend.memory import MAX_MEM_SLOTS, MappedMemory
from pyvmm.vhost.user.backend.vring import Vring
from pyvmm.vhost.user.channel import Connection, Listener
from pyvmm.vhost.user.errors import (ChannelError, Disconnected, ProtocolError,
                                     RemoteProtocolError)
from pyvmm.vhost.user.messages import (
    U64, VHOST_USER_F_PROTOCOL_FEATURES, BackendReq, DeviceConfig, Empty, FrontendReq,
    Inflight, ProtocolFeature, VringState, methods_by_request)
from pyvmm.vhost.user.rules import Channel
from pyvmm.vhost.user.session import NEED_DATA, Role, Session
from pyvmm.vhost.user.wire import close_fds
from pyvmm.virtio import spec
from pyvmm.virtio.device_ring import DeviceRing
from pyvmm.virtio.splitring import (RingError, avail_ring_size, check_queue_size,
                                    desc_table_size, used_ring_size)

log = backend_log()

PF = ProtocolFeature
R = FrontendReq
# What the library implements for any device.
LIBRARY_PROTOCOL_FEATURES = (PF.MQ.mask | PF.REPLY_ACK.mask | PF.CONFIGURE_MEM_SLOTS.mask
                             | PF.STATUS.mask | PF.RESET_DEVICE.mask | PF.BACKEND_REQ.mask)
# The answer that says no to a refused request that is always answered (an
# ack says it with a non-zero u64).
ERROR_FORMS = {R.GET_CONFIG: Empty(),                     # BE-76
               R.GET_INFLIGHT_FD: Inflight(0, 0, 0, 0)}    # no area, so no fd
# Always answered, and nothing in the answer can say no: refusing one of
# these ends the connection.
NO_ERROR_FORM = {R.GET_VRING_BASE, R.GET_VRING_BASE_SKIP_DRAIN, R.GET_STATUS,
                 R.POSTCOPY_ADVISE}
# BE-90: SET_OWNER starts the session ("issued when a new connection is
# established"). Before it, what QEMU sends before it (the conformance
# notes, 4.1 A1-A6): the handshake that decides whether to go on.
BEFORE_OWNER = {R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES,
                R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS, R.SET_BACKEND_REQ_FD, R.SET_OWNER}
ACK = U64(0)            # success, to a request that asked for an ack
EVENT_IDX = spec.bit(spec.VIRTIO_RING_F_EVENT_IDX)     # (checked at every interrupt)
# How long a message to the front-end on the back-end channel may wait for
# room: a front-end that does not read that channel must not stall this one.
BACKEND_CHANNEL_TIMEOUT = 1.0


class Daemon:
    def __init__(self, device, conn, loop, allow_unsealed_memory=False):
        """allow_unsealed_memory: map memory the front-end could still shrink
        (fds.memory), for a trusted front-end whose memory cannot be sealed."""
        self.device = device
        self.conn = conn
        self.loop = loop
        self.session = Session(Role.BACKEND)
        self.allow_unsealed_memory = allow_unsealed_memory
        self.memory = MappedMemory(allow_unsealed=allow_unsealed_memory)
        self.rings = [Vring(i, self.session.negotiated) for i in range(device.num_queues)]
        self._fds = []                    # the fds of the request being applied, not kept
        self._pending = []                # rings to run (_process), in order
        self._processing = False
        self.owner = False                # SET_OWNER came (BE-90)
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
            # One whole frame per wake-up: receive() reads exactly one.
            data, fds = self.conn.receive("the rest of a request")
            if (msg := self.session.message(data, fds)) is not NEED_DATA:
                self.dispatch(msg)
        except Disconnected:
            log.info("the front-end disconnected")
            self.close()
        except (ProtocolError, ChannelError) as e:
            log.warning("the front-end: %s; closing the connection", e)
            self.close()
        except Exception as e:      # noqa: BLE001 - a bug here ends one connection, not all
            log.error("serving the front-end failed: %s: %s; closing the connection",
                      type(e).__name__, e)
            self.close()

    def dispatch(self, msg):
        """Apply one request; answer it when an answer is due. The fds that
        came with it are closed afterwards unless a handler kept one (_keep)."""
        faults.reach("message")
        self._fds = list(msg.fds)
        answer, fds = ACK, ()
        try:
            answer = self._apply(msg) or ACK
            if isinstance(answer, tuple):         # a payload and fds to pass
                answer, fds = answer
        except Refused as e:
            answer = self._refusal(msg, e)
        finally:
            close_fds(self._fds)
            self._fds = []
        try:
            if self.session.awaiting is msg:
                self.conn.send(*self.session.send(self.session.reply_to(msg, answer, fds)))
        finally:
            close_fds(fds)

    def _apply(self, msg):
        if not self.owner and msg.request not in BEFORE_OWNER:
            raise Refused("it comes before SET_OWNER", "BE-90")
        handler = _handlers(type(self)).get(msg.request)
        if handler is None:
            raise Refused("not served")
        return handler(self, msg)

    def _refusal(self, msg, why):
        """The answer that says no to msg; what the session recorded of it undone."""
        self.session.undo()
        if msg.request in NO_ERROR_FORM:
            raise RemoteProtocolError(f"{msg.request.name}: {why}")
        log.warning("%s refused: %s", msg.request.name, why)
        return ERROR_FORMS.get(msg.request, U64(1))

    def _keep(self, fd):
        """Take fd (of the request being applied) for good: dispatch will not close it."""
        if fd in self._fds:
            self._fds.remove(fd)
        return fd

    def _eventfd(self, msg, what):
        """The request's eventfd, checked and kept; None without one (the NOFD bit)."""
        if not msg.fds:
            return None
        return self._keep(checked.eventfd(msg.fds[0], what))

    # --- negotiation --------------------------------------------------------------------

    def _get_features(self, msg):
        return U64(self.offered_features)

    def _set_features(self, msg):
        unknown = msg.payload.value & ~self.offered_features
        if unknown:
            raise Refused(f"SET_FEATURES acks bits {unknown:#x} that were not offered", "FE-10")
        # Without bit 30 every ring is enabled (BE-53): the session's record says so.
        self.features = msg.payload.value
        self.device.start(self.features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES))

    def _get_protocol_features(self, msg):
        return U64(self.offered_protocol_features)

    def _set_protocol_features(self, msg):
        unknown = msg.payload.value & ~self.offered_protocol_features
        if unknown:                           # else the session keeps what was acked
            raise Refused(f"SET_PROTOCOL_FEATURES acks bits {unknown:#x} that were not "
                          f"offered", "FE-10")

    def _set_owner(self, msg):
        self.owner = True               # a second one breaks FE-69: the session refuses it

    def _reset_owner(self, msg):
        self._reset_device(msg)

    def _get_queue_num(self, msg):
        return U64(self.device.num_queues)

    def _get_max_mem_slots(self, msg):
        return U64(MAX_MEM_SLOTS)

    def _set_backend_req_fd(self, msg):
        sock = checked.unix_stream(msg.fds[0])
        self._keep(msg.fds[0])
        self._drop_backend_channel()
        self.backend_channel = Connection(sock, "the front-end (back-end channel)",
                                          timeout=BACKEND_CHANNEL_TIMEOUT)

    def _drop_backend_channel(self):
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = self.backend_session = None

    def _get_status(self, msg):
        return U64(self.status)

    def _set_status(self, msg):
        self.status = msg.payload.value & 0xFF

    def _reset_device(self, msg):
        """BE-92: every ring stopped and disabled, the device as new, ownership kept."""
        for ring in self.rings:               # (the session disables them)
            self._stop(ring)
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
        if not 0 < asked.num_queues <= len(self.rings) or \
                not 0 < asked.queue_size <= self.device.max_queue_size:
            raise Refused(f"an area for {asked.num_queues} queues of {asked.queue_size}; the "
                          f"device has {len(self.rings)} of at most "
                          f"{self.device.max_queue_size}")
        try:
            fd, size = inflight.create(asked.num_queues, asked.queue_size)
        except OSError as e:
            raise Refused(f"no inflight area: {e.strerror}") from None
        return Inflight(size, 0, asked.num_queues, asked.queue_size), [fd]

    def _set_inflight_fd(self, msg):
        running = [ring.index for ring in self.rings if ring.started]
        if running:           # what a started ring took would go untracked
            raise Refused(f"an inflight area while queue {running[0]} runs (it comes before "
                          f"the rings start)")
        area = inflight.InflightArea(msg.fds[0], msg.payload, self.allow_unsealed_memory)
        self._drop_inflight()
        self.inflight_area = area
        for ring in self.rings:
            ring.inflight = self.inflight_area.queue(ring.index)
        faults.reach("inflight-fd")

    def _drop_inflight(self):
        for ring in self.rings:
            ring.inflight = None
        if self.inflight_area is not None:
            self.inflight_area.close()
            self.inflight_area = None

    # --- memory -------------------------------------------------------------------------

    # The fds are closed once mapped (the mappings keep the memory); one that
    # comes with REM_MEM_REG is closed unused (BE-34).

    def _set_mem_table(self, msg):
        self.memory.replace(zip(msg.payload.regions, msg.fds))

    def _add_mem_reg(self, msg):
        self.memory.add(msg.payload.region, msg.fds[0])

    def _rem_mem_reg(self, msg):
        self.memory.remove(msg.payload.region)

    # --- rings ----------------------------------------------------------------------------

    def _ring(self, index):
        if index >= len(self.rings):
            raise Refused(f"queue {index}: the device has {len(self.rings)}", "FE-16")
        return self.rings[index]

    def _stopped_ring(self, index, what):
        """Ring index, which must be stopped: its size and base do not change
        under a running ring (vhost's VHOST_SET_VRING_NUM/BASE: EBUSY)."""
        ring = self._ring(index)
        if ring.started:
            raise Refused(f"queue {index}: {what} while it runs (GET_VRING_BASE stops it)")
        return ring

    def _set_vring_num(self, msg):
        ring = self._stopped_ring(msg.payload.index, "a new size")
        try:
            check_queue_size(msg.payload.num, self.device.max_queue_size)
        except RingError as e:
            raise Refused(f"queue {ring.index}: {e}") from None

    # The session has recorded the new size, base or addresses (and takes
    # them back if the daemon refuses).

    def _set_vring_base(self, msg):
        self._stopped_ring(msg.payload.index, "a new base")

    def _set_vring_addr(self, msg):
        self._ring(msg.payload.index)

    def _device_ring(self, ring):
        """A DeviceRing at ring's addresses, from its base (Vring.start keeps
        the place of a ring already started)."""
        if ring.num is None or ring.addr is None:
            raise Refused(f"queue {ring.index}: no size or address yet", "FE-50")
        a, m = ring.addr, self.memory
        try:
            return DeviceRing(m, ring.num, m.guest_address(a.desc, desc_table_size(ring.num)),
                              m.guest_address(a.avail, avail_ring_size(ring.num)),
                              m.guest_address(a.used, used_ring_size(ring.num)),
                              ring.base)
        except RingError as e:
            raise Refused(f"queue {ring.index}: {e}") from None

    def _replace_fd(self, ring, attribute, fd):
        old = getattr(ring, attribute)
        if old is not None:
            if attribute == "kick":
                self.loop.remove(old)
            os.close(old)
        setattr(ring, attribute, fd)

    def _set_vring_kick(self, msg):
        """BE-46: the kick fd starts the ring; a started ring takes the new fd
        (and addresses) where it is."""
        ring = self._ring(msg.payload.index)
        device_ring = self._device_ring(ring)
        self._replace_fd(ring, "kick", self._eventfd(msg, "kick"))
        ring.start(device_ring)
        if ring.resubmit:
            log.info("queue %d: resubmitting %d requests a previous back-end left in flight",
                     ring.index, len(ring.resubmit))
        if ring.kick is not None:
            self.loop.add_reader(ring.kick, lambda: self._on_kick(ring),
                                 f"queue {ring.index}'s kick")
        self._process(ring)                   # BE-47: what was queued before the kick fd

    def _set_vring_call(self, msg):
        ring = self._ring(msg.payload.index)
        self._replace_fd(ring, "call", self._eventfd(msg, "call"))

    def _set_vring_err(self, msg):
        ring = self._ring(msg.payload.index)
        self._replace_fd(ring, "err", self._eventfd(msg, "error"))

    def _set_vring_enable(self, msg):
        ring = self._ring(msg.payload.index)
        if ring.enabled:                      # (as the session has it now)
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
        try:
            self.backend_channel.send(*self.backend_session.send(
                self.backend_session.request(BackendReq.CONFIG_CHANGE_MSG)))
        except (ChannelError, ProtocolError) as e:
            log.warning("the back-end channel: %s; no more config-change messages", e)
            self._drop_backend_channel()
            return False
        return True

    # --- the data path --------------------------------------------------------------------

    def _on_kick(self, ring):
        try:
            os.eventfd_read(ring.kick)
        except BlockingIOError:
            pass
        if not self._run(ring, None):
            self._process(ring)

    def _process(self, ring):
        """Let the device work on ring, then interrupt the driver. Asked again
        from inside a device's handle_queue (vsock's tx waking its rx), the
        ring runs right after the current one rather than inside it; and the
        interrupts come once all have run, so that the driver finds what one
        ring's requests made another do (vsock's replies) when it hears of
        either."""
        if ring not in self._pending:
            self._pending.append(ring)
        if self._processing:
            return
        self._processing = True
        used_before = {}                  # ring -> its used index before this round
        try:
            while self._pending:
                self._run(self._pending.pop(0), used_before)
        finally:
            self._processing = False
            self._pending.clear()
        for r, before in used_before.items():
            self._interrupt(r, before)

    def _run(self, ring, used_before):
        """Let the device work on a started, enabled, unbroken ring: its
        handle_queue, noting in used_before (ring -> index) the used index
        before it. used_before None, at a kick: the device's serve_kick
        instead, which interrupts the driver itself; False if it left the
        ring to handle_queue (True if it served it, or nothing could run)."""
        dr = ring.device_ring
        if dr is None or not ring.enabled or ring.broken:
            return True
        try:
            if used_before is None:
                return self.device.serve_kick(ring.index, ring, ring.call,
                                              self.features & EVENT_IDX)
            used_before.setdefault(ring, dr.used_idx())
            self.device.handle_queue(ring.index, ring, self.memory)
        except RingError as e:
            self._broken(ring, str(e))
        except Exception as e:  # noqa: BLE001 - whatever the guest made a device do
            self._broken(ring, f"the device failed: {type(e).__name__}: {e}")
        return True

    def _interrupt(self, ring, used_before):
        """Signal the call eventfd if the driver wants to hear of what was used."""
        event_idx = self.features & EVENT_IDX
        try:
            if ring.call is not None and ring.device_ring is not None and \
                    ring.device_ring.should_notify(used_before, event_idx):
                _signal(ring.call)
        except RingError:
            pass                  # no longer in memory: no used entries to tell of

    def _broken(self, ring, why):
        log.warning("queue %d: %s; the ring is broken", ring.index, why)
        ring.broken = True
        if ring.err is not None:
            _signal(ring.err)


@functools.cache
def _handlers(daemon_class):
    """Each request's handler in daemon_class: _set_features for SET_FEATURES..."""
    return methods_by_request(daemon_class, "_")


def _signal(fd):
    """Add 1 to an eventfd (non-blocking: fds.eventfd) without waiting: a
    counter that is full already has an interrupt pending."""
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass


def serve_connection(device, conn, daemon_class=Daemon, **options):
    """Serve one connected front-end until it goes away (daemon_class: a
    Daemon subclass, say one broken on purpose to test a checker; options:
    the Daemon's keyword arguments)."""
    loop = EventLoop(on_error=lambda what, e: log.error("%s: %s", what, e))
    daemon = daemon_class(device, conn, loop, **options)
    try:
        loop.run_until(lambda: daemon.done)
    finally:
        if not daemon.done:
            daemon.close()
        loop.close()
        device.reset()


def serve_forever(listener, device, daemon_class=Daemon, **options):
    """Serve one front-end after another on listener (a Listener, or a path to
    listen on) until interrupted; the socket file goes at the end."""
    if not isinstance(listener, Listener):
        listener = Listener(listener)
    try:
        while True:
            serve_connection(device, listener.accept("the front-end"), daemon_class,
                             **options)
    finally:
        listener.close()
