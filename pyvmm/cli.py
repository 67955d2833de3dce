"""The `pyvmm` command line."""

import argparse
import ipaddress
import logging
import os
import re
import sys
import time

from pyvmm import __version__, guest
from pyvmm.vmm import DEFAULT_TRANSPORT, TRANSPORTS

EXIT_ERROR = 1          # pyvmm could not start the VM (the message says why)
EXIT_USAGE = 2          # bad command line (argparse's convention)
EXIT_NO_STATUS = 125    # the VM ended without a status from the guest, or failed

RUN_DESCRIPTION = """\
Boot a Linux guest under KVM. By default: the tiny guest from images/, with
256 MiB of memory and one vCPU.

With `-- CMD ARGS...` the guest runs CMD and pyvmm exits with its exit
status (the guest's init reports it on I/O port 0xf4; see guest/README.md).
Without it you get an interactive shell on the serial console; type
`poweroff` (or press Ctrl-A x) to leave. (When stdin is not a terminal,
its bytes go to the console as they come; for scripts, use -- CMD.)
"""

RUN_EPILOG = """\
exit status: CMD's, or 0 after `poweroff`; 1 if the VM could not be set up;
125 if the VM ended without a status from the guest (a crash, a reset, or a
KVM failure); 130 on Ctrl-C (or Ctrl-A x).

examples:
  pyvmm run -- uname -a
  pyvmm run --net vhost-kernel -- ping -c 3 10.10.0.1
  pyvmm run --vsock vhost-kernel,cid=5
  pyvmm run --scsi vhost-kernel,image=disk.img -- cat /sys/block/sda/size
  pyvmm run --cpus 2 --mem 512M -- sh -c 'nproc; free -m'
  pyvmm run --stats -- true        # boot time and vCPU exits per reason
  pyvmm run --transport mmio --stats -- true   # the same on virtio-mmio
  pyvmm backend rng --socket-path /tmp/rng.sock &     # a vhost-user back-end
  pyvmm run --rng vhost-user,socket=/tmp/rng.sock -- head -c 16 /dev/hwrng
  pyvmm run --blk vhost-user,socket=/tmp/vub.sock --trace vhost-user -- true

This host's KVM may be unable to boot Linux (a paravirtual KVM, no
/dev/kvm); then run pyvmm inside the testbed VM:
  scripts/testbed -- python3 -m pyvmm run -- uname -a
"""

def parse_transport(text):
    if text not in TRANSPORTS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a transport: pci or mmio "
                                         f"(--transport, or $PYVMM_TRANSPORT for its default)")
    return text


SIZE_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text):
    """'256M', '1G', '512K' or a plain number of MiB (as QEMU's -m)."""
    m = re.fullmatch(r"(\d+)([KMG]?)(?:i?B)?", text.strip(), re.I)
    if not m or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 256M or 1G")
    return int(m.group(1)) * SIZE_UNITS[m.group(2).upper()]


MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


def parse_backend_options(text, option, allowed, kind="vhost-kernel", flags=()):
    """'KIND,key=value,flag,...' -> {key: value, flag: True}, for a back-end of
    kind (one name, or a tuple of them); keys from allowed, bare words from flags."""
    backend, *pairs = text.split(",")
    kinds = (kind,) if isinstance(kind, str) else kind
    if backend not in kinds:
        raise argparse.ArgumentTypeError(
            f"{option} {text!r}: the back-end must be {' or '.join(kinds)}")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if (sep and key in allowed) or (not sep and key in flags):
            options[key] = value if sep else True
        else:
            known = sorted(allowed) + [f"{f} (no value)" for f in flags]
            raise argparse.ArgumentTypeError(
                f"{option}: unknown option {pair!r} (known: {', '.join(known)})")
    return options


def _number(option, key, value, low, high, what="a number"):
    try:
        n = int(value, 0)
        if not low <= n <= high:
            raise ValueError
        return n
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option} {key}={value}: give {what} from {low} to "
                                         f"{high}") from None


def parse_vhost_user(text, option, example, keys=()):
    """OPTION vhost-user,socket=PATH[,server][,timeout=S] plus keys: a VhostUserConfig
    and the option's own keys as given."""
    from pyvmm.vmm.virtio_devices import VhostUserConfig
    opts = parse_backend_options(text, option, {"socket", "timeout", "reconnect", *keys},
                                 kind="vhost-user", flags={"server"})
    if not opts.get("socket"):
        raise argparse.ArgumentTypeError(f"{option}: give the back-end's socket, "
                                         f"e.g. vhost-user,socket={example}")
    cfg = VhostUserConfig(socket=opts["socket"], server=opts.get("server", False),
                          kind=option.lstrip("-"))
    if "timeout" in opts:
        cfg.timeout = _seconds(option, "timeout", opts["timeout"], "give seconds")
    if "reconnect" in opts:
        cfg.reconnect = _seconds(option, "reconnect", opts["reconnect"],
                                 "give seconds between attempts")
    return cfg, opts


def _seconds(option, key, text, what):
    """key=text of option: seconds, more than 0 and at most an hour."""
    try:
        seconds = float(text)
        if not 0 < seconds <= 3600:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option} {key}={text}: {what}, more than 0 and at "
                                         f"most 3600") from None
    return seconds


def _mac(text):
    if not MAC_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"--net mac={text}: use six hex bytes, "
                                         "e.g. 02:00:00:00:00:01")
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        raise argparse.ArgumentTypeError(f"--net mac={text}: a multicast address")
    return mac


def _interface(key, text):
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--net {key}={text}: give an address with prefix, e.g. 10.0.0.1/24") from None


def parse_net(text):
    from pyvmm.vmm.virtio_devices import NetConfig
    if text.split(",")[0] == "vhost-user":
        cfg, opts = parse_vhost_user(text, "--net", "/tmp/net.sock",
                                     {"mac", "guest-ip", "queues"})
        cfg.mac = _mac(opts["mac"]) if "mac" in opts else None
        if "queues" in opts:
            cfg.queues = _number("--net", "queues", opts["queues"], 1, 8)
        cfg.guest_ip = _interface("guest-ip", opts["guest-ip"]) if "guest-ip" in opts else None
        return cfg
    opts = parse_backend_options(text, "--net", {"tap", "mac", "host-ip", "guest-ip", "queues"},
                                 kind=("vhost-kernel", "vhost-user"))
    cfg = NetConfig(tap=opts.get("tap") or None)
    if "queues" in opts:
        cfg.queues = _number("--net", "queues", opts["queues"], 1, 8)
    if cfg.tap and (len(cfg.tap.encode()) > 15 or "/" in cfg.tap):
        raise argparse.ArgumentTypeError(f"--net tap={cfg.tap}: an interface name has at most "
                                         "15 characters and no '/'")
    if "mac" in opts:
        cfg.mac = _mac(opts["mac"])
    for key in ("host-ip", "guest-ip"):
        if key in opts:
            setattr(cfg, key.replace("-", "_"), _interface(key, opts[key]))
    return cfg


def parse_vsock(text):
    from pyvmm.vmm.virtio_devices import VsockConfig
    if text.split(",")[0] == "vhost-user":
        cfg, opts = parse_vhost_user(text, "--vsock", "/tmp/vsock.sock", {"cid"})
        if "cid" in opts:
            cfg.cid = _number("--vsock", "cid", opts["cid"], 3, 0xFFFF_FFFE, "a CID")
        return cfg
    opts = parse_backend_options(text, "--vsock", {"cid"}, kind=("vhost-kernel", "vhost-user"))
    try:
        return VsockConfig(cid=int(opts.get("cid", 3)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--vsock cid={opts['cid']}: not a number") from None


def parse_scsi(text):
    from pyvmm.vmm.virtio_devices import ScsiConfig
    opts = parse_backend_options(text, "--scsi", {"image", "wwpn", "tpgt", "queues"})
    cfg = ScsiConfig(image=opts.get("image") or None, wwpn=opts.get("wwpn") or None)
    if not cfg.image and not cfg.wwpn:
        raise argparse.ArgumentTypeError(
            "--scsi: give image=PATH (pyvmm makes a target in configfs with that file as its "
            "disk) or wwpn=NAME (a vhost target made beforehand)")
    if cfg.wwpn and (len(cfg.wwpn.encode()) > 223 or "/" in cfg.wwpn):
        raise argparse.ArgumentTypeError(f"--scsi wwpn={cfg.wwpn}: a target name has at most "
                                         "223 bytes and no '/'")
    if "tpgt" in opts:
        if not cfg.image:
            raise argparse.ArgumentTypeError(
                "--scsi tpgt=N: only with image= (with wwpn= alone the kernel serves every "
                "TPG of the target)")
        cfg.tpgt = _number("--scsi", "tpgt", opts["tpgt"], 0, 255)
    if "queues" in opts:
        cfg.queues = _number("--scsi", "queues", opts["queues"], 1, 16)
    return cfg


def parse_blk(text):
    return parse_vhost_user(text, "--blk", "/tmp/vub.sock")[0]


def parse_fs(text):
    cfg, opts = parse_vhost_user(text, "--fs", "/tmp/vfs.sock,tag=share", {"tag", "queues"})
    tag = opts.get("tag")
    if not tag or len(tag.encode()) > 36:
        raise argparse.ArgumentTypeError("--fs: give the tag the guest mounts, tag=NAME "
                                         "(1 to 36 bytes)")
    cfg.tag = tag
    if "queues" in opts:
        cfg.queues = _number("--fs", "queues", opts["queues"], 1, 63)
    return cfg


def parse_rng(text):
    return parse_vhost_user(text, "--rng", "/tmp/rng.sock")[0]


def parse_device(text):
    cfg, opts = parse_vhost_user(text, "--device", "/tmp/dev.sock,virtio-id=N",
                                 {"virtio-id", "queues", "queue-size", "config-size"})
    if "virtio-id" not in opts:
        raise argparse.ArgumentTypeError("--device: give the device type, virtio-id=N "
                                         "(2 block, 4 rng, 19 vsock, 26 fs, ...)")
    cfg.virtio_id = _number("--device", "virtio-id", opts["virtio-id"], 1, 0xFFFF, "a device id")
    if "queues" in opts:
        cfg.queues = _number("--device", "queues", opts["queues"], 1, 64)
    if "queue-size" in opts:
        cfg.queue_size = _number("--device", "queue-size", opts["queue-size"], 1, 32768)
        if cfg.queue_size & (cfg.queue_size - 1):
            raise argparse.ArgumentTypeError(f"--device queue-size={cfg.queue_size}: give a "
                                             f"power of 2")
    if "config-size" in opts:
        cfg.config_size = _number("--device", "config-size", opts["config-size"], 0, 3840)
    return cfg


def parse_trace(text):
    if text != "vhost-user":
        raise argparse.ArgumentTypeError(f"--trace {text!r}: only vhost-user can be traced")
    return text


def parse_console(text):
    if text == "stdio":
        return ("stdio", None)
    if text.startswith("file:") and len(text) > 5:
        return ("file", text[5:])
    raise argparse.ArgumentTypeError(f"{text!r}: use stdio or file:PATH")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, minus its import of shutil for the terminal width.

    argparse makes a formatter for every add_argument() (to check metavars)
    and HelpFormatter asks shutil for the width each time: importing shutil
    alone cost a quarter of a second of each start in the testbed.
    """

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        super().__init__(prog, indent_increment, max_help_position, width or terminal_width())


def terminal_width():
    """What shutil.get_terminal_size() would say, less argparse's margin of 2."""
    try:
        return int(os.environ["COLUMNS"]) - 2
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns - 2
    except (OSError, ValueError, AttributeError):
        return 78


def build_parser():
    parser = argparse.ArgumentParser(
        prog="pyvmm", formatter_class=HelpFormatter,
        description="A minimal KVM virtual machine monitor whose purpose is vhost.")
    parser.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what pyvmm does (debug level) on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", prog="pyvmm")

    run = sub.add_parser("run", help="boot a guest", description=RUN_DESCRIPTION,
                         epilog=RUN_EPILOG, formatter_class=HelpFormatter)
    run.add_argument("--kernel", default=str(guest.VMLINUX), metavar="PATH",
                     help="vmlinux (ELF) or bzImage to boot (default: images/vmlinux)")
    run.add_argument("--initrd", default=str(guest.INITRAMFS), metavar="PATH",
                     help="initramfs (default: images/initramfs.cpio.gz); 'none' for none")
    run.add_argument("--cmdline", default=guest.BASE_CMDLINE, metavar="STR",
                     help=f"kernel command line (default: {guest.BASE_CMDLINE!r}); "
                          "pyvmm appends what the guest's init needs for CMD")
    run.add_argument("--mem", type=parse_size, default=parse_size("256M"), metavar="SIZE",
                     help="guest memory, e.g. 256M or 4G (default 256M)")
    run.add_argument("--cpus", type=int, default=1, metavar="N", help="vCPUs (default 1)")
    run.add_argument("--hugepages", action="store_true",
                     help="back guest memory with 2 MiB huge pages")
    run.add_argument("--console", type=parse_console, default=("stdio", None),
                     metavar="stdio|file:PATH",
                     help="where the serial console goes (default stdio: your terminal)")
    run.add_argument("--net", type=parse_net, action="append", default=[],
                     metavar="vhost-kernel[,tap=NAME][,mac=MAC][,host-ip=CIDR][,guest-ip=CIDR]"
                             "[,queues=N] "
                             "| vhost-user,socket=PATH[,mac=MAC][,queues=N][,guest-ip=CIDR]"
                             "[,server][,reconnect=S]",
                     help="a virtio-net NIC whose packets the kernel's vhost-net moves to "
                          "a tap (by default a new tap pyvmmN with 10.10.N.1/30 on the host "
                          "and 10.10.N.2/30 as the guest's ethN), or a vhost-user back-end "
                          "such as DPDK's vhost PMD (dpdk-testpmd --vdev net_vhost0,iface=PATH) "
                          "moves, with N queue pairs (default 1; with vhost-kernel a "
                          "multiqueue tap and one vhost-net per pair). Repeat for more NICs")
    run.add_argument("--vsock", type=parse_vsock,
                     metavar="vhost-kernel[,cid=N] | vhost-user,socket=PATH[,cid=N]",
                     help="a virtio-vsock device served by the kernel's vhost-vsock (the "
                          "guest's CID is N, default 3; the host is CID 2) or by a vhost-user "
                          "back-end, which says the guest's CID itself (cid=N must agree)")
    run.add_argument("--scsi", type=parse_scsi, action="append", default=[],
                     metavar="vhost-kernel,image=PATH[,wwpn=NAME][,tpgt=N][,queues=N] "
                             "| vhost-kernel,wwpn=NAME[,queues=N]",
                     help="a virtio-scsi adapter whose commands the kernel's SCSI target "
                          "(LIO) answers through vhost-scsi. With image=PATH, pyvmm makes a "
                          "target in configfs (a fileio backstore on PATH as LUN 0 of target "
                          "N, default 1; the name NAME, default a new naa.5001405...) and "
                          "removes it at exit; the guest sees the file as a SCSI disk, sda. "
                          "With wwpn=NAME alone, it serves a vhost target made beforehand "
                          "(e.g. with targetcli). N request queues (default 1). Repeat for "
                          "more adapters")
    run.add_argument("--blk", type=parse_blk, action="append", default=[],
                     metavar="vhost-user,socket=PATH[,server][,timeout=S][,reconnect=S]",
                     help="a virtio-blk disk (the guest's vda, vdb, ...) served by a "
                          "vhost-user back-end such as qemu-storage-daemon listening on "
                          "PATH; with server, pyvmm listens there (mode 0600) and waits for "
                          "the back-end to connect. Size, block size, read-only and queue "
                          "count come from the back-end, which must answer each message "
                          "within S seconds (default 10). With reconnect=S, a back-end that "
                          "goes away is waited for (pyvmm connects again every S seconds, or "
                          "with server accepts the next one) and the device goes on where it "
                          "stopped, without an error the guest sees; without it, the device "
                          "fails for good. The same keys work for --net, --fs, --rng, --vsock "
                          "and --device. Repeat for more disks")
    run.add_argument("--fs", type=parse_fs, action="append", default=[],
                     metavar="vhost-user,socket=PATH,tag=TAG[,queues=N][,server][,timeout=S]"
                             "[,reconnect=S]",
                     help="a virtio-fs file system served by a vhost-user back-end such as "
                          "virtiofsd; the guest mounts it with 'mount -t virtiofs TAG DIR'. "
                          "N request queues (default 1) besides the high-priority one")
    run.add_argument("--rng", type=parse_rng, action="append", default=[],
                     metavar="vhost-user,socket=PATH[,server][,timeout=S][,reconnect=S]",
                     help="a virtio-rng device (the guest's /dev/hwrng) served by a vhost-user "
                          "back-end, e.g. 'pyvmm backend rng'")
    run.add_argument("--device", type=parse_device, action="append", default=[],
                     metavar="vhost-user,socket=PATH,virtio-id=N[,queues=N][,queue-size=N]"
                             "[,config-size=N]",
                     help="any virtio device type served by a vhost-user back-end, for which "
                          "pyvmm has no model: the device id N, the queue count (default: the "
                          "back-end's) and size (default 256) from here, the config space from "
                          "the back-end (config-size bytes; known for common types)")
    run.add_argument("--transport", type=parse_transport,
                     default=os.environ.get("PYVMM_TRANSPORT", DEFAULT_TRANSPORT),
                     metavar="pci|mmio",
                     help="how the guest finds and drives the virtio devices. pci: each "
                          "device a PCI function on bus 0 (found through ports 0xCF8/0xCFC, "
                          "no ACPI), one MSI-X vector per queue routed by KVM: no exit to "
                          "pyvmm per request or interrupt. mmio: virtio-mmio registers "
                          "announced on the kernel command line, one interrupt line per "
                          "device: smaller, but each interrupt costs the guest an exit (its "
                          f"InterruptStatus read). Default {DEFAULT_TRANSPORT}, or "
                          "$PYVMM_TRANSPORT")
    run.add_argument("--trace", type=parse_trace, metavar="vhost-user",
                     help="print every vhost-user message, both ways, decoded, one line "
                          "each (to stderr, or --trace-file)")
    run.add_argument("--trace-file", metavar="PATH",
                     help="write the --trace lines to PATH instead of stderr")
    run.add_argument("--stats", action="store_true",
                     help="at the end, print the boot time and vCPU exits per reason")
    run.add_argument("guest_command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                     help="run CMD in the guest and exit with its status")

    from pyvmm.vhost.user.backend import program
    program.add_parser(sub, HelpFormatter)
    from pyvmm.vhost.user import trace_command
    trace_command.add_parser(sub, HelpFormatter)
    from pyvmm.check import command as check_command
    check_command.add_parser(sub, HelpFormatter)
    return parser


def process_start_time():
    """time.monotonic() at the moment this process started (from /proc/self/stat)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.monotonic() - age
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def error(message):
    print(f"pyvmm: error: {message}", file=sys.stderr)


def make_console(args, command):
    """The serial console's ends: (Console, file to close or None), or None on error."""
    from pyvmm.vmm.console import Console
    kind, path = args.console
    if kind == "file":
        try:
            out_file = open(path, "wb", buffering=0)
        except OSError as e:
            error(f"--console file:{path}: {e.strerror}")
            return None
        return Console(out_file.fileno()), out_file
    # With a command, the guest's stdin is not ours to give: the terminal
    # stays as it is (and Ctrl-C stops pyvmm).
    return Console(sys.stdout.fileno(), None if command else sys.stdin.fileno()), None


def print_stats(result):
    boot = f"{result.boot_time:.3f} s" if result.boot_time is not None else "not reached"
    print(f"pyvmm: guest init reached after {boot} (from pyvmm's start)", file=sys.stderr)
    print("pyvmm: start-up, seconds from pyvmm's start:", file=sys.stderr)
    for seconds, what in result.timeline:
        print(f"  {seconds:7.3f}  {what}", file=sys.stderr)
    print("pyvmm: vCPU exits:", file=sys.stderr)
    for line in result.stats.report():
        print(f"  {line}", file=sys.stderr)
    if result.queues:
        print("pyvmm: virtio queues as the run left them (a guest waiting on a request "
              "shows avail ahead of used):", file=sys.stderr)
        for line in result.queues:
            print(f"  {line}", file=sys.stderr)


def exit_status(result):
    """pyvmm's exit status for how the run ended (see RUN_EPILOG)."""
    if result.signal_exit is not None:
        print(f"\npyvmm: {result.reason}", file=sys.stderr)
        return result.signal_exit
    if result.status is not None:
        return result.status
    if result.error:
        error(result.reason)
    else:
        print(f"pyvmm: {result.reason}, without reporting an exit status", file=sys.stderr)
    return EXIT_NO_STATUS


def cmd_run(args, started_at):
    from pyvmm.errors import PyvmmError
    from pyvmm.vmm.console import ESCAPE_HELP
    from pyvmm.vmm.machine import Machine, MachineConfig

    command = args.guest_command
    if command[:1] == ["--"]:
        command = command[1:]
    cmdline = args.cmdline
    if command:
        cmdline += " " + guest.command_arg(command)
    config = MachineConfig(kernel=args.kernel, initrd=None if args.initrd == "none" else args.initrd,
                           cmdline=cmdline, mem_size=args.mem, cpus=args.cpus,
                           hugepages=args.hugepages, nets=args.net, vsock=args.vsock,
                           blks=args.blk, rngs=args.rng, generic=args.device, fss=args.fs,
                           scsis=args.scsi, transport=args.transport)

    made = make_console(args, command)
    if made is None:
        return EXIT_ERROR
    console, out_file = made
    trace_file = None
    if args.trace or args.trace_file:          # --trace-file alone implies --trace
        from pyvmm.vhost.user.trace import Tracer
        if args.trace_file:
            try:
                trace_file = open(args.trace_file, "w")
            except OSError as e:
                error(f"--trace-file {args.trace_file}: {e.strerror}")
                return EXIT_ERROR
        config.tracer = Tracer(trace_file or sys.stderr)
    try:
        try:
            machine = Machine(config, console, started_at=started_at)
        except PyvmmError as e:
            error(str(e))
            return EXIT_ERROR
        except OSError as e:
            error(f"setting up the VM failed: {e}")
            return EXIT_ERROR
        try:
            for planned in machine.devices:
                print(f"pyvmm: {planned.summary}", file=sys.stderr)
            if console.interactive:
                print(ESCAPE_HELP, file=sys.stderr)
            result = machine.run()
        finally:
            machine.close()
    finally:
        for f in (out_file, trace_file):
            if f:
                f.close()
    if console.dropped:
        print(f"pyvmm: {console.dropped} bytes of console output were dropped: "
              f"nothing read them fast enough", file=sys.stderr)
    if args.stats:
        print_stats(result)
    return exit_status(result)


def main(argv=None):
    started_at = process_start_time()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["backend"]:
        from pyvmm.vhost.user.backend import program
        early = program.capabilities_first(argv)
        if early is not None:
            return early
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="pyvmm: %(name)s: %(message)s")
    if args.command == "run":
        if args.cpus < 1:
            parser.error("--cpus must be at least 1")
        try:
            return cmd_run(args, started_at)
        except KeyboardInterrupt:  # Ctrl-C while setting up (the run handles its own)
            print("\npyvmm: interrupted", file=sys.stderr)
            return 130
    if args.command == "backend":
        from pyvmm.vhost.user.backend import program
        return program.run(args, parser)
    if args.command == "trace":
        from pyvmm.vhost.user import trace_command
        return trace_command.run(args)
    if args.command == "check":
        from pyvmm.check import command as check_command
        return check_command.run(args)
    parser.print_help()
    return EXIT_USAGE
