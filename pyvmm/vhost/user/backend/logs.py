"""The back-end's log, rate-limited: a front-end or a guest can make the
same complaint thousands of times a second (a refused request, a broken
packet), and each must not become a line.

RateLimit is a logging.Filter: per kind of line, BURST lines pass in each
PERIOD seconds; the rest are counted, and the next line of that kind that
passes says how many were left out. A kind is the format string and, when
the first argument is a string (the request's name in "%s refused: %s"),
that string too; past MAX_KINDS kinds, the format string alone.
"""

import logging
import time

BURST = 5
PERIOD = 10.0
MAX_KINDS = 1000


class RateLimit(logging.Filter):
    def __init__(self, burst=BURST, period=PERIOD, clock=time.monotonic):
        super().__init__()
        self.burst, self.period, self.clock = burst, period, clock
        self._kinds = {}          # kind -> [window start, lines passed, lines left out]

    def _key(self, record):
        key = record.msg
        if isinstance(record.args, tuple) and record.args and isinstance(record.args[0], str):
            key = (record.msg, record.args[0])
        if key in self._kinds or len(self._kinds) < MAX_KINDS:
            return key
        # Full (strings from a peer must not grow the table): the format alone.
        if record.msg not in self._kinds:
            del self._kinds[next(iter(self._kinds))]
        return record.msg

    def filter(self, record):
        now = self.clock()
        key = self._key(record)
        kind = self._kinds.get(key)
        if kind is None or now - kind[0] >= self.period:
            kind = self._kinds[key] = [now, 0, kind[2] if kind else 0]
        if kind[1] >= self.burst:
            kind[2] += 1
            return False
        kind[1] += 1
        if kind[2]:
            record.msg = f"{record.msg} ({kind[2]} more like this left out)"
            kind[2] = 0
        return True


def backend_log():
    """The library's logger ("pyvmm.backend"), rate-limited once."""
    log = logging.getLogger("pyvmm.backend")
    if not any(isinstance(f, RateLimit) for f in log.filters):
        log.addFilter(RateLimit())
    return log
