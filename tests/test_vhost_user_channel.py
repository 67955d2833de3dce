"""The vhost-user socket layer on real Unix sockets: fds, pieces, hang-ups, silence."""

import array
import os
import socket
import stat
import threading
import time

import pytest

from pyvmm.vhost.user.channel import Connection, Listener
from pyvmm.vhost.user.errors import ChannelError, ChannelTimeout, Disconnected
from pyvmm.vhost.user.messages import FrontendReq, U64, VringFd
from pyvmm.vhost.user.wire import encode


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours, theirs = Connection(a, "the back-end", timeout=0.5), b
    yield ours, theirs
    ours.close()
    theirs.close()


def send_with_fds(sock, data, fds):
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def test_a_frame_and_its_fd_arrive_together(pair):
    ours, theirs = pair
    efd = os.eventfd(0)
    frame = encode(FrontendReq.SET_VRING_CALL, 0x1, VringFd(0).pack())
    ours.send(frame, (efd,))
    peer = Connection(theirs.dup(), "the front-end")
    data, fds = peer.receive()
    assert data == frame and len(fds) == 1
    os.eventfd_write(fds[0], 5)                 # the same eventfd, through another fd
    assert os.eventfd_read(efd) == 5
    os.close(fds[0]), os.close(efd)
    peer.close()


def test_a_frame_in_pieces(pair):
    ours, theirs = pair
    frame = encode(FrontendReq.GET_FEATURES, 0x5, U64(1 << 32).pack())

    def dribble():
        for i in range(len(frame)):
            theirs.send(frame[i:i + 1])
            time.sleep(0.01)
    threading.Thread(target=dribble).start()
    assert ours.receive(timeout=5) == (frame, ())


def test_the_peer_hanging_up_before_answering(pair):
    ours, theirs = pair
    theirs.close()
    with pytest.raises(Disconnected, match="the back-end closed the connection instead of "
                                           "sending the reply to GET_FEATURES"):
        ours.receive("the reply to GET_FEATURES")


def test_the_peer_hanging_up_in_the_middle_of_a_message(pair):
    ours, theirs = pair
    theirs.send(encode(FrontendReq.GET_FEATURES, 0x5, U64(1).pack())[:15])
    theirs.close()
    with pytest.raises(Disconnected, match="in the middle of a message \\(3 of 8 bytes\\)"):
        ours.receive()


def test_a_silent_peer_times_out(pair):
    ours, theirs = pair
    theirs.send(b"\x01\x00")                    # two bytes of a header, then nothing
    started = time.monotonic()
    with pytest.raises(ChannelTimeout, match="did not send the reply to GET_FEATURES within"):
        ours.receive("the reply to GET_FEATURES")
    assert time.monotonic() - started < 2


def test_fds_in_the_payload_part_are_refused_and_closed(pair):
    ours, theirs = pair
    frame = encode(FrontendReq.GET_FEATURES, 0x5, U64(1).pack())
    theirs.send(frame[:12])
    r, w = os.pipe()
    send_with_fds(theirs, frame[12:], [r])
    with pytest.raises(ChannelError, match="fds in the middle of a message"):
        ours.receive()
    os.close(r), os.close(w)


def test_a_dead_peer_on_send(pair):
    ours, theirs = pair
    theirs.close()
    with pytest.raises(Disconnected, match="the back-end closed the connection"):
        for _ in range(100):      # the first send may still fit in the buffer
            ours.send(b"x" * 4096)


def test_a_frame_larger_than_the_socket_buffer_waits_for_room(pair):
    """Sending never blocks in the kernel (MSG_DONTWAIT) but waits, within
    the timeout, while the peer reads: the frame arrives whole, its fd with
    its first byte."""
    ours, theirs = pair
    ours.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = os.urandom(256 << 10)
    frame = encode(FrontendReq.SET_CONFIG, 0x1, payload)
    r, w = os.pipe()
    received = []

    def read_slowly():
        peer = Connection(theirs.dup(), "the front-end", timeout=5)
        header, fds = peer.receive()
        received.append((header + peer.read(len(frame) - len(header)), fds))
        peer.close()
    reader = threading.Thread(target=read_slowly)
    reader.start()
    ours.send(frame, (r,))
    reader.join(5)
    (data, fds), = received
    assert data == frame and len(fds) == 1
    os.close(fds[0]), os.close(r), os.close(w)


def test_a_peer_that_stops_reading_times_out_a_send(pair):
    ours, theirs = pair
    started = time.monotonic()
    with pytest.raises(ChannelTimeout, match="the back-end did not take a message for 0.5 s"):
        for _ in range(10000):              # fills both socket buffers, then waits
            ours.send(b"x" * 65536)
    assert 0.4 < time.monotonic() - started < 5


def test_connect_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ChannelError, match="no socket at .*is the back-end running"):
        Connection.connect(tmp_path / "missing.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()                               # bound, never listened: connect is refused
    with pytest.raises(ChannelError, match="nothing listens on"):
        Connection.connect(tmp_path / "dead.sock")


def test_listener_mode_stale_sockets_and_cleanup(tmp_path):
    path = tmp_path / "pyvmm.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()                              # a socket file left behind by a crash
    listener = Listener(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    client = Connection.connect(path, "pyvmm")
    conn = listener.accept("the back-end", timeout=5)
    client.send(b"hello")
    assert conn.sock.recv(5) == b"hello"
    client.close(), conn.close()
    listener.close()
    assert not path.exists()


def test_listener_never_removes_a_file_that_is_not_a_socket(tmp_path):
    path = tmp_path / "precious"
    path.write_text("data")
    with pytest.raises(ChannelError, match="cannot listen on"):
        Listener(path)
    assert path.read_text() == "data"


def test_connect_waits_while_the_listener_s_backlog_is_full(tmp_path):
    """A Unix socket with a timeout answers EAGAIN at once when the listener's
    backlog is full (a back-end busy with an earlier front-end): connect()
    waits for room within its timeout, as a blocking connect would."""
    import threading
    path = str(tmp_path / "busy.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(0)
    queued = []
    while True:                                   # fill the backlog
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            break
        queued.append(s)
    accepted = []
    threading.Timer(0.3, lambda: accepted.append(server.accept()[0])).start()
    conn = Connection.connect(path, "the busy back-end", timeout=5)
    conn.close()
    assert accepted
    for s in queued + accepted:
        s.close()
    server.close()


def test_the_tests_wait_for_a_back_end_that_listens_not_for_its_socket_file(tmp_path):
    """tests/backends.py starts qemu-storage-daemon, virtiofsd and testpmd,
    which bind their socket in place: the file exists before they listen.
    Waiting for the file, a test could connect in between and be refused."""
    import subprocess
    import sys
    from backends import SLOW_LISTENER, _wait_for_socket
    path = str(tmp_path / "slow.sock")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_LISTENER, path])
    try:
        _wait_for_socket(proc, path, "the slow listener")
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
    finally:
        proc.kill()
        proc.wait()


def test_a_client_that_connects_as_soon_as_the_socket_file_appears_is_never_refused(tmp_path):
    """Listener's file appears only once it listens (bound under another
    name, then renamed). Bound in place, the file existed before listen(),
    and a client waiting for it could be refused in between (the proxy's
    tests were, in CI)."""
    tried, refused = 300, []
    for i in range(tried):
        path = str(tmp_path / f"s{i}")

        def client():
            deadline = time.monotonic() + 5
            while not os.path.exists(path) and time.monotonic() < deadline:
                pass
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(path)
                except ConnectionRefusedError:
                    refused.append(i)
        thread = threading.Thread(target=client)
        thread.start()
        listener = Listener(path)
        thread.join(5)
        listener.close()
    assert not refused, f"{len(refused)} of {tried} connections refused"
    assert os.listdir(tmp_path) == []          # no temporary names left behind
