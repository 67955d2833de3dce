"""Real vhost-user back-ends from Debian's packages, started for a test."""

import contextlib
import os
import subprocess
import time

from pyvmm.check.target import ready
from pyvmm.sys.process import stop as _stop   # SIGTERM, then SIGKILL


def mapped_memory(guest, regions):
    """A back-end's MappedMemory of guest's memfd (a GuestMemory), one region
    per (guest_addr, size, fd offset) of regions."""
    from pyvmm.vhost.user.backend.memory import MappedMemory
    from pyvmm.vhost.user.messages import MemoryRegion
    memory = MappedMemory()
    fd = os.dup(guest.fd)
    try:                         # (each mapping keeps an fd of its own, as the daemon's do)
        memory.replace([(MemoryRegion(gpa, size, gpa, offset), fd)
                        for gpa, size, offset in regions])
    finally:
        os.close(fd)
    return memory


def _remove_stale(sock):
    """A back-end killed earlier leaves its socket file: gone before the next
    one starts, so that waiting for the file waits for the new back-end."""
    if os.path.exists(sock):
        os.unlink(sock)


# A program that binds its socket in place and listens a second later, as
# qemu-storage-daemon does with no second in between: its file exists
# before anything listens on it (python -c SLOW_LISTENER PATH).
SLOW_LISTENER = ("import socket, sys, time; s = socket.socket(socket.AF_UNIX); "
                 "s.bind(sys.argv[1]); time.sleep(1); s.listen(); time.sleep(60)")


def _wait_for_socket(proc, sock, what):
    """Until proc listens on sock, not only until the file is there
    (check.target.ready: these programs bind their socket in place)."""
    deadline = time.monotonic() + 30
    while not ready(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = proc.communicate()[0] if proc.stdout else "(its output is in its log file)"
            raise AssertionError(f"{what} did not start: {out}")
        time.sleep(0.05)



@contextlib.contextmanager
def pyvmm_backend(directory, device, *options):
    """`pyvmm backend DEVICE OPTIONS` listening in directory; yields (socket path, process)."""
    import sys
    sock = os.path.join(directory, f"{device}.sock")
    _remove_stale(sock)
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "backend", device,
                             "--socket-path", sock, *options],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        _wait_for_socket(proc, sock, f"pyvmm backend {device}")
        yield sock, proc
    finally:
        _stop(proc)


@contextlib.contextmanager
def blk_backend(kind, directory, image, queues=1, writable=True, procs=None, options=()):
    """A vhost-user-blk back-end of kind "qemu-storage-daemon" or "pyvmm" on
    image; yields its socket path (and appends its Popen to procs, if given).
    options: more of pyvmm's (--die-at POINT, say)."""
    if kind == "pyvmm":
        options = ["--image", str(image), "--queues", str(queues), *options]
        with pyvmm_backend(directory, "blk", *options, *([] if writable else ["--read-only"])) \
                as (sock, proc):
            if procs is not None:
                procs.append(proc)
            yield sock
    else:
        with storage_daemon(directory, image, queues, writable, procs) as sock:
            yield sock


@contextlib.contextmanager
def storage_daemon(directory, image, queues=1, writable=True, procs=None, iops=None):
    """qemu-storage-daemon exporting image as vhost-user-blk; yields its socket
    path. iops: at most that many requests a second (a throttle node), so
    that requests it took stay in flight for a while."""
    sock = os.path.join(directory, "vub.sock")
    _remove_stale(sock)
    node, throttle = "file0", []
    if iops is not None:
        node = "thr0"
        throttle = ["--object", f"throttle-group,id=tg0,x-iops-total={iops}",
                    "--blockdev", "driver=throttle,node-name=thr0,throttle-group=tg0,file=file0"]
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=file0,filename={image}", *throttle,
         "--export", f"type=vhost-user-blk,id=exp0,node-name={node},addr.type=unix,"
                     f"addr.path={sock},writable={'on' if writable else 'off'},"
                     f"num-queues={queues}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    if procs is not None:
        procs.append(proc)
    try:
        _wait_for_socket(proc, sock, "qemu-storage-daemon")
        yield sock
    finally:
        _stop(proc)


@contextlib.contextmanager
def virtiofsd(directory, source, procs=None):
    """QEMU's C virtiofsd sharing source; yields its socket path (and appends
    its Popen to procs, if given). It serves one front-end and exits when
    that one goes (one per test)."""
    sock = os.path.join(directory, "vfs.sock")
    _remove_stale(sock)
    proc = subprocess.Popen(["/usr/lib/qemu/virtiofsd", f"--socket-path={sock}",
                             "-o", f"source={source}", "-o", "cache=none"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    if procs is not None:
        procs.append(proc)
    try:
        _wait_for_socket(proc, sock, "virtiofsd")
        yield sock
    finally:
        _stop(proc)


def read_then_list_share(directory):
    """Issue 24's share: a 1 MiB file (from-host) and a directory of 500
    empty files (many/); (its path, the file's bytes)."""
    shared = os.path.join(directory, "shared")
    os.makedirs(os.path.join(shared, "many"))
    data = os.urandom(1 << 20)
    with open(os.path.join(shared, "from-host"), "wb") as f:
        f.write(data)
    for i in range(500):
        open(os.path.join(shared, "many", f"f{i:03}"), "w").close()
    return shared, data


@contextlib.contextmanager
def dpdk_testpmd(directory, mode="icmpecho", client=False, queues=1, procs=None):
    """DPDK's dpdk-testpmd with a net_vhost port on a socket in directory, in
    forwarding mode `mode` (icmpecho answers ARP and ping); yields (socket
    path, a dict that gets its "output" once it has exited). With client,
    it connects to the socket (the front-end listens) and reconnects; queues:
    queue pairs; procs: a list its Popen is appended to (to kill it)."""
    sock = os.path.join(directory, "net.sock")
    if not client:
        _remove_stale(sock)
    prefix = f"pyvmm{os.getpid()}{abs(hash(directory)) % 10000}"
    vdev = f"net_vhost0,iface={sock},queues={queues}" + (",client=1" if client else "")
    # Its output goes to a file: testpmd logs every vhost-user connection, and
    # a pipe nobody reads until the end fills up and wedges its vhost thread.
    log_path = os.path.join(directory, "testpmd.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            ["dpdk-testpmd", "-l", "0-1", "--no-pci", "--no-huge", "-m", "256",
             f"--file-prefix={prefix}", "--vdev", vdev, "--", "--no-mlockall",
             "--total-num-mbufs=8192", f"--rxq={queues}", f"--txq={queues}",
             f"--forward-mode={mode}", "--auto-start"],
            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True)
    if procs is not None:
        procs.append(proc)
    result = {}
    try:
        if not client:
            _wait_for_socket(proc, sock, "dpdk-testpmd")
        yield sock, result
    finally:
        try:
            proc.communicate("\n", timeout=20)            # "Press enter to exit"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with open(log_path, errors="replace") as log:
            result["output"] = log.read()


class LibraryRig:
    """pyvmm's front-end driving a back-end of pyvmm's library served in a
    thread over a socketpair, each queue a guest-less driver's DriverQueue
    (pyvmm/driver/queue.py) started message by message. The test plays the
    guest's driver (ring.add) and KVM (the eventfds), down to single
    interrupts, which pyvmm.driver's own helpers hide."""

    RINGS = 0x10000          # ring i at RINGS + i * 0x4000

    def __init__(self, memory, device, features=1 << 32, queues=1, size=64, inflight=None,
                 protocol=None, rings=None, base=0):
        """inflight(frontend), if given, runs before the rings start; rings: the
        DriverRings of an earlier rig, to start again at base (a reconnect)."""
        import socket
        import threading

        from pyvmm.driver import DriverQueue
        from pyvmm.vhost import VringAddr
        from pyvmm.vhost.user.backend.daemon import serve_connection
        from pyvmm.vhost.user.channel import Connection
        from pyvmm.vhost.user.frontend import VhostUserFrontend
        ours, theirs = socket.socketpair()
        self.thread = threading.Thread(target=serve_connection,
                                       args=(device, Connection(theirs, "pyvmm")), daemon=True)
        self.thread.start()
        self.memory = memory
        self.fe = VhostUserFrontend(Connection(ours, "the back-end"))
        if protocol is None:
            self.fe.negotiate()
        else:
            self.fe.negotiate(want_protocol=protocol)
        self.fe.set_features(features)
        self.fe.set_mem_table(memory)
        if inflight is not None:
            inflight(self.fe)            # GET/SET_INFLIGHT_FD, before the rings start
        self.queues = [DriverQueue(memory, i, self.RINGS + i * 0x4000, size,
                                   ring=rings[i] if rings else None) for i in range(queues)]
        for q in self.queues:
            r = q.ring
            self.fe.start_vring(q.index, size, VringAddr(r.desc_addr, r.avail_addr, r.used_addr),
                                q.kick, q.call, q.err, base)
            self.fe.set_vring_enable(q.index, True)
        self.rings = [q.ring for q in self.queues]
        self.kicks, self.calls, self.errs = ([q.kick for q in self.queues],
                                             [q.call for q in self.queues],
                                             [q.err for q in self.queues])
        self.ring, self.kick, self.call, self.err = (self.rings[0], self.kicks[0],
                                                     self.calls[0], self.errs[0])

    @staticmethod
    def wait(fd, timeout=5):
        import select
        assert select.select([fd], [], [], timeout)[0], "the back-end did not signal"
        return os.eventfd_read(fd)

    def submit(self, buffers, queue=0):
        """Make one chain available, kick, wait for its interrupt; (head, used
        length), checked as a careful driver would (DriverQueue.used)."""
        q = self.queues[queue]
        head = q.send(buffers)
        self.wait(q.call)
        used = q.used()
        assert [h for h, _ in used] == [head]
        return used[0]

    def close(self):
        self.fe.close()
        self.thread.join(5)
        assert not self.thread.is_alive()
        for q in self.queues:
            q.close()
