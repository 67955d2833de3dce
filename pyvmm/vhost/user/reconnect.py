"""Getting a vhost-user back-end back after it went away (reconnect=S).

The front-end's mode decides how: as a client, pyvmm connects to the
back-end's socket again every S seconds until something listens there (a
restarted back-end); as a server, it listens on its socket again and
accepts the next back-end that connects. Either way the new connection is
negotiated from scratch, as at start-up (GET_FEATURES,
GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, ..., SET_OWNER), before the
device's state is replayed on it (devices/virtio/vhost_user.py).

QEMU retries at a fixed interval forever, without a deadline or back-off
(`../shared/VHOST-USER-RECONNECT.md` 1.3); so does pyvmm, until the VM
ends (a guest that resets the device meanwhile gets it back afresh).
"""

from pyvmm.vhost.user.channel import DEFAULT_TIMEOUT, Connection, Listener
from pyvmm.vhost.user.errors import VhostUserError
from pyvmm.vhost.user.frontend import VhostUserFrontend


class Reconnect:
    def __init__(self, socket_path, server, interval, timeout=None, tracer=None):
        """socket_path: where the back-end listens (or, server, where pyvmm does);
        interval: seconds between attempts; timeout: the back-end's per-answer
        limit; tracer: as VhostUserFrontend's."""
        self.socket_path = str(socket_path)
        self.server = server
        self.interval = interval
        self.timeout = timeout or DEFAULT_TIMEOUT
        self.tracer = tracer
        self._listener = None

    def how(self):
        """For the line pyvmm prints when the back-end goes."""
        if self.server:
            return f"waiting for a back-end to connect to {self.socket_path}"
        return f"connecting to {self.socket_path} every {self.interval:g} s"

    def attempt(self):
        """One try: a negotiated VhostUserFrontend, or VhostUserError when no
        back-end came within the interval (or the one that came failed the
        handshake)."""
        if self.server:
            if self._listener is None:
                self._listener = Listener(self.socket_path)
            conn = self._listener.accept("the back-end", timeout=self.interval)
            conn.timeout = self.timeout
            self.close()          # one back-end at a time, as at start-up
        else:
            conn = Connection.connect(self.socket_path, "the back-end", self.timeout)
        frontend = VhostUserFrontend(conn, tracer=self.tracer)
        try:
            frontend.negotiate()
        except VhostUserError:
            frontend.close()
            raise
        return frontend

    def close(self):
        if self._listener is not None:
            self._listener.close()
            self._listener = None
