"""A CURVE client that only tells how its handshake with a router ended."""

from __future__ import annotations

import time

import zmq
from zmq.utils.monitor import recv_monitor_message

HANDSHAKE_OUTCOMES = {zmq.EVENT_HANDSHAKE_SUCCEEDED: "succeeded",
                      zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed",
                      zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "failed",
                      zmq.EVENT_HANDSHAKE_FAILED_AUTH: "failed"}


def handshake_outcome(endpoint: str, server_public: str, client: tuple[bytes, bytes],
                      refused_by_server=lambda: False, timeout_s: float = 30.0) -> str:
    """Connect a CURVE DEALER and report how its first handshake ended.

    "failed" when the client saw the handshake fail or ``refused_by_server()``
    turned true first (libzmq does not always tell the client it was refused).
    """
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_serverkey = server_public.encode()
    sock.curve_publickey, sock.curve_secretkey = client
    monitor = sock.get_monitor_socket()
    try:
        sock.connect(endpoint)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if monitor.poll(100):
                event = recv_monitor_message(monitor)["event"]
                if event in HANDSHAKE_OUTCOMES:
                    return HANDSHAKE_OUTCOMES[event]
            elif refused_by_server():
                return "failed"
        return "no outcome"
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
