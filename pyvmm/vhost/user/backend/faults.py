"""--die-at POINT[:N]: the back-end kills itself (SIGKILL, as a crash would:
no cleanup, no goodbye on the socket) the Nth time it reaches POINT. For
testing a front-end's reconnect: which requests does the next back-end
have to finish, and does each complete exactly once?

The points follow a request through the back-end, in the order of the
spec's inflight tracking (vhost-user.rst, "Inflight I/O tracking"), plus
two on the control path. One process arms at most one point; with none
armed, reach() costs a comparison.
"""

import os
import signal

POINTS = {
    "popped": "a request taken from the avail ring, not yet marked in flight",
    "taken": "marked in flight in the inflight area, its I/O not yet done",
    "served": "its I/O done, no used element written yet",
    "used-elem": "the used element written, used.idx not yet moved",
    "used-idx": "used.idx moved (the guest may see it), the inflight mark not yet cleared",
    "completed": "the inflight mark cleared: the request is done",
    "resubmitted": "a request a dead predecessor left in flight, taken again",
    "inflight-fd": "SET_INFLIGHT_FD handled, the rings not yet started",
    "message": "a front-end message received, before it is handled",
}

_armed = None          # [point, how many more times to pass it]


def arm(spec):
    """POINT or POINT:N (N from 1; default 1); ValueError with a one-line reason."""
    point, _, count = spec.partition(":")
    if point not in POINTS:
        raise ValueError(f"{point!r} is not a point; choose from {', '.join(POINTS)}")
    try:
        n = int(count) if count else 1
    except ValueError:
        raise ValueError(f"{count!r}: give N as a number from 1") from None
    if n < 1:
        raise ValueError(f"{n}: give N as a number from 1")
    global _armed
    _armed = [point, n]


def armed():
    """Whether a point is armed (requests then go the way that reaches each)."""
    return _armed is not None


def reach(point):
    """The back-end is at point: die here if this is the armed point's Nth time."""
    if _armed is None or _armed[0] != point:
        return
    _armed[1] -= 1
    if _armed[1] == 0:
        os.kill(os.getpid(), signal.SIGKILL)

