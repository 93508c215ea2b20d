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
- **Holding.** A node that re-executes in place for an upgrade drains, drops
  its link and says hello again a few seconds later. A request for a model
  the router knows but no session can take now (its nodes are draining,
  loading or away), or that every agent tried refused with one of
  `HOLD_FOR`, waits for one (`Router.availability`, no polling) up to
  `Settings.hold_s` from its arrival, then is sent — or fails with the
  retryable 503 it would have got at once, saying how long it waited. At
  most `Settings.hold_max` requests wait at once (each holds its body and a
  client connection); beyond that the 503 comes at once. An unknown model
  (404) and full agents (429: backpressure) are answered at once; a client
  that goes away stops waiting (`Presence`).
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
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from xim_proto import codec
from xim_router.mesh import AgentUnavailable, Router, Session

log = logging.getLogger("xim_router.dataplane")

# Refusals worth trying on another agent, if nothing was sent to the client yet.
RETRY_ELSEWHERE = frozenset({"at_capacity", "draining", "engine_unavailable", "agent_unavailable"})
# Those worth waiting out for a while when no agent is left to try: a node switching
# over (draining, reconnecting, loading). at_capacity is backpressure: answered at once.
HOLD_FOR = RETRY_ELSEWHERE - {"at_capacity"}
# Endpoints only some agents serve; each says so in hello's capabilities (docs/protocol.md §5.3).
OPTIONAL_ENDPOINTS = frozenset({codec.EMBEDDINGS})


@dataclass(frozen=True)
class Settings:
    request_timeout_s: float = 600.0     # the deadline an infer carries
    initial_credit: int = 16             # chunk frames an agent may send before the first grant
    credit_batch: int = 8                # frames written to the client per credit message
    max_attempts: int = 3                # agents tried for one request
    grace_s: float = 5.0                 # how much longer than the deadline the router waits
    hold_s: float = 10.0                 # how long a request may wait for a node (0: not at all)
    hold_max: int = 256                  # requests that may wait for a node at once


class RequestFailed(Exception):
    """A request the router answers with an error: a protocol code, a message, an HTTP status."""

    def __init__(self, code: str, message: str, http_status: int | None = None,
                 retryable: bool | None = None, param: str | None = None):
        spec = codec.ERROR_CODES.get(code)
        self.code = code
        self.message = message
        self.param = param                   # the body field at fault, for OpenAI's error body
        self.http_status = http_status or (spec.http_status if spec else 500)
        self.retryable = retryable if retryable is not None else bool(spec and spec.retryable)
        super().__init__(f"{code}: {message}")

    @classmethod
    def from_error(cls, msg: codec.Error) -> RequestFailed:
        return cls(msg.code, msg.message, msg.http_status, msg.retryable)


def load_of(in_flight: int, max_concurrent: int) -> float:
    """How full an agent is: 0 idle, 1 full."""
    return in_flight / max(1, max_concurrent)


def served_models(router: Router) -> list[str]:
    """Models some connected agent reports ready and may serve, sorted."""
    names: set[str] = set()
    for session in router.sessions.values():
        names.update(m.name for m in session.models() if m.state == "ready")
    return sorted(names)


def served_model_lengths(router: Router) -> dict[str, int | None]:
    """The models of `served_models`, each with the smallest ``max_model_len`` a node serving
    it reports (a request within it fits on every one); None when none reports one."""
    lengths: dict[str, int | None] = {}
    for session in router.sessions.values():
        for m in session.models():
            if m.state != "ready":
                continue
            known = lengths.get(m.name)
            if m.name not in lengths or known is None:
                lengths[m.name] = m.max_model_len
            elif m.max_model_len is not None:
                lengths[m.name] = min(known, m.max_model_len)
    return lengths


def models_of_absent_agents(router: Router) -> set[str]:
    """Models that enrolled agents without a live session served at their last lease.

    Such an agent is restarting or reconnecting: a request for its model is
    worth a retry (503), not a "no such model" (404).
    """
    names: set[str] = set()
    for models in router.absent_models.values():       # in memory: routing never reads the store
        names.update(models)
    return names


def choose(router: Router, model: str, endpoint: str = "chat.completions") -> list[Session]:
    """Agents to try for ``model`` at ``endpoint``, least loaded first; RequestFailed when there is none.

    An optional endpoint (embeddings) goes only to agents that announced it in hello
    (revision 1.2); when agents serve the model but none of them offers it, and no agent
    that is away served the model (it might), that is the client's 400.
    """
    ready = router.candidates(model)
    if endpoint in OPTIONAL_ENDPOINTS:
        able = [s for s in ready if endpoint in s.hello.capabilities]
        if ready and not able and model not in models_of_absent_agents(router):
            raise RequestFailed("bad_request", f"no node serving '{model}' offers {endpoint}: their engines "
                                               "do not serve that endpoint (or their ximd predates it)",
                                400, param="model")
        ready = able
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
        self._held: object | None = None    # what more_chunks() took off the queue but is not a chunk
        # One timer per request, not one per chunk: when it fires, a marker
        # lands in the queue and next() turns it into a timeout.
        self._timer = asyncio.get_running_loop().call_later(
            settings.request_timeout_s + settings.grace_s, self._expire)

    def _expire(self) -> None:
        self.queue.put_nowait(_TIMEOUT)

    async def next(self) -> codec.Message:
        """The next chunk or done from the agent; RequestFailed on an error or the deadline."""
        if self._held is not None:
            msg, self._held = self._held, None
        else:
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

    def more_chunks(self) -> list[codec.Chunk]:
        """The chunk frames already queued behind the one in hand, without waiting.

        A busy router wakes a stream's writer less often than its frames arrive;
        writing what gathered in one go costs one HTTP write instead of one per
        frame (docs/performance.md). Whatever else comes next waits for `next()`.
        """
        chunks: list[codec.Chunk] = []
        while self._held is None and not self.queue.empty():
            msg = self.queue.get_nowait()
            if isinstance(msg, codec.Chunk):
                chunks.append(msg)
            else:
                self._held = msg
        return chunks

    def forward(self, deliver: Callable[[codec.Message], None]) -> None:
        """From now on hand this request's chunk, done and error to ``deliver`` as they
        arrive, instead of queueing them for `next()` (the core of a router with HTTP
        workers passes them on to the worker that serves the client: no task wakes for
        them here). What is queued already goes first. The deadline, `client_gone` and
        `cancel` keep their meaning: an expired deadline cancels on the agent and
        delivers a ``timeout`` error; a gone client cancels and delivers nothing."""
        queued = [] if self._held is None else [self._held]
        self._held = None
        while not self.queue.empty():
            queued.append(self.queue.get_nowait())
        self.queue = _Forward(self, deliver)       # type: ignore[assignment]
        self.router.redirect(self.id, self.queue)
        for msg in queued:
            self.queue.put_nowait(msg)

    def client_gone(self) -> None:
        """The HTTP side saw its client disconnect: the pending or next `next()` cancels."""
        self.queue.put_nowait(_CLIENT_GONE)

    def written(self, frames: int = 1) -> None:
        """Chunk frames reached the client's socket; grant more credit every batch."""
        self._written += frames
        if self._written >= self.settings.credit_batch:
            n, self._written = self._written, 0
            self.router.grant(self.id, n)    # counted before the agent can use it
            self.router.send_soon(self.worker_id, codec.Credit(id=self.id, n=n))

    def cancel(self, reason: str) -> None:
        """Tell the agent to stop (fire and forget) and forget the request."""
        if not self.finished:
            self.finished = True
            self.router.send_soon(self.worker_id, codec.Cancel(id=self.id, reason=reason))
        self.close()

    def close(self) -> None:
        self._timer.cancel()
        self.router.close_request(self.id)


class _Forward:
    """An exchange's queue once it forwards (`Exchange.forward`): what lands in it is
    handed on at once, the markers turned into what `next()` would have made of them."""

    def __init__(self, exchange: Exchange, deliver: Callable[[codec.Message], None]):
        self.exchange, self.deliver = exchange, deliver

    def empty(self) -> bool:
        return True

    def put_nowait(self, msg: object) -> None:
        exchange = self.exchange
        if exchange.finished and not isinstance(msg, codec.Error):
            return          # cancelled or ended: nothing more goes out (an error still may: stopping)
        if isinstance(msg, codec.Chunk):
            self.deliver(msg)
        elif isinstance(msg, (codec.Done, codec.Error)):
            exchange.finished = True
            exchange.close()
            self.deliver(msg)
        elif msg is _TIMEOUT:
            exchange.cancel("router timeout")
            self.deliver(codec.error_for("timeout", "the request did not finish before its deadline "
                                         f"({exchange.settings.request_timeout_s:g} s)",
                                         request_id=exchange.id))
        else:
            exchange.cancel("client disconnected")


class ClientGone(Exception):
    """The HTTP client went away; the agent was told to cancel."""


class Presence:
    """Whether the client is still there, for whichever exchange serves it now,
    or for the wait before one (a request held for a node)."""

    def __init__(self) -> None:
        self.gone = False
        self.exchange: Exchange | None = None
        self.ended: RequestFailed | None = None     # the router ends the request (stopping)
        self._wake = asyncio.Event()

    def attach(self, exchange: Exchange) -> None:
        self.exchange = exchange
        if self.gone:
            exchange.client_gone()

    def mark_gone(self) -> None:
        if not self.gone:
            self.gone = True
            self._wake.set()
            if self.exchange is not None:
                self.exchange.client_gone()

    def end(self, failure: RequestFailed) -> None:
        """The router gives up on this request (it is stopping): a wait for a node ends
        with ``failure``; an exchange already under way is the caller's to end."""
        self.ended = failure
        self._wake.set()

    async def interrupted(self) -> None:
        """Returns once the client is gone or the router ended the request."""
        await self._wake.wait()


class Holds:
    """The requests waiting for a node (Settings.hold_s), shared by one router's handlers:
    how many wait now, bounded by Settings.hold_max, and what the waits came to."""

    def __init__(self) -> None:
        self.waiting = 0            # now
        self.held = 0               # requests that waited, since the start
        self.waited_s = 0.0         # their waits together
        self.outcomes: dict[str, int] = {}   # sent, gave_up, client_gone, stopped, full

    def enter(self, limit: int) -> bool:
        if self.waiting >= limit:
            self._count("full")
            return False
        self.waiting += 1
        self.held += 1
        return True

    def leave(self, waited_s: float, outcome: str) -> None:
        self.waiting -= 1
        self.waited_s += waited_s
        self._count(outcome)

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


# Markers the queue carries besides the agent's messages.
_CLIENT_GONE = object()
_TIMEOUT = object()


def new_request_id() -> str:
    return "xim-" + uuid.uuid4().hex


async def start(router: Router, settings: Settings, *, model: str, endpoint: str, body: bytes,
                stream: bool, presence: Presence | None = None,
                holds: Holds | None = None) -> tuple[Exchange, codec.Message]:
    """Send the request to the best agent and wait for its first answer.

    Returns the exchange and the first chunk (or the done of a short answer).
    Raises RequestFailed if no agent takes it; retryable refusals before the
    first answer move on to the next agent. When none is left to try and the
    model is only away for now, it waits for a node up to ``settings.hold_s``
    (`_Hold`). ``presence`` lets the HTTP side cancel while this still waits
    for a node or the first answer (ClientGone).
    """
    presence = presence or Presence()
    hold = _Hold(router, settings, holds or Holds(), presence, model)
    request_id = new_request_id()
    tried: set[str] = set()            # sessions tried since the last wait
    last: RequestFailed | None = None
    backpressure = False               # an agent said at_capacity: not worth waiting for
    attempt = 0
    try:
        while attempt < settings.max_attempts:
            try:
                agents = [s for s in choose(router, model, endpoint) if s.session_id not in tried]
            except RequestFailed as exc:
                if exc.code == "at_capacity":
                    raise (last if last is not None else exc) from None
                if exc.code not in HOLD_FOR:
                    raise                                   # an unknown model: 404 at once
                await hold.wait(exc)                        # away for now: wait for a node
                tried.clear()
                continue
            if not agents:
                if last is None or backpressure or last.code not in HOLD_FOR:
                    break
                await hold.wait(last)       # every agent refused for now: wait for a change
                tried.clear()
                continue
            session = agents[0]
            worker_id = session.worker_id
            tried.add(session.session_id)
            rid = request_id if attempt == 0 else f"{request_id}-{attempt}"
            attempt += 1
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
                backpressure = backpressure or exc.code == "at_capacity"
            except BaseException:
                exchange.cancel("router gave up")
                raise
            log.info("request %s: agent %s refused (%s); trying another", rid, worker_id, last.code)
        raise last or RequestFailed("at_capacity", f"no agent could take a '{model}' request", 429)
    finally:
        hold.done()


class _Hold:
    """One request's wait for a node: its budget from arrival, its place among the `Holds`."""

    def __init__(self, router: Router, settings: Settings, holds: Holds, presence: Presence, model: str):
        self.router, self.settings, self.holds, self.presence = router, settings, holds, presence
        self.model = model
        self.arrived = time.monotonic()
        self.deadline = self.arrived + settings.hold_s
        self.since: float | None = None        # when it began to wait (it holds a place)
        self.outcome = "sent"

    async def wait(self, failure: RequestFailed) -> None:
        """Wait until some session may take more than before, the client goes, or the
        budget ends; the last two raise (ClientGone, or ``failure`` saying it waited)."""
        if self.settings.hold_s <= 0:
            raise failure                        # holding is off: the answer comes at once
        event = self.router.availability()     # taken before the wait: no change is missed
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self._gave_up(failure)
        if self.since is None:
            if not self.holds.enter(self.settings.hold_max):
                raise RequestFailed(failure.code, f"{failure.message} ({self.settings.hold_max} "
                                                  "requests already wait for a node)",
                                    failure.http_status, failure.retryable)
            self.since = time.monotonic()
            log.debug("a request for '%s' waits up to %.1f s for a node (%s)", self.model, left,
                      failure.code)
        changed = asyncio.ensure_future(event.wait())
        interrupted = asyncio.ensure_future(self.presence.interrupted())
        try:
            await asyncio.wait((changed, interrupted), timeout=left,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            interrupted.cancel()
        if self.presence.gone:
            self.outcome = "client_gone"
            raise ClientGone()
        if self.presence.ended is not None:
            self.outcome = "stopped"
            raise self.presence.ended
        if not event.is_set():
            raise self._gave_up(failure)

    def _gave_up(self, failure: RequestFailed) -> RequestFailed:
        self.outcome = "gave_up"
        waited = time.monotonic() - self.arrived
        return RequestFailed(failure.code, f"{failure.message} (waited {waited:.1f} s for a node "
                                           "to take it)",
                             failure.http_status, failure.retryable)

    def done(self) -> None:
        if self.since is not None:
            waited = time.monotonic() - self.since
            self.holds.leave(waited, self.outcome)
            log.debug("a request for '%s' waited %.2f s for a node: %s", self.model, waited, self.outcome)
            self.since = None
