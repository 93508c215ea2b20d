"""The router's HTTP application: one aiohttp app that route modules add to.

`build_app(router)` is the seam: each module in ROUTE_MODULES has
`add_routes(app)` and reaches the mesh through ``app[ROUTER_KEY]``. The
OpenAI-compatible API (serving) plugs in here beside the enrollment API.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from xim_proto.ratelimit import escape
from xim_router import enroll_api, openai_api
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


def build_app(router: Router, modules: tuple = ROUTE_MODULES) -> web.Application:
    """An app with /healthz and the routes of ``modules`` (a separate enrollment
    listener gets only enroll_api, the API listener then only openai_api)."""
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY_BYTES)
    app[ROUTER_KEY] = router
    app.router.add_get("/healthz", healthz)
    for module in modules:
        module.add_routes(app)
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
