"""The router's /metrics: Prometheus text, written by prometheus_client.

Two kinds of series, so that serving pays for almost none of it:

- **counted as requests end** (`RouterMetrics`): requests by endpoint and HTTP
  status, errors by protocol code, tokens from each answer's usage. A few
  counter increments per request, none per streamed chunk.
- **read at scrape time** (`MeshCollector`): what the mesh knows now — each
  connected node's load (the router's in-flight count over its effective
  ``max_concurrent``), the figures of its last lease and that lease's age, whether
  it drains and which optional endpoints it serves (``xim_router_node_info``'s
  ``embeddings`` label), the requests waiting for a node, and the mesh's own
  frame and event counts. Nothing of it is kept between scrapes: a node that
  leaves takes its series with it.

One registry per HTTP app (not prometheus_client's global one): two routers in one
process (the tests) never mix their figures. ``process_*`` comes from
prometheus_client's process collector.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from xim_proto import codec
from xim_router import __version__
from xim_router.api_common import ROUTER_KEY

if TYPE_CHECKING:
    from xim_router.dataplane import Holds
    from xim_router.mesh import Router

METRICS_KEY = "xim_router.metrics"
# The classic text format: what every Prometheus server and parser reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RouterMetrics:
    """The counters the HTTP side bumps as requests end, and the registry that writes them all."""

    def __init__(self, router: Router, holds: Holds | None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("xim_router_requests", "API requests answered, by endpoint and HTTP status "
                                "(a stream that failed after its headers counts as 200; see errors).",
                                ("endpoint", "status"), registry=self.registry)
        self.errors = Counter("xim_router_request_errors", "API requests that ended in an error, by the "
                              "protocol's error code (docs/protocol.md §6), mid-stream ones included.",
                              ("code",), registry=self.registry)
        self.tokens = Counter("xim_router_tokens", "Tokens of answered requests, from the nodes' usage.",
                              ("kind",), registry=self.registry)
        self._prompt = self.tokens.labels("prompt")
        self._completion = self.tokens.labels("completion")
        ProcessCollector(registry=self.registry)
        self.registry.register(MeshCollector(router, holds))

    def request_done(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def failed(self, code: str) -> None:
        self.errors.labels(code).inc()

    def used(self, usage: codec.Usage | None) -> None:
        if usage is not None:
            self._prompt.inc(max(0, usage.prompt_tokens))
            self._completion.inc(max(0, usage.completion_tokens))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class MeshCollector(Collector):
    """The mesh's state at scrape time: nodes, their load and leases, held requests."""

    def __init__(self, router: Router, holds: Holds | None) -> None:
        self.router = router
        self.holds = holds

    def describe(self) -> Iterator[Metric]:
        return iter(())          # names vary with the mesh; nothing to read at registration

    def collect(self) -> Iterator[Metric]:
        router, now = self.router, time.time()
        info = GaugeMetricFamily("xim_router_info", "The router's version and protocol revision.",
                                 labels=("version", "protocol_revision"))
        info.add_metric((__version__, codec.PROTOCOL_REVISION), 1)
        yield info
        yield GaugeMetricFamily("xim_router_nodes_connected", "Nodes with a live session.",
                                value=len(router.sessions))
        node = GaugeMetricFamily("xim_router_node_info", "One per connected node: its host, agent version "
                                 "and whether it serves embeddings.",
                                 labels=("worker_id", "hostname", "agent_version", "embeddings"))
        families = {
            "in_flight": GaugeMetricFamily("xim_router_node_in_flight",
                                           "Requests the router has on the node now.", labels=("worker_id",)),
            "max_concurrent": GaugeMetricFamily("xim_router_node_max_concurrent",
                                                "The node's effective max_concurrent (declared, capped by "
                                                "its policy).", labels=("worker_id",)),
            "load": GaugeMetricFamily("xim_router_node_load", "in_flight over max_concurrent: 0 idle, "
                                      "1 full (what routing compares).", labels=("worker_id",)),
            "running": GaugeMetricFamily("xim_router_node_running", "Requests the engine runs, as of the "
                                         "node's last lease.", labels=("worker_id",)),
            "waiting": GaugeMetricFamily("xim_router_node_waiting", "Requests queued in the engine, as of "
                                         "the node's last lease.", labels=("worker_id",)),
            "kv": GaugeMetricFamily("xim_router_node_kv_cache_usage", "KV-cache use 0-1, as of the node's "
                                    "last lease.", labels=("worker_id",)),
            "lease_age": GaugeMetricFamily("xim_router_node_lease_age_seconds", "Seconds since the node's "
                                           "last lease (or, before the first, its hello).",
                                           labels=("worker_id",)),
            "draining": GaugeMetricFamily("xim_router_node_draining", "1 while the node drains.",
                                          labels=("worker_id",)),
            "model": GaugeMetricFamily("xim_router_node_model_ready", "1 for each model the node may be "
                                       "sent now, 0 for one it declares but not ready.",
                                       labels=("worker_id", "model")),
        }
        for worker_id, session in sorted(router.sessions.items()):
            wid = (worker_id,)
            in_flight = router.in_flight(worker_id)
            capacity = session.max_concurrent
            node.add_metric((worker_id, session.hello.hostname, session.hello.agent_version,
                             str(codec.EMBEDDINGS in session.hello.capabilities).lower()), 1)
            families["in_flight"].add_metric(wid, in_flight)
            families["max_concurrent"].add_metric(wid, capacity)
            families["load"].add_metric(wid, in_flight / max(1, capacity))
            lease = session.lease
            if lease is not None:
                families["running"].add_metric(wid, lease.running)
                families["waiting"].add_metric(wid, lease.waiting)
                families["kv"].add_metric(wid, lease.kv_cache_usage)
            families["lease_age"].add_metric(wid, max(0.0, now - (session.lease_at or session.connected_at)))
            families["draining"].add_metric(wid, int(session.draining))
            ready = session.ready_models()
            for model in sorted({m.name for m in session.models()}):
                families["model"].add_metric((worker_id, model), int(model in ready))
        yield node
        yield from families.values()
        if self.holds is not None:      # the names /healthz uses
            yield GaugeMetricFamily("xim_router_requests_held_now", "Requests waiting for a node now "
                                    "(--hold-for-node).", value=self.holds.waiting)
            yield CounterMetricFamily("xim_router_requests_held", "Requests that waited for a node, since "
                                      "the start.", value=self.holds.held)
            yield CounterMetricFamily("xim_router_requests_held_seconds", "Their waits together, in seconds.",
                                      value=self.holds.waited_s)
        stats = router.stats
        mesh = CounterMetricFamily("xim_router_mesh_events", "Mesh events since the start (frames in and "
                                   "out, batches in, malformed, rate-limited, credit overruns, failed handshakes, "
                                   "closed connections, refused by ZAP).", labels=("event",))
        for event, value in (("frame_in", stats.frames_in), ("batch_in", stats.batches_in),
                             ("frame_out", stats.frames_out),
                             ("malformed", stats.malformed), ("no_session", stats.no_session),
                             ("rate_limited", stats.rate_limited), ("credit_overrun", stats.credit_overruns),
                             ("handshake_failed", stats.handshake_failed), ("disconnect", stats.disconnects),
                             ("zap_denied", router.zap_denied)):
            mesh.add_metric((event,), value)
        yield mesh


def metrics_of(app: web.Application) -> RouterMetrics | None:
    return app.get(METRICS_KEY)


def install(app: web.Application, holds: Holds | None) -> RouterMetrics:
    """Give ``app`` its registry (the route is xim_router.http's: it checks the API key first)."""
    metrics = app[METRICS_KEY] = RouterMetrics(app[ROUTER_KEY], holds)
    return metrics


def response(app: web.Application) -> web.Response:
    metrics: RouterMetrics = app[METRICS_KEY]
    return web.Response(body=metrics.text(), headers={"Content-Type": CONTENT_TYPE})
