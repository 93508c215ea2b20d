"""Router + agent + bridge + stand-in engine on real sockets, for the OpenAI API tests.

The router half is the real thing: `xim_router.mesh.Router` with its CURVE
ROUTER socket and ZAP, the enrollment store, `build_app` plus the OpenAI
routes, served by aiohttp on a loopback port. The agent half is the real
`ximd.mesh.link.MeshLink` with CURVE keys enrolled in that store, handing
serving messages to the real `ximd.serve.Bridge`, which talks to the
stand-in engine process over its unix socket. Only the daemon around them
(ximd.agent) is left out; tests/serving/test_daemon.py covers that. It all runs on an event loop in a background thread, so the
tests can drive it with the official `openai` client, sync or async.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import zmq
from aiohttp import web

from xim_proto import codec
from xim_router import http as router_http
from xim_router import keys as router_keys
from xim_router import openai_api
from xim_router import store as store_mod
from xim_router.mesh import Router, RouterSettings
from ximd.enrollment import Identity
from ximd.mesh.link import MeshLink
from ximd.mesh.report import HelloInfo, LeaseInfo
from ximd.mesh.state import LinkState
from ximd.serve import Bridge

MODEL = "tiny"


class Node:
    """The agent's serving half: the real MeshLink (CURVE DEALER) feeding the real Bridge."""

    def __init__(self, router: Router, store: store_mod.Store, engine_socket: Path, *,
                 max_concurrent: int, bridge_class: type[Bridge] = Bridge):
        public, secret = zmq.curve_keypair()
        enrolled = store.enroll(join_key=store.create_join_key(ttl_s=600, uses=1, model=None),
                                public_key=public.decode(), hostname="test-node", hardware={},
                                max_concurrent=max_concurrent, agent_version="test",
                                token_ttl_s=3600)
        self.identity = Identity(
            agent_id=enrolled.agent.agent_id, worker_id=enrolled.agent.worker_id,
            router_url="http://unused", mesh_endpoints=(router.mesh_endpoint,),
            router_public_key=router.keypair.public, agent_public_key=public.decode(),
            agent_secret_key=secret.decode(), token=enrolled.token,
            token_expires_at=enrolled.token_expires_at)
        self.max_concurrent = max_concurrent
        self.link = MeshLink(self.identity, hello_info=self.hello_info, lease_info=self.lease_info,
                             on_message=self.on_message, on_state=self.on_state, lease_interval=1.0)
        self.bridge = bridge_class(engine_socket, max_concurrent=max_concurrent, send=self.link.send)
        self._task: asyncio.Task | None = None

    def models(self) -> tuple[codec.Model, ...]:
        return (codec.Model(name=MODEL, state="ready", max_model_len=self.bridge.max_model_len),)

    def hello_info(self) -> HelloInfo:
        return HelloInfo(hostname="test-node", models=self.models(), max_concurrent=self.max_concurrent,
                         capabilities=tuple(sorted(self.bridge.optional_endpoints)))

    def lease_info(self) -> LeaseInfo:
        return LeaseInfo(models=self.models(), max_concurrent=self.max_concurrent,
                         running=self.bridge.running, in_flight=tuple(self.bridge.in_flight_ids()),
                         draining=self.bridge.draining, engine_state="healthy")

    async def on_message(self, msg: codec.Message) -> None:
        await self.bridge.handle(msg)

    def on_state(self, state: LinkState, detail: str) -> None:
        if state is not LinkState.CONNECTED:
            self.bridge.abort_all("link")       # the router has failed these requests already

    async def start(self) -> None:
        await self.bridge.start()
        await self.bridge.probe_engine()        # as ximd's node does before its link
        self._task = asyncio.ensure_future(self.link.run())

    async def close(self) -> None:
        await self.link.close()
        if self._task is not None:
            await asyncio.wait([self._task], timeout=5)
        await self.bridge.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServingStack:
    """Everything above, on a loop in a thread; `url` is the router's HTTP base."""

    def __init__(self, tmp: Path, engine_socket: Path, *, max_concurrent: int = 8,
                 api_keys: frozenset[str] = frozenset(), request_timeout_s: float = 60,
                 bridge_class: type[Bridge] = Bridge):
        self.bridge_class = bridge_class
        self.tmp = tmp
        self.engine_socket = engine_socket
        self.max_concurrent = max_concurrent
        self.api_settings = openai_api.ApiSettings(
            api_keys=api_keys, dataplane=openai_api.dataplane.Settings(request_timeout_s=request_timeout_s))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.agents: list[Node] = []

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServingStack:
        self.thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        self.store = store_mod.Store(self.tmp / "router-state")
        self.router = Router(self.store, router_keys.load_or_create_keypair(self.tmp / "router-state"),
                             mesh_bind="tcp://127.0.0.1:0",
                             settings=RouterSettings(lease_interval_s=1.0, lease_timeout_s=3.0))
        await self.router.start()
        app = router_http.build_app(self.router)
        openai_api.configure(app, self.api_settings)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        await self._add_agent(self.max_concurrent)

    async def _add_agent(self, max_concurrent: int) -> Node:
        agent = Node(self.router, self.store, self.engine_socket, max_concurrent=max_concurrent,
                     bridge_class=self.bridge_class)
        await agent.start()
        for _ in range(500):            # the lease has been handled once the router lists the model
            session = self.router.sessions.get(agent.identity.worker_id)
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
        self.store.close()
