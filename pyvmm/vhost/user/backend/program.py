"""`pyvmm backend DEVICE`: a back-end program by the spec's conventions
(vhost-user.rst, "Back-end program conventions"; vhost-user.json).

--socket-path PATH   listen there (BE-111); one front-end at a time
--fd N               or on the listening socket inherited as fd N (BE-112)
--print-capabilities print the JSON capabilities and exit (BE-114)
--connect PATH       not a convention: connect to a listening front-end
--allow-unsealed-memory  map guest memory the front-end could still shrink

It never daemonizes (BE-109), ends cleanly on SIGTERM (BE-110) and works
with fds 0-2 on /dev/null (BE-118).
"""

import argparse
import logging
import signal
import sys

from pyvmm.vhost.user.backend import faults

EXIT_ERROR = 1
CONNECT_WAIT = 30         # seconds --connect waits for the front-end's socket

# device -> (vhost-user.json type, a one-line description)
DEVICES = {
    "rng": ("rng", "virtio-rng: entropy from the host's os.urandom()"),
    "blk": ("block", "virtio-blk: a disk backed by an image file (raw)"),
    "vsock": ("vsock", "virtio-vsock: guest AF_VSOCK streams to and from host Unix sockets"),
}

VSOCK_EPILOG = """The guest connecting to the host (CID 2), port P reaches the Unix socket
UDS_PATH_P (e.g. /tmp/vm.vsock_5000), which a host program listens on. A
host program reaches the guest's port P by connecting to UDS_PATH and
writing "CONNECT P\\n"; the answer is "OK <host port>\\n", then the stream
is the guest's. (Firecracker's and vhost-device-vsock's convention.)"""

DESCRIPTION = """\
Run a vhost-user back-end written with pyvmm's back-end library. It listens
on --socket-path (or the listening socket --fd), serves one front-end at a
time (QEMU with -chardev socket,path=PATH and -device vhost-user-...,
pyvmm run --... vhost-user,socket=PATH) and ends on SIGTERM or Ctrl-C."""


def add_parser(sub, formatter_class=argparse.RawDescriptionHelpFormatter):
    from pyvmm.vhost.user.backend.blk import IO_THREADS
    backend = sub.add_parser("backend", help="run a vhost-user back-end",
                             description=DESCRIPTION, formatter_class=formatter_class)
    devices = backend.add_subparsers(dest="device", metavar="DEVICE", required=True,
                                     prog="pyvmm backend")
    for name, (_, what) in DEVICES.items():
        p = devices.add_parser(name, help=what, description=f"{what}.\n\n{DESCRIPTION}",
                               epilog=VSOCK_EPILOG if name == "vsock" else None,
                               formatter_class=formatter_class)
        p.set_defaults(device_parser=p)      # errors show this command's usage
        where = p.add_mutually_exclusive_group()
        where.add_argument("--socket-path", metavar="PATH",
                           help="listen for the front-end on this Unix socket")
        where.add_argument("--fd", type=int, metavar="N",
                           help="listen on the Unix socket inherited as file descriptor N")
        where.add_argument("--connect", metavar="PATH",
                           help="instead, connect to a front-end listening on PATH (pyvmm's "
                                "'server' option, QEMU's chardev server=on), waiting up to "
                                f"{CONNECT_WAIT} s for it; ends when that front-end goes")
        p.add_argument("--print-capabilities", action="store_true",
                       help="print the back-end's capabilities as JSON and exit")
        p.add_argument("--allow-unsealed-memory", action="store_true",
                       help="map guest memory (and inflight areas) that the front-end could "
                            "still shrink: a memfd without F_SEAL_SHRINK that cannot be "
                            "sealed, or a plain file (QEMU's memory-backend-file on "
                            "hugetlbfs). A front-end that then shrinks it kills this back-end "
                            "(SIGBUS): only for a trusted front-end. Without it such memory is "
                            "refused; a memfd that allows sealing is sealed here, and QEMU's "
                            "memory-backend-memfd (seal=on by default) needs nothing")
        p.add_argument("--die-at", metavar="POINT[:N]",
                       help="fault injection, for testing a front-end's reconnect: kill this "
                            "back-end (SIGKILL, as a crash) the Nth time (default 1st) it "
                            "reaches POINT, one of: " + ", ".join(faults.POINTS)
                            + " (see pyvmm/vhost/user/backend/faults.py)")
        if name == "blk":
            p.add_argument("--image", metavar="FILE",
                           help="the disk: a raw image file or a block device (required)")
            p.add_argument("--read-only", action="store_true",
                           help="offer VIRTIO_BLK_F_RO and fail writes")
            p.add_argument("--queues", type=int, default=1, metavar="N",
                           help="request queues (default 1; the guest may use fewer)")
            p.add_argument("--serial", metavar="ID",
                           help="what GET_ID answers, up to 20 bytes (default: the "
                                "image's file name)")
            p.add_argument("--io-threads", type=int, default=IO_THREADS, metavar="N",
                           help="requests served at once, each by its own thread (default "
                                f"{IO_THREADS}; 1: one at a time): the guest's requests "
                                "that arrive together have their data copied in parallel")
        if name == "vsock":
            p.add_argument("--guest-cid", type=int, metavar="N",
                           help="the guest's CID, 3 or more (required)")
            p.add_argument("--uds-path", metavar="PATH",
                           help="the host side's Unix socket (required; see below)")
    return backend


def make_device(args, parser):
    """The device the options describe; a bad option is one line via parser.error."""
    if args.device == "rng":
        from pyvmm.vhost.user.backend.rng import Rng
        return Rng()
    if args.device == "vsock":
        return make_vsock(args, parser)
    from pyvmm.vhost.user.backend.blk import Blk
    if args.image is None:
        parser.error("blk needs --image FILE")
    if not 1 <= args.queues <= 64:
        parser.error(f"--queues {args.queues}: give 1 to 64")
    if not 1 <= args.io_threads <= 64:
        parser.error(f"--io-threads {args.io_threads}: give 1 to 64")
    try:
        return Blk(args.image, read_only=args.read_only, num_queues=args.queues,
                   serial=args.serial, io_threads=args.io_threads)
    except OSError as e:
        parser.error(f"--image {args.image}: {e.strerror or e}")


def make_vsock(args, parser):
    from pyvmm.vhost.user.backend.vsock import Vsock
    if args.guest_cid is None or args.uds_path is None:
        parser.error("vsock needs --guest-cid N and --uds-path PATH")
    if not 3 <= args.guest_cid < 0xFFFF_FFFF:
        parser.error(f"--guest-cid {args.guest_cid}: CIDs 0-2 and 2^32-1 are reserved; "
                     "give 3 or more")
    try:
        return Vsock(args.guest_cid, args.uds_path)
    except OSError as e:
        parser.error(f"--uds-path {args.uds_path}: {e.strerror}")


def serve_one_front_end(path, device, **options):
    """--connect: connect to a listening front-end, serve it until it goes."""
    import time

    from pyvmm.vhost.user.backend.daemon import serve_connection
    from pyvmm.vhost.user.channel import Connection
    from pyvmm.vhost.user.errors import ChannelError
    deadline = time.monotonic() + CONNECT_WAIT
    try:
        while True:
            try:
                conn = Connection.connect(path, "the front-end")
                break
            except ChannelError as e:
                if time.monotonic() > deadline:
                    print(f"pyvmm: error: --connect {path}: no front-end listened there "
                          f"within {CONNECT_WAIT} s ({e})", file=sys.stderr)
                    return EXIT_ERROR
                time.sleep(0.1)
        print(f"pyvmm: back-end connected to {path}", file=sys.stderr, flush=True)
        serve_connection(device, conn, **options)
    except KeyboardInterrupt:
        pass
    finally:
        device.close()
    return 0


def listen(args):
    """The Listener of --socket-path or --fd, or None after one line on stderr."""
    import socket

    from pyvmm.vhost.user.channel import Listener
    from pyvmm.vhost.user.errors import ChannelError
    try:
        if args.fd is None:
            return Listener(args.socket_path)
        return Listener.from_socket(socket.socket(fileno=args.fd))
    except OSError as e:
        print(f"pyvmm: error: --fd {args.fd}: {e.strerror}", file=sys.stderr)
    except ChannelError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
    return None


def print_capabilities(device):
    """BE-114: vhost-user.json's capabilities object."""
    import json
    print(json.dumps({"type": DEVICES[device][0]}))
    return 0


def capabilities_first(argv):
    """BE-115: `backend DEVICE ... --print-capabilities ...` prints the
    capabilities whatever else is on the line (argparse would refuse an
    unknown option first); None for any other command line."""
    if len(argv) >= 2 and argv[0] == "backend" and argv[1] in DEVICES \
            and "--print-capabilities" in argv[2:]:
        return print_capabilities(argv[1])
    return None


def run(args, parser):
    parser = args.device_parser
    if args.print_capabilities:
        return print_capabilities(args.device)
    if args.socket_path is None and args.fd is None and args.connect is None:
        parser.error("give --socket-path PATH, --fd N or --connect PATH")
    if args.die_at is not None:
        try:
            faults.arm(args.die_at)
        except ValueError as e:
            parser.error(f"--die-at {args.die_at}: {e}")
    device = make_device(args, parser)

    def terminate(signum, frame):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, terminate)
    if hasattr(device, "request_resize"):     # blk: the image grew (or shrank)
        # Only asks: the work (and the message to the front-end) is the loop's.
        signal.signal(signal.SIGHUP, lambda signum, frame: device.request_resize())
    logging.getLogger("pyvmm.backend").setLevel(logging.INFO)
    options = {"allow_unsealed_memory": args.allow_unsealed_memory}
    if args.connect is not None:
        return serve_one_front_end(args.connect, device, **options)
    from pyvmm.vhost.user.backend.daemon import serve_forever
    listener = listen(args)
    if listener is None:
        device.close()
        return EXIT_ERROR
    print(f"pyvmm: {args.device} back-end listening on "
          f"{args.socket_path or f'fd {args.fd}'}", file=sys.stderr, flush=True)
    try:
        serve_forever(listener, device, **options)
    except KeyboardInterrupt:
        pass
    finally:
        device.close()
    return 0
