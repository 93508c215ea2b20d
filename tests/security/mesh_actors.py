"""The actors of the hostile-node tests: an honest node and a hostile enrolled peer.

Both hold keys enrolled through the router's real enrollment API and speak
CURVE to a real `xim-router serve` (tests/support/router.py):

- `HonestNode`: the real `ximd.mesh.link.MeshLink`, answering every `infer`
  itself (a whole answer in `done`, or a few `chunk`s then `done`), so a
  test can tell which node served a request.
- `HostilePeer`: a raw DEALER with its own enrolled keypair that can pick
  any routing id, say hello with its own token, record every frame the
  router sends it and send whatever it likes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

import aiohttp
import zmq
import zmq.asyncio

from tests.mesh.helpers import LinkProbe, make_link, running, until
from xim_proto import codec
from ximd.identity import Identity
from ximd.mesh.link import MeshLink
from ximd.mesh.state import LinkState

CLIENT_TIMEOUT_S = 60.0


def answer_body(node_name: str) -> bytes:
    """A chat completion that names the node that produced it."""
    return json.dumps({"id": "x", "object": "chat.completion", "model": "tiny", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": f"served by {node_name}"},
         "finish_reason": "stop"}]}).encode()


class HonestNode(LinkProbe):
    """A MeshLink that serves ``models`` by answering each infer on its own."""

    def __init__(self, identity: Identity, name: str, models=("tiny",)):
        super().__init__(models=models)
        self.name = name
        self.identity = identity
        self.infers: list[codec.Infer] = []
        self.link: MeshLink = make_link(identity, self)

    async def on_message(self, msg: codec.Message) -> None:
        await super().on_message(msg)
        if isinstance(msg, codec.Infer):
            self.infers.append(msg)
            await self.link.send(codec.Done(id=msg.id, finish_reason="stop", body=answer_body(self.name)))

    @property
    def connected(self) -> bool:
        return self.link.state is LinkState.CONNECTED

    @contextlib.asynccontextmanager
    async def serving(self):
        async with running(self.link):
            await until(lambda: self.connected, 60, f"{self.name} to connect")
            yield self


class HostilePeer:
    """A raw CURVE DEALER holding an enrolled key, speaking under a routing id of its choice."""

    def __init__(self, identity: Identity, router_endpoint: str, *, routing_id: bytes | None):
        self.identity = identity
        self.endpoint = router_endpoint
        self.routing_id = routing_id
        self.received: list[codec.Message] = []
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None

    # ------------------------------------------------------------ connection

    async def connect(self) -> None:
        """Open a fresh socket and wait until the CURVE handshake (and ZAP) succeeded."""
        await self.disconnect()
        sock = self._ctx.socket(zmq.DEALER)
        if self.routing_id is not None:
            sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100000)
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.identity.router_public_key.encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.identity.agent_public_key.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.identity.agent_secret_key.encode())
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        sock.connect(self.endpoint)
        try:
            await asyncio.wait_for(monitor.recv_multipart(), CLIENT_TIMEOUT_S)
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
        self._sock = sock
        self._reader = asyncio.ensure_future(self._read(sock))

    async def disconnect(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._reader = None

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._sock is not None:
            self._sock.close(linger=0)
        self._ctx.term()

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            with contextlib.suppress(codec.ProtocolError):
                self.received.append(codec.decode(frames[-1], sender=codec.ROUTER))

    # ------------------------------------------------------------ speaking

    async def send(self, msg: codec.Message) -> None:
        assert self._sock is not None, "connect() first"
        await self._sock.send(codec.encode(msg))

    async def hello(self, models=("bait",)) -> None:
        await self.send(codec.Hello(
            token=self.identity.token, versions=[1], agent_version="hostile", hostname="hostile",
            capabilities=["credit", "cancel"], hardware={},
            models=[codec.Model(name=m, state="ready") for m in models], max_concurrent=4))

    def got(self, kind: type[codec.Message]) -> list:
        return [m for m in self.received if isinstance(m, kind)]

    def infers(self) -> list[codec.Infer]:
        return self.got(codec.Infer)


async def chat(http_url: str, model: str = "tiny", *, prompt: str = "a secret prompt",
               stream: bool = False) -> tuple[int, bytes]:
    """One OpenAI chat completion through the router: (status, body)."""
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": prompt}]}
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as client, \
            client.post(f"{http_url}/v1/chat/completions", json=body) as response:
        return response.status, await response.read()


def router_rss(pid: int) -> int:
    """Resident memory of a process, in bytes (/proc, so no extra dependency is needed)."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
