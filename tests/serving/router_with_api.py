"""`python -m tests.serving.router_with_api ...` = `xim-router ...` with the OpenAI routes mounted.

Until the router's own app lists xim_router.openai_api in ROUTE_MODULES, the
daemon-level serving tests start the router through this module; once it
does, this adds nothing and runs the very same `xim-router`.
"""

import sys

from xim_router import cli, http, openai_api

if openai_api not in http.ROUTE_MODULES:
    http.ROUTE_MODULES = (*http.ROUTE_MODULES, openai_api)

sys.exit(cli.main())
