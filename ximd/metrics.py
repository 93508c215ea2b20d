"""Node metrics: Prometheus text on 127.0.0.1:7394 (``metrics.enabled``, ``metrics.listen``).

The daemon (ximd.agent) starts the endpoint as it starts, before enrollment, a
model download or an engine: every series below exists from the first scrape.
Two sources in one scrape:

- ximd's own series (``ximd_*``), written by prometheus_client on a registry of
  this process's own: the daemon's state, the engine's and the link's, each an
  enum gauge (one series per state, 1 for the current one, 0 for the others, so
  no series vanishes when the state changes); the last lease the router
  acknowledged as a timestamp (0 before the first: age = time() - it); requests
  by outcome, time to first token, tokens, requests in flight, engine restarts,
  KV-cache tiers; and ``process_*`` (CPU, memory, file descriptors, start time).
  The bridge (ximd.serve) and the daemon write them through the small methods
  of `NodeMetrics`; nothing here is global.
- the engine's own ``vllm:*`` series, fetched from its ``/metrics`` over its
  unix socket at scrape time and passed through unchanged, so a dashboard
  built for vLLM works against the node. ``ximd_engine_metrics_up`` says
  whether that part is present (0 before there is an engine).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from xim_proto.addresses import parse_host_port
from ximd import __version__
from ximd.engine.supervisor import EngineState
from ximd.mesh.state import LinkState

log = logging.getLogger("ximd.metrics")

# Not 9094 (ximd 0.1): that is Alertmanager's cluster port. Prometheus' list of
# default port allocations covers 9090-9099 (its own components) and 9100-9999 (exporters,
# all taken), so no free port is left there; 7394 is outside it, is no default of what runs
# beside a node (vLLM 8000, xim-router 8080 and 5555, Redis 6379, node_exporter 9100, DCGM
# exporter 9400) and is not in /etc/services.
DEFAULT_LISTEN = "127.0.0.1:7394"
ENGINE_SCRAPE_TIMEOUT_S = 2.0
# Time to first token in seconds: fine steps below 100 ms, where a node's own
# overhead shows, then coarse ones for loaded engines and long prompts.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                10.0, 20.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The daemon's phases (ximd.agent's STATUS phases); one series each from the start. A phase
# not listed gets its series when first entered and keeps it.
NODE_STATES = ("starting", "not-enrolled", "enrolling", "model", "model-waiting", "preparing", "loading",
               "serving", "engine-unavailable", "engine-unhealthy", "engine-backoff", "engine-failed",
               "reexec", "stopping")


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) → (host, port); ValueError says what is wrong."""
    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise ValueError(f"metrics.listen: {exc}") from None


class EnumGauge:
    """A state as a gauge with one series per state (1 for the current one): the series
    stay when the state changes, so ``ximd_state{state="serving"} == 0`` can alert."""

    def __init__(self, name: str, help_text: str, states: tuple[str, ...], initial: str,
                 registry: CollectorRegistry):
        self.gauge = Gauge(name, help_text, ("state",), registry=registry)
        self.current = initial
        for state in states:
            self.gauge.labels(state).set(int(state == initial))
        self.gauge.labels(initial).set(1)

    def set(self, state: str) -> None:
        if state != self.current:
            self.gauge.labels(self.current).set(0)
            self.gauge.labels(state).set(1)
            self.current = state


class NodeMetrics:
    """ximd's own series; the bridge and the daemon update them, `render()` writes them."""

    def __init__(self, started_at: float | None = None):
        registry = self.registry = CollectorRegistry(auto_describe=True)
        self.started_at = time.time() if started_at is None else started_at
        Gauge("ximd_info", "ximd's version.", ("version",), registry=registry).labels(__version__).set(1)
        Gauge("ximd_start_time_seconds", "When ximd started (unix time).",
              registry=registry).set(self.started_at)
        self._state = EnumGauge("ximd_state", "The daemon's phase, as STATUS says it (1 for the current one).",
                                NODE_STATES, "starting", registry)
        self._requests = Counter("ximd_requests", "Inference requests ximd finished, by outcome.",
                                 ("outcome",), registry=registry)
        self._in_flight = Gauge("ximd_requests_in_flight", "Requests ximd is running on the engine now.",
                                registry=registry)
        self._ttft = Histogram("ximd_time_to_first_token_seconds",
                               "From the router's infer to the first chunk ximd sends back.",
                               buckets=TTFT_BUCKETS, registry=registry)
        tokens = Counter("ximd_tokens", "Tokens of finished requests, from the engine's usage.", ("kind",),
                         registry=registry)
        self._prompt, self._completion = tokens.labels("prompt"), tokens.labels("completion")
        self._link = EnumGauge("ximd_link_state", "The mesh link's state (1 for the current one).",
                               tuple(s.value for s in LinkState), LinkState.CONNECTING.value, registry)
        self._lease_ack = Gauge("ximd_lease_last_acknowledged_timestamp_seconds",
                                "When the router last acknowledged a lease (unix time; 0: not yet).",
                                registry=registry)
        self._engine = EnumGauge("ximd_engine_state", "The engine supervisor's state (1 for the current one).",
                                 tuple(s.value for s in EngineState), EngineState.STOPPED.value, registry)
        self._restarts = Gauge("ximd_engine_restarts_total", "Times the supervisor restarted the engine.",
                               registry=registry)
        self._kv_tiers = Gauge("ximd_kv_tier_enabled", "KV-cache tiers in use (1) or configured but off (0).",
                               ("tier",), registry=registry)
        ProcessCollector(registry=registry)
        self.in_flight_now = 0
        # Plain totals beside the counters, for `ximd status` and tests (no registry walk).
        self.first_tokens = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.last_lease_ack_at: float | None = None      # wall clock
        self.engine_restarts = 0

    # -- written by the bridge

    @property
    def in_flight(self) -> int:
        return self.in_flight_now

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self.in_flight_now = value
        self._in_flight.set(value)

    @property
    def requests_by_outcome(self) -> dict[str, int]:
        """The finished requests by outcome, as the counter holds them (for status and tests)."""
        return {sample.labels["outcome"]: int(sample.value) for family in self._requests.collect()
                for sample in family.samples if sample.name.endswith("_total")}

    def request_finished(self, outcome: str) -> None:
        self._requests.labels(outcome).inc()

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)
        self.first_tokens += 1

    def tokens(self, prompt: int, completion: int) -> None:
        self._prompt.inc(max(0, prompt))
        self._completion.inc(max(0, completion))
        self.prompt_tokens += max(0, prompt)
        self.completion_tokens += max(0, completion)

    # -- written by the daemon and the node

    @property
    def state(self) -> str:
        return self._state.current

    def set_state(self, phase: str) -> None:
        self._state.set(phase)

    @property
    def link_state(self) -> str:
        return self._link.current

    def set_link_state(self, state: LinkState) -> None:
        self._link.set(state.value)

    def lease_acknowledged(self, at: float | None = None) -> None:
        self.last_lease_ack_at = time.time() if at is None else at
        self._lease_ack.set(self.last_lease_ack_at)

    @property
    def engine_state(self) -> str:
        return self._engine.current

    def set_engine(self, state: str, restarts: int) -> None:
        self._engine.set(state)
        self.engine_restarts = restarts
        self._restarts.set(restarts)

    def set_kv_tier(self, tier: str, in_use: bool) -> None:
        self._kv_tiers.labels(tier).set(int(in_use))

    # -- the text

    def render(self) -> str:
        return generate_latest(self.registry).decode()


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
    """The /metrics endpoint: ximd's series, then the engine's passed through once
    `attach_engine` says where the engine listens."""

    def __init__(self, listen: str, metrics: NodeMetrics, engine_socket: Path | None = None):
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
            socket_path, self.engine_socket = self.engine_socket, None
            await self.attach_engine(socket_path)
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def attach_engine(self, engine_socket: Path) -> None:
        """From now on, scrapes pass the engine's own series through (from its unix socket)."""
        if self._engine_session is not None:
            if engine_socket == self.engine_socket:
                return
            await self._engine_session.close()
        self.engine_socket = engine_socket
        self._engine_session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(engine_socket)))

    async def close(self) -> None:
        if self._engine_session is not None:
            await self._engine_session.close()
            self._engine_session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

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
