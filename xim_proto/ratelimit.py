"""What a peer may cost us in log lines and work: escaped, rate-limited log lines; token buckets.

A peer must not be able to flood the journal, forge lines in it or drive the
operator's terminal, nor buy unbounded work with frames nobody asked for.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

# C0 and C1 controls, DEL, the Unicode line/paragraph separators and the bidi
# overrides and isolates ("Trojan Source"): what can end a log line, move the
# cursor, recolour or retitle a terminal, or make text read other than it is.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(text: str, limit: int = 200) -> str:
    """``text`` from a peer, safe inside one log line: controls as ``\\xNN``, at most ``limit``
    characters of it (then its length, so a truncated value is seen as one)."""
    shown = _UNSAFE.sub(_escaped, text[:limit])
    if len(text) > limit:
        shown += f"… ({len(text)} characters)"
    return shown


class RateLimitedLog:
    """Log the first of a kind of event, then at most one line per ``interval_s``.

    A peer that sends garbage in a loop must not flood the journal; the line
    that does get through says how many were suppressed since the last one.
    """

    def __init__(self, log: logging.Logger, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.log = log
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, level: int, key: str, msg: str, *args: object) -> bool:
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        suppressed = self._suppressed.pop(key, 0)
        self._last[key] = now
        if suppressed:
            msg += f" ({suppressed} more like it suppressed)"
        self.log.log(level, msg, *args)
        return True


class TokenBucket:
    """``rate`` events per second on average, ``burst`` of them at once."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        """Spend one token: True when there was one (the event may go ahead)."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
