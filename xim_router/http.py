"""The router's HTTP application: one aiohttp app that route modules add to.

`build_app(router)` is the seam: each module in ROUTE_MODULES has
`add_routes(app)` and reaches the mesh through ``app[ROUTER_KEY]``. The
OpenAI-compatible API (serving) plugs in here beside the enrollment API.

Every listener also answers the operators' endpoints, without an API key:
``/healthz`` (JSON details), ``/health`` (200 when the router can route a
request at all, 503 otherwise: for load balancers) and ``/version``. The
listener of the OpenAI API adds ``/metrics`` (Prometheus text,
xim_router.metrics), behind the API key when keys are set: it names the nodes.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from xim_proto import codec
from xim_proto.ratelimit import escape
from xim_router import __version__, dataplane, enroll_api, metrics, openai_api
from xim_router.api_common import ROUTER_KEY, json_errors
from xim_router.mesh import Router

# Modules with add_routes(app): enrollment, and the OpenAI-compatible API.
ROUTE_MODULES = (enroll_api, openai_api)

MAX_BODY_BYTES = 1 << 20


async def healthz(request: web.Request) -> web.Response:
    router: Router = request.app[ROUTER_KEY]
    body: dict = {"status": "ok", "agents_connected": len(router.sessions)}
    holds = request.app.get(openai_api.HOLDS_KEY)        # on the listener that serves the API
    if holds is not None:
        body.update(requests_held=holds.waiting, requests_held_total=holds.held,
                    requests_held_seconds_total=round(holds.waited_s, 3))
    return web.json_response(body)


async def health(request: web.Request) -> web.Response:
    """For load balancers: 200 while some connected node has a model ready, 503 otherwise."""
    models = dataplane.served_models(request.app[ROUTER_KEY])
    if models:
        return web.json_response({"status": "ok", "models": len(models)})
    return web.json_response({"status": "unavailable", "reason": "no connected node has a model ready"},
                             status=503)


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__, "protocol_version": codec.PROTOCOL_VERSION,
                              "protocol_revision": codec.PROTOCOL_REVISION})


async def metrics_endpoint(request: web.Request) -> web.Response:
    if not openai_api.authorized(request, openai_api.settings_of(request).api_keys):
        return openai_api.unauthorized()
    return metrics.response(request.app)


def build_app(router: Router, modules: tuple = ROUTE_MODULES) -> web.Application:
    """An app with /healthz, /health, /version and the routes of ``modules`` (a separate
    enrollment listener gets only enroll_api, the API listener then only openai_api,
    which brings /metrics)."""
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY_BYTES)
    app[ROUTER_KEY] = router
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    for module in modules:
        module.add_routes(app)
    if openai_api in modules:
        metrics.install(app, app.get(openai_api.HOLDS_KEY))
        app.router.add_get("/metrics", metrics_endpoint)
    return app


class MalformedRequestsAreTheClients(logging.Filter):
    """aiohttp logs a request it cannot parse (a negative Content-Length, too many
    headers…) at ERROR with a traceback: any client could fill the router's log with
    its own mistakes. Those become one DEBUG line without the traceback; every other
    record of aiohttp.server passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg, record.args = f"{record.getMessage()}: {escape(str(exc))}", ()
        record.exc_info = record.exc_text = None
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def quiet_malformed_requests() -> None:
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestsAreTheClients())
