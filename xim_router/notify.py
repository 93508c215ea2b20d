"""sd_notify(3) for xim-router.service (Type=notify): READY=1 once it listens,
STOPPING=1 when it is told to stop, a STATUS= line for `systemctl status`.

Only what the router needs, written against the protocol: one datagram to
$NOTIFY_SOCKET. Without it (run by hand, in the tests) nothing is sent. The
router shares no code with ximd but xim_proto, whose notifier is ximd's own.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("xim_router")


def send(*lines: str, env: Mapping[str, str] = os.environ) -> bool:
    """Send ``lines`` to the service manager; False when there is none or it did not take them."""
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):             # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", env["NOTIFY_SOCKET"], exc)
        return False
    return True
