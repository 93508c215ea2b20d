"""ZeroMQ socket settings both ends of the link share, and the checks around them.

The agent (ximd.mesh.link) and the router (xim_router.mesh) apply the same
options so that the limits in docs/protocol.md §4.1 hold in both directions.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import zmq

from xim_proto.codec import MAX_FRAME_BYTES

# Socket buffers the design asks for (4 MiB). The kernel silently caps a
# SO_SNDBUF/SO_RCVBUF request at net.core.wmem_max/rmem_max.
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024

# What libzmq may queue for one peer in each direction before it pushes back
# (stops reading that peer's TCP connection, or refuses our send with EAGAIN).
# High-water marks count messages, so the byte bound is HWM x MAXMSGSIZE: 64
# frames of the 1 MiB limit. Credits keep real queues far shorter; this bounds
# what a peer that floods us, or stops reading, can pin in our memory.
PEER_QUEUE_BYTES = 64 * MAX_FRAME_BYTES
HIGH_WATER_MARK = PEER_QUEUE_BYTES // MAX_FRAME_BYTES

# Frames an Outbox holds in Python while the socket pushes back (the sender's own
# memory; the link waits for room beyond it).
OUTBOX_LIMIT = 10_000

# ZMTP heartbeats notice a peer that vanished without closing TCP (power
# loss, cable) long before the application lease would.
HEARTBEAT_IVL_MS = 2_000
HEARTBEAT_TIMEOUT_MS = 6_000

# A process that wakes this much later than it asked to was not running (a frozen VM,
# SIGSTOP, heavy swapping). Its peer's frames of that time wait in its socket, so the
# silence is its own: lease clocks move on by the pause instead of ending the session.
PAUSE_THRESHOLD_S = 1.0


def paused_for(wake_at: float | None, now: float) -> float:
    """How long past ``wake_at`` this process woke up, when that was a pause; else 0."""
    if wake_at is None:
        return 0.0
    late = now - wake_at
    return late if late > PAUSE_THRESHOLD_S else 0.0


def apply_common_options(sock: zmq.Socket, *, buffer_bytes: int = SOCKET_BUFFER_BYTES) -> None:
    """Options both the agent's DEALER and the router's ROUTER carry (set before connect/bind)."""
    sock.setsockopt(zmq.SNDBUF, buffer_bytes)
    sock.setsockopt(zmq.RCVBUF, buffer_bytes)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.LINGER, 0)


@dataclass(frozen=True)
class BufferCheck:
    requested: int
    send: int          # what the kernel grants a TCP socket here
    receive: int

    @property
    def capped(self) -> bool:
        return self.send < self.requested or self.receive < self.requested

    def describe(self) -> str:
        text = (f"socket buffers: asked {self.requested} bytes, the kernel grants "
                f"send {self.send}, receive {self.receive}")
        if self.capped:
            text += (" (capped by net.core.wmem_max / net.core.rmem_max; raise both to "
                     f"{self.requested}, e.g. with the package's sysctl drop-in "
                     "/usr/lib/sysctl.d/60-xerotier-agent.conf)")
        return text


def granted_buffer(requested: int, reported: int) -> int:
    """What a SO_*BUF request really got: Linux reports twice the usable size."""
    return min(requested, reported // 2)


def check_socket_buffers(requested: int = SOCKET_BUFFER_BYTES) -> BufferCheck:
    """Ask the kernel for ``requested``-byte TCP buffers and read back what it granted.

    ZeroMQ does not expose its TCP sockets, and getsockopt(ZMQ_SNDBUF) only
    echoes the option, so a probe socket in the same network namespace shows
    what ZeroMQ's own setsockopt() gets. Changes no sysctl.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, requested)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, requested)
        send = probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        receive = probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return BufferCheck(requested, granted_buffer(requested, send), granted_buffer(requested, receive))


def log_socket_buffers(log: logging.Logger, requested: int = SOCKET_BUFFER_BYTES) -> BufferCheck:
    check = check_socket_buffers(requested)
    (log.warning if check.capped else log.info)(check.describe())
    return check


# Monitor events worth a log line, by name (pyzmq 24 has every one of these).
MONITOR_EVENTS = {
    getattr(zmq, name): name[6:].lower()
    for name in ("EVENT_CONNECTED", "EVENT_ACCEPTED", "EVENT_DISCONNECTED", "EVENT_CLOSED",
                 "EVENT_HANDSHAKE_SUCCEEDED", "EVENT_HANDSHAKE_FAILED_NO_DETAIL",
                 "EVENT_HANDSHAKE_FAILED_PROTOCOL", "EVENT_HANDSHAKE_FAILED_AUTH",
                 "EVENT_CONNECT_RETRIED", "EVENT_MONITOR_STOPPED")
}


class ReadyWatch:
    """Wake one coroutine when any of some ZeroMQ sockets may have work.

    Cheaper than zmq.asyncio's pollers, which register and unregister every
    socket with the event loop on each call: here each socket's ZMQ_FD is
    registered once. ZMQ_FD is edge-triggered and any operation on a socket
    may consume its edge, so code that sends on a watched socket calls poke()
    afterwards, and the waiter always re-checks readable() after waking.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *sockets: zmq.Socket):
        self._loop = loop
        self._event = asyncio.Event()
        self._fds: list[int] = [cast(int, s.getsockopt(zmq.FD)) for s in sockets]
        for fd in self._fds:
            loop.add_reader(fd, self._event.set)

    def poke(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    async def wait(self, timeout_s: float | None) -> None:
        """Until poked, a socket FD fires, or ``timeout_s`` passes (None: no limit)."""
        handle = self._loop.call_later(max(0.0, timeout_s), self._event.set) if timeout_s is not None else None
        try:
            await self._event.wait()
        finally:
            if handle is not None:
                handle.cancel()

    def close(self) -> None:
        for fd in self._fds:
            self._loop.remove_reader(fd)
        self._fds = []


_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
_DONTWAIT = int(zmq.DONTWAIT)


def readable(sock: zmq.Socket) -> bool:
    # ZMQ_EVENTS is an int option; no cast() in the hot path just to say so.
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)  # type: ignore[operator]


# The shortest time between two bursts of frames on one socket (see Outbox).
FLUSH_INTERVAL_S = 0.002


def flush_delay(last_flush: float, now: float, interval_s: float = FLUSH_INTERVAL_S) -> float:
    """How long a new frame waits: nothing on a link idle for ``interval_s``, else
    until that long after the last burst."""
    return max(0.0, last_flush + interval_s - now)


# Packs a burst of frames (more than one, in order) into ZeroMQ messages, each with the
# number of frames it carries: codec.batched, when the peer reads batches.
Pack = Callable[[list[bytes]], Iterable[tuple[bytes, int]]]


class Outbox:
    """Frames for one socket, sent in bursts at most every ``interval_s``.

    A zmq send that finds libzmq's I/O thread idle wakes it, and each wake-up is a
    system call and a context switch here, then one more in the router. One token
    per frame per stream made that most of ximd's CPU per token; now an idle link
    sends a frame at once and a busy one sends what gathered since its last burst
    together (docs/performance.md: about a fifth less CPU per token in ximd and the
    router under load). What someone waits for goes at once (``urgent``).

    With ``pack`` (a peer that reads ``batch`` frames, protocol revision 1.3) a burst
    of several frames leaves as one ZeroMQ message, or as few as the frame limit allows:
    one send, one CURVE box and one receive in the router instead of one per frame.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket, after_send: Callable[[], None],
                 *, interval_s: float = FLUSH_INTERVAL_S, limit: int = OUTBOX_LIMIT, pack: Pack | None = None):
        self._loop, self._sock, self._after_send = loop, sock, after_send
        self.interval_s, self.limit = interval_s, limit
        self._pack = pack
        self._frames: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._last_flush = -math.inf

    def full(self) -> bool:
        return len(self._frames) >= self.limit

    def put(self, frame: bytes, *, urgent: bool = False) -> None:
        """Queue ``frame``; an urgent one goes at once, with what gathered before it."""
        self._frames.append(frame)
        if urgent:
            self.flush()
        elif self._timer is None:
            delay = flush_delay(self._last_flush, self._loop.time(), self.interval_s)
            if delay:
                self._timer = self._loop.call_later(delay, self.flush)
            else:
                self.flush()

    def flush(self) -> None:
        self._cancel_timer()
        self._last_flush = self._loop.time()
        frames, sent = self._frames, 0
        messages = self._pack(frames) if self._pack is not None and len(frames) > 1 else \
            ((frame, 1) for frame in frames)
        try:
            for message, carried in messages:
                self._sock.send(message, _DONTWAIT)
                sent += carried
        except zmq.Again:                # the peer stopped reading: the rest waits for room
            self._timer = self._loop.call_later(self.interval_s, self.flush)
        except zmq.ZMQError:             # the socket is gone with its session: so are its frames
            sent = len(self._frames)
        del self._frames[:sent]
        self._after_send()

    def close(self) -> None:
        """Drop what is left: a new session never replays an old one's frames."""
        self._cancel_timer()
        self._frames.clear()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
