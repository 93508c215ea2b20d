"""Router + agent + bridge + stand-in engine on real sockets, for the OpenAI API tests.

The router half is the real thing: `xim_router.mesh.Router` with its CURVE
ROUTER socket and ZAP, the enrollment store, `build_app` plus the OpenAI
routes, served by aiohttp on a loopback port. The agent half is a real
DEALER with CURVE keys enrolled in that store, speaking the real codec
(hello → welcome → lease) and handing serving messages to the real
`ximd.serve.Bridge`, which talks to the stand-in engine process over its
unix socket. It all runs on an event loop in a background thread, so the
tests can drive it with the official `openai` client, sync or async.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import zmq
import zmq.asyncio
from aiohttp import web

from ximd.mesh import codec, transport
from ximd.serve import Bridge
from xim_router import http as router_http
from xim_router import keys as router_keys
from xim_router import openai_api
from xim_router import store as store_mod
from xim_router.mesh import Router, RouterSettings

MODEL = "tiny"


class MiniAgent:
    """The agent's side of the link, reduced to what serving needs."""

    def __init__(self, ctx: zmq.asyncio.Context, router: Router, store: store_mod.Store,
                 bridge_factory, *, max_concurrent: int):
        public, secret = zmq.curve_keypair()
        enrolled = store.enroll(join_key=store.create_join_key(ttl_s=600, uses=1, model=None),
                                public_key=public.decode(), hostname="test-node", hardware={},
                                max_concurrent=max_concurrent, agent_version="test",
                                token_ttl_s=3600)
        self.worker_id = enrolled.agent.worker_id
        self.token = enrolled.token
        self.max_concurrent = max_concurrent
        sock = ctx.socket(zmq.DEALER)
        transport.apply_common_options(sock)
        sock.setsockopt(zmq.ROUTING_ID, self.worker_id.encode())
        sock.setsockopt(zmq.CURVE_SERVERKEY, router.keypair.public.encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.connect(router.mesh_endpoint)
        self.sock = sock
        self.bridge: Bridge = bridge_factory(self.send)
        self.seq = 0
        self._task: asyncio.Task | None = None

    async def send(self, msg: codec.Message) -> None:
        await self.sock.send(codec.encode(msg))

    def models(self) -> list[codec.Model]:
        return [codec.Model(name=MODEL, state="ready")]

    async def lease(self) -> None:
        self.seq += 1
        await self.send(codec.Lease(seq=self.seq, running=self.bridge.running, waiting=0,
                                    kv_cache_usage=0.0, engine_state="healthy", models=self.models(),
                                    in_flight=self.bridge.in_flight_ids(),
                                    max_concurrent=self.max_concurrent, draining=self.bridge.draining))

    async def start(self) -> None:
        await self.bridge.start()
        await self.send(codec.Hello(token=self.token, versions=list(codec.PROTOCOL_VERSIONS),
                                    agent_version="test", hostname="test-node", capabilities=[],
                                    hardware={}, models=self.models(),
                                    max_concurrent=self.max_concurrent))
        welcome = codec.decode(await asyncio.wait_for(self.sock.recv(), 10), sender=codec.ROUTER)
        assert isinstance(welcome, codec.Welcome), welcome
        await self.lease()
        self._task = asyncio.ensure_future(self._receive())

    async def _receive(self) -> None:
        while True:
            msg = codec.decode(await self.sock.recv(), sender=codec.ROUTER)
            await self.bridge.handle(msg)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.bridge.close()
        self.sock.close(linger=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServingStack:
    """Everything above, on a loop in a thread; `url` is the router's HTTP base."""

    def __init__(self, tmp: Path, engine_socket: Path, *, max_concurrent: int = 8,
                 api_keys: frozenset[str] = frozenset(), request_timeout_s: float = 60):
        self.tmp = tmp
        self.engine_socket = engine_socket
        self.max_concurrent = max_concurrent
        self.api_settings = openai_api.ApiSettings(
            api_keys=api_keys, dataplane=openai_api.dataplane.Settings(request_timeout_s=request_timeout_s))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.agents: list[MiniAgent] = []

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "ServingStack":
        self.thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        self.store = store_mod.Store(self.tmp / "router-state")
        self.router = Router(self.store, router_keys.load_or_create_keypair(self.tmp / "router-state"),
                             mesh_bind="tcp://127.0.0.1:0", settings=RouterSettings())
        await self.router.start()
        app = router_http.build_app(self.router)
        if openai_api not in router_http.ROUTE_MODULES:     # until the router wires it in
            openai_api.add_routes(app)
        openai_api.configure(app, self.api_settings)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.ctx = zmq.asyncio.Context()
        await self._add_agent(self.max_concurrent)

    async def _add_agent(self, max_concurrent: int) -> MiniAgent:
        def bridge(send):
            return Bridge(self.engine_socket, max_concurrent=max_concurrent, send=send)
        agent = MiniAgent(self.ctx, self.router, self.store, bridge, max_concurrent=max_concurrent)
        await agent.start()
        for _ in range(200):            # the lease has been handled once the router lists the model
            session = self.router.sessions.get(agent.worker_id)
            if session is not None and session.lease is not None:
                break
            await asyncio.sleep(0.01)
        self.agents.append(agent)
        return agent

    def stop(self) -> None:
        try:
            self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    async def _stop(self) -> None:
        # The router first: it says bye to agents that are still connected.
        await self.runner.cleanup()
        await self.router.stop()
        for agent in self.agents:
            await agent.close()
        self.ctx.term()
        self.store.close()
