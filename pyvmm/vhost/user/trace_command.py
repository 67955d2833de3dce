"""`pyvmm trace`: its options and how it runs (the proxy is proxy.py, imported
only when the command runs, so that `pyvmm run` does not pay for it)."""

DEVICE_NAMES = ("blk",)      # devices whose feature bits pyvmm can name

DESCRIPTION = """\
Trace a vhost-user conversation: listen on --listen for a front-end (give
QEMU or pyvmm that path as the back-end's socket), connect to the real
back-end at --connect, and forward every message both ways unchanged,
fds included, while printing each one decoded (one line each, '->' from
the front-end, '<-' from the back-end) and flagging the first rule either
side breaks, by its id in the conformance notes (FE-n, BE-n). The
back-end's request channel passes through as an fd and is not traced."""


def add_parser(sub, formatter_class):
    p = sub.add_parser("trace", help="trace the vhost-user messages between a front-end "
                                     "and a back-end (a proxy)",
                       description=DESCRIPTION, formatter_class=formatter_class,
                       epilog="example:\n  pyvmm trace --listen /tmp/trace.sock --connect "
                              "/tmp/vub.sock &\n  pyvmm run --blk vhost-user,"
                              "socket=/tmp/trace.sock -- true\n\nexit status: 1 if a rule "
                              "was broken (or the back-end could not be reached), else 0")
    p.add_argument("--listen", required=True, metavar="PATH",
                   help="the socket the front-end connects to (created, mode 0600)")
    p.add_argument("--connect", required=True, metavar="PATH",
                   help="the real back-end's socket")
    p.add_argument("--once", action="store_true",
                   help="end when the first front-end goes (default: serve the next one)")
    p.add_argument("--drop-at", type=_message_number, action="append", default=[],
                   metavar="N",
                   help="a fault for testing the front-end: hang up on both sides when the "
                        "front-end sends its Nth message (counted from 1, not forwarded), "
                        "as if the back-end died there; repeat for the next connections")
    p.add_argument("--output", metavar="FILE", help="write the trace to FILE, not stdout")
    p.add_argument("--device", choices=sorted(DEVICE_NAMES),
                   help="name the device's own feature bits (vhost-user does not say which "
                        "device a back-end is, so they come by number otherwise)")
    return p


def _message_number(text):
    import argparse
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a message number, 1 or more")
    return n


def run(args):
    import signal
    import sys

    from pyvmm.virtio import blk
    from pyvmm.vhost.user.errors import ChannelError
    from pyvmm.vhost.user.proxy import serve
    out = sys.stdout
    if args.output:
        try:
            out = open(args.output, "a", buffering=1)
        except OSError as e:
            print(f"pyvmm: error: --output {args.output}: {e.strerror}", file=sys.stderr)
            return 1

    def write(line):
        out.write(line + "\n")
        out.flush()

    def terminate(signum, frame):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, terminate)
    try:
        names = {"blk": blk.BLK_FEATURE_NAMES}.get(args.device)
        broken = serve(args.listen, args.connect, write, once=args.once, device_names=names,
                       drop_at=args.drop_at)
    except ChannelError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 1 if broken else 0
