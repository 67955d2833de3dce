"""Checks of ring states, kicks and GET_VRING_BASE, and of the data path,
through the guest-less driver (section E of the back-end rules).

Each check runs a device's DataPath (datapath.py): the queues it starts,
the queue it watches, and requests whose execution can be seen.
"""

import contextlib
import os
import select
import time

from pyvmm.check.core import Failed, Skipped, check
from pyvmm.check.datapath import PATHS
from pyvmm.devices.virtio.vhost_user import DRIVER_OK_STATUS
from pyvmm.driver import DriverError
from pyvmm.driver.driver import DRIVER_FEATURES
from pyvmm.errors import PyvmmError
from pyvmm.vhost import VringAddr
from pyvmm.vhost.user.messages import FrontendReq as R, ProtocolFeature as PF, U64
from pyvmm.virtio import spec

QUIET = 0.5                   # how long "nothing happens" is watched


def path_of(ctx):
    if ctx.device is None:
        raise Skipped("a data-path check needs the device type (give --device)")
    return PATHS[ctx.device]()


@contextlib.contextmanager
def running(ctx, path=None, event_idx=True, **driver):
    """A driver with the device's queues (path's, or the device's) started and
    enabled, begun; without event_idx, VIRTIO_RING_F_EVENT_IDX is not acked,
    so that every completion signals the call eventfd."""
    path = path or path_of(ctx)
    with ctx.driver(path.config_size, **driver) as d:
        features = d.backend.features() & DRIVER_FEATURES
        if not event_idx:
            features &= ~spec.bit(spec.VIRTIO_RING_F_EVENT_IDX)
        d.start(features=features, queues=path.queues)
        taken(d.backend.frontend)
        path.begin(d)
        yield d, path, d.queues[path.queue]


@contextlib.contextmanager
def set_up(ctx, kick=True, enable=True, base=0, before=None, inflight=False):
    """A driver whose queues are set up message by message: everything but
    the watched queue's SET_VRING_KICK (unless kick) and its
    SET_VRING_ENABLE (unless enable; True/False: sent with that value, None:
    not sent). The watched queue starts at base; before(driver, queue), if
    given, prepares its ring first. With inflight, an area from
    GET_INFLIGHT_FD is handed back with SET_INFLIGHT_FD first, as QEMU does
    (d.inflight: its mapping). Yields (driver, path, the watched
    DriverQueue, start()), where start() sends what was held back."""
    path = path_of(ctx)
    with ctx.driver(path.config_size, inflight=inflight) as d:
        fe = d.backend.frontend
        fe.set_features(d.backend.features() & DRIVER_FEATURES)
        if inflight:
            d.inflight = inflight_area(fe, len(path.queues), max(s for _, s in path.queues))
        fe.set_mem_table(d.memory)
        for index, size in path.queues:
            q = d.make_queue(index, size)
            if index == path.queue and before is not None:
                before(d, q)
            fe.set_vring_num(index, size)
            fe.set_vring_base(index, base if index == path.queue else 0)
            fe.set_vring_addr(index, VringAddr(q.ring.desc_addr, q.ring.avail_addr,
                                               q.ring.used_addr))
            fe.set_vring_call(index, q.call)
            protocol = fe.negotiated.protocol_features_on
            if index != path.queue:
                fe.set_vring_kick(index, q.kick)
                if protocol:
                    fe.set_vring_enable(index, True)
                continue
            if protocol and enable is not None:
                fe.set_vring_enable(index, enable)
            if kick:
                fe.set_vring_kick(index, q.kick)
        driver_ok(fe)

        def start():
            q = d.queues[path.queue]
            if not kick:
                fe.set_vring_kick(path.queue, q.kick)
            if enable is not True and fe.negotiated.protocol_features_on:
                fe.set_vring_enable(path.queue, True)
        yield d, path, d.queues[path.queue], start


def inflight_area(fe, num_queues, queue_size):
    """GET_INFLIGHT_FD, mapped, then SET_INFLIGHT_FD: the mapping."""
    import mmap
    description, fd = fe.get_inflight_fd(num_queues, queue_size)
    if fd is None or not description.mmap_size:
        raise Failed(f"GET_INFLIGHT_FD for {num_queues} queue(s) of {queue_size}: no area")
    try:
        area = mmap.mmap(fd, description.mmap_size, mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE, offset=description.mmap_offset)
        fe.set_inflight_fd(description, fd)
    finally:
        os.close(fd)
    return area


def taken(fe):
    """Without REPLY_ACK nothing says the back-end has taken what was sent, and
    a kick (on its eventfd) may overtake it: a GET_FEATURES reply says so,
    messages being handled in order."""
    if not fe.has(PF.REPLY_ACK):
        fe.get_features()


def driver_ok(fe):
    """SET_STATUS(DRIVER_OK) where STATUS was negotiated, as a front-end does once
    the rings are set up (DPDK serves no ring before it)."""
    if fe.has(PF.STATUS):
        fe.set_status(DRIVER_OK_STATUS)


def untouched(q, used, what, seconds=QUIET):
    time.sleep(seconds)
    if q.ring.used_idx() != used:
        raise Failed(what)


def kick(q):
    os.eventfd_write(q.kick, 1)


def new_eventfd():
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def signalled(fd, seconds=0):
    """Whether eventfd fd is (or within seconds becomes) readable."""
    return bool(select.select([fd], [], [], seconds)[0])


def drain(fd):
    """Forget the signals an eventfd has had so far."""
    while signalled(fd):
        os.eventfd_read(fd)


def completes(q, head, timeout, what):
    try:
        q.wait(head, timeout)
    except DriverError as e:
        raise Failed(f"{what}: {e}") from None


@check("BE-45", "MUST", "a ring is not processed before SET_VRING_KICK starts it")
def not_started(ctx):
    path = path_of(ctx)
    with set_up(ctx, kick=False, before=lambda d, q: path.post(d)) as (d, path, q, _):
        kick(q)
        untouched(q, 0, "a request was served on a ring that had no SET_VRING_KICK yet")


@check("BE-46", "MUST", "SET_VRING_KICK starts a ring: a kick is then served")
def kick_starts(ctx):
    with set_up(ctx) as (d, path, q, _):
        path.begin(d)
        path.request(d)


@check("BE-47", "SHOULD", "a request queued before SET_VRING_KICK is served without a kick")
def no_kick_needed(ctx):
    with set_up(ctx, kick=False) as (d, path, q, start):
        head = path.post(d)
        start()
        completes(q, head, 1.0, "queued before SET_VRING_KICK and never kicked")


def _not_served_after(ctx, stop, what):
    """A request served, then stop(frontend, index): a request posted and
    kicked after it must stay unused."""
    with running(ctx) as (d, path, q):
        path.request(d)
        stop(d.backend.frontend, path.queue)
        taken(d.backend.frontend)
        used = q.ring.used_idx()
        path.post(d)
        kick(q)
        untouched(q, used, f"a request posted and kicked after {what} was served")


@check("BE-48", "MUST", "after GET_VRING_BASE the ring is stopped: kicks are not served")
def stopped_ring(ctx):
    _not_served_after(ctx, lambda fe, index: fe.get_vring_base(index), "GET_VRING_BASE")


@check("BE-49", "MUST*", "a stopped ring restarts at SET_VRING_BASE with a new SET_VRING_KICK")
def restart(ctx):
    with running(ctx) as (d, path, q):
        path.request(d)
        fe = d.backend.frontend
        base = fe.get_vring_base(path.queue)
        new_kick = new_eventfd()
        os.close(q.kick)
        q.kick = new_kick
        # The whole set-up again, as QEMU restarts a ring (DPDK serves no
        # ring it stopped until it has had all of it again).
        fe.start_vring(path.queue, q.size, VringAddr(q.ring.desc_addr, q.ring.avail_addr,
                                                     q.ring.used_addr), q.kick, q.call,
                       base=base)
        if fe.negotiated.protocol_features_on:
            fe.set_vring_enable(path.queue, True)
        head = path.post(d)
        kick(q)
        completes(q, head, ctx.timeout, f"restarted at base {base}")


def observable(ctx):
    """Skipped if the execution of a request cannot be seen. net shows one
    only as an answer on RX (dpdk-testpmd's icmpecho answers the ARP
    request): a back-end that does not answer would pass every "without side
    effects" rule unseen. Learned once per run, on an enabled ring."""
    if "observable" not in ctx.learned:
        try:
            ctx.learned["observable"] = _executed_visibly(ctx)
        except (Failed, PyvmmError, OSError) as e:       # learned once, not at every rule
            ctx.learned["observable"] = f"a request on an enabled ring failed ({e}; see BE-51)"
        finally:
            ctx.target.release()
    if ctx.learned["observable"] is not True:
        raise Skipped(f"could not observe side effects: {ctx.learned['observable']}")


def _executed_visibly(ctx):
    """True if a request on a started, enabled ring shows within QUIET (the
    time the side-effect rules watch), else why not."""
    with running(ctx) as (d, path, q):
        head, executed = path.marked(d)
        kick(q)
        q.wait(head, ctx.timeout)
        deadline = time.monotonic() + QUIET
        while not executed():
            if time.monotonic() > deadline:
                return (f"a request executed on an enabled ring showed nothing within "
                        f"{QUIET:g} s (a {ctx.device} back-end that does not answer "
                        f"what it is sent)")
            time.sleep(0.01)
    return True


def _no_side_effects(d, path, q, what):
    head, executed = path.marked(d)
    kick(q)
    time.sleep(QUIET)
    done = dict(q.used())
    if head in done and executed():
        raise Failed(what)
    return head, done


@check("BE-50", "MUST", "started but not enabled, a ring is served without side effects")
def started_not_enabled(ctx):
    ctx.needs_protocol_features()
    observable(ctx)
    with set_up(ctx, enable=None) as (d, path, q, _):
        _no_side_effects(d, path, q, "a request on a ring that had no SET_VRING_ENABLE was "
                                     "executed (its result reached the guest's buffers)")


@check("BE-51", "MUST", "a started and enabled ring executes requests")
def data_path(ctx):
    with running(ctx) as (d, path, q):
        path.request(d)


@check("BE-52", "MUST*", "with bit 30, rings need SET_VRING_ENABLE(1) before they execute")
def enable_needed(ctx):
    ctx.needs_protocol_features()
    observable(ctx)
    with set_up(ctx, enable=None) as (d, path, q, start):
        head, done = _no_side_effects(d, path, q, "a request was executed before "
                                                  "SET_VRING_ENABLE")
        start()
        if head not in done:
            kick(q)
            completes(q, head, ctx.timeout, "enabled, the ring did not serve the held request")
        path.begin(d)
        path.request(d)


@check("BE-53", "MUST", "without bit 30 in SET_FEATURES, rings start enabled")
def enabled_without_protocol_features(ctx):
    ctx.needs_protocol_features()
    path = path_of(ctx)
    with ctx.driver(path.config_size) as d:
        fe = d.backend.frontend
        features = d.backend.features() & DRIVER_FEATURES
        fe.call(R.SET_FEATURES, U64(features))        # set_features() would add bit 30
        fe.set_mem_table(d.memory)
        for index, size in path.queues:
            q = d.make_queue(index, size)
            fe.start_vring(index, size, VringAddr(q.ring.desc_addr, q.ring.avail_addr,
                                                  q.ring.used_addr), q.kick, q.call)
        driver_ok(fe)
        path.begin(d)
        path.request(d)


@check("BE-54", "SHOULD", "SET_VRING_ENABLE before SET_VRING_KICK applies once the ring starts")
def enable_before_start(ctx):
    ctx.needs_protocol_features()
    observable(ctx)
    with set_up(ctx, kick=False, enable=False) as (d, path, q, _):
        fe = d.backend.frontend
        fe.set_vring_kick(path.queue, q.kick)
        _no_side_effects(d, path, q, "disabled before SET_VRING_KICK, the ring executed a "
                                     "request after it")
    with set_up(ctx, kick=False, enable=True) as (d, path, q, start):
        start()
        path.begin(d)
        path.request(d)


@check("BE-55", "MUST*", "a disabled ring is served without side effects; enabled, normally")
def enable_disable(ctx):
    """The spec's disabled ring is processed "without causing any side effects"
    (a NIC consumes and drops TX): a request may be consumed, but not executed."""
    ctx.needs_protocol_features()
    observable(ctx)
    with running(ctx) as (d, path, q):
        path.request(d)
        fe = d.backend.frontend
        fe.set_vring_enable(path.queue, False)
        taken(fe)
        head, done = _no_side_effects(d, path, q, "a request on a disabled ring was executed "
                                                  "(its result reached the guest's buffers)")
        fe.set_vring_enable(path.queue, True)
        if head not in done:
            kick(q)
            completes(q, head, ctx.timeout, "enabled again, the ring did not serve the held "
                                            "request")
        path.request(d)


@check("BE-56", "MUST*", "SET_VRING_BASE says where in the available ring to start")
def vring_base_start(ctx):
    heads = []

    def five_used_one_new(d, q):
        """As a ring a previous back-end left: five requests used, a sixth not."""
        heads.extend(path.post(d) for _ in range(6))
        d.memory.write(q.ring.used_addr + 2, (5).to_bytes(2, "little"))
        q.ring.last_used_idx = 5
        for head in heads[:5]:
            del q.in_flight[head]

    path = path_of(ctx)
    with set_up(ctx, kick=False, base=5, before=five_used_one_new) as (d, _, q, start):
        start()
        kick(q)
        completes(q, heads[5], ctx.timeout, "from base 5, the sixth request")
        untouched(q, 6, "from base 5 of 6 available, more than one request was served")


@check("BE-58", "MUST", "GET_VRING_BASE answers where the ring stopped")
def vring_base(ctx):
    with running(ctx) as (d, path, q):
        for _ in range(3):
            path.request(d)
        expected = q.ring.avail_idx
        base = d.backend.frontend.get_vring_base(path.queue)
        if base != expected:
            raise Failed(f"GET_VRING_BASE after {expected} requests from base 0: got {base}")


@check("BE-60", "MUST", "GET_VRING_BASE completes the requests in flight before it answers")
def vring_base_drains(ctx):
    with running(ctx) as (d, path, q):
        for _ in range(8):
            path.post(d)
        kick(q)
        base = d.backend.frontend.get_vring_base(path.queue)
        used = q.ring.used_idx()
        if used != base:
            raise Failed(f"GET_VRING_BASE answered {base} with the used index at {used}: "
                         f"requests it took were not completed first")
        untouched(q, used, "the used ring moved after GET_VRING_BASE answered")


@check("BE-62", "MUST", "with every ring stopped, nothing is written or signalled")
def suspended(ctx):
    with running(ctx) as (d, path, q):
        path.request(d)
        fe = d.backend.frontend
        for index in d.queues:
            fe.get_vring_base(index)
        used = {i: dq.ring.used_idx() for i, dq in d.queues.items()}
        for dq in d.queues.values():
            drain(dq.call)
        path.post(d)
        for dq in d.queues.values():
            kick(dq)
        time.sleep(QUIET)
        for i, dq in d.queues.items():
            if dq.ring.used_idx() != used[i]:
                raise Failed(f"queue {i}'s used index moved with every ring stopped")
            if signalled(dq.call) or signalled(dq.err):
                raise Failed(f"queue {i}'s call or error eventfd was signalled with every "
                             f"ring stopped")
        fe.get_features()                          # and it still answers


@check("BE-64", "SHOULD", "with SET_VRING_CALL's no-fd flag the used ring is still updated")
def no_call_fd(ctx):
    with running(ctx) as (d, path, q):
        d.backend.frontend.set_vring_call(path.queue, None)
        path.request(d)


@check("BE-65", "MUST*", "without EVENT_IDX, each completion signals the call eventfd")
def call_signalled(ctx):
    with running(ctx, event_idx=False) as (d, path, q):
        drain(q.call)
        head = path.post(d)
        kick(q)
        if not signalled(q.call, ctx.timeout):
            raise Failed(f"no signal on the call eventfd within {ctx.timeout:g} s of a "
                         f"request{' (it was used)' if q.ring.used_idx() else ''}")
        completes(q, head, ctx.timeout, "the signalled request")


@check("BE-92", "MUST*", "after RESET_DEVICE the rings are stopped")
def reset_device(ctx):
    ctx.needs(PF.RESET_DEVICE)
    _not_served_after(ctx, lambda fe, index: fe.reset_device(), "RESET_DEVICE")


@check("BE-7", "MUST*", "fds sent with the header count when the payload comes later")
def fds_before_payload(ctx):
    """SET_VRING_CALL in two writes 20 ms apart: the header with the new call
    eventfd, then its payload (a peer's sendmsg may be split like this)."""
    import socket
    from pyvmm.vhost.user.messages import VHOST_USER_VERSION, VringFd
    from pyvmm.vhost.user.wire import encode
    with running(ctx, event_idx=False) as (d, path, q):
        call = new_eventfd()
        frame = encode(R.SET_VRING_CALL, VHOST_USER_VERSION, VringFd(path.queue).pack())
        sock = d.backend.frontend.conn.sock
        sock.sendmsg([frame[:12]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     call.to_bytes(4, "little"))])
        time.sleep(0.02)
        sock.sendall(frame[12:])
        os.close(q.call)
        q.call = call
        d.backend.frontend.get_features()          # a barrier: the back-end has read it
        head = path.post(d)
        kick(q)
        if not signalled(q.call, ctx.timeout):
            raise Failed("the call eventfd sent with SET_VRING_CALL's header (its payload "
                         "20 ms later) was not signalled for a completed request")
        completes(q, head, ctx.timeout, "after the split SET_VRING_CALL")


@check("BE-73", "SHOULD", "the inflight area tracks each request: none in flight once used")
def inflight_tracked(ctx):
    from pyvmm.vhost.user.backend.inflight import DESC, HEADER
    ctx.needs(PF.INFLIGHT_SHMFD)
    with set_up(ctx, inflight=True) as (d, path, q, _):
        path.begin(d)
        for _ in range(3):
            path.request(d)
        stride = len(d.inflight) // len(path.queues)      # the split layout's, per queue
        region = path.queues.index((path.queue, q.size)) * stride
        _, _, desc_num, _, used_idx = HEADER.unpack_from(d.inflight, region)
        if used_idx != q.ring.used_idx():
            raise Failed(f"after {q.ring.used_idx()} requests the area's used_idx is "
                         f"{used_idx}")
        busy = [i for i in range(min(desc_num, q.size))
                if DESC.unpack_from(d.inflight, region + HEADER.size + i * DESC.size)[0]]
        if busy:
            raise Failed(f"descriptors {busy} are still marked in flight after their "
                         f"requests were used")


@check("BE-26", "SHOULD**", "once a new call eventfd is set, only it is signalled")
def new_call_fd(ctx):
    with running(ctx, event_idx=False) as (d, path, q):
        old, q.call = q.call, new_eventfd()
        try:
            d.backend.frontend.set_vring_call(path.queue, q.call)
            taken(d.backend.frontend)
            drain(old)
            head = path.post(d)
            kick(q)
            if not signalled(q.call, ctx.timeout):
                raise Failed("the new call eventfd was not signalled")
            completes(q, head, ctx.timeout, "after SET_VRING_CALL with a new eventfd")
            if signalled(old, QUIET):
                raise Failed("the old call eventfd was signalled after SET_VRING_CALL "
                             "replaced it")
        finally:
            os.close(old)


@check("BE-18", "MUST*", "every queue below the advertised count works (the last one too)")
def last_queue(ctx):
    path = path_of(ctx)
    if ctx.device != "blk":
        raise Skipped("a check of blk's request queues (give --device blk)")
    last = ctx.offer.queues - 1
    if last == 0:
        raise Skipped("one queue: BE-51 covers it")
    path.queue, path.queues = last, tuple((i, 64) for i in range(last + 1))
    with running(ctx, path) as (d, path, q):
        path.request(d)
