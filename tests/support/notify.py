"""A real sd_notify receiver: an AF_UNIX datagram socket set as NOTIFY_SOCKET."""

from __future__ import annotations

import socket
import time
from pathlib import Path


class NotifyReceiver:
    def __init__(self, directory: Path):
        self.path = directory / "notify.sock"
        self.path.unlink(missing_ok=True)   # a predecessor's, in a restart test
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[tuple[float, dict[str, str]]] = []

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def poll(self, timeout: float) -> None:
        """Collect everything that arrives within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, value: str | None = None, timeout: float = 10.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for _, fields in self.messages[seen:]:
                if key in fields and (value is None or fields[key] == value):
                    return fields
            seen = len(self.messages)
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {key}={value} within {timeout}s; got {self.messages}")
            self.poll(min(0.2, deadline - time.monotonic()))

    def times_of(self, key: str) -> list[float]:
        return [t for t, fields in self.messages if key in fields]

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)
