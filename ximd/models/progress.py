"""How a download's progress is measured and told: pure arithmetic and wording.

The same figures feed systemd's STATUS line, the journal's progress lines,
`ximd status` and `ximd model pull`, so they all say the same thing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ximd.units import GB

MB = 1000 ** 2
RATE_WINDOW_S = 20.0          # the rate is an average over this much recent time
# No rate (nor time left) until this much time has been measured: the partial file grows
# in 1 MiB steps, so a rate from the first seconds of a slow link is wildly off.
RATE_MIN_SPAN_S = 5.0
LOG_EVERY_FRACTION = 0.10     # a journal line at every 10 % ...
LOG_EVERY_S = 30.0            # ... or every 30 s, whichever comes first


@dataclass(frozen=True)
class Progress:
    model: str
    phase: str            # "downloading" or "verifying"
    done: int             # bytes
    total: int            # bytes
    rate: float | None    # bytes per second, None until measurable

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if not self.rate or self.rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / self.rate)

    def to_json(self) -> dict[str, object]:
        return {"model": self.model, "phase": self.phase, "done_bytes": self.done, "total_bytes": self.total,
                "bytes_per_s": round(self.rate) if self.rate else None,
                "eta_s": round(self.eta_s) if self.eta_s is not None else None}


def amount_text(done: int, total: int) -> str:
    """``6.2 of 16.1 GB``; megabytes for models under a gigabyte."""
    unit, name = (GB, "GB") if total >= GB else (MB, "MB")
    return f"{done / unit:.1f} of {total / unit:.1f} {name}"


def rate_text(rate: float | None) -> str:
    if rate is None:
        return "measuring speed"
    if rate >= MB:
        return f"{rate / MB:.0f} MB/s"
    return f"{rate / 1000:.0f} kB/s"


def time_left_text(seconds: float | None) -> str:
    if seconds is None:
        return "time left unknown"
    if seconds < 60:
        return f"about {max(1, round(seconds))} s left"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"about {minutes} min left"
    return f"about {minutes // 60} h {minutes % 60} min left"


def progress_line(p: Progress) -> str:
    """``downloading org/model: 6.2 of 16.1 GB, 48 MB/s, about 3 min left``."""
    return f"{p.phase} {p.model}: {amount_text(p.done, p.total)}, {rate_text(p.rate)}, {time_left_text(p.eta_s)}"


def log_line(p: Progress) -> str:
    """The journal's version: the percentage first, for a reader scanning many lines."""
    return f"{p.phase} {p.model}: {p.fraction:.0%} ({amount_text(p.done, p.total)}), " \
           f"{rate_text(p.rate)}, {time_left_text(p.eta_s)}"


class RateMeter:
    """Bytes per second over the last RATE_WINDOW_S of samples."""

    def __init__(self, window_s: float = RATE_WINDOW_S):
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> float | None:
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        first_t, first_done = self._samples[0]
        if now - first_t < RATE_MIN_SPAN_S:
            return None
        return max(0.0, (done - first_done) / (now - first_t))


class LogPacer:
    """Whether a progress line is due: a new tenth reached, or LOG_EVERY_S since the last line."""

    def __init__(self, every_fraction: float = LOG_EVERY_FRACTION, every_s: float = LOG_EVERY_S):
        self.every_fraction = every_fraction
        self.every_s = every_s
        self._last_step = -1
        self._last_at: float | None = None

    def due(self, fraction: float, now: float) -> bool:
        step = int(fraction / self.every_fraction + 1e-9)
        if step > self._last_step or self._last_at is None or now - self._last_at >= self.every_s:
            self._last_step = max(step, self._last_step)
            self._last_at = now
            return True
        return False


class StallWatch:
    """Whether bytes arrived recently: the start timeout is extended only then, so a
    download that stops making progress still meets systemd's timeout."""

    def __init__(self, stall_s: float):
        self.stall_s = stall_s
        self._last_done = -1
        self._last_change: float | None = None

    def moving(self, done: int, now: float) -> bool:
        if done != self._last_done or self._last_change is None:
            self._last_done = done
            self._last_change = now
        return now - self._last_change < self.stall_s
