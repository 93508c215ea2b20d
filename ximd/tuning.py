"""Kernel socket-buffer limits: read, compare, explain. Never write.

ZeroMQ asks for 4 MiB send/receive buffers; Linux silently caps them at
net.core.{r,w}mem_max (212992 by default). The package ships a sysctl
drop-in and applies it; the daemon runs under ProtectKernelTunables and only
verifies, saying exactly how to fix a shortfall.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SYSCTL_DROPIN = "/usr/lib/sysctl.d/60-xerotier-agent.conf"
SOCKET_BUFFER_KEYS = ("net.core.rmem_max", "net.core.wmem_max")


@dataclass(frozen=True)
class SysctlReading:
    key: str
    value: int | None     # None when unreadable (e.g. a container hiding it)
    required: int

    @property
    def ok(self) -> bool:
        return self.value is not None and self.value >= self.required


def sysctl_path(key: str, proc_sys: Path) -> Path:
    return proc_sys / key.replace(".", "/")


def read_sysctl(key: str, proc_sys: Path = Path("/proc/sys")) -> int | None:
    try:
        return int(sysctl_path(key, proc_sys).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def check_socket_buffers(required: int, proc_sys: Path = Path("/proc/sys")) -> list[SysctlReading]:
    return [SysctlReading(key, read_sysctl(key, proc_sys), required) for key in SOCKET_BUFFER_KEYS]


def explain(readings: list[SysctlReading]) -> str | None:
    """One warning with the exact fix, or None when every limit is high enough."""
    short = [r for r in readings if not r.ok]
    if not short:
        return None
    found = ", ".join(f"{r.key}={'unreadable' if r.value is None else r.value}" for r in short)
    required = short[0].required
    sets = " ".join(f"{r.key}={required}" for r in short)
    return (f"kernel socket buffer limits are below {required} bytes ({found}); ZeroMQ's 4 MiB "
            f"buffers will be capped silently, slowing large streams. Fix: `sudo sysctl --system` "
            f"applies {SYSCTL_DROPIN}, or `sudo sysctl -w {sets}` for this boot.")


def describe(readings: list[SysctlReading]) -> str:
    return ", ".join(f"{r.key}={r.value}" for r in readings)
