"""Checks that kill the back-end and start it again (a back-end given as a
command: `pyvmm check --device D -- CMD`): what a front-end's reconnect
relies on (../shared/VHOST-USER-RECONNECT.md).

BE-74: requests are taken into flight, the back-end is killed (SIGKILL)
at a chosen point, started again, and given the device again as QEMU's
reconnect does: the whole handshake, features, memory table, the same
inflight area (SET_INFLIGHT_FD, no new GET_INFLIGHT_FD), each ring from
its used index, a kick (pyvmm.driver's reconnect()). Every request must
then complete exactly once: those the dead one took and never finished
(the area says which), and those it never took; none it finished.
"""

import time

from pyvmm.check.core import Failed, Skipped, check
from pyvmm.check.rings import QUIET, kick, path_of, running
from pyvmm.driver import DriverError
from pyvmm.vhost.user.messages import ProtocolFeature as PF

REQUESTS = 16

# Where the back-end dies, as the check can choose it from outside: how
# many requests are posted first, whether they are kicked, and how many
# completions the check waits for before the kill. (Once kicked, a fast
# back-end may finish them all before it dies: then only the first two
# points leave anything for its successor.)
POINTS = {
    "after SET_INFLIGHT_FD, before any request": (0, False, 0),
    "requests posted, not kicked": (REQUESTS, False, 0),
    "requests kicked, none waited for": (REQUESTS, True, 0),
    "requests kicked, the first answered": (REQUESTS, True, 1),
}


def restartable(ctx):
    if not getattr(ctx.target, "can_restart", False):
        raise Skipped("needs a back-end pyvmm check can kill and start again: give it as "
                      "a command (pyvmm check --device D -- CMD ...)")


def in_flight(d, index):
    """The heads the back-end has marked in flight on queue index, from the
    inflight area pyvmm's front-end keeps (None: no area)."""
    used_idx = d.queues[index].ring.used_idx()
    return d.backend.unfinished(index, d.queues[index].size, used_idx)


@check("BE-74", "SHOULD", "after a restart (SIGKILL) the back-end resubmits from the inflight "
                          "area: every request completes exactly once")
def restart_resubmits(ctx):
    ctx.needs(PF.INFLIGHT_SHMFD)
    restartable(ctx)
    path = path_of(ctx)
    for point, (before, kicked, answered) in POINTS.items():
        with running(ctx, path, inflight=True) as (d, path, q):
            posted = [path.post(d) for _ in range(before)]
            if kicked:
                kick(q)
            done = []
            if answered:
                try:
                    done = [head for head, _ in q.wait(None, ctx.timeout)]
                except DriverError as e:
                    raise Failed(f"{point}: {e}") from None
            ctx.target.kill()
            done += [head for head, _ in q.used()]           # (finished as it died)
            marked = in_flight(d, path.queue)
            try:
                d.reconnect(ctx.target.connect())
            except Exception as e:       # noqa: BLE001 - any failure is the finding
                raise Failed(f"{point}: the restarted back-end did not take the device "
                             f"back: {e}") from None
            if not before:
                posted = [path.post(d) for _ in range(REQUESTS)]
            kick(q)
            _exactly_once(q, posted, done, ctx.timeout, f"{point} (left in flight: {marked})")


def _exactly_once(q, posted, done, timeout, point):
    """Every posted head not in done completes, once; then nothing more comes
    (a head used twice shows as one not in flight: DriverError)."""
    seen = list(done)
    deadline = time.monotonic() + timeout
    try:
        while set(posted) - set(seen) and time.monotonic() < deadline:
            seen += [head for head, _ in q.used()]
            time.sleep(0.01)
        time.sleep(QUIET)
        seen += [head for head, _ in q.used()]
    except DriverError as e:
        raise Failed(f"{point}: a request completed twice: {e}") from None
    missing = sorted(set(posted) - set(seen))
    if missing:
        raise Failed(f"{point}: requests {missing} never completed after the restart")
