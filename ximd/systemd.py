"""Talking to systemd: sd_notify messages and the watchdog's pacing.

Written against the protocol (sd_notify(3)) rather than a library so that it
works on every distribution's Python without a compiled dependency. Without
NOTIFY_SOCKET every call is a no-op, so the daemon runs the same by hand.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends state lines to the service manager's notification socket."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog_usec_for_us(env))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2 / 1_000_000 if self.watchdog_usec else None

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []), f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more before systemd's start/stop timeout fires."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def reloading(self) -> None:
        self.send("RELOADING=1")

    def stopping(self, status: str | None = None) -> None:
        self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        try:
            # Never block the event loop on the manager: a full queue drops the line.
            self._socket().sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, _sockaddr(self.address))
            return True
        except OSError as exc:
            # Losing the manager's socket must not take the daemon down, but it
            # is worth one clear line: the unit will look wrong from outside.
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
                self._warned = True
            return False

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_usec_for_us(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC when it is addressed to this process (WATCHDOG_PID unset or ours)."""
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec)


def _sockaddr(address: str) -> str | bytes:
    # "@name" is an abstract socket: a leading NUL on the wire.
    return b"\0" + address[1:].encode() if address.startswith("@") else address


def under_systemd(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("INVOCATION_ID") or env.get("JOURNAL_STREAM"))
