"""Queues served by a vhost-user back-end: another process, over a Unix socket.

At plan time the front-end has connected and negotiated (frontend.py); the
back-end's config space is read then and cached, and read again only when
the back-end says it changed (BACKEND_CONFIG_CHANGE_MSG on its request
channel), from the event loop, never while a vCPU waits.

At DRIVER_OK (start): SET_FEATURES, the memory table, then per queue
SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK,
SET_VRING_CALL, SET_VRING_ERR and SET_VRING_ENABLE, a kick for whatever the
guest queued before the back-end watched, and SET_STATUS(DRIVER_OK) where
STATUS is negotiated. At reset (stop): SET_VRING_ENABLE(0) and
GET_VRING_BASE per queue, SET_STATUS(0) and RESET_DEVICE where negotiated.

A back-end that goes away (its socket hangs up) or breaks the protocol
fails this device only: the transport sets DEVICE_NEEDS_RESET and pyvmm
says so in one line; the VM and its other devices go on.
"""

import logging
import os

from pyvmm.devices.virtio.device import DeviceError, QueueBackend
from pyvmm.vhost.backend import VringAddr
from pyvmm.vhost.user.errors import ChannelError, VhostUserError
from pyvmm.vhost.user.messages import (U64, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES,
                                       BackendReq, ProtocolFeature)
from pyvmm.vhost.user.rules import Channel
from pyvmm.vhost.user.session import NEED_DATA, Role, Session
from pyvmm.virtio import spec

log = logging.getLogger("pyvmm.vhost-user")

PF = ProtocolFeature
# Bits of GET_FEATURES that are about vhost-user itself, not the device.
PROTOCOL_ONLY_FEATURES = (1 << VHOST_USER_F_PROTOCOL_FEATURES) | (1 << VHOST_F_LOG_ALL)
DRIVER_OK_STATUS = (spec.VIRTIO_CONFIG_S_ACKNOWLEDGE | spec.VIRTIO_CONFIG_S_DRIVER
                    | spec.VIRTIO_CONFIG_S_FEATURES_OK | spec.VIRTIO_CONFIG_S_DRIVER_OK)


class VhostUserBackend(QueueBackend):
    def __init__(self, frontend, description, config_size=0):
        """frontend: a negotiated VhostUserFrontend, now the back-end's;
        config_size: bytes of config space to read from it (GET_CONFIG)."""
        self.frontend = frontend
        self.description = description
        self._features = (frontend.negotiated.features_offered or 0) & ~PROTOCOL_ONLY_FEATURES
        self._config_size = config_size
        self.config_space = b""
        self._started = []
        self.failed = None           # why the back-end is gone, once it is
        self._backend_session = None
        # Queues the model keeps disabled at DRIVER_OK (a NIC's pairs past the
        # first, until the driver asks for them: set_enabled()).
        self.disabled_at_start = set()
        if config_size:
            self.refresh_config()

    def features(self):
        return self._features

    def refresh_config(self):
        """Read the config space again (GET_CONFIG); keep the last one on failure."""
        if self._config_size and self.frontend.has(PF.CONFIG):
            self.config_space = self.frontend.get_config(self._config_size)

    def set_enabled(self, index, enabled):
        """SET_VRING_ENABLE for a started queue (the model's decision)."""
        if index in self._started and not self.failed:
            self.frontend.set_vring_enable(index, enabled)

    def write_config(self, offset, data):
        """A driver's write into the config space: kept in the cache and sent on
        (SET_CONFIG). Only within the config space the back-end gave."""
        end = offset + len(data)
        if end > len(self.config_space) or self.failed:
            return
        self.config_space = self.config_space[:offset] + bytes(data) + self.config_space[end:]
        try:
            self.frontend.set_config(offset, data)
        except VhostUserError as e:
            log.warning("%s: writing its config space: %s", self.description, e)

    # --- the data path's control ---------------------------------------------------

    def start(self, memory, features, queues):
        if self.failed:
            raise DeviceError(f"{self.description} is gone ({self.failed})")
        fe = self.frontend
        try:
            # Bits the model implements itself (a MAC in config space, say)
            # are not the back-end's to ack (FE-10).
            fe.set_features(features & self._features)
            fe.set_mem_table(memory)
            for q in queues:
                fe.start_vring(q.index, q.size, VringAddr(q.desc, q.avail, q.used),
                               q.kick_fd, q.call_fd, q.err_fd)
                self._started.append(q.index)
                if fe.negotiated.protocol_features_on:
                    fe.set_vring_enable(q.index, q.index not in self.disabled_at_start)
                # FE-45: requests the guest queued before the back-end watched
                # its kick fd would otherwise wait for the next kick.
                os.eventfd_write(q.kick_fd, 1)
            if fe.has(PF.STATUS):
                fe.set_status(DRIVER_OK_STATUS)
        except VhostUserError as e:
            if isinstance(e, ChannelError):
                self.failed = str(e)      # gone: the hang-up watch has nothing to add
            raise DeviceError(f"{self.description}: {e}") from None

    def stop(self):
        """Stop every started queue; the bases stay in frontend.vring_bases."""
        started, self._started = self._started, []
        if self.failed or not started:
            return
        fe = self.frontend
        try:
            for index in started:
                if fe.negotiated.protocol_features_on:
                    fe.set_vring_enable(index, False)
                fe.get_vring_base(index)
            if fe.has(PF.STATUS):
                fe.set_status(0)
            if fe.has(PF.RESET_DEVICE):
                fe.reset_device()         # BE-92: back to its initial state, still ours
        except VhostUserError as e:
            log.warning("%s: stopping the queues: %s", self.description, e)

    def close(self):
        self.frontend.close()

    # --- watching the back-end from the event loop ------------------------------------

    def watch(self, device, loop):
        """Notice the back-end hanging up, and serve its request channel."""
        conn = self.frontend.conn

        def hung_up():
            loop.remove(conn.fileno())
            self._fail(device, "the back-end closed its connection")
        loop.add_hangup_watch(conn.fileno(), hung_up, f"{device.name}'s vhost-user socket")

        channel = self.frontend.backend_channel
        if channel is not None:
            self._backend_session = Session(Role.FRONTEND, Channel.BACKEND,
                                            main=self.frontend.session)

            def request():
                try:
                    self._serve_backend_request(device, channel)
                except VhostUserError as e:
                    loop.remove(channel.fileno())
                    self._fail(device, f"its request channel: {e}")
            loop.add_reader(channel.fileno(), request, f"{device.name}'s back-end channel")

    def _fail(self, device, reason):
        if self.failed is None:
            self.failed = reason
            device.on_failure(f"{self.description}: {reason}")

    def _serve_backend_request(self, device, channel):
        """One request from the back-end: config changes become a config interrupt."""
        session = self._backend_session
        data, fds = channel.receive("a back-end request")
        session.receive(data, fds)
        message = session.next_message()
        if message is NEED_DATA:
            return
        for fd in message.fds:       # no request pyvmm serves takes an fd
            os.close(fd)
        status = 0
        if message.request is BackendReq.CONFIG_CHANGE_MSG:
            self.refresh_config()
            device.on_config_change()
            log.debug("%s: the back-end changed the config space", device.name)
        else:
            log.warning("%s: the back-end sent %s, which pyvmm does not serve", device.name,
                        message.request.spec_name)
            status = 1
        if session.awaiting is message:
            data, fds = session.send(session.reply_to(message, U64(status)))
            channel.send(data, fds)
