"""`pyvmm check`: its options and how it runs (the checks are imported only
when the command runs)."""

import sys

DESCRIPTION = """\
Check a vhost-user back-end against the protocol's back-end rules (the BE-n
rules of the conformance notes). Each check opens a fresh connection, plays
the front-end (and, for the data path, a guest-less driver: no VM, no KVM),
and prints one line: the rule, PASS, FAIL or SKIP (not offered, or not
checkable here), its level, and for a failure what was sent and what came
back. Then a summary.

Where the back-end is:
  --socket PATH            it listens on PATH (and accepts one connection
                           after another; if it dies, the rules after the
                           one it died at are skipped)
  --socket PATH --listen   pyvmm check listens on PATH and the back-end
                           connects (again after each check)
  -- COMMAND ...           pyvmm check starts the program itself, adds
                           --socket-path=PATH (the program conventions,
                           which the BE-107 to BE-118 checks examine) and
                           starts it again whenever it exits: this is how a
                           back-end that serves one front-end (virtiofsd)
                           is checked
  --socket PATH -- COMMAND the program, run as given, listens on PATH (or,
                           with --listen, connects to it)

The data-path checks need the device type (--device): vhost-user does not
say which device a back-end is."""

EPILOG = """\
examples:
  pyvmm check --socket /tmp/vub.sock --device blk
  pyvmm check --device fs -- /usr/lib/qemu/virtiofsd -o source=/srv/share
  pyvmm check --device rng -- pyvmm backend rng
  pyvmm check --socket /tmp/net.sock --listen --device net

exit status: 1 if a MUST rule failed, or could not be checked (the back-end
could not be reached, or died before it), else 0"""


def add_parser(sub, formatter_class):
    p = sub.add_parser("check", help="check a vhost-user back-end against the protocol's rules",
                       description=DESCRIPTION, formatter_class=formatter_class, epilog=EPILOG)
    p.add_argument("--socket", metavar="PATH",
                   help="the back-end's socket (see above)")
    p.add_argument("--listen", action="store_true",
                   help="listen on --socket and let the back-end connect")
    p.add_argument("--device", choices=["blk", "net", "fs", "rng", "vsock", "auto"],
                   default="auto",
                   help="the device type, for the data-path checks (auto, the default: "
                        "vhost-user does not say, so those checks are skipped)")
    p.add_argument("--rule", action="append", metavar="BE-N",
                   help="run only this rule (repeat for more)")
    p.add_argument("--list", action="store_true",
                   help="list the rules checked (id, level, what) and exit")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (each rule's result, then the counts) "
                        "instead of lines")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="seconds the back-end has for each answer (default 5)")
    p.add_argument("backend_command", nargs="*", metavar="-- COMMAND",
                   help="the back-end program and its arguments (after --)")
    p.set_defaults(check_parser=p)
    return p


def target_of(args, parser):
    from pyvmm.check.target import CommandTarget, ListenTarget, SocketTarget
    if args.listen and args.socket is None:
        parser.error("--listen needs --socket PATH (where the back-end connects)")
    if args.backend_command:
        return CommandTarget(args.backend_command, args.socket, args.listen, args.timeout)
    if args.socket is None:
        parser.error("give --socket PATH, or the back-end's command after --")
    if args.listen:
        return ListenTarget(args.socket, args.timeout)
    return SocketTarget(args.socket, args.timeout)


def run(args):
    """The exit status; a reader that goes away (| head) ends the run quietly."""
    import os
    try:
        return _run(args)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1


def _run(args):
    import json

    from pyvmm.check.rules import CHECKS
    from pyvmm.check.run import run_checks
    from pyvmm.errors import PyvmmError
    parser = args.check_parser
    if args.list:
        for c in CHECKS:
            print(f"{c.rule:<7} {c.level:<9} {c.what}")
        return 0
    known = {c.rule for c in CHECKS}
    unknown = sorted(set(args.rule or ()) - known)
    if unknown:
        parser.error(f"no check for {', '.join(unknown)} (pyvmm check --list lists them)")
    device = None if args.device == "auto" else args.device
    results = []
    write = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    try:
        target = target_of(args, parser)
    except (PyvmmError, OSError) as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return 1
    try:
        passed, failed, skipped, must_failed = run_checks(
            target, device, timeout=args.timeout, write=write, results=results,
            only=set(args.rule) if args.rule else None)
    except (PyvmmError, OSError) as e:
        print(f"pyvmm: error: {target}: {e}", file=sys.stderr)
        return 1
    finally:
        target.close()
    if args.json:
        print(json.dumps({"backend": str(target), "device": device, "results": results,
                          "passed": passed, "failed": failed, "skipped": skipped,
                          "must_failed": must_failed}, indent=1))
    return 1 if must_failed else 0
