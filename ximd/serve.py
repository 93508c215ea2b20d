"""The request bridge: ``infer`` from the mesh → the engine's OpenAI API → ``chunk``/``done``.

One `Bridge` per engine. For each ``infer`` the router sends, it POSTs the
OpenAI body to the engine's ``/v1/chat/completions``, ``/v1/completions`` or
``/v1/embeddings`` over the engine's unix socket and streams the answer back
(docs/protocol.md §5):

- **Coalescing.** Every read from the engine takes all the bytes that are
  ready; the complete SSE events in them travel as ONE ``chunk`` frame. The
  link's message rate therefore follows the reader, not tokens/s: a busy
  node sends fewer, fuller frames instead of falling behind.
- **Push.** A streamed answer's frames leave from the engine connection's
  read callback (`StreamRelay`, `Response.push`) while the request has credit
  and the link has room; the request's task wakes only when they run out, at
  the end, and on errors, so a token costs one event-loop callback, not two.
- **Pass-through.** Each event's ``data:`` payload goes on as the engine's
  own bytes. Only the chunks that carry a ``finish_reason`` or the usage are
  parsed (once or twice per request), for ``done`` and the metrics.
- **Credits.** Each chunk frame spends one credit; the router grants more as
  its client reads. Out of credit, the bridge stops reading the engine, so
  the engine's socket fills and the engine itself waits: a slow client
  cannot make ximd buffer without bound.
- **Limits.** More than ``max_concurrent`` requests → an immediate retryable
  ``at_capacity`` error. ``cancel`` closes the engine response (the engine
  aborts the request) and frees the slot. ``drain(grace)`` refuses new work,
  lets in-flight requests finish within the grace and cancels the rest
  (the agent tells the router first, with the link's ``drain``).
- **Errors.** Engine statuses and connection failures become the protocol's
  error codes (`engine_error`), so the router can answer with a proper HTTP
  status.

The HTTP is `ximd.enginehttp`'s: a fixed request template and a chunk reader
made for this one exchange, on pooled keep-alive connections.

Streamed requests are sent to the engine with
``stream_options.include_usage`` on; the usage-only chunk that produces is
not forwarded as a ``chunk`` but carried in ``done.body`` (and parsed into
``done.usage``), and the router shows it to clients that asked for it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from xim_proto import codec
from ximd.enginehttp import EngineClient, EngineHTTPError, ProtocolError, Response, Unreachable
from ximd.metrics import NodeMetrics

log = logging.getLogger("ximd.serve")

ENDPOINT_PATHS = {"chat.completions": "/v1/chat/completions", "completions": "/v1/completions",
                  "embeddings": "/v1/embeddings"}
# Endpoints an engine serves only in some configurations (vLLM: embeddings with a pooling
# runner), probed once it is healthy (`Bridge.probe_endpoints`) and announced in hello's
# capabilities (docs/protocol.md §5.2); never streamed: the answer travels whole in done.body.
OPTIONAL_ENDPOINTS = (codec.EMBEDDINGS,)
# Data per chunk frame: far under the frame limit, so msgpack's per-item
# overhead can never push a frame over it.
MAX_CHUNK_DATA_BYTES = 256 * 1024
# A non-streamed answer travels whole in done.body; leave room for the envelope.
MAX_WHOLE_BODY_BYTES = codec.MAX_FRAME_BYTES - 16 * 1024
# One SSE event travels as one payload of a chunk frame: a longer one could never be sent,
# and an engine that never ends its event must not make the bridge buffer without bound
# (credit cannot stop it: no chunk frame goes out, so none is spent).
MAX_EVENT_BYTES = MAX_WHOLE_BODY_BYTES
ERROR_BODY_LIMIT = 64 * 1024
DEFAULT_CREDIT_TIMEOUT_S = 60.0

Send = Callable[[codec.Message], Awaitable[None]]
# Queues a frame if the link has room, else False (MeshLink.try_send): the fast path of a stream.
TrySend = Callable[[codec.Message], bool]


class EngineError(Exception):
    """A request failed in a way the protocol has a code for."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class LinkLost(Exception):
    """The link refused a frame: nobody is listening for this request any more."""


# ---------------------------------------------------------------- pure helpers


def error_code_for_status(status: int) -> str:
    """The protocol error code for an engine HTTP status."""
    if status == 404:
        return "model_not_found"
    if status in (408, 504):
        return "timeout"
    if status == 429:
        return "at_capacity"
    if status in (502, 503):
        return "engine_unavailable"
    if status >= 500:
        return "internal"
    return "bad_request"


def engine_error_message(status: int, body: bytes) -> str:
    """The human part of an engine error body (vLLM's ``{"error": {"message"}}`` and older shapes)."""
    message = None
    try:
        obj = json.loads(body)
        if isinstance(obj, dict):
            inner = obj.get("error")
            if isinstance(inner, dict):
                message = inner.get("message")
            elif isinstance(inner, str):
                message = inner
            message = message or obj.get("message") or obj.get("detail")
    except ValueError:
        pass
    if not isinstance(message, str) or not message:
        message = body[:300].decode("utf-8", "replace").strip() or "no details"
    return f"engine answered HTTP {status}: {message[:1000]}"


def with_usage_requested(body: bytes) -> bytes:
    """``body`` with ``stream_options.include_usage`` on, whatever the client asked.

    The node is the one place that asks the engine for usage (the router passes
    the client's body through): done.usage and the token metrics need it, and the
    router shows the usage chunk only to clients that asked. At most one JSON
    round trip per streamed request. A body that is not a JSON object goes
    through unchanged and the engine rejects it.
    """
    if b'"include_usage":true' in body or b'"include_usage": true' in body:
        return body
    try:
        obj = json.loads(body)
    except ValueError:
        return body
    if not isinstance(obj, dict):
        return body
    options = obj.get("stream_options")
    obj["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return json.dumps(obj, separators=(",", ":")).encode()


def sse_data(event: bytes) -> bytes | None:
    """The ``data`` of one SSE event (lines joined by newline), or None for comments/empty."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]                          # the engine's usual one-line event
    lines = [line[5:].lstrip(b" ") if line.startswith(b"data:") else None
             for line in event.replace(b"\r\n", b"\n").split(b"\n")]
    parts = [line for line in lines if line is not None]
    return b"\n".join(parts) if parts else None


def has_finish_reason(payload: bytes) -> bool:
    """Whether some choice in this chunk carries a finish_reason (a string, not null).

    Two substring tests instead of a JSON parse: this runs for every event.
    """
    return b'"finish_reason":"' in payload or b'"finish_reason": "' in payload


def finish_reason_of(obj: dict) -> str | None:
    reasons = [c.get("finish_reason") for c in obj.get("choices") or () if isinstance(c, dict)]
    reasons = [r for r in reasons if isinstance(r, str)]
    return reasons[-1] if reasons else None


def usage_of(raw: object) -> codec.Usage | None:
    if not isinstance(raw, dict):
        return None
    try:
        prompt = int(raw.get("prompt_tokens") or 0)
        completion = int(raw.get("completion_tokens") or 0)
        total = int(raw.get("total_tokens") or prompt + completion)
    except (TypeError, ValueError):
        return None
    return codec.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)


def frames_of(payloads: list[bytes], limit: int = MAX_CHUNK_DATA_BYTES) -> Iterable[list[bytes]]:
    """Split payloads into groups whose sizes add up to at most ``limit`` (one payload at least)."""
    group: list[bytes] = []
    size = 0
    for payload in payloads:
        if group and size + len(payload) > limit:
            yield group
            group, size = [], 0
        group.append(payload)
        size += len(payload)
    if group:
        yield group


class EventStream:
    """An engine's SSE stream, fed as it arrives: the chunk frames to relay, and what
    ``done`` carries (the finish reason, the usage, the usage-only chunk itself).

    Pure: bytes in, payloads out. Each event's ``data`` goes on as the engine's own
    bytes; only an event that carries a finish_reason or the usage is parsed.
    """

    def __init__(self) -> None:
        self.tail = b""                          # the start of an event still to come
        self.finish: str | None = None
        self.usage: codec.Usage | None = None
        self.usage_payload: bytes | None = None  # the usage-only chunk: travels in done
        self.saw_done = False

    def frames(self, data: bytes) -> list[list[bytes]]:
        """The payloads of the events ``data`` completes, grouped into chunk frames (in
        the usual case one). EngineError for an event longer than a frame can carry."""
        if self.tail:
            data = self.tail + data
        events = data.split(b"\n\n")
        self.tail = events.pop()
        if len(self.tail) > MAX_EVENT_BYTES:
            raise EngineError("internal", f"the engine sent an SSE event over {MAX_EVENT_BYTES} bytes, "
                                          "more than a frame carries")
        payloads = [payload for payload in map(self._relayed, events) if payload is not None]
        if not payloads:
            return []
        if len(data) <= MAX_CHUNK_DATA_BYTES:
            return [payloads]
        return list(frames_of(payloads))

    def _relayed(self, event: bytes) -> bytes | None:
        """The payload of ``event`` if it goes on in a chunk frame (noted here if it does not)."""
        payload = sse_data(event)
        if payload is None:
            return None
        if payload == b"[DONE]":
            self.saw_done = True
            return None
        if b'"usage"' in payload or has_finish_reason(payload):
            obj = _json_or_none(payload)
            if obj is not None:
                self.finish = finish_reason_of(obj) or self.finish
                self.usage = usage_of(obj.get("usage")) or self.usage
                if "usage" in obj and obj["usage"] and not obj.get("choices"):
                    self.usage_payload = payload
                    return None
        return payload

    def ended_with_done(self) -> bool:
        """At the end of the body: whether the engine sent its ``[DONE]`` (the last event
        may lack its blank line)."""
        tail = self.tail.strip()
        return self.saw_done or (bool(tail) and sse_data(tail) == b"[DONE]")


# ---------------------------------------------------------------- the bridge


@dataclass(eq=False)
class _Request:
    infer: codec.Infer
    received: float                                   # monotonic
    credit: int
    credit_granted: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    cancel_reason: str | None = None                  # router | drain | link
    seq: int = 0
    sent_first: bool = False

    @property
    def id(self) -> str:
        return self.infer.id

    def grant(self, n: int) -> None:
        self.credit += n
        if self.credit > 0:
            self.credit_granted.set()

    def spend(self) -> None:
        self.credit -= 1
        if self.credit <= 0:
            self.credit_granted.clear()


class StreamRelay:
    """A streamed answer's way from the engine to the link, as the response's sink.

    It runs in the engine connection's read callback (`Response.push`): each read's
    events leave at once as a chunk frame while ``offer`` can send it without waiting
    (the request has credit and the link room), so a token costs no task step. The first
    frame ``offer`` refuses is kept, with every frame after it, in order, and the
    response paused, which wakes the request's task: it sends what was kept the waiting
    way and resumes (`Bridge._relay_stream`). Out of credit it pauses as well: what the
    engine writes meanwhile waits in the socket and leaves in one frame when credit comes.
    """

    def __init__(self, request: _Request, response: Response, offer: Callable[[list[bytes]], bool]):
        self.events = EventStream()
        self.kept: deque[list[bytes]] = deque()      # frames for the task to send, in order
        self._request = request
        self._response = response
        self._offer = offer

    def feed(self, data: bytes) -> None:
        for payloads in self.events.frames(data):
            if self.kept or not self._offer(payloads):
                self.kept.append(payloads)
        if self.kept or self._request.credit <= 0:
            self._response.pause()


class Bridge:
    """Runs the router's inference requests on the engine behind ``engine_socket``.

    ``send`` is the link's send; ``try_send`` (optional) its send that never waits, which
    lets a streamed answer go from the engine's read callback straight to the link
    (`StreamRelay`; without it every frame takes the waiting way). ``models``
    (optional) names the models the engine serves now; ``engine_ready`` (optional)
    says whether it is healthy.
    Feed every ``infer``, ``cancel``, ``credit`` and ``lease_ack`` to `handle()`.
    """

    def __init__(self, engine_socket: Path, *, max_concurrent: int, send: Send,
                 models: Callable[[], Collection[str]] | None = None,
                 engine_ready: Callable[[], bool] | None = None,
                 try_send: TrySend | None = None,
                 metrics: NodeMetrics | None = None,
                 credit_timeout_s: float = DEFAULT_CREDIT_TIMEOUT_S,
                 connect_timeout_s: float = 5.0):
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        self.engine_socket = Path(engine_socket)
        self.max_concurrent = max_concurrent
        self.send = send
        self.try_send = try_send
        self.models = models
        self.engine_ready = engine_ready
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self.credit_timeout_s = credit_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.draining = False
        self.optional_endpoints: frozenset[str] = frozenset()   # what probe_engine found
        self.max_model_len: int | None = None                    # the engine's own, per probe_engine
        self._requests: dict[str, _Request] = {}
        self._client: EngineClient | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # Keep-alive connections to the engine save a connect per request; the
        # pool has no limit: admission is max_concurrent's job.
        self._client = EngineClient(self.engine_socket, connect_timeout_s=self.connect_timeout_s)

    async def close(self) -> None:
        """Cancel everything without telling the router (use `drain` for a polite stop)."""
        await self._cancel_all("link", wait_s=5.0)
        if self._client is not None:
            self._client.close()
            self._client = None

    async def probe_engine(self, timeout_s: float = 5.0) -> None:
        """Ask the healthy engine, without running anything, what the router should know:
        which of OPTIONAL_ENDPOINTS it serves (`optional_endpoints`, for `_refusal` and
        hello) and the context length it runs with (`max_model_len`, from its /v1/models).

        A GET on a POST-only route is a 405 where the route exists and a 404 where it
        does not (vLLM registers /v1/embeddings only for a model it runs for pooling);
        no answer counts as not served.
        """
        if self._client is None:
            return
        found = set()
        for endpoint in OPTIONAL_ENDPOINTS:
            try:
                status, _ = await self._get(ENDPOINT_PATHS[endpoint], timeout_s)
                if status == 405:
                    found.add(endpoint)
            except (EngineHTTPError, TimeoutError) as exc:
                log.info("could not ask the engine whether it serves %s: %r", endpoint, exc)
        self.optional_endpoints = frozenset(found)
        try:
            status, body = await self._get("/v1/models", timeout_s)
            listed = json.loads(body) if status == 200 else None
        except (EngineHTTPError, TimeoutError, ValueError) as exc:
            log.info("could not read the engine's model list: %r", exc)
            listed = None
        lengths = [m.get("max_model_len") for m in (listed or {}).get("data") or ()
                   if isinstance(m, dict)] if isinstance(listed, dict) else []
        self.max_model_len = next((n for n in lengths if isinstance(n, int) and not isinstance(n, bool)
                                   and n > 0), None)

    async def _get(self, path: str, timeout_s: float) -> tuple[int, bytes]:
        """A GET to the engine: its status and its body (at most MAX_WHOLE_BODY_BYTES of it)."""
        assert self._client is not None
        async with asyncio.timeout(timeout_s):
            response = await self._client.request("GET", path)
            try:
                body = await response.read(MAX_WHOLE_BODY_BYTES)
            except BaseException:
                response.close()
                raise
            response.release()
        return response.status, body

    # ------------------------------------------------------------ what the agent reads

    @property
    def running(self) -> int:
        return len(self._requests)

    def in_flight_ids(self) -> list[str]:
        return list(self._requests)

    # ------------------------------------------------------------ messages from the router

    async def handle(self, msg: codec.Message) -> bool:
        """Act on a serving message; False if ``msg`` is not one (the caller handles it)."""
        if isinstance(msg, codec.Infer):
            await self._admit(msg)
        elif isinstance(msg, codec.Credit):
            request = self._requests.get(msg.id)
            if request is not None and msg.n > 0:
                request.grant(msg.n)
        elif isinstance(msg, codec.Cancel):
            self._cancel(msg.id, "router")
        elif isinstance(msg, codec.LeaseAck):
            for request_id in msg.stale or ():
                self._cancel(request_id, "router")   # the router no longer knows it
        elif isinstance(msg, codec.DrainAck):
            log.info("router acknowledged the drain (%d request(s) in flight there)", msg.in_flight)
        else:
            return False
        return True

    async def _admit(self, infer: codec.Infer) -> None:
        refusal = self._refusal(infer)
        if refusal is not None:
            code, message = refusal
            self.metrics.request_finished(code)
            log.info("refused request %s: %s", infer.id, message,
                     extra={"fields": {"XIM_REQUEST_ID": infer.id}})
            await self._send_quietly(codec.error_for(code, message, request_id=infer.id))
            return
        request = _Request(infer=infer, received=time.monotonic(), credit=infer.credit)
        if request.credit > 0:
            request.credit_granted.set()
        self._requests[infer.id] = request
        self.metrics.in_flight = len(self._requests)
        request.task = asyncio.ensure_future(self._serve(request))
        request.task.add_done_callback(lambda _task: self._forget(request, "cancelled"))

    def _forget(self, request: _Request, outcome: str) -> None:
        """Free the slot of a finished request (once, whichever path gets here first).

        The done-callback matters for a task cancelled before it ever ran:
        its coroutine's ``finally`` never executes.
        """
        if self._requests.get(request.id) is request:
            del self._requests[request.id]
            self.metrics.in_flight = len(self._requests)
            self.metrics.request_finished(outcome)

    def _refusal(self, infer: codec.Infer) -> tuple[str, str] | None:
        if self.draining:
            return "draining", "this node is draining and takes no new requests"
        if infer.id in self._requests:
            return "bad_request", f"request id {infer.id!r} is already in flight"
        if infer.endpoint not in ENDPOINT_PATHS:
            return "bad_request", (f"unknown endpoint {infer.endpoint!r} "
                                   f"(expected one of {', '.join(ENDPOINT_PATHS)})")
        if infer.endpoint in OPTIONAL_ENDPOINTS:
            if infer.endpoint not in self.optional_endpoints:
                return "bad_request", f"this node's engine does not serve {infer.endpoint}"
            if infer.stream:
                return "bad_request", f"{infer.endpoint} are not streamed"
        if self.models is not None:
            served = self.models()
            if infer.model not in served:
                return "model_not_found", (f"model {infer.model!r} is not served here "
                                           f"(serving: {', '.join(sorted(served)) or 'nothing'})")
        if self.engine_ready is not None and not self.engine_ready():
            return "engine_unavailable", "the engine is not ready"
        if len(self._requests) >= self.max_concurrent:
            return "at_capacity", f"{self.max_concurrent} requests already running (max_concurrent)"
        return None

    # ------------------------------------------------------------ stopping

    def _cancel(self, request_id: str, reason: str) -> bool:
        request = self._requests.get(request_id)
        if request is None or request.task is None or request.task.done():
            return False
        request.cancel_reason = request.cancel_reason or reason
        request.task.cancel()
        return True

    async def _cancel_all(self, reason: str, wait_s: float) -> int:
        requests = list(self._requests.values())
        for request in requests:
            self._cancel(request.id, reason)
        tasks = [r.task for r in requests if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=wait_s)
        return len(requests)

    def abort_all(self, reason: str = "link") -> int:
        """Cancel every request without a word to the router (its link is gone)."""
        return sum(self._cancel(request_id, reason) for request_id in list(self._requests))

    async def drain(self, grace_s: float) -> int:
        """Refuse new work, let in-flight requests finish within ``grace_s``, cancel the rest.

        Telling the router to send no more is the link's job (MeshLink.drain);
        call it first. Returns how many requests were still running at the end
        of the grace and were cancelled (each gets a ``draining`` error).
        """
        self.draining = True
        tasks = [r.task for r in self._requests.values() if r.task is not None]
        if tasks:
            log.info("draining: waiting up to %.0f s for %d request(s)", grace_s, len(tasks))
            await asyncio.wait(tasks, timeout=grace_s)
        left = await self._cancel_all("drain", wait_s=5.0)
        if left:
            log.warning("drain grace of %.0f s ran out: cancelled %d request(s)", grace_s, left)
        return left

    # ------------------------------------------------------------ one request

    async def _serve(self, request: _Request) -> None:
        rid = request.id
        fields = {"fields": {"XIM_REQUEST_ID": rid}}
        outcome = "internal"
        try:
            async with asyncio.timeout(request.infer.deadline_s if request.infer.deadline_s > 0 else None):
                usage = await self._exchange(request)
            outcome = "ok"
            if usage is not None:
                self.metrics.tokens(usage.prompt_tokens, usage.completion_tokens)
            log.debug("request %s finished in %.3f s", rid, time.monotonic() - request.received,
                      extra=fields)
        except asyncio.CancelledError:
            outcome = "cancelled"
            if request.cancel_reason == "drain":
                await self._send_quietly(codec.error_for(
                    "draining", "ximd stopped before the request finished (drain grace ran out)",
                    request_id=rid))
            log.info("request %s cancelled (%s)", rid, request.cancel_reason or "shutdown",
                     extra=fields)
        except TimeoutError:
            outcome = "timeout"
            await self._send_quietly(codec.error_for(
                "timeout", f"the request's deadline of {request.infer.deadline_s:g} s passed",
                request_id=rid))
            log.warning("request %s timed out after %.1f s", rid, request.infer.deadline_s,
                        extra=fields)
        except EngineError as exc:
            outcome = exc.code
            await self._send_quietly(codec.error_for(exc.code, exc.message, request_id=rid))
            log.warning("request %s failed: %s", rid, exc.message, extra=fields)
        except LinkLost as exc:
            outcome = "link_lost"
            log.info("request %s abandoned: %s", rid, exc, extra=fields)
        except Exception as exc:   # a bug here must fail one request, not the bridge
            log.exception("request %s failed unexpectedly", rid, extra=fields)
            await self._send_quietly(codec.error_for("internal", f"ximd: {type(exc).__name__}",
                                                     request_id=rid))
        finally:
            self._forget(request, outcome)

    async def _exchange(self, request: _Request) -> codec.Usage | None:
        infer = request.infer
        if self._client is None:
            raise EngineError("internal", "the bridge is not started")
        body = with_usage_requested(infer.body) if infer.stream else infer.body
        try:
            response = await self._client.request("POST", ENDPOINT_PATHS[infer.endpoint], body,
                                                  request_id=infer.id)
        except Unreachable as exc:
            raise EngineError("engine_unavailable", f"cannot reach the engine at "
                                                    f"{self.engine_socket}: {exc}") from None
        except EngineHTTPError as exc:
            raise _broken(exc) from None
        except ValueError as exc:                 # an id no header can carry
            raise EngineError("bad_request", str(exc)) from None
        completed = False
        try:
            if response.status != 200:
                detail = await response.read(ERROR_BODY_LIMIT)
                raise EngineError(error_code_for_status(response.status),
                                  engine_error_message(response.status, detail))
            streamed = infer.stream and response.content_type == "text/event-stream"
            if streamed:
                usage = await self._relay_stream(request, response)
            else:
                usage = await self._relay_whole(request, response)
            completed = True
            return usage
        except EngineHTTPError as exc:
            raise _broken(exc) from None
        finally:
            # release() returns a fully read connection to the pool; close()
            # drops one mid-answer, which is how the engine learns to abort.
            if completed:
                response.release()
            else:
                response.close()

    async def _relay_whole(self, request: _Request, response: Response) -> codec.Usage | None:
        body = await response.read(MAX_WHOLE_BODY_BYTES + 1)
        if len(body) > MAX_WHOLE_BODY_BYTES:
            hint = "send fewer inputs per request" if request.infer.endpoint == "embeddings" \
                else "ask for it streamed"
            raise EngineError("internal", f"the engine's answer is over {MAX_WHOLE_BODY_BYTES} bytes; {hint}")
        try:
            obj = json.loads(body)
        except ValueError:
            raise EngineError("internal", "the engine's answer is not JSON") from None
        usage = usage_of(obj.get("usage")) if isinstance(obj, dict) else None
        finish = finish_reason_of(obj) if isinstance(obj, dict) else None
        self._first_output(request)
        await self._send(codec.Done(id=request.id, finish_reason=finish, usage=usage, body=body))
        return usage

    async def _relay_stream(self, request: _Request, response: Response) -> codec.Usage | None:
        relay = StreamRelay(request, response, functools.partial(self._try_chunk, request))
        response.push(relay.feed)
        while not await response.pushed():          # paused: frames kept, or out of credit
            while relay.kept:
                await self._send_chunk(request, relay.kept.popleft())
            if request.credit <= 0:
                await self._wait_for_credit(request)
            response.resume()
        events = relay.events
        if not events.ended_with_done():
            raise EngineError("engine_unavailable", "the engine ended the stream before [DONE]")
        await self._send(codec.Done(id=request.id, finish_reason=events.finish, usage=events.usage,
                                    body=events.usage_payload))
        return events.usage

    async def _wait_for_credit(self, request: _Request) -> None:
        try:
            async with asyncio.timeout(self.credit_timeout_s):
                await request.credit_granted.wait()
        except TimeoutError:
            raise EngineError("timeout", f"the router granted no credit for {self.credit_timeout_s:g} s "
                                         "(its client stopped reading)") from None

    async def _send_chunk(self, request: _Request, payloads: list[bytes]) -> None:
        if request.credit <= 0:
            await self._wait_for_credit(request)
        self._first_output(request)
        await self._send(codec.Chunk(id=request.id, seq=request.seq, data=payloads))
        request.seq += 1
        request.spend()

    def _try_chunk(self, request: _Request, payloads: list[bytes]) -> bool:
        """Send a chunk frame if that needs no wait (credit, room on the link): whether it went."""
        if request.credit <= 0 or self.try_send is None:
            return False
        if request.cancel_reason is not None:     # cancelled, its task not yet run: nothing more goes
            return False
        msg = codec.Chunk(id=request.id, seq=request.seq, data=payloads)
        try:
            if not self.try_send(msg):
                return False
        except Exception as exc:
            raise _link_lost(msg, exc) from None
        self._first_output(request)
        request.seq += 1
        request.spend()
        return True

    def _first_output(self, request: _Request) -> None:
        if not request.sent_first:
            request.sent_first = True
            self.metrics.first_token(time.monotonic() - request.received)

    async def _send(self, msg: codec.Message) -> None:
        try:
            await self.send(msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _link_lost(msg, exc) from None

    async def _send_quietly(self, msg: codec.Message) -> None:
        """Best effort: an error or drain notice the link cannot carry is only logged."""
        try:
            await self._send(msg)
        except LinkLost as exc:
            log.debug("%s", exc)


def _broken(exc: EngineHTTPError) -> EngineError:
    """The protocol error for an exchange that failed after the connection was made."""
    if isinstance(exc, ProtocolError):
        return EngineError("engine_unavailable", f"the engine's answer is not HTTP ximd can read: {exc}")
    return EngineError("engine_unavailable", str(exc))      # Broken: "the engine closed the connection …"


def _link_lost(msg: codec.Message, exc: Exception) -> LinkLost:
    return LinkLost(f"the link refused a {msg.TYPE} frame: {exc}")


def _json_or_none(payload: bytes) -> dict | None:
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None
