"""HOST:PORT, the one address form both programs take (listen addresses, metrics)."""

from __future__ import annotations

import ipaddress


def parse_host_port(text: str, *, ephemeral_ok: bool = False) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) → (host, port); ValueError says what is wrong.

    Port 0 (let the kernel pick) only with ``ephemeral_ok``: fine for a program that
    reports where it bound, useless for an address someone else must find.
    """
    host, sep, port_text = text.rpartition(":") if isinstance(text, str) else ("", "", "")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit():
        raise ValueError(f"port {port_text!r} is not a number")
    port = int(port_text)
    if not (0 if ephemeral_ok else 1) <= port < 65536:
        raise ValueError(f"port {port} is out of range {0 if ephemeral_ok else 1}-65535")
    return host, port


def is_loopback_host(host: str) -> bool:
    """Only this host can reach ``host`` (127.0.0.0/8, ::1, localhost); other names count as remote."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
