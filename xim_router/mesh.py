"""The router's end of the mesh: a CURVE ROUTER socket, agent sessions, leases.

`Router` is the seam the HTTP side builds on: it knows which agents are
connected and what their last lease said (`sessions`, `candidates()`), sends
them messages (`send()`), and hands each request's answers (chunk, done,
error) to the coroutine that opened it (`open_request()`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import cast

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from xim_proto import codec, transport
from xim_proto.ratelimit import RateLimitedLog
from xim_router import __version__, zap
from xim_router import store as store_mod
from xim_router.keys import CurveKeypair

log = logging.getLogger("xim_router.mesh")

ZAP_DOMAIN = b"xim"
SEND_TIMEOUT_S = 2.0
# Plain ints: pyzmq's enum flags cost a conversion on every call in the hot path.
_DONTWAIT = int(zmq.DONTWAIT)
_RCVMORE = int(zmq.RCVMORE)            # how long send() waits on a peer queue at its high-water mark


class AgentUnavailable(Exception):
    """The agent has no live session, or its queue stayed full (docs/protocol.md §5)."""


@dataclass(frozen=True)
class RouterSettings:
    lease_interval_s: float = 5.0
    lease_timeout_s: float = 15.0        # no lease for this long: disconnected
    dead_after_s: float = 300.0          # disconnected for this long: dead
    token_ttl_s: float = 86400.0
    token_grace_s: float = 7 * 86400.0   # an expired token may still be refreshed this long
    sweep_interval_s: float = 1.0


@dataclass
class Session:
    """One agent's live link, from welcome to its end."""

    agent_id: str
    worker_id: str
    session_id: str
    version: int
    hello: codec.Hello
    connected_at: float                         # wall clock
    last_seen: float                            # monotonic: any frame from the agent
    lease: codec.Lease | None = None
    lease_at: float | None = None               # wall clock of the last lease
    draining: bool = False

    @property
    def max_concurrent(self) -> int:
        return self.lease.max_concurrent if self.lease else self.hello.max_concurrent

    def serves(self, model: str) -> bool:
        models = self.lease.models if self.lease else self.hello.models
        return any(m.name == model and m.state == "ready" for m in models)


@dataclass
class RouterStats:
    frames_in: int = 0
    frames_out: int = 0
    malformed: int = 0
    no_session: int = 0
    spoofed: int = 0
    handshake_failed: int = 0
    disconnects: int = 0
    leases: int = 0
    counts_by_type: dict[str, int] = field(default_factory=dict)


class Router:
    def __init__(self, store: store_mod.Store, keypair: CurveKeypair, *, mesh_bind: str,
                 settings: RouterSettings | None = None, advertise: tuple[str, ...] = ()):
        self.store = store
        self.advertise = advertise                  # mesh endpoints to hand agents, if set
        self.keypair = keypair
        self.mesh_bind = mesh_bind
        self.settings = settings or RouterSettings()
        self.mesh_endpoint = ""                     # the bound endpoint, known after start()
        self.sessions: dict[str, Session] = {}     # by worker id
        self.stats = RouterStats()
        self._requests: dict[str, tuple[str, asyncio.Queue]] = {}   # id -> (worker id, queue)
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.Socket | None = None        # plain socket, watched by _watch
        self._monitor: zmq.Socket | None = None
        self._watch: transport.ReadyWatch | None = None
        self._tasks: list[asyncio.Task] = []
        self._zap: zap.ZapHandler | None = None
        self._workers: dict[str, str] = {}          # agent id -> worker id
        self._limited = RateLimitedLog(log, interval_s=5.0)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        self._ctx = zmq.asyncio.Context()
        # The ZAP handler must exist before the CURVE socket binds: without
        # one, libzmq lets every CURVE client in.
        self._zap, zap_task = zap.start(self._ctx, self.store.agent_by_public_key)
        # A plain socket in the same context as the ZAP handler: the receive
        # loop watches its FD itself (transport.ReadyWatch), which costs less
        # per frame than zmq.asyncio's futures.
        sock = zmq.Socket(self._ctx, zmq.ROUTER)
        transport.apply_common_options(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)     # unknown peer: an error, not a silent drop
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)      # a reconnecting agent takes over its id
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keypair.secret.encode())
        zap.require_zap(sock, ZAP_DOMAIN)           # no handler answering: nobody gets in
        monitor_owner = sock.get_monitor_socket()
        monitor: zmq.Socket = zmq.Socket.shadow(monitor_owner.underlying)
        try:
            sock.bind(self.mesh_bind)
        except zmq.ZMQError:
            sock.disable_monitor()
            monitor_owner.close(linger=0)
            sock.close(linger=0)
            zap_task.cancel()
            self._zap.close()
            self._zap = None
            self._ctx.term()
            self._ctx = None
            raise
        self.mesh_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock, self._monitor, self._monitor_owner = sock, monitor, monitor_owner
        self._watch = transport.ReadyWatch(asyncio.get_running_loop(), sock, monitor)
        transport.log_socket_buffers(log)
        # Sessions did not survive a restart: agents that were active must say hello again.
        for agent in self.store.agents():
            if agent.state == store_mod.ACTIVE:
                self.store.set_state(agent.agent_id, store_mod.DISCONNECTED)
        self._tasks = [zap_task, asyncio.ensure_future(self._receive_loop()),
                       asyncio.ensure_future(self._sweep_loop())]
        log.info("mesh listening on %s (CURVE public key %s)", self.mesh_endpoint,
                 self.keypair.public)
        return self.mesh_endpoint

    async def stop(self) -> None:
        for session in list(self.sessions.values()):
            self._reply(session.worker_id, codec.Bye(reason="router stopping"), session.version)
            self._end_session(session, "router stopping", store_mod.DISCONNECTED)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None and self._watch is not None:
            self._watch.close()
            # The monitor socket must still be open here: libzmq delivers
            # MONITOR_STOPPED synchronously and would block on a closed peer.
            self._sock.disable_monitor()
            self._monitor_owner.close(linger=0)
            self._sock.close(linger=0)
        if self._zap is not None:
            self._zap.close()
        if self._ctx is not None:
            self._ctx.term()

    @property
    def zap_denied(self) -> int:
        return self._zap.denied if self._zap else 0

    # ------------------------------------------------------------ the seam for serving

    def candidates(self, model: str) -> list[Session]:
        """Active, non-draining sessions whose last report says ``model`` is ready."""
        return [s for s in self.sessions.values() if not s.draining and s.serves(model)]

    def in_flight(self, worker_id: str) -> int:
        return sum(1 for wid, _ in self._requests.values() if wid == worker_id)

    def open_request(self, request_id: str, worker_id: str) -> asyncio.Queue:
        """Register a request before sending its infer; its chunk/done/error land in the queue."""
        queue: asyncio.Queue = asyncio.Queue()
        self._requests[request_id] = (worker_id, queue)
        return queue

    def close_request(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    async def send(self, worker_id: str, msg: codec.Message) -> None:
        """Send to a connected agent; AgentUnavailable if it has no session or stays backlogged."""
        session = self.sessions.get(worker_id)
        if session is None:
            raise AgentUnavailable(f"{worker_id} has no live session")
        deadline = time.monotonic() + SEND_TIMEOUT_S
        while not self._send_now(worker_id, msg, session.version):
            if time.monotonic() > deadline or worker_id not in self.sessions:
                raise AgentUnavailable(f"{worker_id} is not reading its queue")
            await asyncio.sleep(0.005)

    def _send_now(self, worker_id: str, msg: codec.Message, version: int) -> bool:
        """True when queued; False when the peer's queue is full (try again)."""
        frame = codec.encode(msg, version=version)
        sock, watch = self._sock, self._watch
        if sock is None or watch is None:
            raise AgentUnavailable("the mesh socket is closed")
        try:
            sock.send_multipart([worker_id.encode(), frame], flags=_DONTWAIT)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:       # ROUTER_MANDATORY: the peer is gone
                raise AgentUnavailable(f"{worker_id} is not connected") from None
            raise
        finally:
            if transport.readable(sock):
                watch.poke()          # the send consumed the FD edge of pending input
        self.stats.frames_out += 1
        return True

    def _reply(self, worker_id: str, msg: codec.Message, version: int = codec.PROTOCOL_VERSION) -> None:
        """Best-effort answer on the receive path: never block it, never fail it."""
        try:
            if not self._send_now(worker_id, msg, version):
                log.warning("dropped %s to %s: its queue is full", msg.TYPE, worker_id)
        except AgentUnavailable:
            pass

    # ------------------------------------------------------------ receiving

    async def _receive_loop(self) -> None:
        sock, monitor, watch = self._sock, self._monitor, self._watch
        assert sock is not None and monitor is not None and watch is not None   # started by start()
        while True:
            watch.clear()            # before looking: a later edge wakes the wait below
            if transport.readable(monitor):
                self._on_monitor_events(monitor)
            handled = 0
            # Take what is ready, but yield now and then so a busy mesh
            # cannot starve the HTTP side.
            while handled < 256 and transport.readable(sock):
                parts = self._recv_parts(sock)
                handled += 1
                self.stats.frames_in += 1
                try:
                    self._on_frames(*parts)
                except Exception:   # one agent's bad frame must never stop the mesh
                    log.exception("error handling a frame; dropped")
            if handled == 256:
                await asyncio.sleep(0)
                continue
            await watch.wait(None)

    @staticmethod
    def _recv_parts(rx: zmq.Socket) -> tuple[bytes, zmq.Frame, int]:
        """(routing id, first payload part, number of payload parts) of one message.

        A ROUTER message from a DEALER is [routing id, payload]; reading the
        parts one by one is cheaper than recv_multipart for that fixed shape.
        """
        routing_id = rx.recv(_DONTWAIT)
        payload = rx.recv(copy=False)
        parts = 1
        while rx.getsockopt(_RCVMORE):           # extra parts: read and count them
            rx.recv(copy=False)
            parts += 1
        return routing_id, payload, parts

    def _on_frames(self, routing_id: bytes, payload: zmq.Frame, parts: int) -> None:
        worker_id = routing_id.decode(errors="replace")
        agent_id = cast(str, payload.get("User-Id"))   # set by our ZAP handler
        if parts != 1:
            self._malformed(worker_id, f"{parts} frame parts, expected 1")
            return
        expected = self._workers.get(agent_id) or self._worker_of(agent_id)
        if expected != worker_id:
            # An enrolled key speaking under another worker's routing id.
            self.stats.spoofed += 1
            self._limited(logging.WARNING, f"spoof:{agent_id}",
                          "dropped a frame from agent %s using routing id %r (its worker id is %r)",
                          agent_id, worker_id, expected)
            return
        try:
            msg = codec.decode(payload.bytes, sender=codec.AGENT)
        except codec.ProtocolError as exc:
            self._malformed(worker_id, str(exc), exc.code)
            return
        self.stats.counts_by_type[msg.TYPE] = self.stats.counts_by_type.get(msg.TYPE, 0) + 1
        if isinstance(msg, codec.Hello):
            self._on_hello(worker_id, agent_id, msg)
            return
        session = self.sessions.get(worker_id)
        if session is None:
            self.stats.no_session += 1
            self._reply(worker_id, codec.Reject(code="no_session",
                                                message="no session: send hello first"))
            return
        session.last_seen = time.monotonic()
        self._on_session_message(session, msg)

    def _worker_of(self, agent_id: str | None) -> str | None:
        """The worker id enrolled with ``agent_id`` (cached: it never changes)."""
        if not agent_id:
            return None
        if agent_id not in self._workers:
            agent = self.store.agent(agent_id)
            if agent is None:
                return None
            self._workers[agent_id] = agent.worker_id
        return self._workers[agent_id]

    def _malformed(self, worker_id: str, detail: str, code: str = "malformed") -> None:
        self.stats.malformed += 1
        if self._limited(logging.WARNING, f"malformed:{worker_id}",
                         "dropped a malformed frame from %s: %s", worker_id, detail):
            # Tell the agent once in a while, so its own log shows the cause.
            self._reply(worker_id, codec.error_for(code if code in codec.ERROR_CODES else "malformed",
                                                   detail[:200]))

    def _on_hello(self, worker_id: str, agent_id: str, hello: codec.Hello) -> None:
        try:
            agent = self.store.check_token(hello.token)
        except store_mod.StoreError as exc:
            code = {"invalid_token": "unauthorized"}.get(exc.code, exc.code)
            log.warning("refused hello from %s: %s", worker_id, exc.message)
            self._reply(worker_id, codec.Reject(code=code, message=exc.message))
            return
        if agent.agent_id != agent_id:
            log.warning("refused hello from %s: its token belongs to another agent", worker_id)
            self._reply(worker_id, codec.Reject(code="unauthorized",
                                                message="the token does not belong to this CURVE key"))
            return
        common = sorted(set(hello.versions) & set(codec.PROTOCOL_VERSIONS))
        if not common:
            self._reply(worker_id, codec.Reject(
                code="unsupported_version",
                message=f"router speaks {list(codec.PROTOCOL_VERSIONS)}, agent {hello.versions}"))
            return
        old = self.sessions.get(worker_id)
        if old is not None:
            self._end_session(old, "replaced by a new hello", store_mod.DISCONNECTED)
        session = Session(agent_id=agent_id, worker_id=worker_id, session_id=uuid.uuid4().hex,
                          version=common[-1], hello=hello, connected_at=time.time(),
                          last_seen=time.monotonic())
        self.sessions[worker_id] = session
        self.store.set_state(agent_id, store_mod.ACTIVE)
        s = self.settings
        self._reply(worker_id, codec.Welcome(
            version=session.version, session=session.session_id, router_version=__version__,
            lease_interval_s=s.lease_interval_s, lease_timeout_s=s.lease_timeout_s,
            max_frame_bytes=codec.MAX_FRAME_BYTES, capabilities=["credit", "cancel", "drain"],
            assigned_model=agent.assigned_model), session.version)
        log.info("agent %s (%s, %s) connected: protocol v%d, %d model(s), max_concurrent %d",
                 worker_id, hello.hostname, hello.agent_version, session.version,
                 len(hello.models), hello.max_concurrent)

    def _on_session_message(self, session: Session, msg: codec.Message) -> None:
        if isinstance(msg, codec.Lease):
            self.stats.leases += 1
            session.lease, session.lease_at = msg, time.time()
            self.store.record_lease(session.agent_id, _summary(msg))
            mine = {rid for rid, (wid, _) in self._requests.items() if wid == session.worker_id}
            stale = [rid for rid in msg.in_flight if rid not in mine]
            self._reply(session.worker_id, codec.LeaseAck(seq=msg.seq, stale=stale or None),
                        session.version)
        elif isinstance(msg, (codec.Chunk, codec.Done, codec.Error)) and msg.id is not None:
            request_id = msg.id                 # an error without one is about the link (below)
            entry = self._requests.get(request_id)
            if entry is None or entry[0] != session.worker_id:
                self._reply(session.worker_id, codec.Cancel(id=request_id, reason="unknown request"),
                            session.version)
                return
            entry[1].put_nowait(msg)
            if not isinstance(msg, codec.Chunk):
                self._requests.pop(request_id, None)
        elif isinstance(msg, codec.Error):
            log.warning("agent %s reports %s: %s", session.worker_id, msg.code, msg.message)
        elif isinstance(msg, codec.Drain):
            session.draining = True
            log.info("agent %s is draining (%s)", session.worker_id, msg.reason)
            self._reply(session.worker_id, codec.DrainAck(in_flight=self.in_flight(session.worker_id)),
                        session.version)
        elif isinstance(msg, codec.Bye):
            log.info("agent %s said bye: %s", session.worker_id, msg.reason)
            # The answer tells the agent that everything it sent before its bye was read
            # here, so it can close without TCP resetting frames still on their way.
            self._reply(session.worker_id, codec.Bye(reason="bye acknowledged"), session.version)
            self._end_session(session, f"bye: {msg.reason}", store_mod.DISCONNECTED)

    # ------------------------------------------------------------ ending sessions

    def end_agent(self, agent_id: str, code: str, message: str, state: str) -> None:
        """Tell a connected agent it is revoked/unenrolled and forget its session."""
        for session in list(self.sessions.values()):
            if session.agent_id == agent_id:
                self._reply(session.worker_id, codec.Reject(code=code, message=message),
                            session.version)
                self._end_session(session, message, state)

    def _end_session(self, session: Session, why: str, state: str) -> None:
        if self.sessions.get(session.worker_id) is not session:
            return
        del self.sessions[session.worker_id]
        self.store.set_state(session.agent_id, state)
        failed = [rid for rid, (wid, _) in self._requests.items() if wid == session.worker_id]
        for rid in failed:
            _, queue = self._requests.pop(rid)
            queue.put_nowait(codec.error_for("agent_unavailable", f"agent link ended: {why}",
                                             request_id=rid))
        log.info("agent %s session ended (%s); %d request(s) failed over", session.worker_id,
                 why, len(failed))

    async def _sweep_loop(self) -> None:
        while True:
            wake_at = time.monotonic() + self.settings.sweep_interval_s
            await asyncio.sleep(self.settings.sweep_interval_s)
            self.forgive_pause(transport.paused_for(wake_at, time.monotonic()))
            try:
                self.sweep()
            except Exception:
                log.exception("sweep failed")

    def forgive_pause(self, paused_s: float) -> None:
        """The router did not run for ``paused_s``: the agents' frames of that time are
        still queued here, so their leases are not late by it."""
        if not paused_s:
            return
        log.warning("the router did not run for %.1f s (host paused or overloaded); "
                    "lease clocks moved on by that much", paused_s)
        for session in self.sessions.values():
            session.last_seen += paused_s

    def sweep(self, now_mono: float | None = None, now: float | None = None) -> None:
        """Apply the lease timing and revocations made by `xim-router revoke`."""
        now_mono = time.monotonic() if now_mono is None else now_mono
        now = time.time() if now is None else now
        for session in list(self.sessions.values()):
            if now_mono - session.last_seen > self.settings.lease_timeout_s:
                log.warning("agent %s missed its lease for %.0f s: disconnected",
                            session.worker_id, now_mono - session.last_seen)
                self._end_session(session, "lease expired", store_mod.DISCONNECTED)
        ended = self.store.ended_agents()
        for session in list(self.sessions.values()):
            if session.agent_id in ended:
                self.end_agent(session.agent_id, "revoked", "this agent's identity was revoked",
                               store_mod.REVOKED)
        for agent in self.store.agents():
            if agent.state == store_mod.DISCONNECTED and now - agent.state_since > self.settings.dead_after_s:
                log.warning("agent %s disconnected for %.0f s: dead", agent.worker_id,
                            now - agent.state_since)
                self.store.set_state(agent.agent_id, store_mod.DEAD, now)

    def _on_monitor_events(self, monitor: zmq.Socket) -> None:
        while True:
            try:
                event = parse_monitor_message(monitor.recv_multipart(_DONTWAIT))
            except zmq.Again:
                return
            name = transport.MONITOR_EVENTS.get(event["event"])
            where = event["endpoint"].decode(errors="replace") if event.get("endpoint") else ""
            if name is not None and name.startswith("handshake_failed"):
                self.stats.handshake_failed += 1
                self._limited(logging.WARNING, "handshake", "mesh handshake failed (%s) on %s",
                              name, where)
            elif name == "disconnected":
                self.stats.disconnects += 1
                log.info("a mesh connection closed (the peer left, or broke the transport "
                         "rules, e.g. a frame over %d bytes)", codec.MAX_FRAME_BYTES)


def _summary(lease: codec.Lease) -> dict:
    """A JSON-able view of a lease for the store."""
    data = dataclasses.asdict(lease)
    data["at"] = time.time()
    return data
