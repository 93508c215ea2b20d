"""The router's HTTP application: one aiohttp app that route modules add to.

`build_app(router)` is the seam: each module in ROUTE_MODULES has
`add_routes(app)` and reaches the mesh through ``app[ROUTER_KEY]``. The
OpenAI-compatible API (serving) plugs in here beside the enrollment API.
"""

from __future__ import annotations

from aiohttp import web

from xim_router import enroll_api, openai_api
from xim_router.api_common import ROUTER_KEY, json_errors
from xim_router.mesh import Router

# Modules with add_routes(app): enrollment, and the OpenAI-compatible API.
ROUTE_MODULES = (enroll_api, openai_api)

MAX_BODY_BYTES = 1 << 20


async def healthz(request: web.Request) -> web.Response:
    router: Router = request.app[ROUTER_KEY]
    return web.json_response({"status": "ok", "agents_connected": len(router.sessions)})


def build_app(router: Router, modules: tuple = ROUTE_MODULES) -> web.Application:
    """An app with /healthz and the routes of ``modules`` (a separate enrollment
    listener gets only enroll_api, the API listener then only openai_api)."""
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY_BYTES)
    app[ROUTER_KEY] = router
    app.router.add_get("/healthz", healthz)
    for module in modules:
        module.add_routes(app)
    return app
