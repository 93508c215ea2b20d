"""A stand-in for vLLM's OpenAI-compatible server, paced like a real engine.

    python -m bench.standin_engine --uds /run/ximd/engine.sock [--ttft-ms 20 --tokens-per-s 75]

It speaks what ximd needs of the engine — ``/health``, ``/v1/models``,
``/metrics`` (vLLM's series names: ``vllm:num_requests_running`` ...),
``/v1/chat/completions`` and ``/v1/completions``, streamed (SSE, the same
compact JSON chunks vLLM writes, the usage chunk with ``choices: []``) or not,
and, with ``--embeddings`` (what vLLM's ``--runner pooling`` maps to here),
``/v1/embeddings`` (a deterministic unit vector per input) — and it streams at a fixed pace: ``ttft_ms`` to the first token, then
``tokens_per_s`` per stream (``--unpaced``: as fast as it is read, one token per
event, for saturation benchmarks). Pacing is what makes it useful for measuring
ximd: with the engine's cost fixed and small, what a benchmark sees through
router + ximd beyond the direct run is our overhead, not CPU starvation.

Error paths for tests: each request may carry ``"x_standin": {...}`` in its
body to override the pacing or to ``fail_status`` (answer that HTTP status),
``hang`` (never answer; still notices a client that goes away) or
``fail_after_tokens`` (drop the connection mid-stream). A real vLLM ignores
unknown fields, so the same body works against both.

It never replaces the real-engine tests; it isolates ximd's own overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from aiohttp import web

SERVED_MODEL = "tiny"
UVICORN_BACKLOG = 2048     # uvicorn's default listen backlog
WORDS = ("the", "engine", "writes", "one", "token", "at", "a", "time", "and", "ximd",
         "passes", "it", "on")


@dataclass(frozen=True)
class Pacing:
    """How one request behaves; the server's defaults, overridden per request."""

    ttft_ms: float = 20.0
    tokens_per_s: float = 75.0
    max_tokens: int = 16
    fail_status: int = 0          # answer this HTTP status instead of generating
    hang: bool = False            # accept the request and never answer
    fail_after_tokens: int = -1   # drop the connection after this many tokens (-1: never)
    # vLLM-like steps: every stream's tokens fall on one shared clock grid (1/tokens_per_s),
    # as continuous batching decodes one token for all running requests per step.
    # Off: each stream keeps its own phase (the harder case for a reader: no two
    # streams' tokens arrive together).
    batched: bool = False
    # As fast as the reader takes them (bench.saturate): no pause between tokens, still one
    # token per SSE event and HTTP chunk; the streams take turns, one token each.
    unpaced: bool = False

    def override(self, raw: object) -> Pacing:
        if not isinstance(raw, dict):
            return self
        known = {k: raw[k] for k in ("ttft_ms", "tokens_per_s", "fail_status", "hang",
                                     "fail_after_tokens", "batched", "unpaced") if k in raw}
        return replace(self, **known)


class BadRequest(Exception):
    pass


def error_body(message: str, kind: str, status: int) -> bytes:
    """vLLM's error shape (``{"error": {...}}``)."""
    return json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": status}}).encode()


def prompt_tokens_of(endpoint: str, body: dict) -> int:
    """A deterministic token count: one per whitespace-separated word."""
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: expected a non-empty list")
        text = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise BadRequest("prompt: field required")
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    return max(1, len(text.split()))


class ChunkWriter:
    """Pre-built byte templates for one request's chunks, so pacing (not JSON) dominates."""

    def __init__(self, endpoint: str, request_id: str, model: str, created: int):
        self.endpoint = endpoint
        if endpoint == "chat":
            self.head = (b'{"id":"chatcmpl-' + request_id.encode() +
                         b'","object":"chat.completion.chunk","created":' + str(created).encode() +
                         b',"model":' + json.dumps(model).encode() + b',"choices":')
        else:
            self.head = (b'{"id":"cmpl-' + request_id.encode() +
                         b'","object":"text_completion","created":' + str(created).encode() +
                         b',"model":' + json.dumps(model).encode() + b',"choices":')

    def role(self) -> bytes:
        return (self.head + b'[{"index":0,"delta":{"role":"assistant","content":""},'
                            b'"logprobs":null,"finish_reason":null}]}')

    def token(self, text: str, finish_reason: str | None) -> bytes:
        finish = b"null" if finish_reason is None else json.dumps(finish_reason).encode()
        quoted = json.dumps(text).encode()
        if self.endpoint == "chat":
            return (self.head + b'[{"index":0,"delta":{"content":' + quoted +
                    b'},"logprobs":null,"finish_reason":' + finish + b'}]}')
        return (self.head + b'[{"index":0,"text":' + quoted + b',"logprobs":null,"finish_reason":' +
                finish + b',"stop_reason":null}]}')

    def usage(self, usage: dict) -> bytes:
        return self.head + b'[],"usage":' + json.dumps(usage, separators=(",", ":")).encode() + b"}"


class StandinEngine:
    """The aiohttp application and its counters (what /metrics reports)."""

    def __init__(self, pacing: Pacing, model: str = SERVED_MODEL, max_num_seqs: int = 0,
                 embeddings: bool = False):
        self.pacing = pacing
        self.embeddings = embeddings
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.running = 0
        self.waiting = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.requests_total = 0
        self.ids = itertools.count(1)
        self.slots = asyncio.Semaphore(max_num_seqs) if max_num_seqs > 0 else None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 << 20)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        if self.embeddings:
            # Like vLLM: the route exists only when the engine embeds (a GET on it is then a 405,
            # not a 404; that is how ximd tells).
            app.router.add_post("/v1/embeddings", self.embed)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "vllm",
             "root": self.model, "max_model_len": 2048}]})

    async def metrics(self, request: web.Request) -> web.Response:
        label = f'{{engine="0",model_name="{self.model}"}}'
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{label} {self.running}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{label} {self.waiting}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{label} {min(1.0, self.running / 256):.4f}",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{label} {self.prompt_tokens_total}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{label} {self.generation_tokens_total}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def embed(self, request: web.Request) -> web.Response:
        """vLLM's /v1/embeddings answer shape: one vector per input, usage without completion tokens."""
        try:
            body = await request.json()
        except ValueError:
            body = None
        inputs = body.get("input") if isinstance(body, dict) else None
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            return web.Response(status=400, content_type="application/json", body=error_body(
                "'input' must be a string or a list of strings", "BadRequestError", 400))
        pacing = self.pacing.override(body.get("x_standin"))
        if pacing.fail_status:
            return web.Response(status=pacing.fail_status, content_type="application/json",
                                body=error_body("stand-in failure", "BadRequestError", pacing.fail_status))
        dims = body.get("dimensions") if isinstance(body.get("dimensions"), int) else 8
        tokens = sum(max(1, len(text.split())) for text in inputs)
        self.requests_total += 1
        self.prompt_tokens_total += tokens
        return web.json_response({
            "id": f"embd-{next(self.ids)}", "object": "list", "created": int(time.time()),
            "model": self.model,
            "data": [{"index": i, "object": "embedding", "embedding": unit_vector(text, max(1, dims))}
                     for i, text in enumerate(inputs)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.generate(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.generate(request, "completions")

    async def generate(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            prompt_tokens = prompt_tokens_of(endpoint, body)
            max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
            max_tokens = self.pacing.max_tokens if max_tokens is None else max_tokens
            if not isinstance(max_tokens, int) or max_tokens < 1:
                raise BadRequest("max_tokens: expected an integer >= 1")
        except (ValueError, BadRequest) as exc:
            return web.Response(status=400, body=error_body(str(exc), "BadRequestError", 400),
                                content_type="application/json")
        model = body.get("model")
        if model != self.model:
            return web.Response(status=404, body=error_body(
                f"The model `{model}` does not exist.", "NotFoundError", 404),
                content_type="application/json")
        pacing = self.pacing.override(body.get("x_standin"))
        if pacing.fail_status:
            return web.Response(status=pacing.fail_status, body=error_body(
                "stand-in engine told to fail", "InternalServerError", pacing.fail_status),
                content_type="application/json")
        self.requests_total += 1
        self.waiting += 1
        try:
            if self.slots is not None:
                await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        self.prompt_tokens_total += prompt_tokens
        try:
            if pacing.hang:
                await wait_for_disconnect(request)
                return web.Response(status=499)
            writer = ChunkWriter(endpoint, str(next(self.ids)), self.model, int(time.time()))
            if body.get("stream"):
                options = body.get("stream_options") or {}
                return await self.stream(request, writer, pacing, max_tokens, prompt_tokens,
                                         bool(options.get("include_usage")))
            return await self.whole(request, endpoint, writer, pacing, max_tokens, prompt_tokens)
        finally:
            self.running -= 1
            if self.slots is not None:
                self.slots.release()

    async def stream(self, request: web.Request, writer: ChunkWriter, pacing: Pacing,
                     max_tokens: int, prompt_tokens: int, include_usage: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        start = time.monotonic()
        interval = 1.0 / pacing.tokens_per_s
        # The events without a finish_reason, built once: the words repeat.
        events = [b"data: " + writer.token(" " + word, None) + b"\n\n" for word in WORDS]
        try:
            for i in range(max_tokens):
                # An absolute schedule: a late wake-up does not push every later token back.
                due = start + pacing.ttft_ms / 1000 + i * interval
                if pacing.batched:
                    due = math.ceil(due / interval) * interval      # the next engine step
                if pacing.unpaced and i > 0:
                    await asyncio.sleep(0)          # one token, then the other streams' turn
                elif (delay := due - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
                if i == pacing.fail_after_tokens:
                    request.transport.close()
                    return response
                if i == max_tokens - 1:
                    event = b"data: " + writer.token(" " + WORDS[i % len(WORDS)], "length") + b"\n\n"
                else:
                    event = events[i % len(WORDS)]
                if i == 0 and writer.endpoint == "chat":
                    # vLLM sends the role chunk with the first token, not before it.
                    event = b"data: " + writer.role() + b"\n\n" + event
                await response.write(event)
                self.generation_tokens_total += 1
            if include_usage:
                await response.write(b"data: " + writer.usage(usage_of(prompt_tokens, max_tokens)) +
                                     b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:
            pass    # the client went away: stop generating, which frees the slot
        return response

    async def whole(self, request: web.Request, endpoint: str, writer: ChunkWriter, pacing: Pacing,
                    max_tokens: int, prompt_tokens: int) -> web.Response:
        deadline = time.monotonic() + pacing.ttft_ms / 1000 + (max_tokens - 1) / pacing.tokens_per_s
        while (left := deadline - time.monotonic()) > 0:
            if client_gone(request):
                return web.Response(status=499)
            await asyncio.sleep(min(left, 0.05))
        self.generation_tokens_total += max_tokens
        text = "".join(" " + WORDS[i % len(WORDS)] for i in range(max_tokens))
        created = int(time.time())
        if endpoint == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": "length"}
            obj, prefix = "chat.completion", "chatcmpl-"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                      "stop_reason": None}
            obj, prefix = "text_completion", "cmpl-"
        return web.json_response({"id": prefix + str(next(self.ids)), "object": obj,
                                  "created": created, "model": self.model, "choices": [choice],
                                  "usage": usage_of(prompt_tokens, max_tokens)})


def unit_vector(text: str, dims: int) -> list[float]:
    """A vector of length 1 that depends only on ``text`` (so tests can compare answers)."""
    raw = [math.sin((i + 1) * (sum(text.encode()) + len(text) + 1)) for i in range(dims)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def wait_for_disconnect(request: web.Request) -> None:
    while not client_gone(request):
        await asyncio.sleep(0.05)


async def serve(engine: StandinEngine, *, uds: Path | None, host: str | None, port: int | None,
                ready_file: Path | None = None) -> None:
    runner = web.AppRunner(engine.app(), access_log=None)
    await runner.setup()
    sites = []
    if uds is not None:
        # uvicorn's backlog (vLLM serves with uvicorn), not aiohttp's 128: a burst of 256
        # connects overflowed that, a failure of the stand-in, not of what it stands in for.
        sites.append(web.UnixSite(runner, str(uds), backlog=UVICORN_BACKLOG))
    if port is not None:
        sites.append(web.TCPSite(runner, host or "127.0.0.1", port, backlog=UVICORN_BACKLOG))
    for site in sites:
        await site.start()
    if ready_file is not None:
        ready_file.write_text("ready\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


# What ximd reads from a local model directory to plan the engine: the shapes
# of tools/make_tiny_model.py's model. The stand-in needs no weights.
MODEL_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
                "intermediate_size": 512, "num_attention_heads": 2, "num_key_value_heads": 2,
                "num_hidden_layers": 2, "max_position_embeddings": 2048, "vocab_size": 4096,
                "torch_dtype": "float32"}


def write_model_dir(path: Path) -> Path:
    """A model directory ximd accepts as ``engine.model`` for the stand-in (config.json only)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(MODEL_CONFIG, indent=1))
    return path


def vllm_compatible(argv: list[str]) -> list[str]:
    """Our flags from a vLLM command line (``--vllm-args`` mode).

    ximd starts its engine as ``<python> -m vllm.entrypoints.openai.api_server
    --model M --served-model-name N --uds S ...``; bench/standin-python hands
    that argv here, so the real daemon can supervise the stand-in. vLLM's
    other flags are ignored; ``--standin-*`` flags (through
    ``engine.extra_args``) set the pacing (``--standin-batched``: vLLM-like steps).
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--uds")
    parser.add_argument("--served-model-name", nargs="+")
    parser.add_argument("--model")
    parser.add_argument("--port")
    parser.add_argument("--max-num-seqs")
    for name in ("ttft-ms", "tokens-per-s", "max-tokens"):
        parser.add_argument(f"--standin-{name}")
    parser.add_argument("--standin-batched", action="store_true")
    parser.add_argument("--standin-unpaced", action="store_true")
    parser.add_argument("--runner")           # vLLM's: "pooling" serves embeddings
    known, _ = parser.parse_known_args(argv)
    out = []
    if known.uds:
        out += ["--uds", known.uds]
    elif known.port:
        out += ["--port", known.port]
    model = (known.served_model_name or [None])[0] or known.model
    if model:
        out += ["--model", model]
    if known.max_num_seqs:
        out += ["--max-num-seqs", known.max_num_seqs]
    for name in ("ttft_ms", "tokens_per_s", "max_tokens"):
        value = getattr(known, f"standin_{name}")
        if value is not None:
            out += ["--" + name.replace("_", "-"), value]
    if known.standin_batched:
        out.append("--batched")
    if known.standin_unpaced:
        out.append("--unpaced")
    if known.runner == "pooling":
        out.append("--embeddings")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--vllm-args"]:
        argv = vllm_compatible(argv[1:])
    parser = argparse.ArgumentParser(prog="standin_engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--uds", type=Path, help="serve on this unix socket (like vllm --uds)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="also serve on this TCP port")
    parser.add_argument("--model", default=SERVED_MODEL, help="served model name")
    parser.add_argument("--ttft-ms", type=float, default=Pacing.ttft_ms)
    parser.add_argument("--tokens-per-s", type=float, default=Pacing.tokens_per_s)
    parser.add_argument("--max-tokens", type=int, default=Pacing.max_tokens,
                        help="completion length when a request does not say")
    parser.add_argument("--batched", action="store_true",
                        help="vLLM-like steps: all streams' tokens on one shared clock grid")
    parser.add_argument("--unpaced", action="store_true",
                        help="stream as fast as the reader takes it (one token per event, the "
                             "streams taking turns): for saturation benchmarks")
    parser.add_argument("--max-num-seqs", type=int, default=0,
                        help="run at most this many requests at once, queue the rest (0: no limit)")
    parser.add_argument("--embeddings", action="store_true",
                        help="also serve /v1/embeddings (what vLLM does with --runner pooling)")
    parser.add_argument("--ready-file", type=Path, help="write this file once listening")
    args = parser.parse_args(argv)
    if args.uds is None and args.port is None:
        parser.error("give --uds PATH and/or --port N")
    if args.tokens_per_s <= 0:
        parser.error("--tokens-per-s must be > 0")
    pacing = Pacing(ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s, max_tokens=args.max_tokens,
                    batched=args.batched, unpaced=args.unpaced)
    engine = StandinEngine(pacing, model=args.model, max_num_seqs=args.max_num_seqs,
                           embeddings=args.embeddings)
    pace = "unpaced" if args.unpaced else f"{args.tokens_per_s:g} tokens/s"
    print(f"stand-in engine: model {args.model}, {args.ttft_ms:g} ms to first token, "
          f"{pace}, on {args.uds or f'{args.host}:{args.port}'}", flush=True)
    asyncio.run(serve(engine, uds=args.uds, host=args.host, port=args.port,
                      ready_file=args.ready_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
