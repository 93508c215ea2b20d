"""Finding 10: mesh endpoints from the enrollment answer must be tcp://HOST:PORT.

A hostile enrollment API (a real HTTP server played by the test) answers a valid
enrollment with endpoints of other ZeroMQ transports: `ipc://` would make the node
dial a local unix socket of the router's choosing, `inproc://`/`pgm://` are not the
protocol, and `tcp://eth0;host:port` picks the node's source interface. `ximd enroll`
refuses them with a message that names the endpoint and the expected form; an honest
answer still enrolls.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import zmq
from aiohttp import web

from tests.mesh.helpers import load_config, write_agent_config
from xim_proto import enroll as enroll_api
from ximd import enrollment

JOIN_KEY = "xjk_" + "a" * 32


def answer(endpoints: list[str]) -> dict:
    return {"agent_id": "a1", "worker_id": "worker-000000000001", "mesh_endpoints": endpoints,
            "router_public_key": zmq.curve_keypair()[0].decode(), "token": "xat_t",
            "token_expires_at": 2e9, "assigned_model": None, "protocol_version": 1}


@contextlib.asynccontextmanager
async def enrollment_api(endpoints: list[str]):
    """Yield the base URL of a router whose enrollment answer carries ``endpoints``."""
    async def enroll(request: web.Request) -> web.Response:
        await request.json()
        return web.json_response(answer(endpoints))
    app = web.Application()
    app.router.add_post(enroll_api.ENROLL_PATH, enroll)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]     # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def enroll_against(tmp_path, endpoints: list[str]) -> enrollment.Identity:
    async def scenario():
        async with enrollment_api(endpoints) as url:
            cfg = load_config(write_agent_config(tmp_path / "agent.toml", url=url,
                                                 state_dir=tmp_path / "state"))
            return await enrollment.enroll(cfg, JOIN_KEY, hostname="n", hardware={})
    return asyncio.run(scenario())


HOSTILE = {
    "ipc": ["ipc:///run/ximd/control.sock"],
    "inproc": ["inproc://mesh"],
    "pgm": ["pgm://eth0;239.192.1.1:5555"],
    "source interface": ["tcp://eth0;10.0.0.1:7000"],
    "wildcard": ["tcp://*:7000"],
    "no port": ["tcp://router.example"],
    "port out of range": ["tcp://router.example:70000"],
    "a port of 5000 digits": ["tcp://router.example:" + "9" * 5000],
    "one bad among good": ["tcp://router.example:7000", "ipc:///tmp/x"],
}


@pytest.mark.parametrize("endpoints", HOSTILE.values(), ids=HOSTILE.keys())
def test_enrollment_refuses_endpoints_that_are_not_tcp_host_port(tmp_path, endpoints):
    with pytest.raises(enrollment.RouterUnreachable) as refused:
        enroll_against(tmp_path, endpoints)
    message = str(refused.value)
    assert "tcp://HOST:PORT" in message and repr(endpoints[-1])[:40] in message, message


@pytest.mark.parametrize("endpoints", [["tcp://router.example:7000"], ["tcp://10.0.0.1:7000"],
                                       ["tcp://[fd00::1]:7000", "tcp://r-2.example.org:1"]])
def test_tcp_endpoints_enroll(tmp_path, endpoints):
    assert enroll_against(tmp_path, endpoints).mesh_endpoints == tuple(endpoints)
