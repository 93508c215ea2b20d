"""The router's data plane: pick an agent, run one request over the mesh, keep it flowing.

This module knows the serving half of docs/protocol.md (infer, chunk, done,
error, credit, cancel) and nothing of HTTP; `xim_router.openai_api` turns
what it yields into OpenAI responses.

- **Choosing.** Among the active, non-draining agents whose last report says
  the model is ready and whose policy allows it (xim_router.policy: a node's
  own claims count only within what the operator allows), the least loaded
  by the router's own in-flight count (fresher than any lease) over its
  ``max_concurrent`` — capped by the policy's ceiling; full agents are
  skipped. No agent for the model at all → 404; agents that serve it exist
  (draining, loading, reconnecting) but none can take it now → 429 when
  all are full, 503 otherwise.
- **Retrying.** A retryable refusal that comes before anything reached the
  client (at_capacity, draining, engine_unavailable, a dead link) moves the
  request to the next agent, up to `Settings.max_attempts`.
- **Credits.** The infer grants `initial_credit` chunk frames; every
  `credit_batch` frames the HTTP side has written out, one ``credit``
  message grants that many again. A client that stops reading stops the
  grants, and the agent stops reading its engine. The router counts them
  too (`Router.grant`): a chunk beyond them fails the request, so an agent
  that ignores its credit cannot make the router buffer without bound.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

from xim_proto import codec
from xim_router.mesh import AgentUnavailable, Router, Session

log = logging.getLogger("xim_router.dataplane")

# Refusals worth trying on another agent, if nothing was sent to the client yet.
RETRY_ELSEWHERE = frozenset({"at_capacity", "draining", "engine_unavailable", "agent_unavailable"})


@dataclass(frozen=True)
class Settings:
    request_timeout_s: float = 600.0     # the deadline an infer carries
    initial_credit: int = 16             # chunk frames an agent may send before the first grant
    credit_batch: int = 8                # frames written to the client per credit message
    max_attempts: int = 3                # agents tried for one request
    grace_s: float = 5.0                 # how much longer than the deadline the router waits


class RequestFailed(Exception):
    """A request the router answers with an error: a protocol code, a message, an HTTP status."""

    def __init__(self, code: str, message: str, http_status: int | None = None,
                 retryable: bool | None = None):
        spec = codec.ERROR_CODES.get(code)
        self.code = code
        self.message = message
        self.http_status = http_status or (spec.http_status if spec else 500)
        self.retryable = retryable if retryable is not None else bool(spec and spec.retryable)
        super().__init__(f"{code}: {message}")

    @classmethod
    def from_error(cls, msg: codec.Error) -> RequestFailed:
        return cls(msg.code, msg.message, msg.http_status, msg.retryable)


# Fire-and-forget sends (credits, cancels) are held here until they finish: the event
# loop keeps only weak references to tasks, so an unheld one may vanish mid-send.
_BACKGROUND: set[asyncio.Task] = set()


def _in_background(coro) -> None:
    task = asyncio.ensure_future(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def load_of(in_flight: int, max_concurrent: int) -> float:
    """How full an agent is: 0 idle, 1 full."""
    return in_flight / max(1, max_concurrent)


def served_models(router: Router) -> list[str]:
    """Models some connected agent reports ready and may serve, sorted."""
    names: set[str] = set()
    for session in router.sessions.values():
        names.update(m.name for m in session.models() if m.state == "ready")
    return sorted(names)


def models_of_absent_agents(router: Router) -> set[str]:
    """Models that enrolled agents without a live session served at their last lease.

    Such an agent is restarting or reconnecting: a request for its model is
    worth a retry (503), not a "no such model" (404).
    """
    names: set[str] = set()
    for models in router.absent_models.values():       # in memory: routing never reads the store
        names.update(models)
    return names


def choose(router: Router, model: str) -> list[Session]:
    """Agents to try for ``model``, least loaded first; RequestFailed when there is none."""
    ready = router.candidates(model)
    if not ready:
        known = any(m.name == model for s in router.sessions.values() for m in s.models())
        if known or model in models_of_absent_agents(router):
            raise RequestFailed("engine_unavailable",
                                f"no agent has model '{model}' ready right now; try again shortly", 503)
        available = ", ".join(served_models(router)) or "none"
        raise RequestFailed("model_not_found",
                            f"The model '{model}' does not exist or is not served here "
                            f"(available: {available})", 404)
    loads = [(load_of(router.in_flight(s.worker_id), s.max_concurrent), i, s) for i, s in enumerate(ready)]
    open_ = sorted((load, i, s) for load, i, s in loads if load < 1)
    if not open_:
        raise RequestFailed("at_capacity", f"every agent serving '{model}' is at its max_concurrent; "
                                           "retry shortly", 429)
    return [s for _, _, s in open_]


class Exchange:
    """One request on one agent: its queue of chunk/done/error, credits, cancel."""

    def __init__(self, router: Router, settings: Settings, request_id: str, worker_id: str):
        self.router = router
        self.settings = settings
        self.id = request_id
        self.worker_id = worker_id
        self.queue = router.open_request(request_id, worker_id, settings.initial_credit)
        self.finished = False
        self._written = 0
        # One timer per request, not one per chunk: when it fires, a marker
        # lands in the queue and next() turns it into a timeout.
        self._timer = asyncio.get_running_loop().call_later(
            settings.request_timeout_s + settings.grace_s, self.queue.put_nowait, _TIMEOUT)

    async def next(self) -> codec.Message:
        """The next chunk or done from the agent; RequestFailed on an error or the deadline."""
        msg = await self.queue.get()
        if isinstance(msg, codec.Chunk):
            return msg
        if isinstance(msg, codec.Done):
            self.finished = True
            self.close()
            return msg
        if isinstance(msg, codec.Error):
            self.finished = True
            self.close()
            raise RequestFailed.from_error(msg)
        if msg is _TIMEOUT:
            self.cancel("router timeout")
            raise RequestFailed("timeout", "the request did not finish before its deadline "
                                           f"({self.settings.request_timeout_s:g} s)", 504)
        self.cancel("client disconnected")
        raise ClientGone()

    def client_gone(self) -> None:
        """The HTTP side saw its client disconnect: the pending or next `next()` cancels."""
        self.queue.put_nowait(_CLIENT_GONE)

    def written(self) -> None:
        """One chunk frame reached the client's socket; grant more credit every batch."""
        self._written += 1
        if self._written >= self.settings.credit_batch:
            n, self._written = self._written, 0
            self.router.grant(self.id, n)    # counted before the agent can use it
            _in_background(self._send_quietly(codec.Credit(id=self.id, n=n)))

    def cancel(self, reason: str) -> None:
        """Tell the agent to stop (fire and forget) and forget the request."""
        if not self.finished:
            self.finished = True
            _in_background(self._send_quietly(codec.Cancel(id=self.id, reason=reason)))
        self.close()

    def close(self) -> None:
        self._timer.cancel()
        self.router.close_request(self.id)

    async def _send_quietly(self, msg: codec.Message) -> None:
        try:
            await self.router.send(self.worker_id, msg)
        except AgentUnavailable:
            pass        # the agent is gone; its link's end fails the request anyway


class ClientGone(Exception):
    """The HTTP client went away; the agent was told to cancel."""


class Presence:
    """Whether the client is still there, for whichever exchange serves it now."""

    def __init__(self) -> None:
        self.gone = False
        self.exchange: Exchange | None = None

    def attach(self, exchange: Exchange) -> None:
        self.exchange = exchange
        if self.gone:
            exchange.client_gone()

    def mark_gone(self) -> None:
        if not self.gone:
            self.gone = True
            if self.exchange is not None:
                self.exchange.client_gone()


# Markers the queue carries besides the agent's messages.
_CLIENT_GONE = object()
_TIMEOUT = object()


def new_request_id() -> str:
    return "xim-" + uuid.uuid4().hex


async def start(router: Router, settings: Settings, *, model: str, endpoint: str, body: bytes,
                stream: bool, presence: Presence | None = None) -> tuple[Exchange, codec.Message]:
    """Send the request to the best agent and wait for its first answer.

    Returns the exchange and the first chunk (or the done of a short answer).
    Raises RequestFailed if no agent takes it; retryable refusals before the
    first answer move on to the next agent. ``presence`` lets the HTTP side
    cancel while this still waits for the first answer.
    """
    presence = presence or Presence()
    request_id = new_request_id()
    tried: list[str] = []
    last: RequestFailed | None = None
    for attempt in range(settings.max_attempts):
        try:
            agents = [s for s in choose(router, model) if s.worker_id not in tried]
        except RequestFailed as exc:
            raise (last if last is not None and exc.code == "at_capacity" else exc) from None
        if not agents:
            break
        worker_id = agents[0].worker_id
        tried.append(worker_id)
        rid = request_id if attempt == 0 else f"{request_id}-{attempt}"
        exchange = Exchange(router, settings, rid, worker_id)
        presence.attach(exchange)
        try:
            await router.send(worker_id, codec.Infer(
                id=rid, model=model, endpoint=endpoint, body=body, stream=stream,
                deadline_s=settings.request_timeout_s, credit=settings.initial_credit))
            return exchange, await exchange.next()
        except AgentUnavailable as exc:
            exchange.close()
            last = RequestFailed("agent_unavailable", f"agent {worker_id}: {exc}", 503)
        except RequestFailed as exc:
            exchange.close()
            if exc.code not in RETRY_ELSEWHERE:
                raise
            last = exc
        except BaseException:
            exchange.cancel("router gave up")
            raise
        log.info("request %s: agent %s refused (%s); trying another", rid, worker_id, last.code)
    raise last or RequestFailed("at_capacity", f"no agent could take a '{model}' request", 429)
