"""`pyvmm check`: its options and how it runs (the checks are imported only
when the command runs)."""

import sys

DESCRIPTION = """\
Check a running vhost-user back-end against the protocol's back-end rules
(the BE-n rules of the conformance notes): each check opens a fresh
connection to --socket, plays the front-end (and, for the data path, a
guest-less driver), and prints one line: the rule, PASS, FAIL or SKIP (not
offered), its level, and for a failure what was sent and what came back.
Then a summary. The data-path checks need the device type (--device)."""


def add_parser(sub, formatter_class):
    p = sub.add_parser("check", help="check a vhost-user back-end against the protocol's rules",
                       description=DESCRIPTION, formatter_class=formatter_class,
                       epilog="example:\n  pyvmm check --socket /tmp/vub.sock --device blk\n\n"
                              "exit status: 1 if a MUST rule failed (or the back-end could not "
                              "be reached), else 0")
    p.add_argument("--socket", required=True, metavar="PATH",
                   help="the back-end's listening socket (it must accept one connection "
                        "after another)")
    p.add_argument("--device", choices=["blk", "rng", "auto"], default="auto",
                   help="the device type, for the data-path checks (auto, the default: "
                        "vhost-user does not say, so those checks are skipped)")
    p.add_argument("--rule", action="append", metavar="BE-N",
                   help="run only this rule (repeat for more)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (each rule's result, then the counts) "
                        "instead of lines")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="seconds the back-end has for each answer (default 5)")
    return p


def run(args):
    import json

    from pyvmm.check.run import run_checks
    from pyvmm.errors import PyvmmError
    device = None if args.device == "auto" else args.device
    results = []
    write = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    try:
        passed, failed, skipped, must_failed = run_checks(
            args.socket, device, timeout=args.timeout, write=write, results=results,
            only=set(args.rule) if args.rule else None)
    except (PyvmmError, OSError) as e:
        print(f"pyvmm: error: {args.socket}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"socket": args.socket, "device": device, "results": results,
                          "passed": passed, "failed": failed, "skipped": skipped,
                          "must_failed": must_failed}, indent=1))
    return 1 if must_failed else 0
