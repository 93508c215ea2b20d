"""The agent's end of the mesh: a CURVE DEALER that keeps a session with the router.

One socket per session (docs/protocol.md §8): connect, hello, welcome, leases
every few seconds, and on any loss a fresh socket after a backoff with
jitter. A fresh socket per session means nothing queued for a router that
went away is replayed to the next one before its hello.

The agent owns a MeshLink and gives it callbacks: what hello and each lease
carry, where the router's requests go, and who hears about state changes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import zmq
from zmq.utils.monitor import parse_monitor_message

from xim_proto import codec, transport
from xim_proto.ratelimit import RateLimitedLog, escape
from ximd import __version__
from ximd.identity import EnrollmentError, EnrollmentRejected, Identity, TokenRefresher
from ximd.mesh.report import HelloInfo, LeaseInfo
from ximd.mesh.state import LinkState

log = logging.getLogger("ximd.mesh")

# What the link itself supports (docs/protocol.md §5.2): hello offers these, and batches
# (revision 1.3) are sent only to a router whose welcome offers them too.
CAPABILITIES = ["credit", "cancel", "drain", "coalesce", codec.BATCH]

# Rejections that no retry can fix: the node waits for a new identity.
FINAL_REJECTIONS = {"revoked", "unsupported_version"}
# Rejections a token refresh may fix.
TOKEN_REJECTIONS = {"token_expired", "unauthorized"}

_WATCHED_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                   | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                   | zmq.EVENT_DISCONNECTED)


# Length of the random routing id of each connection (docs/protocol.md §4.1).
ROUTING_ID_BYTES = 16
# How long close() waits for the router to answer its bye.
BYE_ANSWER_TIMEOUT_S = 2.0

# What the node accepts of welcome's lease timing (docs/protocol.md §8, §9). The router
# chooses, but a hostile or broken one must not make the node spin on leases (an interval
# of 0) or never notice its silence (a timeout of 0, NaN or 10**12).
LEASE_INTERVAL_RANGE_S = (0.1, 60.0)
LEASE_TIMEOUT_RANGE_S = (1.0, 300.0)
DEFAULT_LEASE_TIMEOUT_S = 15.0          # for a timeout that is not a number
# Plain ints: pyzmq's enum flags cost a conversion on every call in the hot path.
_DONTWAIT = int(zmq.DONTWAIT)
_RCVMORE = int(zmq.RCVMORE)


def new_routing_id() -> bytes:
    """16 random bytes. Not left to libzmq, whose own ids are a counter any peer can predict."""
    return secrets.token_bytes(ROUTING_ID_BYTES)


def is_mid_stream(msg: codec.Message) -> bool:
    """Only the chunks after a stream's first may wait for the next burst: a first token,
    an answer, a refusal, a lease or a bye is something somebody is waiting for."""
    return isinstance(msg, codec.Chunk) and msg.seq > 0


@dataclass(frozen=True)
class LeaseTiming:
    """The session's lease timing as the node applies it."""

    interval_s: float          # how often the node sends a lease
    timeout_s: float           # router silence after which the node ends the session


def _clamp(value: float, bounds: tuple[float, float], fallback: float) -> float:
    if math.isnan(value):
        return fallback
    return min(max(value, bounds[0]), bounds[1])


def lease_timing(own_interval_s: float, welcome: codec.Welcome) -> LeaseTiming:
    """Welcome's timing within LEASE_*_RANGE_S; the node never leases less often than its own interval.

    The router acknowledges each lease, so its silence is judged against at least two
    intervals: a shorter timeout would end every session between two acks.
    """
    interval = min(own_interval_s, _clamp(welcome.lease_interval_s, LEASE_INTERVAL_RANGE_S, own_interval_s))
    timeout = _clamp(welcome.lease_timeout_s, LEASE_TIMEOUT_RANGE_S, DEFAULT_LEASE_TIMEOUT_S)
    return LeaseTiming(interval, min(max(timeout, 2 * interval), LEASE_TIMEOUT_RANGE_S[1]))


class LinkDown(Exception):
    """send() while there is no session with the router."""


@dataclass
class Backoff:
    """Exponential backoff with jitter: each delay is uniform in [d/2, d], d doubling to ``maximum``.

    The jitter spreads a fleet's reconnects after a router restart.
    """

    initial: float = 0.5
    maximum: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * (2 ** self.attempt))
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True)
class Renewed:
    """The enrollment API issued a new token; the link holds the new identity."""


@dataclass(frozen=True)
class RefusedForGood:
    """The enrollment API refused this node (revoked, unknown): no retry helps."""

    code: str
    message: str


@dataclass(frozen=True)
class FailedForNow:
    """The enrollment API could not be asked (network, server error): try again later."""

    error: EnrollmentError


TokenRefresh = Renewed | RefusedForGood | FailedForNow


@dataclass(frozen=True)
class SessionEnd:
    detail: str
    final: bool = False             # stop trying: rejected for good
    was_connected: bool = False     # the session got a welcome (resets the backoff)
    retry_now: bool = False         # e.g. a token was just refreshed


class MeshLink:
    def __init__(self, identity: Identity, *, hello_info: Callable[[], HelloInfo],
                 lease_info: Callable[[], LeaseInfo],
                 on_message: Callable[[codec.Message], Awaitable[None]],
                 on_state: Callable[[LinkState, str], None], lease_interval: float = 5.0,
                 token_refresher: TokenRefresher | None = None,
                 token_refresh_margin_s: float = 600.0, handshake_timeout_s: float = 10.0,
                 backoff: Backoff | None = None,
                 socket_buffer_bytes: int = transport.SOCKET_BUFFER_BYTES):
        self.identity = identity
        self.socket_buffer_bytes = socket_buffer_bytes    # tuning.socket_buffer_bytes
        self.hello_info = hello_info
        self.lease_info = lease_info
        self.on_message = on_message
        self.on_state = on_state
        self.lease_interval = lease_interval
        self.token_refresher = token_refresher
        self.token_refresh_margin_s = token_refresh_margin_s
        self.handshake_timeout_s = handshake_timeout_s
        self.backoff = backoff or Backoff()
        self.state = LinkState.DISCONNECTED
        self.state_detail = "not started"
        self.welcome: codec.Welcome | None = None
        self.lease_timing: LeaseTiming | None = None    # set from each welcome
        self.endpoint = ""
        self.last_lease_ack_at: float | None = None     # wall clock
        self.connected_since: float | None = None
        self.malformed_dropped = 0
        self._seq = 0
        self._version = codec.PROTOCOL_VERSION
        self._offered: list[str] = []                   # the capabilities of this session's hello
        self._sock: zmq.Socket | None = None            # set while a session is connected
        self._outbox: transport.Outbox | None = None    # likewise: what send() queues
        self._watch: transport.ReadyWatch | None = None
        self._closing = False
        self._stop = asyncio.Event()
        self._refreshing: asyncio.Task | None = None
        self._drain_acked: asyncio.Future | None = None
        self._bye_answered: asyncio.Future | None = None
        self._limited = RateLimitedLog(log, interval_s=10.0)
        self._lease_soon = False                        # lease_soon(): the next lease goes now

    # ------------------------------------------------------------ public

    async def run(self) -> None:
        """Keep a session with the router until close() or a final rejection."""
        # Plain (not zmq.asyncio) sockets: one reader per socket is registered
        # with the event loop for the whole session (transport.ReadyWatch),
        # which costs far less per message than zmq.asyncio's pollers.
        ctx = zmq.Context()
        transport.log_socket_buffers(log, self.socket_buffer_bytes)
        try:
            attempt = 0
            while not self._closing:
                endpoint = self.identity.mesh_endpoints[attempt % len(self.identity.mesh_endpoints)]
                attempt += 1
                end = await self._session(ctx, endpoint)
                if end.final:
                    self._set_state(LinkState.REJECTED, end.detail)
                    return
                if self._closing:
                    break
                if end.was_connected or end.retry_now:
                    self.backoff.reset()
                delay = 0.05 if end.retry_now else self.backoff.next()
                self._set_state(LinkState.DISCONNECTED, f"{end.detail}; retrying in {delay:.1f} s")
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)   # close() ends the wait
                except TimeoutError:
                    pass
            self._set_state(LinkState.DISCONNECTED, "link closed")
        finally:
            if self._refreshing:
                self._refreshing.cancel()
            ctx.term()

    async def send(self, msg: codec.Message) -> None:
        """Queue for the router (transport.Outbox); LinkDown when there is no session."""
        outbox = self._session_outbox()
        frame = codec.encode(msg, version=self._version)
        while outbox.full():                    # the router is not reading: wait for room
            await asyncio.sleep(0.001)
            if self._outbox is not outbox:
                raise LinkDown("the link went down while waiting to send")
        outbox.put(frame, urgent=not is_mid_stream(msg))

    def try_send(self, msg: codec.Message) -> bool:
        """send() if it would not wait: False, and nothing queued, while the outbox is full.

        For callers that cannot wait where they are (the bridge relays a streamed answer
        in the engine connection's read callback); LinkDown when there is no session.
        """
        outbox = self._session_outbox()
        if outbox.full():
            return False
        outbox.put(codec.encode(msg, version=self._version), urgent=not is_mid_stream(msg))
        return True

    def _session_outbox(self) -> transport.Outbox:
        outbox = self._outbox
        if self.state != LinkState.CONNECTED or outbox is None:
            raise LinkDown(f"no session with the router ({self.state.value})")
        return outbox

    def lease_soon(self) -> None:
        """Send the next lease now rather than at its interval: what it reports changed (a
        group's part), and the router acts on it."""
        self._lease_soon = True
        if self._watch is not None:
            self._watch.poke()

    async def drain(self, reason: str, timeout_s: float = 5.0) -> bool:
        """Ask the router to send no more requests; True once it acknowledged."""
        self._drain_acked = asyncio.get_running_loop().create_future()
        try:
            await self.send(codec.Drain(reason=reason))
            await asyncio.wait_for(asyncio.shield(self._drain_acked), timeout_s)
            return True
        except (TimeoutError, LinkDown):
            return False

    async def close(self, answer_timeout_s: float = BYE_ANSWER_TIMEOUT_S) -> None:
        """Say bye, give the router a moment to answer it, and stop run().

        The router answers once it has read everything sent before the bye. Closing
        sooner lets TCP reset the connection under frames still on their way (the
        last chunks of a drained stream) when the router's own frames arrive late.
        """
        if self.state == LinkState.CONNECTED and self._sock is not None:
            self._bye_answered = asyncio.get_running_loop().create_future()
            try:
                await self.send(codec.Bye(reason="agent stopping"))
                await asyncio.wait_for(asyncio.shield(self._bye_answered), answer_timeout_s)
            except (TimeoutError, LinkDown, codec.ProtocolError):
                pass                     # no answer (an older or vanished router): close anyway
        self._closing = True
        self._stop.set()
        if self._watch is not None:
            self._watch.poke()

    # ------------------------------------------------------------ state

    def _set_state(self, state: LinkState, detail: str) -> None:
        changed = state != self.state
        self.state, self.state_detail = state, detail
        if state == LinkState.CONNECTED:
            self.connected_since = time.time()
        if changed:
            level = {LinkState.CONNECTED: logging.INFO, LinkState.REJECTED: logging.ERROR,
                     LinkState.CONNECTING: logging.INFO}.get(state, logging.WARNING)
            log.log(level, "mesh link %s: %s", state.value, detail,
                    extra={"fields": {"XIM_LINK_STATE": state.value}})
        try:
            self.on_state(state, detail)
        except Exception:
            log.exception("on_state callback failed")

    # ------------------------------------------------------------ one session

    def _socket(self, ctx: zmq.Context, endpoint: str) -> tuple[zmq.Socket, zmq.Socket]:
        sock = ctx.socket(zmq.DEALER)
        transport.apply_common_options(sock, buffer_bytes=self.socket_buffer_bytes)
        # A fresh unguessable routing id per connection, never the worker id: the router
        # addresses the connection its authenticated hello came on, and an address another
        # node could guess is one it could claim once this connection drops (§4.1).
        sock.setsockopt(zmq.ROUTING_ID, new_routing_id())
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.identity.router_public_key.encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.identity.agent_public_key.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.identity.agent_secret_key.encode())
        # While the TCP connection cannot be made, libzmq retries on its own
        # with a doubling interval plus random jitter, up to the maximum.
        sock.setsockopt(zmq.RECONNECT_IVL, 500)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(self.backoff.maximum * 1000))
        monitor = sock.get_monitor_socket(events=_WATCHED_EVENTS)
        sock.connect(endpoint)
        return sock, monitor

    def _hello(self) -> codec.Hello:
        info = self.hello_info()
        return codec.Hello(
            token=self.identity.token, versions=list(codec.PROTOCOL_VERSIONS), agent_version=__version__,
            hostname=info.hostname or socket.gethostname(), capabilities=[*CAPABILITIES, *info.capabilities],
            hardware=dict(info.hardware), models=list(info.models), max_concurrent=info.max_concurrent)

    def _lease(self) -> codec.Lease:
        info = self.lease_info()
        self._seq += 1
        return codec.Lease(
            seq=self._seq, running=info.running, waiting=info.waiting, kv_cache_usage=info.kv_cache_usage,
            engine_state=info.engine_state, models=list(info.models), in_flight=list(info.in_flight),
            max_concurrent=info.max_concurrent, draining=info.draining, group=info.group)

    async def _session(self, ctx: zmq.Context, endpoint: str) -> SessionEnd:
        self.endpoint = endpoint
        self._version = codec.PROTOCOL_VERSION
        end = await self._refresh_if_due()
        if end is not None:
            return end
        sock, monitor = self._socket(ctx, endpoint)
        watch = transport.ReadyWatch(asyncio.get_running_loop(), sock, monitor)
        self._watch = watch
        self._set_state(LinkState.CONNECTING, f"connecting to {endpoint}")
        try:
            try:
                hello = self._hello()
                self._offered = hello.capabilities
                sock.send(codec.encode(hello), _DONTWAIT)    # queued until connected
            except (KeyError, TypeError, ValueError, codec.ProtocolError) as exc:
                return SessionEnd(f"cannot build hello: {exc}")
            return await self._session_loop(sock, monitor, watch)
        finally:
            if self._outbox is not None:
                self._outbox.close()
            self._outbox = None
            self._sock = None
            self._watch = None
            watch.close()
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            self.welcome = None

    async def _session_loop(self, sock: zmq.Socket, monitor: zmq.Socket,
                            watch: transport.ReadyWatch) -> SessionEnd:
        welcome_deadline = None          # set once the CURVE handshake succeeded
        lease_timeout = None
        next_lease = last_rx = 0.0
        interval = self.lease_interval
        while not self._closing:
            watch.clear()                # before looking: a later edge wakes the wait below
            now = time.monotonic()
            if transport.readable(monitor):
                end = await self._on_monitor(monitor, welcome_deadline is not None)
                if isinstance(end, SessionEnd):
                    return end
                if end == "handshake":
                    welcome_deadline = now + self.handshake_timeout_s
            while transport.readable(sock):
                frames = [sock.recv(_DONTWAIT)]
                while sock.getsockopt(_RCVMORE):
                    frames.append(sock.recv())
                last_rx = now
                msg = self._decode(frames)
                if msg is None:
                    continue
                if isinstance(msg, codec.Welcome) and self.state != LinkState.CONNECTED:
                    self._on_welcome(sock, msg)
                    welcome_deadline = None
                    interval, lease_timeout = self._apply_lease_timing(msg)
                    next_lease = now
                    continue
                end = await self._on_router_message(msg)
                if end is not None:
                    return end
            if welcome_deadline and now > welcome_deadline:
                return SessionEnd(f"no welcome from {self.endpoint} within "
                                  f"{self.handshake_timeout_s:.0f} s")
            if lease_timeout and now - last_rx > lease_timeout:
                return SessionEnd(f"no answer from the router for {now - last_rx:.0f} s",
                                  was_connected=True)
            if self.state == LinkState.CONNECTED and (now >= next_lease or self._lease_soon):
                next_lease = now + interval
                self._lease_soon = False
                await self._send_lease()
                continue                 # sending may have hidden a readable edge: look again
            deadlines = [d for d in (welcome_deadline, next_lease if self.state == LinkState.CONNECTED else None,
                                     last_rx + lease_timeout if lease_timeout else None) if d]
            wake_at = min(deadlines) if deadlines else None
            await watch.wait(wake_at - time.monotonic() if wake_at else None)
            paused = transport.paused_for(wake_at, time.monotonic())
            if paused:                   # our own stall, not the router's silence
                log.warning("ximd did not run for %.1f s (host paused or overloaded); "
                            "the router's lease clock moved on by that much", paused)
                last_rx += paused
        return SessionEnd("link closed", was_connected=self.state == LinkState.CONNECTED)

    def _on_welcome(self, sock: zmq.Socket, welcome: codec.Welcome) -> None:
        self.welcome = welcome
        self._version = welcome.version
        self._sock = sock
        watch = self._watch

        def after_send() -> None:
            if watch is not None and transport.readable(sock):
                watch.poke()             # sending consumed the FD edge of pending input
        # Several frames per message only when both sides offered it (revision 1.3): an
        # older router reads one frame per message.
        batches = codec.BATCH in self._offered and codec.BATCH in welcome.capabilities
        pack = functools.partial(codec.batched, version=welcome.version) if batches else None
        self._outbox = transport.Outbox(asyncio.get_running_loop(), sock, after_send, pack=pack)
        self._set_state(LinkState.CONNECTED, f"session {welcome.session} with {self.endpoint} "
                                   f"(router {welcome.router_version}, protocol v{welcome.version}"
                                   f"{', batches' if batches else ''})")

    def _apply_lease_timing(self, welcome: codec.Welcome) -> tuple[float, float]:
        timing = self.lease_timing = lease_timing(self.lease_interval, welcome)
        asked = (welcome.lease_interval_s, welcome.lease_timeout_s)
        if not (LEASE_INTERVAL_RANGE_S[0] <= asked[0] <= LEASE_INTERVAL_RANGE_S[1]
                and LEASE_TIMEOUT_RANGE_S[0] <= asked[1] <= LEASE_TIMEOUT_RANGE_S[1]):   # NaN too
            log.warning("the router asked for lease_interval_s=%r, lease_timeout_s=%r; using "
                        "%.1f s and %.1f s (the node accepts %s s and %s s)",
                        welcome.lease_interval_s, welcome.lease_timeout_s, timing.interval_s,
                        timing.timeout_s, "–".join(map(str, LEASE_INTERVAL_RANGE_S)),
                        "–".join(map(str, LEASE_TIMEOUT_RANGE_S)))
        return timing.interval_s, timing.timeout_s

    async def _send_lease(self) -> None:
        try:
            lease = self._lease()
        except Exception:
            log.exception("lease_info callback failed; lease skipped")
            return
        try:
            await self.send(lease)
        except (LinkDown, codec.ProtocolError) as exc:
            log.warning("lease not sent: %s", exc)
        if self.identity.token_expires_at - time.time() < self.token_refresh_margin_s \
                and self.token_refresher and not self._refreshing:
            self._refreshing = asyncio.ensure_future(self._refresh_in_background(self.token_refresher))

    def _decode(self, frames: list[bytes]) -> codec.Message | None:
        if len(frames) != 1:
            detail = f"{len(frames)} frame parts, expected 1"
        else:
            try:
                return codec.decode(frames[0], sender=codec.ROUTER)
            except codec.ProtocolError as exc:
                detail = str(exc)
        self.malformed_dropped += 1
        self._limited(logging.WARNING, "malformed", "dropped a malformed frame from the router: %s",
                      detail)
        return None

    async def _on_monitor(self, monitor: zmq.Socket, transport_up: bool) -> SessionEnd | Literal["handshake"] | None:
        """Read every pending monitor event: a SessionEnd, "handshake" when the CURVE
        handshake completed, or None."""
        result: Literal["handshake"] | None = None
        while True:
            try:
                event = parse_monitor_message(monitor.recv_multipart(_DONTWAIT))
            except zmq.Again:
                return result
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                result, transport_up = "handshake", True
            elif kind == zmq.EVENT_DISCONNECTED and (transport_up or self.state == LinkState.CONNECTED):
                return SessionEnd(f"connection to {self.endpoint} lost",
                                  was_connected=self.state == LinkState.CONNECTED)
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return await self._auth_failed()
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                return SessionEnd(f"CURVE handshake with {self.endpoint} failed: the router's "
                                  "public key may not match the one from enrollment")

    async def _auth_failed(self) -> SessionEnd:
        """The router refused our CURVE key: ask the enrollment API whether we still exist."""
        detail = f"the router at {self.endpoint} refused this node's CURVE key"
        if self.token_refresher is None:
            return SessionEnd(detail)
        match await self._refresh_token(self.token_refresher):
            case RefusedForGood(code, message):
                return SessionEnd(f"{detail}: {message} ({code})", final=True)
            case FailedForNow(error):
                return SessionEnd(f"{detail}; could not ask why: {error}")
        return SessionEnd(detail)

    async def _on_router_message(self, msg: codec.Message) -> SessionEnd | None:
        if isinstance(msg, codec.Reject):
            return await self._on_reject(msg)
        if isinstance(msg, codec.Bye):
            if self._bye_answered is not None and not self._bye_answered.done():
                self._closing = True     # the answer to our own bye: over, no reconnect
                self._bye_answered.set_result(msg)
                return SessionEnd("the router acknowledged our bye", was_connected=True)
            return SessionEnd(f"router said bye: {msg.reason}", was_connected=True)
        if self.state != LinkState.CONNECTED:
            log.debug("ignored %s before welcome", msg.TYPE)
            return None
        if isinstance(msg, codec.LeaseAck):
            self.last_lease_ack_at = time.time()
            if not msg.stale:
                return None
        elif isinstance(msg, codec.DrainAck):
            if self._drain_acked is not None and not self._drain_acked.done():
                self._drain_acked.set_result(msg)
        elif isinstance(msg, codec.Error) and msg.id is None:
            self._limited(logging.WARNING, f"router-error:{msg.code}",
                          "the router reports %s: %s", msg.code, msg.message)
            return None
        try:
            await self.on_message(msg)
        except Exception:
            log.exception("handling %s from the router failed", msg.TYPE)
        return None

    async def _on_reject(self, reject: codec.Reject) -> SessionEnd | None:
        detail = f"router rejected the session: {escape(reject.message)} ({escape(reject.code)})"
        if reject.code in FINAL_REJECTIONS:
            return SessionEnd(detail, final=True)
        if reject.code == "no_session":
            if self.state != LinkState.CONNECTED:
                return None        # a stale frame answered before our hello: harmless
            return SessionEnd("the router lost this session", was_connected=True, retry_now=True)
        if reject.code in TOKEN_REJECTIONS:
            if self.token_refresher is None:
                return SessionEnd(detail, final=reject.code == "unauthorized")
            match await self._refresh_token(self.token_refresher):
                case RefusedForGood(code, message):
                    return SessionEnd(f"{detail}; refresh refused: {message} ({code})", final=True)
                case FailedForNow(error):
                    return SessionEnd(f"{detail}; refresh failed: {error}")
            return SessionEnd(f"{detail}; token refreshed", retry_now=True)
        return SessionEnd(detail)

    # ------------------------------------------------------------ token

    async def _refresh_token(self, refresher: TokenRefresher) -> TokenRefresh:
        """Ask the enrollment API for a new token once; the identity changes only when it gives one."""
        try:
            self.identity = await refresher(self.identity)
        except EnrollmentRejected as exc:
            return RefusedForGood(exc.code, exc.message)
        except EnrollmentError as exc:
            return FailedForNow(exc)
        return Renewed()

    async def _refresh_if_due(self) -> SessionEnd | None:
        if self.token_refresher is None or \
                self.identity.token_expires_at - time.time() >= self.token_refresh_margin_s:
            return None
        match await self._refresh_token(self.token_refresher):
            case RefusedForGood(code, message):
                return SessionEnd(f"token refresh refused: {message} ({code})", final=True)
            case FailedForNow(error):
                log.warning("token refresh failed, trying with the current token: %s", error)
        return None

    async def _refresh_in_background(self, refresher: TokenRefresher) -> None:
        try:
            match await self._refresh_token(refresher):
                case RefusedForGood(code, message):
                    log.error("token refresh refused: %s (%s); the router will end this session", message, code)
                case FailedForNow(error):
                    log.warning("token refresh failed, will retry: %s", error)
        except Exception:
            log.exception("token refresh failed")
        finally:
            self._refreshing = None
