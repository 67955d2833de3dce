"""A vhost-user device's life cycle against back-ends that refuse, stall, hang
up or fail half-way (issue 19, items 1-6 and 24), with no VM: a scripted
back-end (pyvmm.vhost.user.scripted) in a thread, pyvmm's front-end, a
device model on the virtio-mmio transport, and the test playing the
guest's driver (registers, DriverRings) and KVM (the eventfds)."""

import os
import select
import socket
import struct
import threading
import time

import pytest
from test_virtio import RecordingVm, r32, w32
from test_vhost_user_devices import start_driver

from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.devices.virtio.device import DeviceError, Queue
from pyvmm.devices.virtio.generic import VirtioGeneric
from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.devices.virtio.vhost_user import VhostUserBackend
from pyvmm.sys.eventloop import EventLoop
from pyvmm.vhost.user.backend.inflight import InflightArea
from pyvmm.vhost.user.channel import Connection
from pyvmm.vhost.user.errors import ConnectionDead
from pyvmm.vhost.user.frontend import VhostUserFrontend
from pyvmm.vhost.user.messages import U64, DeviceConfig, FrontendReq as R, ProtocolFeature as PF
from pyvmm.vhost.user.scripted import REFUSE, STALL, ScriptedBackend
from pyvmm.vhost.user.wire import encode
from pyvmm.virtio import spec
from pyvmm.virtio.device_ring import DeviceRing
from pyvmm.virtio.splitring import DriverRing

BLK_CONFIG = struct.pack("<Q", 2048).ljust(60, b"\0")      # capacity: 1 MiB
BUF = 0x100000


class Rig:
    """A scripted back-end and pyvmm's front-end, joined by a socketpair."""

    def __init__(self, protocol=PF.REPLY_ACK.mask, timeout=2.0, **backend):
        ours, theirs = socket.socketpair()
        self.be = ScriptedBackend(Connection(theirs, "pyvmm"), protocol=protocol, **backend)
        self.thread = self.be.serve_in_thread()
        self.fe = VhostUserFrontend(Connection(ours, "the back-end", timeout))
        self.fe.negotiate()
        self.loop = EventLoop(on_error=lambda what, e: pytest.fail(f"{what}: {e!r}"))
        self.t = None

    def transport(self, device, memory):
        self.device = device
        self.t = mmio.VirtioMmio(device, RecordingVm(), memory, 0xD000_0000, 5)
        self.t.watch(self.loop)
        return self.t

    def run_loop(self, until, timeout=5.0):
        deadline = time.monotonic() + timeout
        self.loop.run_until(lambda: until() or time.monotonic() > deadline, timeout=0.05)
        assert until(), "the event loop never got there"

    def idle(self, seconds):
        """Let the event loop run for a while (to see that nothing happens)."""
        deadline = time.monotonic() + seconds
        self.loop.run_until(lambda: time.monotonic() > deadline, timeout=0.05)

    def since(self, request):
        """The requests received after the last `request`."""
        names = self.be.requests
        last = len(names) - 1 - names[::-1].index(request)
        return [m for m in self.be.messages[last + 1:]]

    def close(self):
        if self.t is not None:
            self.t.close()
            self.device.close()
        else:
            self.fe.close()
        self.loop.close()
        self.be.close()
        self.thread.join(5)


@pytest.fixture
def rigs():
    made = []

    def make(**kw):
        made.append(Rig(**kw))
        return made[-1]
    yield make
    for rig in made:
        rig.close()


def generic(rig, queues=2, config_size=0):
    backend = VhostUserBackend(rig.fe, "a scripted back-end", config_size=config_size)
    return VirtioGeneric(backend, 2, queues, 64, "virtio-dev0")


def names(messages):
    return [(m.request.name, getattr(m.payload, "index", None)) for m in messages]


# --- item 1: a start that fails half-way is rolled back ------------------------------------

def test_a_start_refused_half_way_stops_what_it_started(rigs, memory16):
    """The back-end refuses SET_VRING_NUM for queue 1: queue 0, already
    kicked, is stopped again (GET_VRING_BASE) before the device reports
    the failure; the device needs a reset and a guest reset sends nothing
    more (nothing runs)."""
    rig = rigs(queues=2, on={R.SET_VRING_NUM: lambda m: REFUSE if m.payload.index == 1 else None})
    t = rig.transport(generic(rig), memory16)
    with pytest.raises(AssertionError):          # DRIVER_OK leaves the device inactive
        start_driver(t, memory16, [0, 1])
    assert r32(t, mmio.STATUS) & spec.VIRTIO_CONFIG_S_NEEDS_RESET
    after = names(rig.since(R.SET_VRING_NUM))
    assert after[:2] == [("SET_VRING_ENABLE", 0), ("GET_VRING_BASE", 0)], after
    assert rig.device.backend._started() == []
    count = len(rig.be.messages)
    w32(t, mmio.STATUS, 0)
    assert len(rig.be.messages) == count       # (the reply came before: no wait needed)


def test_a_guest_reset_after_a_failed_activation_resets_the_device(memory16):
    """The transport calls the model's reset() after a DRIVER_OK whose
    activation failed, too: a back-end may have started queues before it did."""
    from test_virtio import FEATURES, bring_up, make
    t, dev, _ = make(memory16, fail=True)
    assert bring_up(t, FEATURES)
    assert r32(t, mmio.STATUS) & spec.VIRTIO_CONFIG_S_NEEDS_RESET and not t.active
    w32(t, mmio.STATUS, 0)
    assert dev.resets == 1
    w32(t, mmio.STATUS, 0)                     # a second reset: nothing more to stop
    assert dev.resets == 1
    t.close()


# --- item 2: the back-end channel alone failing fails nothing -----------------------------

def test_a_broken_back_end_channel_leaves_the_device_running(rigs, memory16, caplog):
    """The back-end hangs up its request channel: pyvmm stops listening to it,
    in one line, and the device goes on (no NEEDS_RESET, no takeover: the
    back-end's rings still run, two servers on one ring would corrupt it)."""
    rig = rigs(protocol=PF.REPLY_ACK.mask | PF.BACKEND_REQ.mask | PF.CONFIG.mask,
               config=BLK_CONFIG)
    t = rig.transport(generic(rig, 1, 60), memory16)
    start_driver(t, memory16, [0])
    rig.be.backend_channel.sock.send(b"\x01\x00")      # half a header, then hang up
    rig.be.backend_channel.close()
    rig.run_loop(lambda: "channel" in caplog.text)
    rig.idle(0.2)
    assert not r32(t, mmio.STATUS) & spec.VIRTIO_CONFIG_S_NEEDS_RESET
    assert not t._taken_over
    assert "its back-end channel: the back-end (back-end channel) closed the connection in " \
        "the middle of a message (2 of 12 bytes); pyvmm no longer listens to it" in caplog.text
    w32(t, mmio.STATUS, 0)                           # the main socket still works
    assert ("GET_VRING_BASE", 0) in names(rig.be.messages)


def test_a_config_reply_that_breaks_a_rule_fails_the_device_but_takes_nothing_over(
        rigs, memory16, caplog):
    """After a config change, GET_CONFIG comes back at the wrong offset (BE-75):
    the connection is dead and the device needs a reset; its rings may still
    run, so pyvmm answers nothing itself until the back-end hangs up."""
    def bad(msg):               # (raw bytes: the back-end's own session would refuse it)
        return encode(R.GET_CONFIG, 0x5, DeviceConfig(msg.payload.offset + 4, 0,
                                                      msg.payload.data).pack())
    rig = rigs(protocol=PF.REPLY_ACK.mask | PF.BACKEND_REQ.mask | PF.CONFIG.mask,
               config=BLK_CONFIG, close_on_eof=False)
    t = rig.transport(generic(rig, 1, 60), memory16)
    rings = start_driver(t, memory16, [0])
    rig.be.on[R.GET_CONFIG] = bad
    announcer = threading.Thread(target=rig.be.send_config_change)
    announcer.start()
    rig.run_loop(lambda: r32(t, mmio.STATUS) & spec.VIRTIO_CONFIG_S_NEEDS_RESET)
    announcer.join(5)
    assert "reading its new config space: GET_CONFIG of 60 bytes at 0 answered with 60 " \
        "bytes at 4 (BE-75); the device needs a reset" in caplog.text
    rings[0].add([(BUF, 16, True)])
    os.eventfd_write(t.queues[0].kick_fd, 1)
    rig.idle(0.3)
    assert not t._taken_over and rings[0].used_idx() == 0
    # pyvmm shut its side down: the back-end read EOF; it hangs up at last.
    rig.thread.join(5)
    assert not rig.thread.is_alive() and not rig.be.hung_up
    rig.be.close()
    rig.run_loop(lambda: rings[0].used_idx() == 1)      # now pyvmm answers it


# --- item 3: after a timeout the connection is dead -----------------------------------------

def test_a_reply_timeout_kills_the_connection_cleanly(rigs, memory16, caplog):
    """GET_VRING_BASE is never answered: the reset ends within the deadline,
    nothing more is sent (no FE-8 request while a reply is due), later
    requests fail at once as ConnectionDead, and the back-end reads EOF."""
    rig = rigs(timeout=0.5, on={R.GET_VRING_BASE: lambda m: STALL})
    t = rig.transport(generic(rig, 1), memory16)
    start_driver(t, memory16, [0])
    started = time.monotonic()
    w32(t, mmio.STATUS, 0)                                # the guest resets the device
    assert time.monotonic() - started < 2
    assert rig.be.requests[-1] is R.GET_VRING_BASE        # nothing after the stalled one
    assert "its rings 0 may still run: the connection to it is dead" in caplog.text
    with pytest.raises(ConnectionDead, match="the connection to the back-end is dead"):
        rig.fe.get_features()
    rig.thread.join(5)
    assert not rig.thread.is_alive()                      # it read EOF
    rig.run_loop(lambda: "did not send the reply to VHOST_USER_GET_VRING_BASE" in caplog.text
                 and "the device needs a reset" in caplog.text)


# --- item 4: nothing waits on a socket under the register lock -------------------------------

def test_interrupt_status_does_not_wait_for_a_slow_config_write(rigs, memory16):
    """One vCPU writes config space (SET_CONFIG, which the back-end takes 1.5 s
    to ack); another vCPU's InterruptStatus read is not held up by it."""
    def slow(msg):
        time.sleep(1.5)
    rig = rigs(protocol=PF.REPLY_ACK.mask | PF.CONFIG.mask, config=BLK_CONFIG,
               on={R.SET_CONFIG: slow})
    t = rig.transport(generic(rig, 1, 60), memory16)
    start_driver(t, memory16, [0])
    writer = threading.Thread(target=t.write, args=(mmio.CONFIG + 20, 1, 1))
    writer.start()
    time.sleep(0.2)
    started = time.monotonic()
    assert r32(t, mmio.INTERRUPT_STATUS) & mmio.VIRTIO_MMIO_INT_VRING
    assert time.monotonic() - started < 0.3
    writer.join(5)


def test_an_activation_has_one_deadline_as_a_whole(rigs, memory16, caplog):
    """Each answer takes 0.3 s (under the 1 s timeout), but a whole start of
    two queues would take seconds: the vCPU waits about one timeout, then the
    device fails."""
    def slow(msg):
        time.sleep(0.3)
    rig = rigs(timeout=1.0, queues=2, on={r: slow for r in (R.SET_VRING_NUM, R.SET_VRING_BASE,
                                                            R.SET_VRING_ADDR, R.SET_VRING_KICK)})
    t = rig.transport(generic(rig), memory16)
    started = time.monotonic()
    with pytest.raises(AssertionError):
        start_driver(t, memory16, [0, 1])
    assert time.monotonic() - started < 2.0
    assert "took too long over a sequence of requests" in caplog.text \
        or "within 0." in caplog.text


def test_a_request_on_the_back_end_channel_is_served_while_a_reply_is_due(rigs, memory16):
    """The back-end answers SET_CONFIG only after pyvmm acked its
    CONFIG_CHANGE_MSG (NEED_REPLY): pyvmm serves its channel while it waits,
    so neither waits for the other; the new config space is read afterwards
    in the event loop, and the guest gets a config interrupt."""
    rig = rigs(protocol=PF.REPLY_ACK.mask | PF.BACKEND_REQ.mask | PF.CONFIG.mask,
               config=BLK_CONFIG, timeout=3.0)
    acks = []

    def announce_first(msg):
        rig.be.config = struct.pack("<Q", 4096).ljust(60, b"\0")
        acks.append(rig.be.send_config_change(need_reply=True))
    rig.be.on[R.SET_CONFIG] = announce_first
    t = rig.transport(generic(rig, 1, 60), memory16)
    start_driver(t, memory16, [0])
    generation = r32(t, mmio.CONFIG_GENERATION)
    started = time.monotonic()
    t.write(mmio.CONFIG + 20, 1, 1)
    assert time.monotonic() - started < 1.0 and acks == [0]
    rig.run_loop(lambda: r32(t, mmio.CONFIG_GENERATION) != generation)
    assert t.read(mmio.CONFIG, 4) == 4096
    assert r32(t, mmio.INTERRUPT_STATUS) & mmio.VIRTIO_MMIO_INT_CONFIG
    assert not r32(t, mmio.STATUS) & spec.VIRTIO_CONFIG_S_NEEDS_RESET


# --- item 5: a NIC whose control queue was never readied -------------------------------------

def test_mq_without_a_ready_control_queue_is_a_device_error(rigs, memory16, caplog):
    """A driver acks VIRTIO_NET_F_MQ but leaves the control queue unready: the
    device refuses to start (NEEDS_RESET, one line), the vCPU goes on."""
    rig = rigs(protocol=PF.REPLY_ACK.mask | PF.MQ.mask, queues=4)
    net = VirtioNet(VhostUserBackend(rig.fe, "a scripted back-end"), b"\x02" + bytes(5),
                    queue_pairs=2)
    t = rig.transport(net, memory16)
    with pytest.raises(AssertionError):
        start_driver(t, memory16, [0, 1, 2, 3])            # queue 4, the control queue, not ready
    assert r32(t, mmio.STATUS) & spec.VIRTIO_CONFIG_S_NEEDS_RESET
    assert "the control queue (queue 4) is not ready" in caplog.text


# --- item 6: the call eventfd before the kick -------------------------------------------------

class RecordingVhost:
    """A kernel vhost device as VhostKernelNetBackend sees it, recording calls."""

    def __init__(self):
        from pyvmm.vhost.backend import VhostBackend

        class Recorder(VhostBackend):
            calls = []

            def __getattribute__(self, name):
                attr = object.__getattribute__(self, name)
                if name.startswith("set_") and callable(attr):
                    Recorder.calls.append(name)
                return attr
            set_owner = set_features = _set_mem_table = _set_vring_num = lambda *a: None
            set_vring_base = _set_vring_addr = set_vring_kick = set_vring_call = lambda *a: None
            set_vring_err = close = set_backend = lambda *a: None
            get_vring_base = lambda *a: 0                         # noqa: E731
            get_features = lambda self: 1 << spec.VIRTIO_F_VERSION_1   # noqa: E731
        Recorder.calls = []
        self.vhost = Recorder()


def test_call_and_err_reach_a_kernel_back_end_before_the_kick(memory16):
    from pyvmm.devices.virtio.vhost_kernel import VhostKernelNetBackend

    class Tap:
        name, fd, fds = "tap-test", -1, [-1]
        set_offload = set_vnet_hdr_size = close = lambda *a: None
    vhost = RecordingVhost().vhost
    backend = VhostKernelNetBackend([vhost], Tap())
    ring = DriverRing(memory16, 0x10000, 64)
    queue = Queue(0, 64, True, ring.desc_addr, ring.avail_addr, ring.used_addr, 5, 6, 7)
    backend.start(memory16, 1 << spec.VIRTIO_F_VERSION_1, [queue])
    calls = [c for c in type(vhost).calls if c.startswith("set_vring")]
    assert calls == ["set_vring_num", "set_vring_base", "set_vring_addr", "set_vring_call",
                     "set_vring_err", "set_vring_kick"], calls


# --- item 24: the takeover fails exactly the requests in flight --------------------------------

def test_a_gone_back_end_s_unfinished_requests_fail_from_its_inflight_area(rigs, memory16):
    """The back-end tracked requests in the inflight area pyvmm gave it: it
    took A and B, completed B out of order, and died. pyvmm answers A (in
    flight) and C (never taken) with VIRTIO_BLK_S_IOERR, and leaves B as it
    was: from the used index alone it would have answered B twice and A never."""
    rig = rigs(protocol=PF.REPLY_ACK.mask | PF.CONFIG.mask | PF.INFLIGHT_SHMFD.mask,
               config=BLK_CONFIG)
    blk = VirtioBlk(VhostUserBackend(rig.fe, "a scripted back-end", config_size=60))
    t = rig.transport(blk, memory16)
    rings = start_driver(t, memory16, [0])
    assert R.SET_INFLIGHT_FD in rig.be.requests
    assert rig.be.requests.index(R.SET_INFLIGHT_FD) < rig.be.requests.index(R.SET_VRING_KICK)
    ring, q = rings[0], t.queues[0]
    heads = {}
    for n, name in enumerate("ABC"):
        base = BUF + n * 0x1000
        memory16.write(base, struct.pack("<IIQ", 0, 0, 0))      # a read of sector 0
        memory16.write(base + 0x800, b"\xff")
        heads[name] = ring.add([(base, 16, False), (base + 0x200, 512, True),
                                (base + 0x800, 1, True)])
    # The back-end's side: take A and B, complete B only, die.
    description = [m for m in rig.be.messages if m.request is R.SET_INFLIGHT_FD][0].payload
    area = InflightArea(os.dup(rig.be.inflight_fd), description)
    tracking = area.queue(0)
    device = DeviceRing(memory16, 64, ring.desc_addr, ring.avail_addr, ring.used_addr)
    tracking.start(64, 0)
    a, b = device.pop(), device.pop()
    tracking.take(a.head)
    tracking.take(b.head)
    memory16.write(BUF + 0x1800, b"\0")                        # B's status: OK
    tracking.completing(b.head)
    device.push(b.head, 513)
    tracking.completed(b.head, device.used_idx())
    area.close()
    rig.be.close()
    rig.run_loop(lambda: ring.used_idx() == 3)
    assert [h for h, _ in ring.pop_used()] == [heads["B"], heads["A"], heads["C"]]
    assert memory16.read(BUF + 0x800, 1) == b"\x01"            # A: VIRTIO_BLK_S_IOERR
    assert memory16.read(BUF + 0x1800, 1) == b"\0"             # B: as the back-end left it
    assert memory16.read(BUF + 0x2800, 1) == b"\x01"           # C: VIRTIO_BLK_S_IOERR
    assert select.select([q.call_fd], [], [], 0)[0]


def test_the_inflight_area_is_new_after_each_reset(rigs, memory16):
    """A reset device starts with a new area (an old one would resubmit stale
    requests): GET_INFLIGHT_FD, then SET_INFLIGHT_FD, at each start."""
    rig = rigs(protocol=PF.REPLY_ACK.mask | PF.INFLIGHT_SHMFD.mask)
    t = rig.transport(generic(rig, 1), memory16)
    start_driver(t, memory16, [0])
    w32(t, mmio.STATUS, 0)
    start_driver(t, memory16, [0])
    got = [r for r in rig.be.requests if r in (R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD)]
    assert got == [R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD] * 2


# --- item 7: bounds on what a back-end's numbers make pyvmm do ---------------------------------

def test_a_back_end_s_huge_queue_count_is_capped(rigs, tmp_path):
    """--device without queues= takes the back-end's count (GET_QUEUE_NUM), but
    never more than MAX_QUEUES: 1000 queues would be 3000 eventfds."""
    from pyvmm.devices.virtio.device import MAX_QUEUES
    from pyvmm.vhost.user.channel import Listener
    from pyvmm.vmm.virtio_devices import VhostUserConfig, plan_generic
    path = str(tmp_path / "be.sock")
    listener = Listener(path)
    served = []

    def back_end():
        be = ScriptedBackend(listener.accept("pyvmm"), protocol=PF.MQ.mask, queues=1000)
        served.append(be)
        be.serve()
    thread = threading.Thread(target=back_end, daemon=True)
    thread.start()
    device, _, summary = plan_generic(VhostUserConfig(path, kind="device", virtio_id=2), 0,
                                      None)
    try:
        assert device.num_queues == MAX_QUEUES == 64
        assert "64 queues (of the back-end's 1000: pyvmm gives a device at most 64)" in summary
    finally:
        device.close()
        listener.close()
        thread.join(5)


def test_a_queue_index_past_8_bits_is_never_sent(rigs):
    """SET_VRING_KICK/CALL/ERR carry the index in bits 0-7 (FE-48): queue 256
    would be sent as queue 0 with the NOFD bit set."""
    from pyvmm.vhost.user.errors import LocalProtocolError
    rig = rigs(protocol=PF.MQ.mask, queues=512)
    with pytest.raises(LocalProtocolError, match="queue 256: the message has 8 bits .*FE-48"):
        rig.fe.set_vring_call(256, None)


def test_zero_memory_slots_is_the_back_end_s_error(rigs):
    """GET_MAX_MEM_SLOTS answering 0 fails the negotiation, naming the rule
    the back-end broke; pyvmm never blames itself (FE-37) later on."""
    from pyvmm.vhost.user.errors import RemoteProtocolError
    with pytest.raises(RemoteProtocolError, match="GET_MAX_MEM_SLOTS answered 0 memory slots.*"
                                                  r"\(BE-35\)"):
        rigs(protocol=PF.CONFIGURE_MEM_SLOTS.mask,
             on={R.GET_MAX_MEM_SLOTS: lambda m: encode(R.GET_MAX_MEM_SLOTS, 0x5, U64(0).pack())})


def test_fewer_memory_slots_than_guest_ram_regions_is_a_device_error(rigs):
    """Guest RAM above the MMIO hole is two regions; a back-end with one slot
    gets a clear refusal at start, not an ADD_MEM_REG past its slots (FE-37)."""
    from pyvmm.memory.guest_memory import MemoryRegion

    class TwoRegions:                     # what GuestMemory looks like past 3.25 GiB
        regions = [MemoryRegion(0, 4096, 0, 0x1000), MemoryRegion(1 << 32, 4096, 4096, 0x2000)]
        fd = -1
    rig = rigs(protocol=PF.CONFIGURE_MEM_SLOTS.mask | PF.REPLY_ACK.mask, max_mem_slots=1)
    backend = VhostUserBackend(rig.fe, "a scripted back-end")
    with pytest.raises(DeviceError, match="guest RAM is 2 regions, and the back-end takes 1 "
                                          r"\(its GET_MAX_MEM_SLOTS\)"):
        backend.start(TwoRegions(), 1 << 32, [])
    assert R.ADD_MEM_REG not in rig.be.requests
