"""Real vhost-user back-ends from Debian's packages, started for a test."""

import contextlib
import os
import subprocess
import time


@contextlib.contextmanager
def storage_daemon(directory, image, queues=1, writable=True):
    """qemu-storage-daemon exporting image as vhost-user-blk; yields its socket path."""
    sock = os.path.join(directory, "vub.sock")
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=file0,filename={image}",
         "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
                     f"addr.path={sock},writable={'on' if writable else 'off'},"
                     f"num-queues={queues}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"qemu-storage-daemon did not start: {proc.stdout.read()}")
            time.sleep(0.05)
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class FakeBackEnd:
    """A small vhost-user back-end for tests, on the protocol core's back-end
    session: it answers the handshake from what it is given and records the
    rest. (The real back-end library is pyvmm.vhost.user's business; this is
    only enough to drive the front-end through what qemu-storage-daemon
    never does, like a config change or connecting to a listening pyvmm.)"""

    def __init__(self, conn, features, protocol, config=b"", queues=1):
        from pyvmm.vhost.user.session import Role, Session
        self.conn = conn
        self.session = Session(Role.BACKEND)
        self.features, self.protocol, self.config, self.queues = features, protocol, config, queues
        self.backend_channel = None     # a Connection, once SET_BACKEND_REQ_FD came
        self.requests = []
        self.messages = []              # every request, payloads included (fds closed)

    def serve_until(self, request):
        """Answer requests until (and including) `request`."""
        import socket

        from pyvmm.vhost.user.channel import Connection
        from pyvmm.vhost.user.messages import U64, DeviceConfig, FrontendReq as R, VringState
        from pyvmm.vhost.user.session import NEED_DATA
        while True:
            data, fds = self.conn.receive("a request")
            self.session.receive(data, fds)
            msg = self.session.next_message()
            if msg is NEED_DATA:
                continue
            self.requests.append(msg.request)
            answer = U64(0)
            if msg.request is R.GET_FEATURES:
                answer = U64(self.features)
            elif msg.request is R.GET_PROTOCOL_FEATURES:
                answer = U64(self.protocol)
            elif msg.request is R.GET_QUEUE_NUM:
                answer = U64(self.queues)
            elif msg.request is R.GET_VRING_BASE:
                answer = VringState(msg.payload.index, 0)
            elif msg.request is R.GET_CONFIG:
                answer = DeviceConfig(msg.payload.offset, 0,
                                      self.config[:len(msg.payload.data)].ljust(
                                          len(msg.payload.data), b"\0"))
            elif msg.request is R.SET_BACKEND_REQ_FD:
                self.backend_channel = Connection(
                    socket.socket(fileno=msg.fds[0]), "the front-end (back-end channel)")
            else:
                for fd in msg.fds:
                    os.close(fd)
            self.messages.append(msg)
            if self.session.awaiting is msg:
                self.conn.send(*self.session.send(self.session.reply_to(msg, answer)))
            if msg.request is request:
                return msg

    def send_config_change(self):
        """BACKEND_CONFIG_CHANGE_MSG with NEED_REPLY; the front-end's ack."""
        from pyvmm.vhost.user.messages import BackendReq
        from pyvmm.vhost.user.rules import Channel
        from pyvmm.vhost.user.session import NEED_DATA, Role, Session
        session = Session(Role.BACKEND, Channel.BACKEND, main=self.session)
        self.backend_channel.send(*session.send(
            session.request(BackendReq.CONFIG_CHANGE_MSG, need_reply=True)))
        while True:
            data, fds = self.backend_channel.receive("the ack of CONFIG_CHANGE_MSG")
            session.receive(data, fds)
            reply = session.next_message()
            if reply is not NEED_DATA:
                return reply.payload.value
