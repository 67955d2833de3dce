"""`pyvmm backend DEVICE`: a back-end program by the spec's conventions
(vhost-user.rst, "Back-end program conventions"; vhost-user.json).

--socket-path PATH   listen there (BE-111); one front-end at a time
--fd N               or on the listening socket inherited as fd N (BE-112)
--print-capabilities print the JSON capabilities and exit (BE-114)

It never daemonizes (BE-109), ends cleanly on SIGTERM (BE-110) and works
with fds 0-2 on /dev/null (BE-118).
"""

import argparse
import logging
import signal
import sys

EXIT_ERROR = 1

# device -> (vhost-user.json type, a one-line description)
DEVICES = {
    "rng": ("rng", "virtio-rng: entropy from the host's os.urandom()"),
}

DESCRIPTION = """\
Run a vhost-user back-end written with pyvmm's back-end library. It listens
on --socket-path (or the listening socket --fd), serves one front-end at a
time (QEMU with -chardev socket,path=PATH and -device vhost-user-...,
pyvmm run --... vhost-user,socket=PATH) and ends on SIGTERM or Ctrl-C."""


def add_parser(sub, formatter_class=argparse.RawDescriptionHelpFormatter):
    backend = sub.add_parser("backend", help="run a vhost-user back-end",
                             description=DESCRIPTION, formatter_class=formatter_class)
    devices = backend.add_subparsers(dest="device", metavar="DEVICE", required=True,
                                     prog="pyvmm backend")
    for name, (_, what) in DEVICES.items():
        p = devices.add_parser(name, help=what, description=f"{what}.\n\n{DESCRIPTION}",
                               formatter_class=formatter_class)
        where = p.add_mutually_exclusive_group()
        where.add_argument("--socket-path", metavar="PATH",
                           help="listen for the front-end on this Unix socket")
        where.add_argument("--fd", type=int, metavar="N",
                           help="listen on the Unix socket inherited as file descriptor N")
        p.add_argument("--print-capabilities", action="store_true",
                       help="print the back-end's capabilities as JSON and exit")
    return backend


def make_device(args):
    from pyvmm.vhost.user.backend.rng import Rng
    return {"rng": Rng}[args.device]()


def run(args, parser):
    import json
    import socket
    if args.print_capabilities:        # BE-115: other options are ignored
        print(json.dumps({"type": DEVICES[args.device][0]}))
        return 0
    if args.socket_path is None and args.fd is None:
        parser.error("give --socket-path PATH or --fd N")
    from pyvmm.vhost.user.backend.daemon import serve_forever
    from pyvmm.vhost.user.channel import Listener
    from pyvmm.vhost.user.errors import ChannelError

    def terminate(signum, frame):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, terminate)
    logging.getLogger("pyvmm.backend").setLevel(logging.INFO)
    try:
        if args.fd is not None:
            try:
                sock = socket.socket(fileno=args.fd)
            except OSError as e:
                print(f"pyvmm: error: --fd {args.fd}: {e.strerror}", file=sys.stderr)
                return EXIT_ERROR
            listener = Listener.from_socket(sock)
        else:
            listener = Listener(args.socket_path)
    except ChannelError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(f"pyvmm: {args.device} back-end listening on "
          f"{args.socket_path or f'fd {args.fd}'}", file=sys.stderr, flush=True)
    try:
        serve_forever(listener, make_device(args))
    except KeyboardInterrupt:
        pass
    return 0
