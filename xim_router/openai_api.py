"""The router's OpenAI-compatible API: /v1/models (and /v1/models/{id}), /v1/chat/completions,
/v1/completions, /v1/embeddings.

What an OpenAI client sees, built on `xim_router.dataplane`:

- API keys: ``Authorization: Bearer <key>`` against the keys given with
  ``--api-key`` / ``--api-key-file``; a wrong or missing key is a 401 with
  OpenAI's ``invalid_api_key`` body. No keys configured → no check (the
  router listens on loopback by default).
- Streams are Server-Sent Events exactly as OpenAI writes them:
  ``data: {json}\\n\\n`` per chunk, ``data: [DONE]\\n\\n`` at the end; the
  engine's chunk bytes are passed through untouched. The usage chunk is
  only shown to clients that asked for it (``stream_options.include_usage``).
- Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``
  with the protocol's code: 404 unknown model, 429 every agent full (with
  Retry-After), 503 no agent ready, 504 timeout, 502/503 agent errors. An
  error after the stream started arrives as an ``error`` event, which the
  official client raises.
- A client that disconnects cancels the request on its agent, which frees
  the engine slot.
- A request for a model whose nodes are only away for now (re-executing,
  reconnecting, draining, loading) waits for one up to ``--hold-for-node``
  before its 503 (xim_router.dataplane, "Holding").
- The model list gives each model's ``max_model_len`` as vLLM does (the smallest
  any node serving it reports: a request within it fits on every one).
- Embeddings go only to nodes that announce the capability (protocol
  revision 1.2); a model only other nodes serve is a 400 naming it.
- Each answer is counted for /metrics (xim_router.metrics) as it ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from xim_proto import codec
from xim_router import dataplane, metrics
from xim_router.api_common import ROUTER_KEY, NotJsonObject, parse_json_object
from xim_router.dataplane import ClientGone, RequestFailed

log = logging.getLogger("xim_router.openai")

SETTINGS_KEY = "xim_router.openai"
LIVE_KEY = "xim_router.openai.live"          # the Presence of every request being served
HOLDS_KEY = "xim_router.openai.holds"        # the requests waiting for a node (dataplane.Holds)
# What runs a completion: dataplane.start here, the core's over a channel in an HTTP
# worker (xim_router.worker); the same signature and the same exchange interface.
START_KEY = "xim_router.openai.start"
ENDPOINTS = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions",
             "/v1/embeddings": codec.EMBEDDINGS}
DISCONNECT_POLL_S = 0.25
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class ApiSettings:
    api_keys: frozenset[str] = frozenset()
    dataplane: dataplane.Settings = field(default_factory=dataplane.Settings)


# ---------------------------------------------------------------- configuration


def read_key_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ValueError(f"the API key file {path} holds no key")
    return keys


def api_settings(api_keys: Iterable[str] = (), api_key_file: str | None = None,
                 request_timeout_s: float = dataplane.Settings.request_timeout_s,
                 hold_s: float = dataplane.Settings.hold_s,
                 hold_max: int = dataplane.Settings.hold_max) -> ApiSettings:
    """ApiSettings from the operator's values; ValueError with a message for the operator."""
    keys = [k.strip() for k in api_keys if k.strip()]
    if api_key_file:
        keys += read_key_file(api_key_file)
    if not request_timeout_s > 0:
        raise ValueError("--request-timeout must be > 0")
    if not hold_s >= 0:
        raise ValueError("--hold-for-node must be 0 or more")
    if hold_max < 1:
        raise ValueError("--hold-max-requests must be at least 1")
    return ApiSettings(api_keys=frozenset(keys), dataplane=dataplane.Settings(
        request_timeout_s=request_timeout_s, hold_s=hold_s, hold_max=hold_max))


def configure(app: web.Application, settings: ApiSettings) -> None:
    """Give the routes their settings (before the app starts)."""
    app[SETTINGS_KEY] = settings


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)     # ids like org/name hold a slash
    add_completion_routes(app)


def add_completion_routes(app: web.Application) -> None:
    """The endpoints that run on a node (all an HTTP worker serves itself)."""
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", completions)
    app[LIVE_KEY] = set()
    app[HOLDS_KEY] = dataplane.Holds()
    app.on_shutdown.append(end_live_requests)


async def end_live_requests(app: web.Application) -> None:
    """On shutdown, end every open request with a retryable error.

    aiohttp waits for running handlers before it lets the process exit; a
    stream would otherwise hold `xim-router` up for as long as it runs.
    """
    for presence in list(app[LIVE_KEY]):
        presence.end(RequestFailed("draining", "the router is stopping; retry shortly", 503))
        exchange = presence.exchange
        if exchange is not None and not exchange.finished:
            exchange.queue.put_nowait(codec.error_for(
                "draining", "the router is stopping; retry shortly", request_id=exchange.id))
            exchange.cancel("router stopping")


# ---------------------------------------------------------------- OpenAI bodies


def openai_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status == 401:
        return "invalid_request_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(code: str, message: str, status: int, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": openai_type(status), "param": param,
                                 "code": code}}).encode()


def error_response(failure: RequestFailed, *, request_id: str | None = None,
                   param: str | None = None) -> web.Response:
    status = failure.http_status
    if status < 400 or status > 599:
        status = 500        # e.g. 499 "cancelled" is not an answer a client can get
    headers = {"Retry-After": "1"} if failure.retryable and status in (429, 503) else {}
    if request_id:
        headers["X-Request-Id"] = request_id
    return web.Response(status=status, body=error_body(failure.code, failure.message, status, param),
                        content_type="application/json", headers=headers)


def error_event(failure: RequestFailed) -> bytes:
    return b"data: " + error_body(failure.code, failure.message, failure.http_status) + b"\n\n"


def settings_of(request: web.Request) -> ApiSettings:
    return request.app.get(SETTINGS_KEY) or ApiSettings()


def authorized(request: web.Request, keys: frozenset[str]) -> bool:
    if not keys:
        return True
    scheme, _, text = request.headers.get("Authorization", "").partition(" ")
    token = text.strip().encode(errors="surrogateescape")    # the header's own bytes, even non-UTF-8
    # Compare with every key in constant time, so timing tells nothing.
    return scheme.lower() == "bearer" and bool(token) and \
        sum(hmac.compare_digest(token, key.encode()) for key in keys) > 0


def unauthorized() -> web.Response:
    return web.Response(status=401, content_type="application/json", body=error_body(
        "invalid_api_key", "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
        401))


async def read_body(request: web.Request) -> bytes:
    """The body, or RequestFailed(413) in OpenAI's shape when it is over the app's limit."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestFailed("too_large", "the request body is over the router's size limit",
                            413) from None


@dataclass(frozen=True)
class Call:
    """What the router needs from a client's body."""

    model: str
    stream: bool
    wants_usage: bool
    body: bytes                      # what goes to the agent


def parse_call(raw: bytes, endpoint: str = "chat.completions") -> Call:
    """Read model/stream from the body; RequestFailed(400) says what is wrong."""
    try:
        obj = parse_json_object(raw)
    except NotJsonObject as exc:
        raise RequestFailed("bad_request", str(exc), 400) from None
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise RequestFailed("bad_request", "'model' is required and must be a string", 400)
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestFailed("bad_request", "'stream' must be true or false", 400)
    if stream and endpoint == codec.EMBEDDINGS:
        raise RequestFailed("bad_request", "embeddings are not streamed: leave 'stream' out", 400)
    wants_usage = False
    if stream:
        options = obj.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise RequestFailed("bad_request", "'stream_options' must be an object", 400)
        # The node always asks its engine for usage (done.usage needs it); here
        # it is only noted whether the client wants to see the usage chunk.
        wants_usage = bool((options or {}).get("include_usage"))
    return Call(model=model, stream=stream, wants_usage=wants_usage, body=raw)


# ---------------------------------------------------------------- handlers


def model_card(name: str, max_model_len: int | None) -> dict:
    """One model as OpenAI's list shows it, with vLLM's ``root`` and ``max_model_len``."""
    card: dict = {"id": name, "object": "model", "created": 0, "owned_by": "xim", "root": name}
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card


async def list_models(request: web.Request) -> web.Response:
    if not authorized(request, settings_of(request).api_keys):
        return unauthorized()
    lengths = dataplane.served_model_lengths(request.app[ROUTER_KEY])
    return web.json_response({"object": "list", "data": [
        model_card(name, length) for name, length in sorted(lengths.items())]})


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: the model's card, or OpenAI's 404 when no connected node has it ready."""
    if not authorized(request, settings_of(request).api_keys):
        return unauthorized()
    name = request.match_info["model"]
    lengths = dataplane.served_model_lengths(request.app[ROUTER_KEY])
    if name not in lengths:
        return error_response(RequestFailed("model_not_found", f"The model '{name}' does not exist or is "
                                                               "not served here", 404), param="model")
    return web.json_response(model_card(name, lengths[name]))


async def completions(request: web.Request) -> web.StreamResponse:
    settings = settings_of(request)
    endpoint = ENDPOINTS[request.path]
    if not authorized(request, settings.api_keys):
        return counted(request, endpoint, unauthorized())
    try:
        call = parse_call(await read_body(request), endpoint)
    except RequestFailed as exc:
        failed(request, exc)
        return counted(request, endpoint, error_response(exc))
    presence = dataplane.Presence()
    live = request.app[LIVE_KEY]
    live.add(presence)
    try:
        return counted(request, endpoint, await serve_call(request, settings, call, presence))
    finally:
        live.discard(presence)


def counted(request: web.Request, endpoint: str, response: web.StreamResponse) -> web.StreamResponse:
    """Count the answer for /metrics (by the status its client got) and return it."""
    app_metrics = metrics.metrics_of(request.app)
    if app_metrics is not None:
        app_metrics.request_done(endpoint, response.status)
    return response


def failed(request: web.Request, failure: RequestFailed) -> None:
    app_metrics = metrics.metrics_of(request.app)
    if app_metrics is not None:
        app_metrics.failed(failure.code)


def used(request: web.Request, usage: codec.Usage | None) -> None:
    app_metrics = metrics.metrics_of(request.app)
    if app_metrics is not None:
        app_metrics.used(usage)


async def serve_call(request: web.Request, settings: ApiSettings, call: Call,
                     presence: dataplane.Presence) -> web.StreamResponse:
    watcher = asyncio.ensure_future(watch_disconnect(request, presence))
    try:
        exchange, first = await request.app.get(START_KEY, dataplane.start)(
            request.app[ROUTER_KEY], settings.dataplane, model=call.model,
            endpoint=ENDPOINTS[request.path], body=call.body, stream=call.stream, presence=presence,
            holds=request.app[HOLDS_KEY])
    except RequestFailed as exc:
        watcher.cancel()
        failed(request, exc)
        return error_response(exc, param=exc.param or ("model" if exc.code == "model_not_found" else None))
    except ClientGone:
        watcher.cancel()
        return web.Response(status=499)
    try:
        if isinstance(first, codec.Done) and not call.stream:
            used(request, first.usage)
            return web.Response(body=first.body or b"{}", content_type="application/json",
                                headers={"X-Request-Id": exchange.id})
        if not call.stream:
            # A non-streamed answer comes whole in done; anything else is a broken agent.
            exchange.cancel("unexpected chunk")
            failure = RequestFailed("internal", "the agent streamed a non-streamed request", 502)
            failed(request, failure)
            return error_response(failure, request_id=exchange.id)
        return await relay_stream(request, exchange, first, call)
    except ClientGone:
        return web.Response(status=499)
    finally:
        watcher.cancel()
        exchange.cancel("client disconnected")     # a no-op when it finished


def usage_chunk(call: Call, endpoint: str, request_id: str, usage: codec.Usage) -> bytes:
    """A usage-only stream chunk, for an agent whose ``done`` carries usage but not the engine's chunk."""
    kind = "chat.completion.chunk" if endpoint == "chat.completions" else "text_completion"
    return json.dumps({"id": request_id, "object": kind, "created": int(time.time()), "model": call.model,
                       "choices": [], "usage": dataclasses.asdict(usage)},
                      separators=(",", ":")).encode()


async def relay_stream(request: web.Request, exchange: dataplane.Exchange, first: codec.Message,
                       call: Call) -> web.StreamResponse:
    response = web.StreamResponse(headers={**SSE_HEADERS, "X-Request-Id": exchange.id})
    msg = first
    try:
        await response.prepare(request)     # the client may be gone already: same as later
        try:
            while isinstance(msg, codec.Chunk):
                frames = [msg, *exchange.more_chunks()]
                await response.write(b"".join(b"data: " + p + b"\n\n" for frame in frames for p in frame.data))
                exchange.written(len(frames))
                msg = await exchange.next()
            if isinstance(msg, codec.Done):
                used(request, msg.usage)
            if call.wants_usage and isinstance(msg, codec.Done):
                # ximd passes the engine's own usage chunk in done.body; from an
                # agent that only fills done.usage, build the chunk from that.
                body = msg.body or (usage_chunk(call, ENDPOINTS[request.path], exchange.id, msg.usage)
                                    if msg.usage else None)
                if body:
                    await response.write(b"data: " + body + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
        except RequestFailed as exc:
            # Headers are gone already: the error travels as an event, which
            # OpenAI's clients raise as an APIError.
            log.info("request %s failed mid-stream: %s", exchange.id, exc)
            failed(request, exc)
            await response.write(error_event(exc))
        await response.write_eof()
    except (ConnectionError, ClientGone):
        exchange.cancel("client disconnected")
    return response


async def watch_disconnect(request: web.Request, presence: dataplane.Presence) -> None:
    """Notice a client that goes away while its request waits on the agent.

    aiohttp 3.8 also cancels the handler then, newer versions do not; a
    stream notices on its next write, but a request still waiting for its
    first token or a whole answer would not — this covers both.
    """
    while True:
        await asyncio.sleep(DISCONNECT_POLL_S)
        transport = request.transport
        if transport is None or transport.is_closing():
            presence.mark_gone()
            return
