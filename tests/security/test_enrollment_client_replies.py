"""Finding 10: the enrollment client followed redirects re-sending the join key, and read
answers of any size.

A real aiohttp server stands in for a hostile or misconfigured router: it
answers enrollment with a 307/308 to a second server (which records what
reaches it), or with an endless body. `ximd.enrollment.enroll` must stop at the
redirect with an error that names the Location, never send the join key on,
and stop reading past 1 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aiohttp import web

from tests.mesh.helpers import load_config, write_agent_config
from ximd import enrollment
from ximd.enrollment import RouterConfigError, RouterUnreachable

JOIN_KEY = "xjk_" + "k" * 43
MAX_REPLY_BYTES = 1 << 20          # ximd.enrollment.MAX_REPLY_BYTES


@contextlib.asynccontextmanager
async def serving(handler):
    """A real HTTP server on a free loopback port; yields its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def agent_cfg(tmp_path, url):
    return load_config(write_agent_config(tmp_path / "agent.toml", url=url, state_dir=tmp_path / "s"))


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_and_the_join_key_goes_nowhere(tmp_path, status):
    received: list[bytes] = []

    async def elsewhere(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response({"error": {"code": "gotcha", "message": "thanks for the key"}}, status=400)

    async def scenario():
        async with serving(elsewhere) as thief:
            async def redirect(request: web.Request) -> web.Response:
                return web.Response(status=status, headers={"Location": thief + "/steal"})
            async with serving(redirect) as router:
                with pytest.raises(RouterConfigError) as refused:
                    await enrollment.enroll(agent_cfg(tmp_path, router), JOIN_KEY, hostname="n", hardware={})
                return refused.value, thief

    error, thief = asyncio.run(scenario())
    assert received == [], f"the {status} redirect carried the request to {thief}: {received[0][:80]!r}"
    assert f"answered {status}, a redirect to '{thief}/steal'" in str(error)


def test_an_endless_answer_is_cut_at_the_cap(tmp_path):
    sent = {"bytes": 0}

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        block = b" " * (256 * 1024)
        try:
            for _ in range(4 * 64):                    # 64 MiB, far past the cap
                await response.write(block)
                sent["bytes"] += len(block)
        except (ConnectionError, RuntimeError):
            pass                                       # the client hung up: what we want
        return response

    async def scenario():
        async with serving(endless) as router:
            with pytest.raises(RouterUnreachable, match=f"longer than {MAX_REPLY_BYTES} bytes"):
                await enrollment.enroll(agent_cfg(tmp_path, router), JOIN_KEY, hostname="n", hardware={})

    asyncio.run(scenario())


def test_an_announced_huge_answer_is_refused_before_reading(tmp_path):
    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b"{" + b" " * (MAX_REPLY_BYTES + 10) + b"}", content_type="application/json")

    async def scenario():
        async with serving(huge) as router:
            with pytest.raises(RouterUnreachable, match="longer than"):
                await enrollment.enroll(agent_cfg(tmp_path, router), JOIN_KEY, hostname="n", hardware={})

    asyncio.run(scenario())


def test_a_deeply_nested_answer_is_an_error_not_a_crash(tmp_path):
    async def nested(request: web.Request) -> web.Response:
        return web.Response(body=b"[" * 100_000, status=502, content_type="application/json")

    async def scenario():
        async with serving(nested) as router:
            with pytest.raises(RouterUnreachable, match="answered 502"):
                await enrollment.enroll(agent_cfg(tmp_path, router), JOIN_KEY, hostname="n", hardware={})

    asyncio.run(scenario())
