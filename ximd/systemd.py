"""Talking to systemd: sd_notify messages and the watchdog's pacing.

The messages go through a systemd client library (ximd.sdbackend chooses:
python-systemd where installed, sdnotify otherwise). Without NOTIFY_SOCKET every
call is a no-op, so the daemon runs the same by hand. A notification never
blocks: when the manager's queue is full the line is dropped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from xim_proto.ratelimit import escape
from ximd import sdbackend

log = logging.getLogger(__name__)

# systemd shows a long STATUS= whole; this only bounds what a peer's words can make of it.
MAX_STATUS_CHARS = 2048


def status_value(text: str) -> str:
    """``text`` as the value of STATUS=: one line. A status line carries a router's words (a
    group's wait reason, a rejection) and the engine's; a newline in them would be read by
    systemd as more assignments of ximd's own (WATCHDOG=1, STOPPING=1, MAINPID=…)."""
    return escape(text, MAX_STATUS_CHARS)


class Notifier:
    """Sends state lines to the service manager's notification socket."""

    def __init__(self, sender: sdbackend.Sender | None, watchdog_usec: int | None = None):
        self.sender = sender
        self.watchdog_usec = watchdog_usec
        self._warned = False

    @classmethod
    def from_env(cls, backend: str | None = None) -> Notifier:
        """The notifier this process's environment asks for (both libraries read NOTIFY_SOCKET there)."""
        env = os.environ
        address = env.get("NOTIFY_SOCKET") or None
        usec = watchdog_usec_for_us(env)
        if address is None:
            return cls(None, usec)
        chosen = sdbackend.choose(backend)
        if chosen is None:
            # The unit will time out waiting for READY=1: say why, once, where it shows.
            what = f"{backend} is not installed" if backend else "neither python-systemd nor sdnotify is installed"
            log.error("NOTIFY_SOCKET is set but %s: systemd will not hear from ximd "
                      "(install python3-systemd, or pip install 'xerotier-agent[sdnotify]')", what)
            return cls(None, usec)
        return cls(sdbackend.sender(chosen, address), usec)

    @property
    def backend(self) -> str | None:
        return self.sender.name if self.sender is not None else None

    @property
    def enabled(self) -> bool:
        return self.sender is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2 / 1_000_000 if self.watchdog_usec else None

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *([f"STATUS={status_value(status)}"] if status else []), f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={status_value(text)}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more before systemd's start/stop timeout fires."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def reloading(self) -> None:
        self.send("RELOADING=1")

    def stopping(self, status: str | None = None) -> None:
        self.send("STOPPING=1", *([f"STATUS={status_value(status)}"] if status else []))

    def send(self, *lines: str) -> bool:
        if self.sender is None:
            return False
        try:
            self.sender.send("\n".join(lines))
            return True
        except OSError as exc:
            # Losing the manager's socket (or a full queue) must not take the daemon
            # down, but it is worth one clear line: the unit will look wrong from outside.
            if not self._warned:
                log.warning("cannot notify systemd (%s): %s", self.sender.name, exc)
                self._warned = True
            return False

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()


def watchdog_usec_for_us(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC when it is addressed to this process (WATCHDOG_PID unset or ours)."""
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec)


def under_systemd(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("INVOCATION_ID") or env.get("JOURNAL_STREAM"))
