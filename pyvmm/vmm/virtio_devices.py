"""The virtio devices a machine is asked for, from command-line options to transports.

Building one happens in two steps. Before the VM exists: the host side
(tap, /dev/vhost-*, the connection to a vhost-user back-end), which is
where most user errors show up, and the kernel command line entries that
announce the device and configure the guest's end. After: the transport
(virtio-pci or virtio-mmio), whose eventfds KVM wires up.

Each device is a model (devices/virtio/net.py, vsock.py, blk.py, fs.py,
rng.py, scsi.py, generic.py) on a queue back-end: the kernel's vhost (vhost_kernel.py) or a vhost-user
back-end process (vhost_user.py).
"""

import contextlib
import ipaddress
import os
import re
from dataclasses import dataclass

from pyvmm.devices.virtio.device import DeviceError
from pyvmm.guest import net_arg

# The modules of each kind of device (taps, vhost ioctls, sockets) are
# imported when a device of that kind is asked for: a run without it does
# not pay for them at start-up.

# Devices sit one 4 KiB page apart in the MMIO hole below 4 GiB ...
VIRTIO_MMIO_BASE = 0xD000_0000
# ... each on its own IOAPIC pin. Not 0-4 and 8 (timer, keyboard, cascade,
# COM2, COM1, RTC), which a guest may assume are the legacy devices'.
VIRTIO_GSIS = [5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]

# With --transport pci, each device's 32 KiB BAR, one after the other, above
# the virtio-mmio pages.
VIRTIO_PCI_BAR_BASE = 0xE000_0000

DEFAULT_TAP = "pyvmm%d"


@dataclass
class NetConfig:
    """--net vhost-kernel[,tap=NAME][,mac=MAC][,host-ip=CIDR][,guest-ip=CIDR][,queues=N]"""
    tap: str = None
    queues: int = 1             # queue pairs: a multiqueue tap and a vhost-net each
    mac: bytes = None
    host_ip: object = None      # ipaddress.ip_interface
    guest_ip: object = None


@dataclass
class VsockConfig:
    """--vsock vhost-kernel[,cid=N]"""
    cid: int = 3


@dataclass
class ScsiConfig:
    """--scsi vhost-kernel,image=PATH[,wwpn=NAME][,tpgt=N][,queues=N] or vhost-kernel,wwpn=NAME"""
    image: str = None           # pyvmm makes a target with this file as LUN 0 (and removes it)
    wwpn: str = None            # the target's name; without image, a target that exists
    tpgt: int = 1               # with image: the TPG pyvmm makes, the guest's target number
    queues: int = 1             # request queues


@dataclass
class VhostUserConfig:
    """--blk, --fs, --net, --rng, --vsock or --device vhost-user,socket=PATH[,server][,timeout=S]
    and each option's own keys."""
    socket: str
    server: bool = False
    timeout: float = None        # seconds the back-end has for each answer
    reconnect: float = None      # seconds between attempts to get a back-end back (None: never)
    kind: str = "blk"            # which option: blk, rng, vsock or device
    cid: int = None              # vsock: the guest's CID (default: the back-end's)
    virtio_id: int = None        # device: VIRTIO_ID_*
    queues: int = None           # device: default the back-end's count (GET_QUEUE_NUM);
                                 # fs: request queues; net: queue pairs
    queue_size: int = 256        # device: the most entries a queue may have
    config_size: int = None      # device: default the known size for virtio_id
    tag: str = None              # fs: what the guest mounts
    mac: bytes = None            # net: the guest's MAC (default 02:70:79:76:6d:N)
    guest_ip: object = None      # net: an ipaddress.ip_interface for the guest's ethN


BlkConfig = VhostUserConfig


def default_addresses(tap_name):
    """10.10.N.1/30 on the host and 10.10.N.2/30 in the guest, for tap pyvmmN."""
    m = re.fullmatch(r"pyvmm(\d+)", tap_name)
    if not m or int(m.group(1)) > 255:
        return None, None
    n = int(m.group(1))
    return (ipaddress.ip_interface(f"10.10.{n}.1/30"), ipaddress.ip_interface(f"10.10.{n}.2/30"))


def peer_address(host_ip):
    """The other usable address of the host's network, for the guest."""
    for candidate in host_ip.network.hosts():
        if candidate != host_ip.ip:
            return ipaddress.ip_interface(f"{candidate}/{host_ip.network.prefixlen}")
    return None


@dataclass
class PlannedDevice:
    device: object        # a VirtioDevice
    base: int
    gsi: int
    guest_args: list      # kernel command line entries for the guest's init
    summary: str          # one line for the user


def plan_net(cfg, index):
    """Open vhost-net and create the tap for one --net; the guest is eth{index}.

    vhost-net first: without it, the host's network is left untouched.
    """
    from pyvmm.devices.virtio.net import VirtioNet
    from pyvmm.devices.virtio.vhost_kernel import VhostKernelNetBackend
    from pyvmm.sys.tap import Tap
    from pyvmm.vhost.kernel import VhostKernelNet
    vhosts = []
    try:
        for _ in range(cfg.queues):           # one vhost-net per queue pair
            vhosts.append(VhostKernelNet())
        tap = Tap(cfg.tap or DEFAULT_TAP, queues=cfg.queues)
    except BaseException:
        for vhost in vhosts:
            vhost.close()
        raise
    try:
        host_ip, guest_ip = cfg.host_ip, cfg.guest_ip
        if cfg.tap is None and host_ip is None:
            host_ip, default_guest = default_addresses(tap.name)
            guest_ip = guest_ip or default_guest
        if host_ip is not None:
            tap.configure(host_ip)
            guest_ip = guest_ip or peer_address(host_ip)
        else:
            tap.up()
        mac = cfg.mac or default_mac(int(re.sub(r"\D", "", tap.name) or 0))
        device = VirtioNet(VhostKernelNetBackend(vhosts, tap), mac, name=f"virtio-net{index}",
                           queue_pairs=cfg.queues)
    except BaseException:
        tap.close()
        for vhost in vhosts:
            vhost.close()
        raise
    dev = f"eth{index}"
    args = [net_arg(dev, str(guest_ip) if guest_ip else "")]
    summary = (f"{dev} ({':'.join(f'{b:02x}' for b in mac)}) on tap {tap.name}"
               + (f" ({cfg.queues} queue pairs)" if cfg.queues > 1 else "") + " via vhost-net"
               + (f", guest {guest_ip.ip}" if guest_ip else "")
               + (f", host {host_ip.ip}" if host_ip else ""))
    return device, args, summary


def default_mac(index):
    return bytes([0x02, 0x70, 0x79, 0x76, 0x6D, index & 0xFF])


def plan_net_user(cfg, index, tracer):
    """One --net vhost-user: a NIC whose packets a back-end such as DPDK's
    vhost PMD moves; the MAC is pyvmm's (config space), the guest is eth{index}."""
    from pyvmm.devices.virtio.net import CONFIG_TAIL, NET_CONFIG_SIZE, VirtioNet
    from pyvmm.virtio import spec
    name = f"virtio-net{index}"
    backend = open_vhost_user(cfg, name, tracer, config_size=NET_CONFIG_SIZE)
    mac = cfg.mac or default_mac(index)
    with _owned(backend):
        pairs, most = cfg.queues or 1, backend.frontend.max_queues
        if pairs > 1 and not most:
            raise DeviceError(f"--net socket={cfg.socket}: queues={pairs}, but the back-end "
                              f"does not offer the MQ protocol feature")
        if most and pairs > most:
            raise DeviceError(f"--net socket={cfg.socket}: queues={pairs}, but the back-end "
                              f"serves at most {most} queue pairs")
        mtu = None
        if backend.features() & spec.bit(spec.VIRTIO_NET_F_MTU) and backend.config_space:
            mtu = CONFIG_TAIL.unpack_from(backend.config_space, 6)[2] or None
        device = VirtioNet(backend, mac, name=name, queue_pairs=pairs, mtu=mtu)
    dev = f"eth{index}"
    args = [net_arg(dev, str(cfg.guest_ip) if cfg.guest_ip else "")]
    return device, args, (f"{dev} ({':'.join(f'{b:02x}' for b in mac)})"
                          + (f", {pairs} queue pairs" if pairs > 1 else "")
                          + (f", MTU {mtu}" if mtu else "") + f" via vhost-user {cfg.socket}"
                          + (f", guest {cfg.guest_ip.ip}" if cfg.guest_ip else ""))


def plan_vsock(cfg):
    from pyvmm.devices.virtio.vhost_kernel import VhostKernelVsockBackend
    from pyvmm.devices.virtio.vsock import VirtioVsock
    from pyvmm.vhost.kernel import VhostKernelVsock
    vhost = VhostKernelVsock()
    try:
        device = VirtioVsock(VhostKernelVsockBackend(vhost, cfg.cid), cfg.cid)
    except BaseException:
        vhost.close()
        raise
    return device, [], f"vsock CID {cfg.cid} via vhost-vsock"


def plan_scsi(cfg, index):
    """One --scsi vhost-kernel: a virtio-scsi adapter on /dev/vhost-scsi, on a
    target pyvmm makes in configfs (image=) or one made beforehand (wwpn=)."""
    from pyvmm.devices.virtio.scsi import VirtioScsi
    from pyvmm.devices.virtio.vhost_kernel import VhostKernelScsiBackend
    backend = VhostKernelScsiBackend.open(cfg.image, cfg.wwpn, cfg.tpgt,
                                          name=f"pyvmm{os.getpid()}_{index}")
    with _owned(backend):
        device = VirtioScsi(backend, cfg.queues, name=f"virtio-scsi{index}")
    wwpn = backend.wwpn
    what = (f"LUN 0 of target {cfg.tpgt} is {cfg.image} "
            f"({os.path.getsize(cfg.image) / (1 << 20):g} MiB, the guest's sda if it is the "
            f"first SCSI disk)" if cfg.image else "the LUNs of its TPGs")
    return device, [], (f"SCSI adapter {index}: vhost-scsi target {wwpn}; {what}"
                        + (f", {cfg.queues} request queues" if cfg.queues > 1 else ""))


# How long server mode waits for a back-end to connect.
BACKEND_CONNECT_TIMEOUT = 60.0


def connect_vhost_user(socket_path, server, name, tracer, feature_names=None, timeout=None):
    """A negotiated VhostUserFrontend for the back-end at socket_path: pyvmm
    connects to it, or (server) listens there and waits for it."""
    import sys

    from pyvmm.vhost.user.channel import DEFAULT_TIMEOUT, Connection, Listener
    from pyvmm.vhost.user.frontend import VhostUserFrontend
    timeout = timeout or DEFAULT_TIMEOUT
    if server:
        listener = Listener(socket_path)
        try:
            print(f"pyvmm: {name}: waiting for a vhost-user back-end to connect to "
                  f"{socket_path} (at most {BACKEND_CONNECT_TIMEOUT:g} s)", file=sys.stderr)
            conn = listener.accept("the back-end", timeout=BACKEND_CONNECT_TIMEOUT)
            conn.timeout = timeout
        finally:
            listener.close()
    else:
        conn = Connection.connect(socket_path, "the back-end", timeout)
    frontend = VhostUserFrontend(conn, tracer=tracer(name, feature_names) if tracer else None)
    try:
        frontend.negotiate()
    except BaseException:
        frontend.close()
        raise
    return frontend


def open_vhost_user(cfg, name, tracer, feature_names=None, config_size=0):
    """Connect to the back-end of one vhost-user device option and negotiate; a
    VhostUserBackend with config_size bytes of config space read where the
    back-end offers CONFIG. Failures are a DeviceError naming the option."""
    from pyvmm.devices.virtio.vhost_user import VhostUserBackend
    from pyvmm.vhost.user.errors import VhostUserError
    option = f"--{cfg.kind} socket={cfg.socket}"
    try:
        frontend = connect_vhost_user(cfg.socket, cfg.server, name, tracer, feature_names,
                                      cfg.timeout)
    except VhostUserError as e:
        raise DeviceError(f"{option}: {e}") from None
    reconnect = None
    if cfg.reconnect is not None:
        from pyvmm.vhost.user.reconnect import Reconnect
        reconnect = Reconnect(cfg.socket, cfg.server, cfg.reconnect, cfg.timeout,
                              tracer=frontend.tracer)
    try:
        return VhostUserBackend(frontend, f"the vhost-user back-end at {cfg.socket}",
                                config_size=config_size, reconnect=reconnect)
    except VhostUserError as e:
        frontend.close()
        raise DeviceError(f"{option}: {e}") from None
    except BaseException:
        frontend.close()
        raise


@contextlib.contextmanager
def _owned(backend):
    """The back-end is closed if making its device fails."""
    try:
        yield backend
    except BaseException:
        backend.close()
        raise


def _needs_config(backend, cfg, why):
    from pyvmm.vhost.user.messages import ProtocolFeature
    if not backend.frontend.has(ProtocolFeature.CONFIG):
        raise DeviceError(f"--{cfg.kind} socket={cfg.socket}: the back-end does not offer the "
                          f"CONFIG protocol feature, so pyvmm cannot learn {why}")


def plan_blk(cfg, index, tracer):
    """Connect to the vhost-user-blk back-end of one --blk; the guest sees vd{a+index}."""
    from pyvmm.devices.virtio.blk import BLK_FEATURE_NAMES, VIRTIO_BLK_CONFIG_SIZE, VirtioBlk
    backend = open_vhost_user(cfg, f"virtio-blk{index}", tracer, BLK_FEATURE_NAMES,
                              VIRTIO_BLK_CONFIG_SIZE)
    with _owned(backend):
        _needs_config(backend, cfg, "the disk's size")
        device = VirtioBlk(backend, name=f"virtio-blk{index}",
                           max_queues=backend.frontend.max_queues or 1)
    disk = f"vd{chr(ord('a') + index)}"
    summary = (f"{disk}: {device.capacity / (1 << 20):g} MiB disk"
               f"{' (read-only)' if device.read_only else ''}, {device.block_size}-byte "
               f"blocks, {device.num_queues} queue{'s' if device.num_queues > 1 else ''}, "
               f"via vhost-user {cfg.socket}")
    return device, [], summary


def plan_rng(cfg, index, tracer):
    """One --rng vhost-user: the guest's /dev/hwrng."""
    from pyvmm.devices.virtio.rng import VirtioRng
    backend = open_vhost_user(cfg, f"virtio-rng{index}", tracer)
    return (VirtioRng(backend, f"virtio-rng{index}"), [],
            f"hwrng: virtio-rng via vhost-user {cfg.socket}")


def plan_vsock_user(cfg, tracer):
    """--vsock vhost-user: the back-end knows the guest's CID (its config
    space); cid=N, if given, must agree."""
    from pyvmm.devices.virtio.vsock import VirtioVsock
    from pyvmm.virtio.vsock import CONFIG
    backend = open_vhost_user(cfg, "virtio-vsock", tracer, config_size=CONFIG.size)
    with _owned(backend):
        served = int.from_bytes(backend.config_space, "little") if backend.config_space else None
        if served is not None and cfg.cid is not None and served != cfg.cid:
            raise DeviceError(f"--vsock socket={cfg.socket}: the back-end serves CID {served}, "
                              f"not cid={cfg.cid}")
        cid = cfg.cid if cfg.cid is not None else served
        if cid is None:
            raise DeviceError(f"--vsock socket={cfg.socket}: the back-end does not say which "
                              f"CID it serves (no CONFIG): give cid=N")
        device = VirtioVsock(backend, cid)
    return device, [], f"vsock CID {cid} via vhost-user {cfg.socket}"


def plan_fs(cfg, index, tracer):
    """One --fs vhost-user,tag=TAG: a file system the guest mounts by its tag."""
    from pyvmm.devices.virtio.fs import VirtioFs
    name = f"virtio-fs{index}"
    backend = open_vhost_user(cfg, name, tracer)
    with _owned(backend):
        most = backend.frontend.max_queues
        queues = cfg.queues or 1
        if most and 1 + queues > most:
            raise DeviceError(f"--fs socket={cfg.socket}: queues={queues} request queues and "
                              f"the high-priority one, but the back-end serves at most {most}")
        device = VirtioFs(backend, cfg.tag, queues, name)
    return device, [], (f"file system '{cfg.tag}' ({queues} request "
                        f"queue{'s' if queues > 1 else ''}) via vhost-user {cfg.socket}: "
                        f"mount -t virtiofs {cfg.tag} DIR")


def known_config_size(virtio_id):
    """Bytes of config space of the device types pyvmm knows (0 for others),
    for --device when config-size is not given."""
    from pyvmm.devices.virtio.fs import CONFIG as FS_CONFIG
    from pyvmm.devices.virtio.net import NET_CONFIG_SIZE
    from pyvmm.virtio import blk, spec, vsock
    return {spec.VIRTIO_ID_NET: NET_CONFIG_SIZE, spec.VIRTIO_ID_BLOCK: blk.CONFIG.size,
            spec.VIRTIO_ID_VSOCK: vsock.CONFIG.size,
            spec.VIRTIO_ID_FS: FS_CONFIG.size}.get(virtio_id, 0)


def plan_generic(cfg, index, tracer):
    """One --device vhost-user,virtio-id=N: a device pyvmm has no model for."""
    from pyvmm.devices.virtio.generic import VirtioGeneric
    name = f"virtio-dev{index}"
    size = cfg.config_size
    if size is None:
        size = known_config_size(cfg.virtio_id)
    from pyvmm.devices.virtio.device import MAX_QUEUES
    backend = open_vhost_user(cfg, name, tracer, config_size=size)
    with _owned(backend):
        most = backend.frontend.max_queues
        queues = cfg.queues or min(most or 1, MAX_QUEUES)
        if most and queues > most:
            raise DeviceError(f"--device socket={cfg.socket}: queues={queues}, but the back-end "
                              f"serves at most {most}")
        device = VirtioGeneric(backend, cfg.virtio_id, queues, cfg.queue_size, name)
    config = f", {len(backend.config_space)} bytes of config space" if backend.config_space \
        else ""
    capped = f" (of the back-end's {most}: pyvmm gives a device at most {MAX_QUEUES})" \
        if not cfg.queues and most and most > MAX_QUEUES else ""
    return device, [], (f"virtio device id {cfg.virtio_id}, {queues} "
                        f"queue{'s' if queues > 1 else ''}{capped}{config}, "
                        f"via vhost-user {cfg.socket}")


def plan_devices(nets, vsock, blks=(), tracer=None, rngs=(), generic=(), fss=(), scsis=()):
    """Host side of every device, in the order the guest will find them.

    vsock: a VsockConfig (vhost-vsock) or a VhostUserConfig; tracer(device
    name): a tracer(direction, message) for its vhost-user messages
    (--trace vhost-user), or None.
    """
    count = (len(nets) + (vsock is not None) + len(blks) + len(rngs) + len(generic)
             + len(fss) + len(scsis))
    if count > len(VIRTIO_GSIS):
        raise DeviceError(f"at most {len(VIRTIO_GSIS)} virtio devices")
    planned = []
    try:
        for i, cfg in enumerate(blks):
            planned.append(plan_blk(cfg, i, tracer))
        for i, cfg in enumerate(nets):
            if isinstance(cfg, VhostUserConfig):
                planned.append(plan_net_user(cfg, i, tracer))
            else:
                planned.append(plan_net(cfg, i))
        if isinstance(vsock, VhostUserConfig):
            planned.append(plan_vsock_user(vsock, tracer))
        elif vsock is not None:
            planned.append(plan_vsock(vsock))
        for i, cfg in enumerate(scsis):
            planned.append(plan_scsi(cfg, i))
        for i, cfg in enumerate(fss):
            planned.append(plan_fs(cfg, i, tracer))
        for i, cfg in enumerate(rngs):
            planned.append(plan_rng(cfg, i, tracer))
        for i, cfg in enumerate(generic):
            planned.append(plan_generic(cfg, i, tracer))
    except BaseException:
        for device, _, _ in planned:
            device.close()
        raise
    return [PlannedDevice(device, VIRTIO_MMIO_BASE + i * 0x1000, VIRTIO_GSIS[i], args, summary)
            for i, (device, args, summary) in enumerate(planned)]
