"""--rng, --vsock and --device on vhost-user back-ends, through the
virtio-mmio transport, with no VM: the test plays the guest's driver on the
transport's registers and on DriverRings, and KVM on the eventfds. The
back-ends are real programs: `pyvmm backend rng|vsock` and Debian's
qemu-storage-daemon."""

import os
import select
import socket
import struct
import time

import pytest
from backends import pyvmm_backend, storage_daemon
from test_virtio import RecordingVm, r32, w32

from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.device import DeviceError
from pyvmm.vhost.user.scripted import ScriptedBackend
from pyvmm.virtio import spec
from pyvmm.virtio.splitring import DriverRing
from pyvmm.virtio.vsock import (HDR, VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE,
                                VIRTIO_VSOCK_TYPE_STREAM)
from pyvmm.vmm.virtio_devices import (VhostUserConfig, plan_generic, plan_rng,
                                      plan_vsock_user)

MiB = 1 << 20
RINGS, BUF = 0x10000, 0x100000


def start_driver(t, memory, queues, size=64, features=None):
    """ACKNOWLEDGE .. DRIVER_OK, as vm_probe and vm_setup_vq do, with these
    features (default: every one offered) and queues; {index: DriverRing}."""
    if features is None:
        features = t.device.features
    status = spec.VIRTIO_CONFIG_S_ACKNOWLEDGE | spec.VIRTIO_CONFIG_S_DRIVER
    w32(t, mmio.STATUS, status)
    for sel in (0, 1):
        w32(t, mmio.DRIVER_FEATURES_SEL, sel)
        w32(t, mmio.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFF_FFFF)
    status |= spec.VIRTIO_CONFIG_S_FEATURES_OK
    w32(t, mmio.STATUS, status)
    assert r32(t, mmio.STATUS) & spec.VIRTIO_CONFIG_S_FEATURES_OK
    rings = {}
    for index in queues:
        ring = rings[index] = DriverRing(memory, RINGS + index * 0x4000, size)
        w32(t, mmio.QUEUE_SEL, index)
        w32(t, mmio.QUEUE_NUM, size)
        for low, addr in ((mmio.QUEUE_DESC_LOW, ring.desc_addr),
                          (mmio.QUEUE_AVAIL_LOW, ring.avail_addr),
                          (mmio.QUEUE_USED_LOW, ring.used_addr)):
            w32(t, low, addr)
        w32(t, mmio.QUEUE_READY, 1)
    w32(t, mmio.STATUS, status | spec.VIRTIO_CONFIG_S_DRIVER_OK)
    assert t.active
    return rings


def submit(t, rings, index, buffers):
    """Make one chain available on queue index, kick, wait for it: its used length."""
    q = t.queues[index]
    head = rings[index].add(buffers)
    os.eventfd_write(q.kick_fd, 1)
    deadline = time.monotonic() + 10
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([q.call_fd], [], [], left)[0], "no interrupt"
        os.eventfd_read(q.call_fd)
        used = rings[index].pop_used()
        if used:
            assert [h for h, _ in used] == [head]
            return used[0][1]


@pytest.fixture
def transport(memory16):
    made = []

    def make(device):
        t = mmio.VirtioMmio(device, RecordingVm(), memory16, 0xD000_0000, 5)
        made.append((t, device))
        return t
    yield make
    for t, device in made:
        t.close()
        device.close()


def test_rng_on_pyvmm_backend_rng(tmp_path, memory16, transport):
    with pyvmm_backend(str(tmp_path), "rng") as (sock, _):
        device, _, summary = plan_rng(VhostUserConfig(sock, kind="rng"), 0, None)
        assert summary == f"hwrng: virtio-rng via vhost-user {sock}"
        t = transport(device)
        assert r32(t, mmio.DEVICE_ID) == spec.VIRTIO_ID_RNG
        rings = start_driver(t, memory16, [0])
        memory16.write(BUF, bytes(256))
        assert submit(t, rings, 0, [(BUF, 256, True)]) == 256
        assert memory16.read(BUF, 256) != bytes(256)


def test_vsock_on_pyvmm_backend_vsock(tmp_path, memory16, transport):
    """The CID comes from the back-end's config space; a guest connection to
    the host's port 5000 reaches the Unix socket UDS_5000."""
    uds = str(tmp_path / "vm.vsock")
    with pyvmm_backend(str(tmp_path), "vsock", "--guest-cid", "7", "--uds-path", uds) \
            as (sock, _), socket.socket(socket.AF_UNIX) as listener:
        listener.bind(f"{uds}_5000")
        listener.listen(1)
        listener.settimeout(10)
        with pytest.raises(DeviceError, match="the back-end serves CID 7, not cid=8"):
            plan_vsock_user(VhostUserConfig(sock, kind="vsock", cid=8), None)
        device, _, summary = plan_vsock_user(VhostUserConfig(sock, kind="vsock"), None)
        assert summary == f"vsock CID 7 via vhost-user {sock}"
        t = transport(device)
        assert t.read(mmio.CONFIG, 4) == 7
        rings = start_driver(t, memory16, [0, 1, 2])
        assert list(device.vhost_queues()) == [0, 1]      # the event queue stays with pyvmm
        rx = rings[0].add([(BUF + 0x1000, HDR.size + 4096, True)])
        os.eventfd_write(t.queues[0].kick_fd, 1)
        memory16.write(BUF, HDR.pack(7, 2, 1025, 5000, 0, VIRTIO_VSOCK_TYPE_STREAM,
                                     VIRTIO_VSOCK_OP_REQUEST, 0, 65536, 0))
        assert submit(t, rings, 1, [(BUF, HDR.size, False)]) == 0
        conn, _ = listener.accept()
        conn.close()
        deadline = time.monotonic() + 10
        while not (used := rings[0].pop_used()):
            assert time.monotonic() < deadline, "no RESPONSE"
            time.sleep(0.02)
        assert used[0][0] == rx
        header = HDR.unpack(memory16.read(BUF + 0x1000, HDR.size))
        assert header[:4] == (2, 7, 5000, 1025) and header[6] == VIRTIO_VSOCK_OP_RESPONSE


def test_a_generic_device_is_a_disk_on_qemu_storage_daemon(tmp_path, memory16, transport):
    """--device vhost-user,virtio-id=2: no blk model, yet the guest's driver
    finds a disk: the config space is the back-end's, requests go through."""
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(64 << 10) + bytes(MiB - (64 << 10)))
    with storage_daemon(str(tmp_path), image) as sock:
        # (qemu-storage-daemon serves one front-end at a time: this one first.)
        with pytest.raises(DeviceError, match="queues=4, but the back-end serves at most 1"):
            plan_generic(VhostUserConfig(sock, kind="device", virtio_id=2, queues=4), 1, None)
        device, _, summary = plan_generic(
            VhostUserConfig(sock, kind="device", virtio_id=2), 0, None)
        assert summary == (f"virtio device id 2, 1 queue, 60 bytes of config space, "
                           f"via vhost-user {sock}")
        t = transport(device)
        assert r32(t, mmio.DEVICE_ID) == 2
        assert t.read(mmio.CONFIG, 4) == MiB // 512                # capacity
        assert device.features & (1 << 9)                          # VIRTIO_BLK_F_FLUSH
        assert not device.features & (1 << spec.VIRTIO_F_RING_PACKED)
        rings = start_driver(t, memory16, [0])
        memory16.write(BUF, struct.pack("<IIQ", 0, 0, 0))          # VIRTIO_BLK_T_IN, sector 0
        used = submit(t, rings, 0, [(BUF, 16, False), (BUF + 0x1000, 4096, True),
                                    (BUF + 0x2000, 1, True)])
        assert used == 4097 and memory16.read(BUF + 0x2000, 1) == b"\0"
        assert memory16.read(BUF + 0x1000, 4096) == image.read_bytes()[:4096]


FUSE_INIT = 26
FUSE_IN_HEADER = struct.Struct("<IIQQIIIHH")      # len, opcode, unique, nodeid, uid, gid, pid, ...
FUSE_OUT_HEADER = struct.Struct("<IiQ")           # len, error, unique


def test_fs_on_virtiofsd_answers_fuse_init(tmp_path, memory16, transport):
    """--fs vhost-user,tag=TAG: the tag and queue count are pyvmm's config space;
    a FUSE_INIT on the request queue comes back from virtiofsd."""
    from backends import virtiofsd

    from pyvmm.vmm.virtio_devices import plan_fs
    shared = tmp_path / "shared"
    shared.mkdir()
    with virtiofsd(str(tmp_path), shared) as sock:
        device, _, summary = plan_fs(VhostUserConfig(sock, kind="fs", tag="share"), 0, None)
        assert summary.startswith("file system 'share' (1 request queue) via vhost-user")
        t = transport(device)
        assert r32(t, mmio.DEVICE_ID) == spec.VIRTIO_ID_FS
        assert t.read(mmio.CONFIG, 4) == int.from_bytes(b"shar", "little")
        assert t.read(mmio.CONFIG + 36, 4) == 1                 # num_request_queues
        rings = start_driver(t, memory16, [0, 1])
        init_in = struct.pack("<IIII", 7, 31, 0, 0)             # major, minor, readahead, flags
        memory16.write(BUF, FUSE_IN_HEADER.pack(FUSE_IN_HEADER.size + len(init_in), FUSE_INIT,
                                                1, 0, 0, 0, 0, 0, 0) + init_in)
        used = submit(t, rings, 1, [(BUF, FUSE_IN_HEADER.size + len(init_in), False),
                                    (BUF + 0x1000, 256, True)])
        length, error, unique = FUSE_OUT_HEADER.unpack(memory16.read(BUF + 0x1000, 16))
        assert (error, unique) == (0, 1) and length == used
        major, minor = struct.unpack("<II", memory16.read(BUF + 0x1010, 8))
        assert major == 7


FUSE_LOOKUP, FUSE_OPEN, FUSE_READ, FUSE_OPENDIR, FUSE_READDIRPLUS = 1, 14, 15, 27, 44
FUSE_BATCH_FORGET = 42
FUSE_READ_IN = struct.Struct("<QQIIQII")          # fh, offset, size, read_flags, lock_owner, flags


def fuse_request(t, rings, memory, index, opcode, unique, nodeid, body, reply_room):
    """One FUSE request on queue index; checks the used length against the
    reply's own header and the writable room; (error, reply body)."""
    reply = BUF + 0x10000
    memory.write(BUF, FUSE_IN_HEADER.pack(FUSE_IN_HEADER.size + len(body), opcode, unique,
                                          nodeid, 0, 0, 0, 0, 0) + body)
    chain = [(BUF, FUSE_IN_HEADER.size + len(body), False)]
    if not reply_room:                                  # FORGET has no reply
        assert submit(t, rings, index, chain) == 0
        return None, b""
    used = submit(t, rings, index, chain + [(reply, reply_room, True)])
    length, error, got_unique = FUSE_OUT_HEADER.unpack(memory.read(reply, 16))
    assert got_unique == unique and length == used <= reply_room, (opcode, length, used)
    return error, memory.read(reply + 16, length - 16)


def test_fs_large_read_then_large_listing_on_virtiofsd(tmp_path, memory16, transport):
    """Issue 24's request pattern with no VM: a 1 MiB read, a listing of 500
    files, forgetting them on the hiprio queue, twice. virtiofsd's replies
    stay inside their buffers (its used lengths match its FUSE headers), so
    the guest's hang was not virtiofsd's: it was pyvmm's irqfd per queue,
    two of which KVM can inject at once on the one edge-triggered line and
    drop one as coalesced. Every queue's call fd is now the device's one
    irqfd."""
    from backends import read_then_list_share, virtiofsd

    from pyvmm.vmm.virtio_devices import plan_fs
    shared, data = read_then_list_share(str(tmp_path))
    with virtiofsd(str(tmp_path), shared) as sock:
        device, _, _ = plan_fs(VhostUserConfig(sock, kind="fs", tag="share"), 0, None)
        t = transport(device)
        assert t.vm.irqfds == [5] and {q.call_fd for q in t.queues} == {t._irq_fd}
        rings = start_driver(t, memory16, [0, 1])
        unique = iter(range(1, 10_000))
        error, _ = fuse_request(t, rings, memory16, 1, FUSE_INIT, next(unique), 0,
                                struct.pack("<IIII", 7, 31, 0, 0), 256)
        assert error == 0
        for _ in range(2):
            error, entry = fuse_request(t, rings, memory16, 1, FUSE_LOOKUP, next(unique), 1,
                                        b"from-host\0", 256)
            assert error == 0
            node = struct.unpack_from("<Q", entry)[0]
            error, opened = fuse_request(t, rings, memory16, 1, FUSE_OPEN, next(unique), node,
                                         struct.pack("<II", os.O_RDONLY, 0), 256)
            fh = struct.unpack_from("<Q", opened)[0]
            got = b""
            for offset in range(0, 1 * MiB, 256 * 1024):
                error, chunk = fuse_request(t, rings, memory16, 1, FUSE_READ, next(unique), node,
                                            FUSE_READ_IN.pack(fh, offset, 256 * 1024, 0, 0, 0, 0),
                                            16 + 256 * 1024)
                assert error == 0
                got += chunk
            assert got == data
            error, entry = fuse_request(t, rings, memory16, 1, FUSE_LOOKUP, next(unique), 1,
                                        b"many\0", 256)
            many = struct.unpack_from("<Q", entry)[0]
            error, opened = fuse_request(t, rings, memory16, 1, FUSE_OPENDIR, next(unique), many,
                                         struct.pack("<II", os.O_RDONLY, 0), 256)
            fh = struct.unpack_from("<Q", opened)[0]
            names, nodes, offset = [], [], 0
            while True:
                error, listing = fuse_request(t, rings, memory16, 1, FUSE_READDIRPLUS,
                                              next(unique), many,
                                              FUSE_READ_IN.pack(fh, offset, 4096, 0, 0, 0, 0),
                                              16 + 4096)
                assert error == 0
                if not listing:
                    break
                at = 0
                while at < len(listing):                   # fuse_direntplus: entry_out, dirent
                    nodeid = struct.unpack_from("<Q", listing, at)[0]
                    _, offset, namelen, _ = struct.unpack_from("<QQII", listing, at + 128)
                    name = listing[at + 152:at + 152 + namelen]
                    if name not in (b".", b".."):
                        names.append(name)
                        nodes.append(nodeid)
                    at += 152 + (namelen + 7) // 8 * 8
            assert sorted(names) == [f"f{i:03}".encode() for i in range(500)]
            # What the guest's kernel does once the dentries go: forget, on hiprio.
            forgets = [node for node in nodes if node]
            fuse_request(t, rings, memory16, 0, FUSE_BATCH_FORGET, next(unique), 0,
                         struct.pack("<II", len(forgets), 0)
                         + b"".join(struct.pack("<QQ", n, 1) for n in forgets), 0)


def arp_request(mac, sender_ip, target_ip):
    """An Ethernet frame with an ARP who-has."""
    return (b"\xff" * 6 + mac + b"\x08\x06"
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + socket.inet_aton(sender_ip)
            + bytes(6) + socket.inet_aton(target_ip))


def test_net_on_dpdk_testpmd_answers_arp(tmp_path, memory16, transport):
    """--net vhost-user on DPDK's vhost PMD (testpmd, icmpecho): an ARP request
    sent on the transmit queue comes back answered on the receive queue."""
    from backends import dpdk_testpmd

    from pyvmm.vmm.virtio_devices import plan_net_user
    mac = bytes.fromhex("020000000001")
    with dpdk_testpmd(str(tmp_path)) as (sock, result):
        device, args, summary = plan_net_user(
            VhostUserConfig(sock, kind="net", mac=mac), 0, None)
        assert summary == f"eth0 (02:00:00:00:00:01) via vhost-user {sock}"
        t = transport(device)
        assert t.read(mmio.CONFIG, 4) == int.from_bytes(mac[:4], "little")   # pyvmm's MAC
        rings = start_driver(t, memory16, [0, 1])
        q_rx = t.queues[0]
        rx_buffers = {}
        for i in range(8):
            addr = BUF + 0x10000 + i * 0x1000
            rx_buffers[rings[0].add([(addr, 2048, True)])] = addr
        os.eventfd_write(q_rx.kick_fd, 1)
        frame = bytes(12) + arp_request(mac, "10.0.0.2", "10.0.0.1")   # virtio_net_hdr_v1
        memory16.write(BUF, frame)
        rings[1].add([(BUF, len(frame), False)])
        os.eventfd_write(t.queues[1].kick_fd, 1)
        deadline = time.monotonic() + 10
        while not (used := rings[0].pop_used()):
            assert time.monotonic() < deadline, "no frame came back"
            select.select([q_rx.call_fd], [], [], 0.2)
        head, length = used[0]
        reply = memory16.read(rx_buffers[head], length)[12:]
    assert reply[12:14] == b"\x08\x06" and reply[20:22] == b"\x00\x02"    # an ARP reply
    assert reply[0:6] == mac                                             # to us
    assert "RX-packets: 1" in result["output"]


def test_pyvmm_listens_and_testpmd_connects(tmp_path):
    """server: pyvmm listens (0600) and DPDK's vhost PMD, a client (client=1), connects."""
    from backends import dpdk_testpmd

    from pyvmm.vmm.virtio_devices import plan_net_user
    with dpdk_testpmd(str(tmp_path), client=True) as (sock, _):
        device, _, summary = plan_net_user(
            VhostUserConfig(sock, kind="net", server=True), 1, None)
        try:
            assert summary.startswith("eth1 (02:70:79:76:6d:01) via vhost-user")
            assert device.backend.features() & (1 << spec.VIRTIO_F_VERSION_1)
        finally:
            device.close()


def test_net_queue_pairs_are_enabled_by_the_driver_on_the_control_queue(tmp_path, memory16,
                                                                        transport):
    """queues=2: MQ and a control queue that pyvmm serves; the second pair stays
    disabled until VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 2, then carries packets."""
    from backends import dpdk_testpmd

    from pyvmm.vmm.virtio_devices import plan_net_user
    mac = bytes.fromhex("020000000002")
    trace = []
    with dpdk_testpmd(str(tmp_path), queues=2) as (sock, result):
        device, _, summary = plan_net_user(
            VhostUserConfig(sock, kind="net", mac=mac, queues=2), 0,
            lambda name, names: lambda direction, message: direction == "->" and trace.append(
                message))
        assert ", 2 queue pairs via vhost-user" in summary
        t = transport(device)
        assert device.features & (1 << spec.VIRTIO_NET_F_MQ)
        assert t.read(mmio.CONFIG + 8, 2) == 2                     # max_virtqueue_pairs
        rings = start_driver(t, memory16, [0, 1, 2, 3, 4])
        enables = [(m.payload.index, m.payload.num) for m in trace
                   if m.request.name == "SET_VRING_ENABLE"]
        assert enables == [(0, 1), (1, 1), (2, 0), (3, 0)]         # pair 1 waits
        memory16.write(BUF, bytes([4, 0]) + struct.pack("<H", 2))  # MQ, VQ_PAIRS_SET, 2
        memory16.write(BUF + 0x100, b"\xff")
        head = rings[4].add([(BUF, 4, False), (BUF + 0x100, 1, True)])
        t.write(mmio.QUEUE_NOTIFY, 4, 4)                           # the control queue: no fd
        assert rings[4].pop_used() == [(head, 1)]
        assert memory16.read(BUF + 0x100, 1) == b"\0"              # VIRTIO_NET_OK
        enables = [(m.payload.index, m.payload.num) for m in trace
                   if m.request.name == "SET_VRING_ENABLE"]
        assert enables[-2:] == [(2, 1), (3, 1)]
        # An ARP request on the second pair's transmit queue is answered on its receive queue.
        rx_buffers = {}
        for i in range(4):
            addr = BUF + 0x10000 + i * 0x1000
            rx_buffers[rings[2].add([(addr, 2048, True)])] = addr
        os.eventfd_write(t.queues[2].kick_fd, 1)
        frame = bytes(12) + arp_request(mac, "10.0.0.2", "10.0.0.1")
        memory16.write(BUF + 0x2000, frame)
        rings[3].add([(BUF + 0x2000, len(frame), False)])
        os.eventfd_write(t.queues[3].kick_fd, 1)
        deadline = time.monotonic() + 10
        while not (used := rings[2].pop_used()):
            assert time.monotonic() < deadline, "no frame came back on the second pair"
            time.sleep(0.02)
        reply = memory16.read(rx_buffers[used[0][0]], used[0][1])[12:]
        assert reply[12:14] == b"\x08\x06" and reply[20:22] == b"\x00\x02"


def test_net_passes_the_back_ends_mtu_on(tmp_path):
    """A back-end offering VIRTIO_NET_F_MTU and CONFIG: its MTU reaches the
    guest's config space, the MAC stays pyvmm's."""
    import threading


    from pyvmm.vhost.user.channel import Listener
    from pyvmm.vhost.user.messages import FrontendReq, ProtocolFeature as PF
    from pyvmm.vmm.virtio_devices import plan_net_user
    path = str(tmp_path / "net.sock")
    listener = Listener(path)
    config = bytes.fromhex("0a0b0c0d0e0f") + struct.pack("<HHH", 1, 1, 9000)

    def back_end():
        be = ScriptedBackend(listener.accept("pyvmm"), features=1 << 32
                         | 1 << spec.VIRTIO_NET_F_MTU,
                         protocol=PF.REPLY_ACK.mask | PF.CONFIG.mask, config=config)
        be.serve(FrontendReq.GET_CONFIG)
    thread = threading.Thread(target=back_end)
    thread.start()
    device, _, summary = plan_net_user(VhostUserConfig(path, kind="net"), 0, None)
    thread.join(10)
    listener.close()
    try:
        assert ", MTU 9000 via vhost-user" in summary
        assert device.features & (1 << spec.VIRTIO_NET_F_MTU)
        assert device.config()[:6] == bytes.fromhex("02707976 6d00".replace(" ", ""))
        assert struct.unpack_from("<H", device.config(), 10) == (9000,)
    finally:
        device.close()
