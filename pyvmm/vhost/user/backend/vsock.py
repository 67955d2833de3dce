"""virtio-vsock (virtio id 19) as a vhost-user back-end: AF_VSOCK in the
guest, Unix sockets on the host (the hybrid model of Firecracker and
rust-vmm's vhost-device-vsock).

- The guest connects to the host (CID 2), port P: the back-end connects to
  the Unix socket `PATH_P` and joins the two streams.
- A host program connects to the Unix socket `PATH` and writes
  `CONNECT P\\n`: the back-end asks the guest's port P, and once the guest
  accepts answers `OK <host port>\\n`; if it refuses, the stream is closed.

Packets (pyvmm/virtio/vsock.py) come from the guest on the tx queue and go
to it on the rx queue, each in a chain the guest made available there.

Flow control is by credit, per connection (virtio 1.x 5.10.6.3): each side
says how much buffer it has for the connection (buf_alloc) and how many
bytes it has passed on from it (fwd_cnt), and a sender keeps what it sent
but has not seen passed on within the other's buf_alloc. This back-end
buffers at most BUF_ALLOC bytes per connection from the guest, and reads
from a Unix stream only as much as the guest has room for (and at most
MAX_PACKET at a time), so that a slow reader on either side stalls its own
connection and nothing else.

Replies (a RST for a connection that does not exist, say) wait for rx
buffers the guest may never post. As Linux's vhost-vsock does
(vhost_vsock_more_replies), the tx queue is not served while a tx ring's
worth of them waits, and is served again once rx has taken them.
"""

import collections
import logging
import os
import socket

from pyvmm.vhost.user.backend.device import BackendDevice
from pyvmm.virtio import spec
from pyvmm.virtio.vsock import (
    CONFIG, HDR, OP_NAMES, RX_QUEUE, TX_QUEUE, VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV, VIRTIO_VSOCK_SHUTDOWN_SEND, VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST)

log = logging.getLogger("pyvmm.backend")

BUF_ALLOC = 256 << 10          # what we buffer per connection, guest to host
MAX_PACKET = 64 << 10          # data in one rx packet (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
MAX_CONNECTIONS = 256
MAX_CONNECT_LINE = 32          # "CONNECT 4294967295\n"
FIRST_HOST_PORT = 1 << 30      # ports for host-initiated connections, as Firecracker does
SHUTDOWN_BOTH = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND


class Connection:
    """One stream: a guest port and a host port, and the Unix socket behind it."""

    def __init__(self, guest_port, host_port, sock, established):
        self.guest_port, self.host_port, self.sock = guest_port, host_port, sock
        self.established = established   # host-initiated ones wait for the guest's RESPONSE
        self.to_host = bytearray()       # from the guest, not yet written to the Unix stream
        self.fwd_cnt = 0                 # bytes written to the Unix stream
        self.told_fwd_cnt = 0            # the fwd_cnt the guest last heard
        self.tx_cnt = 0                  # bytes sent to the guest
        self.peer_buf_alloc = self.peer_fwd_cnt = 0
        self.guest_shutdown = 0          # SHUTDOWN flags the guest sent
        self.host_shut_wr = False        # the Unix stream was told: no more data
        self.host_eof = False            # the Unix stream has no more data
        self.readable = False            # it has data (or EOF) we have not taken
        self.callback = None             # for the event loop

    @property
    def key(self):
        return self.guest_port, self.host_port

    def credit(self):
        """Bytes the guest has room for."""
        return self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFF_FFFF)

    def wants_data(self):
        return (self.established and not self.host_eof and self.credit() > 0
                and not self.guest_shutdown & VIRTIO_VSOCK_SHUTDOWN_RCV)


class Vsock(BackendDevice):
    device_id = spec.VIRTIO_ID_VSOCK
    name = "vsock"
    num_queues = 3                 # rx, tx, event

    def __init__(self, guest_cid, uds_path):
        """Listens on uds_path at once (OSError if it cannot)."""
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            self.listener.bind(uds_path)
            self.listener.listen(16)
        except OSError:
            self.listener.close()
            raise
        self.conns = {}              # (guest port, host port) -> Connection
        self.waiting = {}            # fd -> [socket, bytes so far]: host streams before CONNECT
        self.control = collections.deque()   # (op, guest port, host port, flags) to the guest
        self.tx_stopped_at = None    # replies queued that stopped tx: the tx ring's size
        self.next_host_port = FIRST_HOST_PORT

    def config(self):
        return CONFIG.pack(self.guest_cid)

    def close(self):
        self.reset()
        self.listener.close()
        try:
            os.unlink(self.uds_path)
        except OSError:
            pass

    # --- the library's hooks --------------------------------------------------------------

    @property
    def loop(self):
        """The serving daemon's event loop, while a front-end is connected."""
        return self.daemon.loop if self.daemon is not None else None

    def attach(self, daemon):
        super().attach(daemon)
        self.loop.add_reader(self.listener.fileno(), self._accept, f"{self.uds_path} (listening)")

    def detach(self):
        self.reset()
        if self.loop is not None:
            self.loop.remove(self.listener.fileno())
        super().detach()

    def reset(self):
        for conn in list(self.conns.values()):
            self._close(conn)
        for fd, (sock, _) in list(self.waiting.items()):
            self._unwatch(fd)
            sock.close()
        self.waiting.clear()
        self.control.clear()
        self.tx_stopped_at = None

    def handle_queue(self, index, ring, memory):
        if index == TX_QUEUE:
            while len(self.control) < ring.num and (chain := ring.pop()) is not None:
                self._from_guest(chain, memory)
                ring.push(chain.head, 0)
            self.tx_stopped_at = ring.num if len(self.control) >= ring.num else None
            if self.control or any(c.readable for c in self.conns.values()):
                self._wake_rx()
        elif index == RX_QUEUE:
            self._to_guest(ring, memory)
            if self.tx_stopped_at is not None and len(self.control) < self.tx_stopped_at:
                self.tx_stopped_at = None
                self.daemon.wake(TX_QUEUE)          # right after this rx round
        # The event queue carries only transport resets (after migration): unused.

    # --- packets from the guest --------------------------------------------------------------

    def _from_guest(self, chain, memory):
        if chain.readable_len < HDR.size:
            log.warning("vsock: a tx packet shorter than its header; dropped")
            return
        (src_cid, dst_cid, src_port, dst_port, length, kind, op, flags, buf_alloc,
         fwd_cnt) = HDR.unpack(chain.read(memory, 0, HDR.size))
        if src_cid != self.guest_cid or dst_cid != VMADDR_CID_HOST:
            log.warning("vsock: a packet from CID %d to CID %d; dropped", src_cid, dst_cid)
            return
        if length > chain.readable_len - HDR.size:
            log.warning("vsock: a packet of %d bytes in a %d-byte chain; dropped", length,
                        chain.readable_len - HDR.size)
            return
        conn = self.conns.get((src_port, dst_port))
        if kind != VIRTIO_VSOCK_TYPE_STREAM:
            if op != VIRTIO_VSOCK_OP_RST:
                self._send_control(VIRTIO_VSOCK_OP_RST, src_port, dst_port)
            return
        if op == VIRTIO_VSOCK_OP_REQUEST:
            if conn is None:
                self._guest_connects(src_port, dst_port, buf_alloc, fwd_cnt)
            else:
                self._reset(conn)
            return
        if conn is None:
            if op != VIRTIO_VSOCK_OP_RST:
                self._send_control(VIRTIO_VSOCK_OP_RST, src_port, dst_port)
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == VIRTIO_VSOCK_OP_RESPONSE and not conn.established:
            conn.established = True
            try:
                conn.sock.send(f"OK {conn.host_port}\n".encode())
            except OSError:
                self._reset(conn)
                return
        elif op == VIRTIO_VSOCK_OP_RW and conn.established:
            if len(conn.to_host) + length > BUF_ALLOC:
                log.warning("vsock: guest port %d sent past its credit; connection reset",
                            src_port)
                self._reset(conn)
                return
            conn.to_host += chain.read(memory, HDR.size, length)
            self._flush(conn)
        elif op == VIRTIO_VSOCK_OP_SHUTDOWN:
            conn.guest_shutdown |= flags & SHUTDOWN_BOTH
            self._flush(conn)
            if conn.guest_shutdown == SHUTDOWN_BOTH:   # done both ways: a RST ends it
                self._reset(conn)
                return
        elif op == VIRTIO_VSOCK_OP_RST:
            self._close(conn)
            return
        elif op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            self._send_control(VIRTIO_VSOCK_OP_CREDIT_UPDATE, src_port, dst_port)
        elif op not in (VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_RESPONSE):
            log.warning("vsock: %s on guest port %d; connection reset",
                        OP_NAMES.get(op, f"op {op}"), src_port)
            self._reset(conn)
            return
        self._interest(conn)

    def _guest_connects(self, guest_port, host_port, buf_alloc, fwd_cnt):
        path = f"{self.uds_path}_{host_port}"
        if len(self.conns) >= MAX_CONNECTIONS:
            log.warning("vsock: %d connections open; refusing another", len(self.conns))
            self._send_control(VIRTIO_VSOCK_OP_RST, guest_port, host_port)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(1)
            sock.connect(path)
            sock.setblocking(False)
        except OSError as e:
            log.info("vsock: guest port %d to host port %d: %s: %s", guest_port, host_port,
                     path, e.strerror or e)
            sock.close()
            self._send_control(VIRTIO_VSOCK_OP_RST, guest_port, host_port)
            return
        conn = self._add(Connection(guest_port, host_port, sock, established=True))
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        self._send_control(VIRTIO_VSOCK_OP_RESPONSE, guest_port, host_port)
        self._interest(conn)

    # --- packets to the guest ---------------------------------------------------------------

    def _to_guest(self, ring, memory):
        """Fill rx chains: control packets first, then data, one connection after another."""
        while ring.available():
            if self.control:
                op, guest_port, host_port, flags = self.control.popleft()
                chain = ring.pop()
                conn = self.conns.get((guest_port, host_port))
                ring.push(chain.head, self._packet(chain, memory, op, guest_port, host_port,
                                                    flags, conn))
                continue
            conn = next((c for c in self.conns.values() if c.readable and c.wants_data()), None)
            if conn is None:
                return
            # Round robin: this one goes to the back of the line.
            del self.conns[conn.key]
            self.conns[conn.key] = conn
            chain = ring.pop()
            ring.push(chain.head, self._data_packet(chain, memory, conn))

    def _data_packet(self, chain, memory, conn):
        """Read what the guest has room for from conn's Unix stream into chain."""
        room = min(chain.writable_len - HDR.size, conn.credit(), MAX_PACKET)
        conn.readable = False
        op, flags, data = VIRTIO_VSOCK_OP_RW, 0, b""
        try:
            if room <= 0:                        # a chain too small for data
                raise BlockingIOError
            data = conn.sock.recv(room)
            if not data:                         # the host side sends no more
                conn.host_eof = True
                op, flags = VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_SEND
        except BlockingIOError:
            op = VIRTIO_VSOCK_OP_CREDIT_UPDATE
        except OSError as e:
            log.info("vsock: host port %d: %s", conn.host_port, e.strerror)
            op = VIRTIO_VSOCK_OP_RST
        written = self._packet(chain, memory, op, conn.guest_port, conn.host_port, flags,
                               conn, data)
        if op == VIRTIO_VSOCK_OP_RST:
            self._close(conn)
        else:
            conn.tx_cnt = (conn.tx_cnt + len(data)) & 0xFFFF_FFFF
            self._interest(conn)
        return written

    def _packet(self, chain, memory, op, guest_port, host_port, flags, conn, data=b""):
        """Write one packet into chain; returns the bytes written."""
        if chain.writable_len < HDR.size + len(data):
            log.warning("vsock: an rx chain of %d bytes, too short for a packet; left empty",
                        chain.writable_len)
            return 0
        fwd_cnt = 0
        if conn is not None:
            fwd_cnt = conn.told_fwd_cnt = conn.fwd_cnt
        header = HDR.pack(VMADDR_CID_HOST, self.guest_cid, host_port, guest_port, len(data),
                          VIRTIO_VSOCK_TYPE_STREAM, op, flags, BUF_ALLOC, fwd_cnt)
        return chain.write(memory, header + data)

    def _send_control(self, op, guest_port, host_port, flags=0):
        self.control.append((op, guest_port, host_port, flags))

    def _wake_rx(self):
        if self.daemon is not None:
            self.daemon.wake(RX_QUEUE)

    # --- the Unix side ------------------------------------------------------------------------

    def _accept(self):
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        if len(self.waiting) >= MAX_CONNECTIONS:      # each is an fd: not without bound
            log.info("vsock: %d host streams wait for CONNECT; refusing another",
                     len(self.waiting))
            sock.close()
            return
        sock.setblocking(False)
        self.waiting[sock.fileno()] = [sock, b""]
        self.loop.watch(sock.fileno(), lambda events: self._connect_line(sock),
                        "a host stream before CONNECT", readable=True)

    def _connect_line(self, sock):
        """Read "CONNECT <port>\\n" from a new host stream, a byte at a time up to
        the newline, so that what follows stays in the stream."""
        entry = self.waiting[sock.fileno()]
        try:
            while not entry[1].endswith(b"\n") and len(entry[1]) < MAX_CONNECT_LINE:
                byte = sock.recv(1)
                if not byte:
                    return self._refuse(sock, "closed before CONNECT <port>")
                entry[1] += byte
        except BlockingIOError:
            return
        except OSError as e:
            return self._refuse(sock, e.strerror)
        line = entry[1]
        words = line.split()
        if len(words) != 2 or words[0] != b"CONNECT" or not words[1].isdigit() \
                or int(words[1]) > 0xFFFF_FFFF:
            return self._refuse(sock, f"{line!r} is not CONNECT <port>")
        if len(self.conns) >= MAX_CONNECTIONS:
            return self._refuse(sock, f"{len(self.conns)} connections open")
        self._unwatch(sock.fileno())
        del self.waiting[sock.fileno()]
        host_port = self._free_host_port()
        conn = self._add(Connection(int(words[1]), host_port, sock, established=False))
        self._send_control(VIRTIO_VSOCK_OP_REQUEST, conn.guest_port, host_port)
        self._interest(conn)
        self._wake_rx()

    def _refuse(self, sock, why):
        log.info("vsock: a host stream: %s; closed", why)
        self._unwatch(sock.fileno())
        del self.waiting[sock.fileno()]
        sock.close()

    def _free_host_port(self):
        while True:
            port = self.next_host_port
            self.next_host_port = FIRST_HOST_PORT + (port + 1 - FIRST_HOST_PORT) % (1 << 30)
            if not any(c.host_port == port for c in self.conns.values()):
                return port

    def _add(self, conn):
        self.conns[conn.key] = conn
        conn.callback = lambda events: self._on_stream(conn, events)
        return conn

    def _on_stream(self, conn, events):
        if events & self.loop.WRITABLE:
            self._flush(conn)
        if events & self.loop.READABLE and conn.key in self.conns:
            conn.readable = True
            self._wake_rx()
        if conn.key in self.conns:
            self._interest(conn)

    def _flush(self, conn):
        """Write what the guest sent to the Unix stream, as far as it takes it."""
        try:
            while conn.to_host:
                n = conn.sock.send(conn.to_host)
                del conn.to_host[:n]
                conn.fwd_cnt = (conn.fwd_cnt + n) & 0xFFFF_FFFF
        except BlockingIOError:
            pass
        except OSError as e:
            log.info("vsock: host port %d: %s", conn.host_port, e.strerror)
            self._reset(conn)
            return
        if (conn.fwd_cnt - conn.told_fwd_cnt) & 0xFFFF_FFFF >= BUF_ALLOC // 4:
            # The guest may be waiting for room: tell it (any packet would).
            self._send_control(VIRTIO_VSOCK_OP_CREDIT_UPDATE, conn.guest_port, conn.host_port)
            conn.told_fwd_cnt = conn.fwd_cnt
            self._wake_rx()
        if (not conn.to_host and conn.guest_shutdown & VIRTIO_VSOCK_SHUTDOWN_SEND
                and not conn.host_shut_wr):
            conn.host_shut_wr = True
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _interest(self, conn):
        """Watch the Unix stream for what the connection can use now."""
        if conn.key in self.conns:
            self.loop.watch(conn.sock.fileno(), conn.callback, f"vsock host port {conn.host_port}",
                            readable=conn.wants_data() and not conn.readable,
                            writable=bool(conn.to_host))

    def _reset(self, conn):
        """End a connection: a RST to the guest, the Unix stream closed."""
        self._send_control(VIRTIO_VSOCK_OP_RST, conn.guest_port, conn.host_port)
        self._close(conn)
        self._wake_rx()

    def _close(self, conn):
        if self.conns.pop(conn.key, None) is not None:
            self._unwatch(conn.sock.fileno())
            conn.sock.close()

    def _unwatch(self, fd):
        if self.loop is not None:
            self.loop.remove(fd)
