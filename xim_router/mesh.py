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
import math
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from xim_proto import codec, transport
from xim_proto.ratelimit import RateLimitedLog, TokenBucket, escape
from xim_router import __version__, zap
from xim_router import groups as groups_mod
from xim_router import store as store_mod
from xim_router.keys import CurveKeypair
from xim_router.policy import NodePolicy, shown

log = logging.getLogger("xim_router.mesh")

ZAP_DOMAIN = b"xim"
SEND_TIMEOUT_S = 2.0
# Plain ints: pyzmq's enum flags cost a conversion on every call in the hot path.
_DONTWAIT = int(zmq.DONTWAIT)
_RCVMORE = int(zmq.RCVMORE)            # how long send() waits on a peer queue at its high-water mark
# The receive loop yields to the HTTP side after this many frames (those in batches
# counted one by one) or this long.
RECEIVE_BATCH = 256
RECEIVE_SLICE_S = 0.02
# What welcome offers (docs/protocol.md §5.2); batch: it reads batch frames (revision 1.3).
ROUTER_CAPABILITIES = ("credit", "cancel", "drain", codec.BATCH)
# A peer over its rate of unsolicited frames hears about it at most this often.
TELL_INTERVAL_S = 10.0


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
    # Frames an agent sends unasked (leases, hello, drain, bye, errors about the link):
    # an honest one sends one every lease interval or so. The excess is dropped and counted.
    unsolicited_per_s: float = 10.0
    unsolicited_burst: int = 30
    # Answers about requests the router does not know (or outside a session) are
    # ignored; each would cost an answer (cancel, no_session), which stops past this.
    # An honest agent sends some after a cancel, up to its credit per request.
    stray_answers_per_s: float = 100.0
    stray_answers_burst: int = 300


@dataclass
class Session:
    """One agent's live link, from welcome to its end.

    A session is bound to the connection its authenticated hello came on: the
    routing id libzmq gave that connection (``routing_id``, the only address
    the router sends to) and its file descriptor (``connection_fd``, how the
    monitor names the connection when it closes). ``worker_id`` is the node's
    public name, never an address (docs/protocol.md §4.1).
    """

    agent_id: str
    worker_id: str
    routing_id: bytes
    connection_fd: int | None
    session_id: str
    version: int
    hello: codec.Hello
    connected_at: float                         # wall clock
    last_seen: float                            # monotonic: any frame from the agent
    lease: codec.Lease | None = None
    lease_at: float | None = None               # wall clock of the last lease
    draining: bool = False
    # What the operator lets this node serve (the store; the sweep applies changes):
    # its own declarations count only within it (xim_router.policy).
    policy: NodePolicy = field(default_factory=NodePolicy)
    refused: tuple[str, ...] = ()               # declared models last logged as not allowed
    batches: bool = False                       # its hello offered batch frames (revision 1.3)

    @property
    def declared_models(self) -> list[codec.Model]:
        return self.lease.models if self.lease else self.hello.models

    @property
    def declared_max_concurrent(self) -> int:
        return self.lease.max_concurrent if self.lease else self.hello.max_concurrent

    @property
    def max_concurrent(self) -> int:
        return self.policy.capacity(self.declared_max_concurrent)

    def models(self) -> list[codec.Model]:
        """The declared models this node may serve."""
        return self.policy.permitted(self.declared_models)

    def serves(self, model: str) -> bool:
        return any(m.name == model and m.state == "ready" for m in self.models())

    def ready_models(self) -> frozenset[str]:
        """The models this session may be given requests for now (draining: none)."""
        return frozenset() if self.draining else \
            frozenset(m.name for m in self.models() if m.state == "ready")


@dataclass
class PendingRequest:
    """A request waiting on an agent: whose it is, where its answers go, what it may still send.

    ``credit`` counts the chunk frames the router granted (infer.credit, then each
    ``credit``) and has not received yet; it bounds ``queue`` (docs/protocol.md §5.4).
    """

    worker_id: str
    queue: asyncio.Queue
    credit: int


@dataclass
class RouterStats:
    frames_in: int = 0                          # each frame in a batch counts
    batches_in: int = 0
    frames_out: int = 0
    malformed: int = 0
    no_session: int = 0
    spoofed: int = 0
    credit_overruns: int = 0
    handshake_failed: int = 0
    disconnects: int = 0
    leases: int = 0
    rate_limited: int = 0
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
        self._by_route: dict[bytes, Session] = {}   # the same sessions, by the routing id they are bound to
        self._by_fd: dict[int, Session] = {}        # and by their connection's file descriptor
        self.stats = RouterStats()
        self._requests: dict[str, PendingRequest] = {}
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.Socket | None = None        # plain socket, watched by _watch
        self._monitor: zmq.Socket | None = None
        self._watch: transport.ReadyWatch | None = None
        self._tasks: list[asyncio.Task] = []
        self._zap: zap.ZapHandler | None = None
        self._limited = RateLimitedLog(log, interval_s=5.0)
        # The store's calls run on its own thread: the loop never waits for SQLite.
        self.store_worker = store_mod.StoreWorker(store)
        # Enrolled agents without a live session (pending, disconnected) -> the models of
        # their last report: a request for one is worth a retry, not a 404. Kept here so
        # that routing never reads the store.
        self.absent_models: dict[str, frozenset[str]] = {}
        self._background: set[asyncio.Task] = set()
        self._latest_lease: dict[str, tuple[codec.Lease, float]] = {}   # agent id -> not yet stored
        self._hellos_checking: set[str] = set()      # agent ids whose hello waits on the store
        self._allowances: dict[str, _Allowance] = {}  # agent id -> its unsolicited-frame budget
        # Set, then replaced, whenever a session may take a model it could not before
        # (a hello, a lease, a policy): requests held for a node wait on it (`availability`).
        self._available = asyncio.Event()
        # Groups (one model on several agents): declared in the store, run from here.
        self.groups = groups_mod.Coordinator()

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
        # No ROUTER_HANDOVER: a routing id is peer-chosen, so a new connection must never take
        # over the address of a live one; a reconnecting agent proves its key with a new hello.
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
        agents = await self.store_worker.call(self.store.agents)
        for agent in agents:
            if agent.state == store_mod.ACTIVE:
                await self.store_worker.call(self.store.set_state, agent.agent_id, store_mod.DISCONNECTED)
        self.absent_models.update(absent_models_of(agents))
        self._tasks = [zap_task, asyncio.ensure_future(self._receive_loop()),
                       asyncio.ensure_future(self._sweep_loop())]
        log.info("mesh listening on %s (CURVE public key %s)", self.mesh_endpoint,
                 self.keypair.public)
        return self.mesh_endpoint

    async def stop(self) -> None:
        for session in list(self.sessions.values()):
            self._reply(session.routing_id, codec.Bye(reason="router stopping"), session.version)
            self._end_session(session, "router stopping", store_mod.DISCONNECTED)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._background:          # hellos being checked, store writes on their way
            await asyncio.gather(*list(self._background), return_exceptions=True)
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
        self.store_worker.close()

    @property
    def zap_denied(self) -> int:
        return self._zap.denied if self._zap else 0

    # ------------------------------------------------------------ the seam for serving

    def candidates(self, model: str) -> list[Session]:
        """Active, non-draining sessions whose last report says ``model`` is ready."""
        return [s for s in self.sessions.values() if not s.draining and s.serves(model)]

    def availability(self) -> asyncio.Event:
        """An event set the next time some session becomes able to serve a model it could
        not serve before: a node's hello (a reconnect, the end of a drain), a lease that
        makes a model ready, a policy that allows one. Take it before looking at the
        candidates, then wait on it; look again once it is set."""
        return self._available

    def _more_available(self) -> None:
        self._available.set()
        self._available = asyncio.Event()

    def in_flight(self, worker_id: str) -> int:
        return sum(1 for r in self._requests.values() if r.worker_id == worker_id)

    def open_request(self, request_id: str, worker_id: str, credit: int) -> asyncio.Queue:
        """Register a request before sending its infer (which grants ``credit`` chunk frames);
        its chunk/done/error land in the queue."""
        queue: asyncio.Queue = asyncio.Queue()
        self._requests[request_id] = PendingRequest(worker_id, queue, credit)
        return queue

    def grant(self, request_id: str, n: int) -> None:
        """Count ``n`` more chunk frames for the request; call before sending the ``credit``."""
        pending = self._requests.get(request_id)
        if pending is not None:
            pending.credit += n

    def redirect(self, request_id: str, queue: asyncio.Queue) -> None:
        """From now on put the request's chunk/done/error in ``queue`` (anything with
        ``put_nowait``: dataplane.Exchange.forward's hand-on)."""
        pending = self._requests.get(request_id)
        if pending is not None:
            pending.queue = queue

    def close_request(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    async def send(self, worker_id: str, msg: codec.Message) -> None:
        """Send to a connected agent; AgentUnavailable if it has no session or stays backlogged.

        Only ever to the connection the agent's session is bound to.
        """
        deadline = time.monotonic() + SEND_TIMEOUT_S
        while True:
            # Connections that closed end their sessions before anything is addressed:
            # another peer may since have connected under the same routing id.
            self._read_monitor()
            session = self.sessions.get(worker_id)
            if session is None:
                raise AgentUnavailable(f"{worker_id} has no live session")
            try:
                if self._send_now(session.routing_id, msg, session.version):
                    return
            except AgentUnavailable as exc:
                raise AgentUnavailable(f"{worker_id}: {exc}") from None
            if time.monotonic() > deadline:
                raise AgentUnavailable(f"{worker_id} is not reading its queue")
            await asyncio.sleep(0.005)

    def send_soon(self, worker_id: str, msg: codec.Message) -> None:
        """Send without waiting, best effort (a credit, a cancel): queued at once when the
        agent's queue has room — the usual case, no task for it — else by `send()` in the
        background. An agent without a session gets nothing: its link's end fails its requests."""
        self._read_monitor()      # as in send(): a closed connection's session ends before anything is addressed
        session = self.sessions.get(worker_id)
        if session is None:
            return
        try:
            if self._send_now(session.routing_id, msg, session.version):
                return
        except AgentUnavailable:
            return
        self._in_background(self._send_or_drop(worker_id, msg))

    async def _send_or_drop(self, worker_id: str, msg: codec.Message) -> None:
        try:
            await self.send(worker_id, msg)
        except AgentUnavailable:
            pass

    def _send_now(self, routing_id: bytes, msg: codec.Message, version: int) -> bool:
        """True when queued; False when the peer's queue is full (try again)."""
        frame = codec.encode(msg, version=version)
        sock, watch = self._sock, self._watch
        if sock is None or watch is None:
            raise AgentUnavailable("the mesh socket is closed")
        try:
            sock.send_multipart([routing_id, frame], flags=_DONTWAIT)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:       # ROUTER_MANDATORY: the peer is gone
                raise AgentUnavailable("not connected") from None
            raise
        finally:
            if transport.readable(sock):
                watch.poke()          # the send consumed the FD edge of pending input
        self.stats.frames_out += 1
        return True

    def _reply(self, routing_id: bytes, msg: codec.Message, version: int = codec.PROTOCOL_VERSION) -> None:
        """Best-effort answer on the receive path (to the connection a frame came on):
        never block it, never fail it."""
        try:
            if not self._send_now(routing_id, msg, version):
                self._limited(logging.WARNING, f"full:{routing_id.hex()}",
                              "dropped %s to connection %s: its queue is full", msg.TYPE, routing_id.hex())
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
            # Take what is ready, but yield now and then so a busy mesh
            # cannot starve the HTTP side.
            handled, until = 0, time.monotonic() + RECEIVE_SLICE_S
            busy = False
            while transport.readable(sock):
                parts = self._recv_parts(sock)
                try:
                    frames = self._on_frames(*parts)
                except Exception:   # one agent's bad frame must never stop the mesh
                    log.exception("error handling a frame; dropped")
                    frames = 1
                handled += frames
                self.stats.frames_in += frames
                if handled >= RECEIVE_BATCH or time.monotonic() > until:
                    busy = True
                    break
            if busy:
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

    def _on_frames(self, routing_id: bytes, payload: zmq.Frame, parts: int) -> int:
        """Handle one ZeroMQ message; the number of frames it held (a batch's, or 1)."""
        # The ZAP handler set User-Id to the agent whose enrolled CURVE key opened this
        # connection: that, not the peer-chosen routing id, says who is speaking.
        agent_id = cast(str, payload.get("User-Id"))
        if parts != 1:
            self._malformed(routing_id, agent_id, f"{parts} frame parts, expected 1")
            return 1
        session = self._session_on(routing_id, agent_id)
        try:
            msg = codec.decode(payload.bytes, sender=codec.AGENT)
        except codec.ProtocolError as exc:
            self._malformed(routing_id, agent_id, str(exc), exc.code)
            return 1
        if type(msg) is codec.Batch:
            return self._on_batch(routing_id, agent_id, session, msg)
        self._on_message(routing_id, agent_id, session, msg, payload)
        return 1

    def _on_batch(self, routing_id: bytes, agent_id: str, session: Session | None,
                  batch: codec.Batch) -> int:
        """Each frame of a batch in order, as if it had come alone (docs/protocol.md §4.8):
        a malformed one is dropped like any, and every message counts against the peer's
        allowances on its own."""
        if session is None:
            self._outside_session(routing_id, agent_id)
            return 1
        if not session.batches:
            self._malformed(routing_id, agent_id, "a batch from an agent whose hello did not offer "
                            "batches", "unexpected_type")
            return 1
        self.stats.batches_in += 1
        sessions = self.sessions
        for frame in batch.frames:
            try:
                msg = codec.decode(frame, sender=codec.AGENT, batched=True)
            except codec.ProtocolError as exc:
                self._malformed(routing_id, agent_id, f"in a batch: {exc}", exc.code)
                continue
            # A bye (or the sweep, or a revocation) may end the session half-way through.
            self._on_message(routing_id, agent_id,
                             session if sessions.get(session.worker_id) is session else None, msg)
        return len(batch.frames)

    def _on_message(self, routing_id: bytes, agent_id: str, session: Session | None,
                    msg: codec.Message, payload: zmq.Frame | None = None) -> None:
        """One message from the connection ``routing_id``; ``payload``, the ZeroMQ frame it came
        in, for a hello (which never comes in a batch)."""
        self.stats.counts_by_type[msg.TYPE] = self.stats.counts_by_type.get(msg.TYPE, 0) + 1
        answer = isinstance(msg, (codec.Chunk, codec.Done, codec.Error)) and msg.id is not None
        if not answer and not self._allowed(agent_id, routing_id):
            return
        if isinstance(msg, codec.Hello):
            self._check_hello(routing_id, _source_fd(payload) if payload is not None else None,
                              agent_id, msg)
            return
        if session is None:
            self._outside_session(routing_id, agent_id)
            return
        session.last_seen = time.monotonic()
        self._on_session_message(session, msg)

    def _outside_session(self, routing_id: bytes, agent_id: str) -> None:
        """A frame on a connection without a session: the peer hears, now and then, to say hello."""
        self.stats.no_session += 1
        if self._may_answer_stray(agent_id):
            self._reply(routing_id, codec.Reject(code="no_session", message="no session: send hello first"))

    def _session_on(self, routing_id: bytes, agent_id: str) -> Session | None:
        """The session bound to the connection a frame came on, if the frame's key opened it.

        Another key on a session's routing id means that connection is gone and a new
        one took its address (possible only where the address is guessable: agents
        that still use their worker id): that session ends before anything more is
        sent there.
        """
        session = self._by_route.get(routing_id)
        if session is None or session.agent_id == agent_id:
            return session
        self.stats.spoofed += 1
        self._limited(logging.WARNING, f"spoof:{agent_id}",
                      "agent %s spoke on the routing id of %s's session: that session ends",
                      agent_id, session.worker_id)
        self._end_session(session, "another agent's connection took its routing id",
                          store_mod.DISCONNECTED)
        return None

    def _allowance(self, key: str) -> _Allowance:
        allowance = self._allowances.get(key)
        if allowance is None:
            s = self.settings
            allowance = self._allowances[key] = _Allowance(
                TokenBucket(s.unsolicited_per_s, s.unsolicited_burst),
                TokenBucket(s.stray_answers_per_s, s.stray_answers_burst))
        return allowance

    def _may_answer_stray(self, key: str) -> bool:
        """Whether an answer about an unknown request (or outside a session) gets a reply."""
        if self._allowance(key).strays.take():
            return True
        self.stats.rate_limited += 1
        return False

    def _allowed(self, agent_id: str, routing_id: bytes) -> bool:
        """Spend one of the peer's allowance of unsolicited frames; False: drop this one.

        Such frames cost the router work (a store write, an answer) that nobody
        asked for. The peer is told once in a while why frames vanish.
        """
        allowance = self._allowance(agent_id)
        if allowance.unsolicited.take():
            return True
        self.stats.rate_limited += 1
        allowance.dropped += 1
        now = time.monotonic()
        if now - allowance.told_at >= TELL_INTERVAL_S:
            allowance.told_at = now
            log.warning("agent %s is over its rate of %g unsolicited frames/s: dropping the excess "
                        "(%d dropped so far)", agent_id, self.settings.unsolicited_per_s,
                        allowance.dropped)
            self._reply(routing_id, codec.error_for(
                "rate_limited", f"over {self.settings.unsolicited_per_s:g} unsolicited frames/s "
                                f"(leases, hello, drain, errors without id): the excess is dropped"))
        return False

    def _malformed(self, routing_id: bytes, agent_id: str, detail: str, code: str = "malformed") -> None:
        self.stats.malformed += 1
        if self._limited(logging.WARNING, f"malformed:{agent_id}",
                         "dropped a malformed frame from agent %s: %s", agent_id, escape(detail)):
            # Tell the agent once in a while, so its own log shows the cause.
            self._reply(routing_id, codec.error_for(code if code in codec.ERROR_CODES else "malformed",
                                                    detail[:200]))

    def _check_hello(self, routing_id: bytes, connection_fd: int | None, agent_id: str,
                     hello: codec.Hello) -> None:
        """Check the hello's token on the store's thread, then answer it."""
        if agent_id in self._hellos_checking:       # one at a time: a flood of hellos waits for none
            return
        self._hellos_checking.add(agent_id)
        self._in_background(self._checked_hello(routing_id, connection_fd, agent_id, hello))

    async def _checked_hello(self, routing_id: bytes, connection_fd: int | None, agent_id: str,
                             hello: codec.Hello) -> None:
        try:
            agent = await self.store_worker.call(self.store.check_token, hello.token)
        except store_mod.StoreError as exc:
            code = {"invalid_token": "unauthorized"}.get(exc.code, exc.code)
            log.warning("refused hello from agent %s: %s", agent_id, exc.message)
            self._reply(routing_id, codec.Reject(code=code, message=exc.message))
            return
        except Exception as exc:         # the store failed: no answer, the agent says hello again
            self._limited(logging.ERROR, "store:hello", "could not check the token of a hello from "
                          "agent %s in the store: %s", agent_id, exc)
            return
        finally:
            self._hellos_checking.discard(agent_id)
        self._on_hello(routing_id, connection_fd, agent_id, hello, agent)

    def _on_hello(self, routing_id: bytes, connection_fd: int | None, agent_id: str, hello: codec.Hello,
                  agent: store_mod.Agent) -> None:
        if agent.agent_id != agent_id:
            log.warning("refused hello from agent %s: its token belongs to another agent", agent_id)
            self._reply(routing_id, codec.Reject(code="unauthorized",
                                                 message="the token does not belong to this CURVE key"))
            return
        common = sorted(set(hello.versions) & set(codec.PROTOCOL_VERSIONS))
        if not common:
            self._reply(routing_id, codec.Reject(
                code="unsupported_version",
                message=f"router speaks {list(codec.PROTOCOL_VERSIONS)}, agent {hello.versions}"))
            return
        worker_id = agent.worker_id
        old = self.sessions.get(worker_id)
        if old is not None:
            # The same key proved itself on this connection: it replaces the older one,
            # which may be dead without the router having noticed yet.
            self._end_session(old, "replaced by a new hello", store_mod.DISCONNECTED)
        session = Session(agent_id=agent_id, worker_id=worker_id, routing_id=routing_id,
                          connection_fd=connection_fd, session_id=uuid.uuid4().hex,
                          version=common[-1], hello=hello, connected_at=time.time(),
                          last_seen=time.monotonic(), policy=agent.policy,
                          batches=codec.BATCH in hello.capabilities)
        self._bind(session)
        self.absent_models.pop(agent_id, None)
        if session.ready_models():
            self._more_available()
        self._record_later(f"agent {worker_id} as active", self.store.set_state, agent_id, store_mod.ACTIVE)
        s = self.settings
        self._reply(routing_id, codec.Welcome(
            version=session.version, session=session.session_id, router_version=__version__,
            lease_interval_s=s.lease_interval_s, lease_timeout_s=s.lease_timeout_s,
            max_frame_bytes=codec.MAX_FRAME_BYTES, capabilities=list(ROUTER_CAPABILITIES),
            assigned_model=agent.assigned_model), session.version)
        log.info("agent %s (%s, %s) connected: protocol v%d, %d model(s), max_concurrent %d",
                 worker_id, escape(hello.hostname), escape(hello.agent_version), session.version,
                 len(hello.models), hello.max_concurrent)
        self._ignore_refused(session)
        self._tick_groups()
        if routing_id == worker_id.encode():
            log.warning("agent %s uses its worker id as its routing id (an agent from before "
                        "protocol revision 1.1): another enrolled node can claim that address once "
                        "its connection drops; upgrade it", worker_id)

    def _bind(self, session: Session) -> None:
        self.sessions[session.worker_id] = session
        self._by_route[session.routing_id] = session
        if session.connection_fd is not None:
            self._by_fd[session.connection_fd] = session

    def _unbind(self, session: Session) -> None:
        del self.sessions[session.worker_id]
        if self._by_route.get(session.routing_id) is session:
            del self._by_route[session.routing_id]
        if session.connection_fd is not None and self._by_fd.get(session.connection_fd) is session:
            del self._by_fd[session.connection_fd]

    def _on_session_message(self, session: Session, msg: codec.Message) -> None:
        if isinstance(msg, codec.Lease):
            self.stats.leases += 1
            before = session.ready_models()
            session.lease, session.lease_at = msg, time.time()
            if not session.ready_models() <= before:
                self._more_available()
            self._record_lease(session.agent_id, msg, session.lease_at)
            self._ignore_refused(session)
            if msg.group is not None:
                self._tick_groups()
            mine = {rid for rid, r in self._requests.items() if r.worker_id == session.worker_id}
            stale = [rid for rid in msg.in_flight if rid not in mine]
            self._reply(session.routing_id, codec.LeaseAck(seq=msg.seq, stale=stale or None),
                        session.version)
        elif isinstance(msg, (codec.Chunk, codec.Done, codec.Error)) and msg.id is not None:
            request_id = msg.id                 # an error without one is about the link (below)
            pending = self._requests.get(request_id)
            if pending is None or pending.worker_id != session.worker_id:
                if self._may_answer_stray(session.agent_id):
                    self._reply(session.routing_id, codec.Cancel(id=request_id, reason="unknown request"),
                                session.version)
                return
            if isinstance(msg, codec.Chunk):
                if pending.credit <= 0:
                    self._credit_overrun(session, request_id)
                    return
                pending.credit -= 1
            pending.queue.put_nowait(msg)
            if not isinstance(msg, codec.Chunk):
                self._requests.pop(request_id, None)
        elif isinstance(msg, codec.Error):
            self._limited(logging.WARNING, f"reports:{session.worker_id}", "agent %s reports %s: %s",
                          session.worker_id, escape(msg.code), escape(msg.message))
        elif isinstance(msg, codec.Drain):
            if not session.draining:
                log.info("agent %s is draining (%s)", session.worker_id, escape(msg.reason))
            session.draining = True
            self._reply(session.routing_id, codec.DrainAck(in_flight=self.in_flight(session.worker_id)),
                        session.version)
        elif isinstance(msg, codec.Bye):
            log.info("agent %s said bye: %s", session.worker_id, escape(msg.reason))
            # The answer tells the agent that everything it sent before its bye was read
            # here, so it can close without TCP resetting frames still on their way.
            self._reply(session.routing_id, codec.Bye(reason="bye acknowledged"), session.version)
            self._end_session(session, f"bye: {escape(msg.reason)}", store_mod.DISCONNECTED)

    def _tick_groups(self, now_mono: float | None = None) -> None:
        """Step every group over the live sessions; send each member what changed for it,
        store new epochs, say why an epoch ended (docs/protocol.md §5.6)."""
        if not self.groups.groups and not any(s.lease and s.lease.group for s in self.sessions.values()):
            return
        connected = {w: groups_mod.Member(w, s.session_id, codec.GROUPS in s.hello.capabilities,
                                          s.lease.group if s.lease else None)
                     for w, s in self.sessions.items()}
        tick = self.groups.tick(connected, time.monotonic() if now_mono is None else now_mono)
        for name, why in tick.ended:
            log.warning("group %s: %s; every member stops its part and the group starts over",
                        name, escape(why))
        for name, epoch in tick.epochs.items():
            log.info("group %s: epoch %d", name, epoch)
            self._record_later(f"the epoch of group {name}", self.store.set_group_epoch, name, epoch)
        for worker_id, assignment in tick.sends:
            session = self.sessions[worker_id]
            self._reply(session.routing_id, assignment, session.version)

    def _ignore_refused(self, session: Session) -> None:
        """Say (once per change, rate-limited) which declared models the node may not serve:
        they are ignored; the operator allows them with `xim-router agents set`."""
        refused = session.policy.refused(session.declared_models)
        if refused == session.refused:
            return
        session.refused = refused
        if refused:
            allowed = session.policy.allowed_models or ()
            self._limited(logging.WARNING, f"refused:{session.agent_id}",
                          "agent %s declares model(s) it may not serve, ignored: %s (allowed: %s)",
                          session.worker_id, shown(refused), shown(sorted(allowed)) or "none")

    def _apply_policies(self, agents: list[store_mod.Agent]) -> None:
        """Give live sessions the policies `xim-router agents set` wrote since."""
        for agent in agents:
            session = self.sessions.get(agent.worker_id)
            if session is not None and session.agent_id == agent.agent_id and session.policy != agent.policy:
                before = session.ready_models()
                session.policy = agent.policy
                if not session.ready_models() <= before:
                    self._more_available()
                log.info("agent %s now %s", session.worker_id, agent.policy.describe())
                self._ignore_refused(session)

    def _credit_overrun(self, session: Session, request_id: str) -> None:
        """A chunk beyond the granted credit: the agent loses the request, the client gets an
        error, and nothing more of it is buffered here."""
        pending = self._requests.pop(request_id)
        self.stats.credit_overruns += 1
        self._limited(logging.WARNING, f"overrun:{session.worker_id}",
                      "agent %s overran its credit on request %s; the request is cancelled",
                      session.worker_id, request_id)
        pending.queue.put_nowait(codec.Error(
            code="agent_unavailable", retryable=False, http_status=502, id=request_id,
            message=f"agent {session.worker_id} sent more stream chunks than the router granted "
                    "(credit); the request was cancelled"))
        self._reply(session.routing_id, codec.Cancel(id=request_id, reason="credit overrun"),
                    session.version)

    # ------------------------------------------------------------ ending sessions

    def end_agent(self, agent_id: str, code: str, message: str, state: str) -> None:
        """Tell a connected agent it is revoked/unenrolled and forget its session."""
        for session in list(self.sessions.values()):
            if session.agent_id == agent_id:
                self._reply(session.routing_id, codec.Reject(code=code, message=message),
                            session.version)
                self._end_session(session, message, state)

    def _end_session(self, session: Session, why: str, state: str) -> None:
        if self.sessions.get(session.worker_id) is not session:
            return
        self._unbind(session)
        # Fail the requests over first: a store that cannot record the new state
        # must not keep them waiting.
        failed = [rid for rid, r in self._requests.items() if r.worker_id == session.worker_id]
        for rid in failed:
            self._requests.pop(rid).queue.put_nowait(codec.error_for(
                "agent_unavailable", f"agent link ended: {why}", request_id=rid))
        if state == store_mod.DISCONNECTED:
            self.absent_models[session.agent_id] = frozenset(m.name for m in session.models())
        else:
            self.absent_models.pop(session.agent_id, None)
        self._record_later(f"agent {session.worker_id} as {state}", self.store.set_state,
                           session.agent_id, state)
        log.info("agent %s session ended (%s); %d request(s) failed over", session.worker_id,
                 why, len(failed))
        self._tick_groups()

    async def _sweep_loop(self) -> None:
        while True:
            wake_at = time.monotonic() + self.settings.sweep_interval_s
            await asyncio.sleep(self.settings.sweep_interval_s)
            self.forgive_pause(transport.paused_for(wake_at, time.monotonic()))
            try:
                await self.sweep()
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

    async def sweep(self, now_mono: float | None = None, now: float | None = None) -> None:
        """Apply the lease timing and revocations made by `xim-router revoke`."""
        now_mono = time.monotonic() if now_mono is None else now_mono
        now = time.time() if now is None else now
        for session in list(self.sessions.values()):
            if now_mono - session.last_seen > self.settings.lease_timeout_s:
                log.warning("agent %s missed its lease for %.0f s: disconnected",
                            session.worker_id, now_mono - session.last_seen)
                self._end_session(session, "lease expired", store_mod.DISCONNECTED)
        agents = await self.store_worker.call(self.store.agents)
        self._apply_policies(agents)
        stored = await self.store_worker.call(self.store.groups)
        self.groups.declare([(g.spec, g.epoch) for g in stored])
        self._tick_groups(now_mono)
        live = {s.agent_id for s in self.sessions.values()}       # as of now, after the read
        for agent in agents:
            if agent.state in store_mod.FINAL_STATES:
                self.absent_models.pop(agent.agent_id, None)
                if agent.agent_id in live:
                    self.end_agent(agent.agent_id, "revoked", "this agent's identity was revoked",
                                   store_mod.REVOKED)
            elif (agent.state == store_mod.DISCONNECTED and agent.agent_id not in live
                  and now - agent.state_since > self.settings.dead_after_s):
                log.warning("agent %s disconnected for %.0f s: dead", agent.worker_id,
                            now - agent.state_since)
                self.absent_models.pop(agent.agent_id, None)
                await self._record(f"agent {agent.worker_id} as dead", self.store.set_state,
                                   agent.agent_id, store_mod.DEAD, now)

    # ------------------------------------------------------------ the store, off the loop

    def _record_lease(self, agent_id: str, lease: codec.Lease, at: float) -> None:
        """Store the agent's latest lease; leases that arrive while one is being written
        replace each other, so a slow store holds one per agent, not a backlog."""
        waiting = agent_id in self._latest_lease
        self._latest_lease[agent_id] = (lease, at)
        if not waiting:
            self._in_background(self._write_latest_lease(agent_id))

    async def _write_latest_lease(self, agent_id: str) -> None:
        lease, at = self._latest_lease[agent_id]
        try:
            await self._record(f"the lease of agent {agent_id}", self.store.record_lease,
                               agent_id, _summary(lease, at))
        finally:
            if self._latest_lease.get(agent_id, (None, 0.0))[0] is lease:
                del self._latest_lease[agent_id]
            elif agent_id in self._latest_lease:                   # a newer one came meanwhile
                self._in_background(self._write_latest_lease(agent_id))

    async def _record(self, what: str, write: Callable[..., object], *args: object) -> None:
        """Run a store write on the store's thread; a failure is logged, and what the router
        holds in memory stands (the next write of the same thing may succeed)."""
        try:
            await self.store_worker.call(write, *args)
        except Exception as exc:
            self._limited(logging.ERROR, f"store:{what}", "could not record %s in the store: %s",
                          what, exc)

    def _record_later(self, what: str, write: Callable[..., object], *args: object) -> None:
        self._in_background(self._record(what, write, *args))

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)          # held until done: the loop keeps only weak references
        task.add_done_callback(self._background.discard)

    def _read_monitor(self) -> None:
        """Take in the connection events that are waiting (sessions end on their connection's close)."""
        if self._monitor is not None and transport.readable(self._monitor):
            self._on_monitor_events(self._monitor)

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
                self._connection_closed(int(event["value"]))

    def _connection_closed(self, fd: int) -> None:
        """The connection on ``fd`` is gone: so is the session bound to it.

        Its routing id is free again, and a new connection (of any enrolled key)
        may take it; nothing more is sent there for this session. The monitor
        reports the close before the descriptor is released for reuse, and this
        runs before the frames of any later connection are read.
        """
        session = self._by_fd.get(fd)
        if session is not None:
            self._end_session(session, "connection lost", store_mod.DISCONNECTED)


def _source_fd(payload: zmq.Frame) -> int | None:
    """The file descriptor of the connection a frame came on (how monitor events name it)."""
    try:
        fd = int(payload.get(zmq.SRCFD))
    except (zmq.ZMQError, TypeError, ValueError):
        return None
    return fd if fd >= 0 else None


@dataclass
class _Allowance:
    """One peer's budgets: frames nobody asked for, answers to requests nobody has."""

    unsolicited: TokenBucket
    strays: TokenBucket
    dropped: int = 0
    told_at: float = -math.inf


def _summary(lease: codec.Lease, at: float) -> dict:
    """A JSON-able view of a lease for the store."""
    data = dataclasses.asdict(lease)
    data["at"] = at
    return data


def absent_models_of(agents: list[store_mod.Agent]) -> dict[str, frozenset[str]]:
    """What each agent that may come back served at its last lease, as far as it is allowed:
    a request for such a model is worth a retry (503), not a "no such model" (404)."""
    return {agent.agent_id: frozenset(name for name in _stored_models(agent.last_lease)
                                      if agent.policy.allows(name))
            for agent in agents
            if agent.state not in store_mod.FINAL_STATES and agent.state != store_mod.DEAD
            and agent.last_lease}


def _stored_models(last_lease: dict) -> frozenset[str]:
    """The model names of a lease as the store keeps it (JSON from an older router: checked)."""
    models = last_lease.get("models")
    return frozenset(m["name"] for m in models if isinstance(m, dict) and isinstance(m.get("name"), str)) \
        if isinstance(models, list) else frozenset()
