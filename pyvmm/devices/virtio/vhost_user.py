"""Queues served by a vhost-user back-end: another process, over a Unix socket.

At plan time the front-end has connected and negotiated (frontend.py); the
back-end's config space is read then and cached, and read again only when
the back-end says it changed (BACKEND_CONFIG_CHANGE_MSG on its request
channel), from the event loop, never while a vCPU waits.

At DRIVER_OK (start): SET_FEATURES, the memory table, the inflight area
where the back-end keeps one (GET_INFLIGHT_FD the first time after a
reset, SET_INFLIGHT_FD), then per queue SET_VRING_NUM, SET_VRING_BASE,
SET_VRING_ADDR, SET_VRING_CALL, SET_VRING_ERR, SET_VRING_KICK (which starts
the ring) and SET_VRING_ENABLE, a kick for whatever the guest queued before
the back-end watched, and SET_STATUS(DRIVER_OK) where STATUS is negotiated.
At reset (stop): SET_VRING_ENABLE(0) and GET_VRING_BASE per started queue,
SET_STATUS(0) and RESET_DEVICE where negotiated; the inflight area goes.
A start that fails half-way stops what it started before it reports the
failure, and each of start and stop has one deadline as a whole (the
back-end's timeout), so that a vCPU never waits on it for longer.

A back-end can fail its device in two ways, told apart because they leave
its rings in different states:

- it goes away (its socket hangs up): nothing of it runs any more, so the
  transport may take the queues over and answer the guest's requests with
  errors, starting with those the inflight area says it took and never
  completed;
- the connection dies under it (no answer in time, a broken rule): its
  rings may still run, so the device only gets DEVICE_NEEDS_RESET. pyvmm
  shuts down its side of the socket; when the back-end then hangs up, the
  queues are taken over as above.

Either way pyvmm says so in one line and the VM and its other devices go
on. A failure of the back-end's request channel alone fails nothing: pyvmm
stops listening to it (config changes go unheard) and says so.
"""

import logging
import os
import threading

from pyvmm.devices.virtio.device import DeviceError, QueueBackend
from pyvmm.vhost.backend import VringAddr
from pyvmm.vhost.user.errors import PeerRefused, VhostUserError
from pyvmm.vhost.user.messages import (VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES,
                                       BackendReq, ProtocolFeature)
from pyvmm.virtio import spec
from pyvmm.virtio.splitring import avail_idx, used_idx

log = logging.getLogger("pyvmm.vhost-user")

PF = ProtocolFeature
# Bits of GET_FEATURES that are about vhost-user itself, not the device.
PROTOCOL_ONLY_FEATURES = (1 << VHOST_USER_F_PROTOCOL_FEATURES) | (1 << VHOST_F_LOG_ALL)
DRIVER_OK_STATUS = (spec.VIRTIO_CONFIG_S_ACKNOWLEDGE | spec.VIRTIO_CONFIG_S_DRIVER
                    | spec.VIRTIO_CONFIG_S_FEATURES_OK | spec.VIRTIO_CONFIG_S_DRIVER_OK)


class VhostUserBackend(QueueBackend):
    def __init__(self, frontend, description, config_size=0, reconnect=None):
        """frontend: a negotiated VhostUserFrontend, now the back-end's;
        config_size: bytes of config space to read from it (GET_CONFIG);
        reconnect: a Reconnect (vhost/user/reconnect.py) to get a back-end
        back with when this one goes, or None (it is gone for good)."""
        self.frontend = frontend
        self.reconnect = reconnect
        # start(), stop() and a reconnect each talk to the back-end from start
        # to end alone: a vCPU's start waits for a reconnect's replay.
        self._lock = threading.RLock()
        self._running = None         # (memory, features, queues) from DRIVER_OK to reset
        self._enabled = {}           # index -> SET_VRING_ENABLE as the model last set it
        self.reconnecting = False    # the back-end went; another is being waited for
        self._reconnected = None     # (event loop) a new frontend to watch
        self._closing = threading.Event()
        self._reconnect_thread = None
        self.description = description
        self._features = (frontend.negotiated.features_offered or 0) & ~PROTOCOL_ONLY_FEATURES
        self._config_size = config_size
        self.config_space = b""
        self.failed = None           # why the back-end cannot serve the device, once so
        self.gone = False            # it hung up: none of its rings runs any more
        self._inflight = None        # (Inflight, fd) the back-end tracks requests in
        # Queues the model keeps disabled at DRIVER_OK (a NIC's pairs past the
        # first, until the driver asks for them: set_enabled()).
        self.disabled_at_start = set()
        # The event loop's side (watch()): what the device is told, and an
        # eventfd other threads wake the loop with.
        self._device = self._loop = None
        self._wake_fd = None
        self._config_stale = False
        self._reported = set()       # "failed", "gone": what the device was told
        frontend.on_backend_request = self._backend_request
        if config_size:
            self.refresh_config()

    def features(self):
        return self._features

    def _started(self):
        """The queues whose kick went out: the back-end may be running them
        (the session keeps each ring's state as the messages left it)."""
        return sorted(r.index for r in self.frontend.negotiated.rings.values() if r.started)

    def refresh_config(self):
        """Read the config space again (GET_CONFIG); keep the last one if refused."""
        if self._config_size and self.frontend.has(PF.CONFIG):
            self.config_space = self.frontend.get_config(self._config_size)

    def set_enabled(self, index, enabled):
        """SET_VRING_ENABLE for a started queue (the model's decision)."""
        self._enabled[index] = enabled
        if self.reconnecting:
            return                   # replayed on the next back-end
        if index in self._started() and not self.failed:
            try:
                with self.frontend.deadline(self.frontend.conn.timeout):
                    self.frontend.set_vring_enable(index, enabled)
            except VhostUserError as e:
                self._failed_call(e, f"enabling queue {index}" if enabled
                                  else f"disabling queue {index}")
                raise

    def write_config(self, offset, data):
        """A driver's write into the config space: kept in the cache and sent on
        (SET_CONFIG). Only within the config space the back-end gave."""
        end = offset + len(data)
        if end > len(self.config_space) or self.failed:
            return
        self.config_space = self.config_space[:offset] + bytes(data) + self.config_space[end:]
        if self.reconnecting:
            return
        try:
            with self.frontend.deadline(self.frontend.conn.timeout):
                self.frontend.set_config(offset, data)
        except VhostUserError as e:
            self._failed_call(e, "writing its config space")

    # --- the data path's control ---------------------------------------------------

    def start(self, memory, features, queues):
        with self._lock:
            if self.failed:
                raise DeviceError(f"{self.description} is gone ({self.failed})")
            self._enabled = {q.index: q.index not in self.disabled_at_start for q in queues}
            self._running = (memory, features, queues)
            if self.reconnecting:
                return             # the next back-end gets it all when it comes
            try:
                self._bring_up(memory, features, queues, {})
            except VhostUserError as e:
                if self.reconnect is not None and self.frontend.hung_up:
                    return         # the next back-end gets it all when it comes
                self._running = None
                self._failed_call(e)
                self._reported.add("failed")   # the DeviceError below is the device's one line
                self.stop()        # what did start must not run on behind the guest's back
                raise DeviceError(f"{self.description}: {e}") from None

    def _bring_up(self, memory, features, queues, bases):
        """Everything a back-end needs to run the device, in one deadline: at
        DRIVER_OK (bases {}: every ring from 0), and again on a back-end that
        replaces one that went (bases: where each ring is to go on from)."""
        fe = self.frontend
        with fe.deadline(fe.conn.timeout):
            # Bits the model implements itself (a MAC in config space, say)
            # are not the back-end's to ack (FE-10).
            fe.set_features(features & self._features)
            fe.set_mem_table(memory)
            self._hand_over_inflight(queues)
            for q in queues:
                fe.start_vring(q.index, q.size, VringAddr(q.desc, q.avail, q.used),
                               q.kick_fd, q.call_fd, q.err_fd, bases.get(q.index, 0))
                if fe.negotiated.protocol_features_on:
                    fe.set_vring_enable(q.index, self._enabled.get(q.index, True))
                # FE-45: requests the guest queued before the back-end watched
                # its kick fd would otherwise wait for the next kick.
                os.eventfd_write(q.kick_fd, 1)
            if fe.has(PF.STATUS):
                fe.set_status(DRIVER_OK_STATUS)

    def _hand_over_inflight(self, queues):
        """INFLIGHT_SHMFD: the area the back-end tracks requests in, made the
        first time after a reset (GET_INFLIGHT_FD) and handed to it before its
        rings start (SET_INFLIGHT_FD). pyvmm keeps it: if the back-end goes,
        it says which requests were taken and never completed."""
        fe = self.frontend
        if not fe.has(PF.INFLIGHT_SHMFD) or not queues:
            return
        if self._inflight is None:
            description, fd = fe.get_inflight_fd(max(q.index for q in queues) + 1,
                                                 max(q.size for q in queues))
            if fd is None:
                return             # (an mmap_size of 0: it keeps none after all)
            self._inflight = (description, fd)
        fe.set_inflight_fd(*self._inflight)

    def stop(self):
        """Stop every started queue; the bases stay in frontend.vring_bases."""
        with self._lock:
            self._running = None
            if self.reconnecting:
                self._drop_inflight()    # the next back-end starts afresh
                return
            self._stop()

    def _stop(self):
        started = self._started()
        fe = self.frontend
        try:
            if started and not fe.dead:
                with fe.deadline(fe.conn.timeout):
                    for index in started:
                        self._stop_queue(index)
                    if fe.has(PF.STATUS):
                        fe.set_status(0)
                    if fe.has(PF.RESET_DEVICE):
                        fe.reset_device()         # BE-92: back to its initial state, still ours
        except VhostUserError as e:
            self._failed_call(e, "stopping its rings")
        if fe.dead and self._started() and not self.gone and not fe.hung_up:
            log.warning("%s: its rings %s may still run: the connection to it is dead (%s)",
                        self.description, ", ".join(map(str, self._started())), fe.dead)
        self._drop_inflight()

    def _stop_queue(self, index):
        """Disable, then stop (GET_VRING_BASE) one queue; a refused disable does
        not keep it from being stopped."""
        fe = self.frontend
        if fe.negotiated.protocol_features_on:
            try:
                fe.set_vring_enable(index, False)
            except PeerRefused as e:
                log.warning("%s: %s", self.description, e)
        fe.get_vring_base(index)

    def _drop_inflight(self):
        """A reset device starts afresh: its old area would resubmit stale requests."""
        if self._inflight is not None:
            os.close(self._inflight[1])
            self._inflight = None

    def unfinished(self, index, num, used_idx):
        """Once the back-end is gone: the heads of queue index it took and never
        completed, oldest first, read from the inflight area (what a successor
        would resubmit); None without an area that tracked this queue."""
        from pyvmm.vhost.user.backend.inflight import InflightArea
        if self._inflight is None:
            return None
        description, fd = self._inflight
        area = InflightArea(os.dup(fd), description)
        try:
            queue = area.queue(index)
            if queue is None or num > queue.queue_size:
                return None
            return queue.start(num, used_idx)
        finally:
            area.close()

    def close(self):
        self._closing.set()
        if self._reconnect_thread is not None:
            self._reconnect_thread.join(timeout=(self.reconnect.interval
                                                 + self.frontend.conn.timeout))
        self._drop_inflight()
        if self._wake_fd is not None:
            os.close(self._wake_fd)        # (the VM's loop is going away with it)
            self._wake_fd = None
        self.frontend.close()

    # --- failures ----------------------------------------------------------------------

    def _failed_call(self, error, what=None):
        """A request failed (doing what, if said): a refusal leaves the connection
        as it was, and is one line here; anything else left the connection dead,
        and the device needs a reset (the event loop tells it, in one line)."""
        if self.frontend.dead is None:
            if what is not None:
                log.warning("%s: %s: %s", self.description, what, error)
        elif self.reconnect is not None and self.frontend.hung_up:
            pass                   # the hang-up watch brings the next back-end in
        elif self.failed is None:
            self.failed = f"{what}: {self.frontend.dead}" if what else self.frontend.dead
            self._wake()

    def _hung_up(self):
        """(event loop) The back-end closed its connection."""
        fe = self.frontend
        self._loop.remove(fe.conn.fileno())
        if fe.backend_channel is not None:
            self._loop.remove(fe.backend_channel.fileno())
        fe.die("the back-end closed its connection", hung_up=True)
        if self.reconnect is not None and self.failed is None:
            with self._lock:
                self.reconnecting = True
            log.warning("%s went away; %s", self.description, self.reconnect.how())
            self._reconnect_thread = threading.Thread(target=self._reconnect_loop,
                                                      name="vhost-user reconnect", daemon=True)
            self._reconnect_thread.start()
            return
        self.gone = True
        if self.failed is None:
            self.failed = "the back-end closed its connection"
        self._report()

    def _report(self):
        """(event loop) Tell the device what it has not been told yet: the
        back-end failed (DEVICE_NEEDS_RESET, one line); it is gone (its queues
        may be taken over)."""
        device = self._device
        if self.failed is not None and "failed" not in self._reported:
            self._reported.add("failed")
            device.on_failure(f"{self.description}: {self.failed}")
        if self.gone and "gone" not in self._reported:
            self._reported.add("gone")
            device.on_backend_gone()

    # --- watching the back-end from the event loop ------------------------------------

    def watch(self, device, loop):
        """Notice the back-end hanging up, serve its request channel, and do
        in the loop what other threads ask for (a config refresh, a failure,
        a back-end back)."""
        self._device, self._loop = device, loop
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        loop.add_reader(self._wake_fd, self._on_wake, f"{device.name}'s vhost-user events")
        self._watch_connection(self.frontend)
        if self.failed is not None:
            self._wake()

    def _watch_connection(self, fe):
        loop, name = self._loop, self._device.name
        loop.add_hangup_watch(fe.conn.fileno(), self._hung_up, f"{name}'s vhost-user socket")
        channel = fe.backend_channel
        if channel is not None:
            def request():
                fe.serve_backend_channel()
                if fe.backend_broken is not None:
                    loop.remove(channel.fileno())    # (closed with the front-end)
            loop.add_reader(channel.fileno(), request, f"{name}'s back-end channel")

    def _wake(self):
        if self._wake_fd is not None:
            os.eventfd_write(self._wake_fd, 1)

    def _on_wake(self):
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        if self._reconnected is not None:
            self._rewatch()
        if self._config_stale and self.failed is None:
            self._config_stale = False
            try:
                self.refresh_config()
                self._device.on_config_change()
                log.debug("%s: the back-end changed the config space", self._device.name)
            except VhostUserError as e:
                self._failed_call(e, "reading its new config space")
        self._report()

    # --- reconnect (reconnect=S) -------------------------------------------------------

    def _reconnect_loop(self):
        """(its own thread) Try for a back-end until one takes the device over,
        one cannot (the device fails), or the VM ends."""
        rc = self.reconnect
        while not self._closing.is_set():
            try:
                fe = rc.attempt()
            except VhostUserError as e:
                log.debug("%s: no back-end yet: %s", self.description, e)
                if not rc.server:
                    self._closing.wait(rc.interval)
                continue
            try:
                with self._lock:
                    self._take_over(fe)
                return
            except DeviceError as e:
                fe.close()
                with self._lock:
                    self.reconnecting = False
                    self.failed = str(e)
                    self.gone = True       # nothing runs its rings: pyvmm may take them
                self._wake()
                return
            except VhostUserError as e:
                fe.close()
                log.warning("%s: the new back-end failed while taking the device over (%s); "
                            "%s", self.description, e, rc.how())
                if not rc.server:
                    self._closing.wait(rc.interval)
        rc.close()

    def replace(self, fe):
        """Give the device to fe, a negotiated VhostUserFrontend, in place of the
        back-end it has (which went away, or is being dropped): what a
        reconnect does, for a caller that runs no event loop (the guest-less
        driver's reconnect()). DeviceError if fe cannot take it over."""
        with self._lock:
            self.frontend.die("replaced by a new back-end", hung_up=True)
            self._take_over(fe)

    def _take_over(self, fe):
        """(under _lock) The new back-end fe gets the device as the guest has it:
        the same features, memory table and inflight area, each ring from
        where it stopped (the used index: what the old one finished), enabled
        as the model had it, then a kick for the back-end and an interrupt
        for the guest."""
        self._check_successor(fe)
        fe.on_backend_request = self._backend_request
        old, self.frontend = self.frontend, fe
        old.close()
        if self._running is not None:
            memory, features, queues = self._running
            bases = {q.index: used_idx(memory, q.used) for q in queues}
            if self._inflight is None:
                self._say_unrecoverable(memory, queues, bases)
            self._bring_up(memory, features, queues, bases)
            # The old back-end may have moved a used index and died before it
            # signalled the call eventfd: the guest would never look, and the
            # new one, with nothing left to do, signals nothing. One interrupt
            # per call eventfd (a spurious one costs the guest a ring check).
            for fd in {q.call_fd for q in queues}:
                os.eventfd_write(fd, 1)
        self.reconnecting = False
        self._reconnected = fe
        self._wake()

    def _check_successor(self, fe):
        """A back-end must offer everything its predecessor was asked to do;
        DeviceError (the device fails) if not."""
        need = self._features
        if self._running is not None:
            need &= self._running[1]               # what the guest acked
        offered = fe.negotiated.features_offered or 0
        missing = [f"bit {b}" for b in range(64) if need >> b & 1 and not offered >> b & 1]
        old_pf = self.frontend.negotiated.protocol_acked
        new_pf = fe.negotiated.protocol_acked
        missing += [f.name for f in PF if old_pf & f.mask and not new_pf & f.mask]
        if missing:
            raise DeviceError(f"the back-end that came back lacks what its predecessor had: "
                              f"{', '.join(missing)}")
        if self._running is not None and self.frontend.has(PF.MQ):
            wanted = max(q.index for q in self._running[2]) + 1
            if fe.max_queues < wanted:
                raise DeviceError(f"the back-end that came back has {fe.max_queues} queues, "
                                  f"the device runs {wanted}")

    def _say_unrecoverable(self, memory, queues, bases):
        """Without an inflight area, which requests the old back-end took is not
        known: the new one starts at the used index, so requests it took and
        never finished run again (fine), and any it finished out of order
        would be answered twice. Name them."""
        for q in queues:
            outstanding = (avail_idx(memory, q.avail) - bases[q.index]) & 0xFFFF
            if outstanding:
                log.warning("%s: queue %d: no inflight area (INFLIGHT_SHMFD), so the %d "
                            "requests the guest posted from used index %d on are served again "
                            "from there; any the old back-end had completed out of order would "
                            "complete twice", self.description, q.index, outstanding,
                            bases[q.index])

    def _rewatch(self):
        """(event loop) A back-end is back: watch its connection, and tell the
        guest if its config space changed meanwhile."""
        fe, self._reconnected = self._reconnected, None
        if fe is not self.frontend:
            return                 # (replaced again meanwhile)
        # Watched even if a call on it failed already: its hang-up is what
        # brings the next back-end in.
        self._watch_connection(fe)
        if fe.dead is not None:
            return
        log.warning("%s is back: the device goes on where it stopped", self.description)
        before = self.config_space
        try:
            self.refresh_config()
        except VhostUserError as e:
            self._failed_call(e, "reading its config space")
            return
        if self.config_space != before:
            self._device.on_config_change()

    def _backend_request(self, message):
        """A request on the back-end channel (in whichever thread read it, maybe
        one waiting for a reply on the main socket: nothing here may wait for
        the back-end); its ack status."""
        if message.request is BackendReq.CONFIG_CHANGE_MSG:
            self._config_stale = True
            self._wake()
            return 0
        log.warning("%s: the back-end sent %s, which pyvmm does not serve", self.description,
                    message.request.spec_name)
        return 1
