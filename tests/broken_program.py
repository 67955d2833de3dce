"""`pyvmm backend rng`, broken in one program convention (the rule given
as first argument), for the checks of section M to fail on (BE-74: `pyvmm
backend blk`, broken in how it restarts):

    python3 tests/broken_program.py BE-110 --socket-path=PATH

or, with `connected-fd` instead of a rule, not broken but taking --fd=N as
vhost-user-gpu does: a connected socket, not a listening one (the spec
does not say which, BE-112).
"""

import json
import os
import signal
import socket
import sys

from pyvmm.cli import main


def serve_connected_fd(fd):
    """The front-end already connected at fd: serve it until it goes."""
    from pyvmm.vhost.user.backend.daemon import serve_connection
    from pyvmm.vhost.user.backend.rng import Rng
    from pyvmm.vhost.user.channel import Connection
    sock = socket.socket(fileno=fd)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        print(f"--fd={fd} is a listening socket; this program wants a connected one",
              file=sys.stderr)
        return 1
    serve_connection(Rng(), Connection(sock, "the front-end"))
    return 0


def start_at_the_avail_index():
    """BE-74 broken: a (re)started ring ignores the inflight area and SET_VRING_BASE
    and goes on from the avail index, as if whatever was posted were done."""
    from pyvmm.vhost.user.backend.vring import Vring
    start = Vring.start

    def broken(self, device_ring):
        start(self, device_ring)
        self.resubmit = []
        device_ring.next_avail = device_ring.avail_idx()
    Vring.start = broken


def run(rule, args):
    if rule == "BE-74":                      # blk (--image FILE in args)
        start_at_the_avail_index()
        return main(["backend", "blk", *args])
    fd = [a[len("--fd="):] for a in args if a.startswith("--fd=")]
    if rule == "connected-fd" and fd and not any(a.startswith("--socket-path") for a in args):
        return serve_connected_fd(int(fd[0]))
    if rule == "BE-108":                     # whatever goes wrong, exit status 0
        main(["backend", "rng", *args])
        return 0
    if rule == "BE-109" and os.fork():       # daemonizes: the parent goes at once
        return 0
    if rule == "BE-110":                     # SIGTERM is ignored
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal = lambda *a: None
    if rule == "BE-111":                     # listens somewhere else
        args = [a + ".elsewhere" if a.startswith("--socket-path=") else a for a in args]
    if rule == "BE-112" and any(a.startswith("--fd") for a in args):
        return 2                             # no --fd
    if rule == "BE-113" and any(a.startswith("--socket-path") for a in args):
        args = [a for a in args if not a.startswith("--fd")]     # both accepted
    if "--print-capabilities" in args:
        if rule == "BE-114":
            print("type: rng")
            return 0
        if rule == "BE-115" and len(args) > 1:
            return 2
        if rule == "BE-116":
            print(json.dumps({"type": "random"}))
            return 0
    if rule == "BE-118" and os.path.samefile("/dev/null", "/proc/self/fd/1"):
        return 1                             # needs a real stdout
    return main(["backend", "rng", *args])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
