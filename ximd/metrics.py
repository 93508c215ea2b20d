"""Node metrics: Prometheus text on 127.0.0.1:9094 (``metrics.enabled``, ``metrics.listen``).

Two sources in one scrape:

- ximd's own series (``ximd_*``): requests by outcome, time to first token,
  tokens, requests in flight, link state, lease age, engine state and
  restarts, KV-cache tier state. The bridge (ximd.serve) and the agent write
  them through the small methods of `NodeMetrics`; nothing here is global.
- the engine's own ``vllm:*`` series, fetched from its ``/metrics`` over its
  unix socket at scrape time and passed through unchanged, so a dashboard
  built for vLLM works against the node. ``ximd_engine_metrics_up`` says
  whether that part is present.

The text format is written by hand (Prometheus exposition format 0.0.4): it
is a few lines, and the daemon's dependency list stays at what Debian ships.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from xim_proto.addresses import parse_host_port
from ximd import __version__
from ximd.mesh.state import LinkState

log = logging.getLogger("ximd.metrics")

DEFAULT_LISTEN = "127.0.0.1:9094"
ENGINE_SCRAPE_TIMEOUT_S = 2.0
# Time to first token in seconds: fine steps below 100 ms, where a node's own
# overhead shows, then coarse ones for loaded engines and long prompts.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                10.0, 20.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) → (host, port); ValueError says what is wrong."""
    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise ValueError(f"metrics.listen: {exc}") from None


def escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


@dataclass
class Histogram:
    """A cumulative Prometheus histogram with fixed buckets."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{format_value(bound)}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {format_value(self.total)}")
        out.append(f"{name}_count {self.count}")
        return out


@dataclass
class NodeMetrics:
    """ximd's own series; the bridge and the agent update them, `render()` writes them."""

    requests_by_outcome: dict[str, int] = field(default_factory=dict)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    link_state: LinkState = LinkState.CONNECTING
    last_lease_ack_at: float | None = None      # wall clock
    engine_state: str = "stopped"
    engine_restarts: int = 0
    kv_tiers: dict[str, bool] = field(default_factory=dict)   # tier -> in use
    started_at: float = field(default_factory=time.time)

    # -- written by the bridge

    def request_finished(self, outcome: str) -> None:
        self.requests_by_outcome[outcome] = self.requests_by_outcome.get(outcome, 0) + 1

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion

    # -- written by the agent

    def set_link_state(self, state: LinkState) -> None:
        self.link_state = state

    def lease_acknowledged(self, at: float | None = None) -> None:
        self.last_lease_ack_at = time.time() if at is None else at

    def set_engine(self, state: str, restarts: int) -> None:
        self.engine_state, self.engine_restarts = state, restarts

    def set_kv_tier(self, tier: str, in_use: bool) -> None:
        self.kv_tiers[tier] = in_use

    # -- the text

    def render(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        family("ximd_info", "gauge", "ximd's version.",
               [f'ximd_info{{version="{escape_label(__version__)}"}} 1'])
        family("ximd_start_time_seconds", "gauge", "When ximd started (unix time).",
               [f"ximd_start_time_seconds {format_value(self.started_at)}"])
        family("ximd_requests_total", "counter", "Inference requests ximd finished, by outcome.",
               [f'ximd_requests_total{{outcome="{escape_label(k)}"}} {v}'
                for k, v in sorted(self.requests_by_outcome.items())])
        family("ximd_requests_in_flight", "gauge", "Requests ximd is running on the engine now.",
               [f"ximd_requests_in_flight {self.in_flight}"])
        family("ximd_time_to_first_token_seconds", "histogram",
               "From the router's infer to the first chunk ximd sends back.",
               self.ttft.lines("ximd_time_to_first_token_seconds"))
        family("ximd_tokens_total", "counter", "Tokens of finished requests, from the engine's usage.",
               [f'ximd_tokens_total{{kind="prompt"}} {self.prompt_tokens}',
                f'ximd_tokens_total{{kind="completion"}} {self.completion_tokens}'])
        family("ximd_link_state", "gauge", "The mesh link's state (1 for the current one).",
               [f'ximd_link_state{{state="{escape_label(s.value)}"}} {int(s is self.link_state)}'
                for s in LinkState])
        if self.last_lease_ack_at is not None:
            family("ximd_lease_age_seconds", "gauge", "Seconds since the router last acknowledged a lease.",
                   [f"ximd_lease_age_seconds {format_value(max(0.0, now - self.last_lease_ack_at))}"])
        family("ximd_engine_state", "gauge", "The engine supervisor's state (1 for the current one).",
               [f'ximd_engine_state{{state="{escape_label(self.engine_state)}"}} 1'])
        family("ximd_engine_restarts_total", "counter", "Times the supervisor restarted the engine.",
               [f"ximd_engine_restarts_total {self.engine_restarts}"])
        family("ximd_kv_tier_enabled", "gauge", "KV-cache tiers in use (1) or configured but off (0).",
               [f'ximd_kv_tier_enabled{{tier="{escape_label(t)}"}} {int(on)}'
                for t, on in sorted(self.kv_tiers.items())])
        return "\n".join(out) + "\n"


async def scrape_engine(session: aiohttp.ClientSession) -> str | None:
    """The engine's /metrics text, or None when it does not answer in time."""
    try:
        async with session.get("http://engine/metrics",
                               timeout=aiohttp.ClientTimeout(total=ENGINE_SCRAPE_TIMEOUT_S)) as resp:
            if resp.status != 200:
                return None
            return await resp.text()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:   # OSError: no socket yet
        log.debug("engine metrics scrape failed: %r", exc)
        return None


class MetricsServer:
    """The /metrics endpoint: ximd's series, then the engine's passed through."""

    def __init__(self, listen: str, metrics: NodeMetrics, engine_socket: Path | None):
        self.host, self.port = parse_listen(listen)
        self.metrics = metrics
        self.engine_socket = engine_socket
        self._runner: web.AppRunner | None = None
        self._engine_session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise OSError(exc.errno, f"metrics: cannot listen on {self.host}:{self.port}: "
                                     f"{exc.strerror} (set metrics.listen or metrics.enabled=false)") from None
        if self.engine_socket is not None:
            self._engine_session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.engine_socket)))
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._engine_session is not None:
            await self._engine_session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def render(self) -> str:
        text = self.metrics.render()
        engine = await scrape_engine(self._engine_session) if self._engine_session else None
        up = ["# HELP ximd_engine_metrics_up Whether the engine's own series below were scraped.",
              "# TYPE ximd_engine_metrics_up gauge", f"ximd_engine_metrics_up {int(engine is not None)}"]
        text += "\n".join(up) + "\n"
        if engine:
            text += engine if engine.endswith("\n") else engine + "\n"
        return text

    async def _handle(self, request: web.Request) -> web.Response:
        return web.Response(body=(await self.render()).encode(),
                            headers={"Content-Type": CONTENT_TYPE})
