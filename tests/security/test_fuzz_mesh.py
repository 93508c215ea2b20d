"""Fuzz the router's mesh socket from an enrolled node, while an honest node serves.

A real `xim-router serve`; an honest node (ximd's MeshLink, answering each infer) and
a hostile one: a raw CURVE DEALER with its own enrolled key and worker id, which says
a valid hello and then sends hypothesis-made frames of every message type (built from
the codec's catalogue with hostile fields, types only the router may send, arbitrary
MessagePack, arbitrary bytes, multi-part messages, batches of all of these: it offers
batches in its hello), with a fresh hello now and then so
that most frames land in a live session. Throughout, a client's request for the honest
node's model is answered by the honest node; afterwards the router's log holds no
traceback, its RSS stayed under a bound and /healthz answers.

Seeds: tests/security/fuzzing.py. Figures print with -s.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections import Counter

import msgpack
import psutil
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from tests.mesh.helpers import LinkProbe, enroll_fresh, load_config, make_link, wait_for, write_agent_config
from tests.security.fuzzing import ANY_VALUE, fuzz_settings, hostile_batch, hostile_frame, seed_note
from tests.support.router import RouterProcess
from xim_proto import codec, transport
from ximd.identity import Identity
from ximd.mesh.link import MeshLink
from ximd.mesh.state import LinkState

MODEL = "honest-model"
ANSWER = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {
    "role": "assistant", "content": "honest"}, "finish_reason": "stop"}]}
RSS_BOUND = 384 << 20
HELLO_EVERY = 40               # cases between two fresh hellos of the hostile node
CHECK_EVERY = 250              # cases between two requests to the honest node
FIGURES: Counter[str] = Counter()


class HonestNode:
    """A MeshLink in its own thread and event loop that answers every infer with ANSWER."""

    def __init__(self, identity: Identity):
        self.probe = LinkProbe(models=(MODEL,))
        self.probe.on_message = self.on_message          # type: ignore[method-assign]
        self.link: MeshLink = make_link(identity, self.probe)
        self.loop = asyncio.new_event_loop()
        self.served = 0
        self._closing: asyncio.Future | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._run(),),
                                       daemon=True)

    async def on_message(self, msg: codec.Message) -> None:
        if isinstance(msg, codec.Infer):
            self.served += 1
            await self.link.send(codec.Done(id=msg.id, finish_reason="stop",
                                            usage=codec.Usage(1, 1, 2), body=json.dumps(ANSWER).encode()))

    def start(self) -> HonestNode:
        self.thread.start()
        wait_for(lambda: self.link.state == LinkState.CONNECTED, 60, "the honest node's session")
        return self

    async def _run(self) -> None:
        await self.link.run()
        if self._closing is not None:      # run() may end first: on the router's answer to our bye
            await self._closing

    def _close(self) -> None:
        self._closing = asyncio.ensure_future(self.link.close())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._close)
        self.thread.join(60)
        assert not self.thread.is_alive(), "the honest node's link did not stop"
        self.loop.close()


class HostileNode:
    """A raw DEALER with an enrolled key, speaking under its own worker id."""

    def __init__(self, identity: Identity):
        self.identity = identity
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        transport.apply_common_options(self.sock)
        self.sock.setsockopt(zmq.ROUTING_ID, identity.worker_id.encode())
        self.sock.setsockopt(zmq.CURVE_SERVERKEY, identity.router_public_key.encode())
        self.sock.setsockopt(zmq.CURVE_PUBLICKEY, identity.agent_public_key.encode())
        self.sock.setsockopt(zmq.CURVE_SECRETKEY, identity.agent_secret_key.encode())
        self.sock.setsockopt(zmq.SNDTIMEO, 10_000)
        self.sock.connect(identity.mesh_endpoints[0])
        self.received: Counter[str] = Counter()

    def hello(self) -> None:
        self.sock.send(codec.encode(codec.Hello(
            token=self.identity.token, versions=[1], agent_version="fuzz", hostname="hostile",
            capabilities=["credit", "cancel", codec.BATCH], hardware={}, models=[], max_concurrent=1)))

    def send(self, parts: list[bytes]) -> None:
        self.sock.send_multipart(parts)
        self.drain()

    def drain(self) -> None:
        """Read what the router answered, so that its queue to us never fills."""
        while True:
            try:
                frame = self.sock.recv(zmq.DONTWAIT)
            except zmq.Again:
                return
            try:
                self.received[codec.decode(frame, sender=codec.ROUTER).TYPE] += 1
            except codec.ProtocolError:
                self.received["undecodable"] += 1

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class Mesh:
    def __init__(self, router: RouterProcess, honest: HonestNode, hostile: HostileNode):
        self.router, self.honest, self.hostile = router, honest, hostile
        self.process = psutil.Process(router.pid)
        host, port = router.http_url.split("://", 1)[1].rsplit(":", 1)
        self.http = (host, int(port))

    def http_request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(*self.http, timeout=120)
        try:
            conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def honest_node_serves(self) -> None:
        status, body = self.http_request("POST", "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200, f"{status} {body[:300]!r}; router log:\n{self.router.log()[-3000:]}"
        assert json.loads(body)["choices"][0]["message"]["content"] == "honest"
        FIGURES["honest requests served"] += 1

    def rss(self) -> int:
        rss = self.process.memory_info().rss
        FIGURES["peak_rss"] = max(FIGURES["peak_rss"], rss)
        return rss


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-mesh")
    router = RouterProcess(root).start()
    honest = hostile = None
    try:
        def identity(name: str) -> Identity:
            cfg = load_config(write_agent_config(root / f"{name}.toml", url=router.http_url,
                                                 state_dir=root / f"{name}-state"))
            return enroll_fresh(router, cfg)
        honest = HonestNode(identity("honest")).start()
        hostile = HostileNode(identity("hostile"))
        hostile.hello()
        m = Mesh(router, honest, hostile)
        m.honest_node_serves()
        yield m
        log = router.log()
        print(f"\nmesh fuzz: {FIGURES['cases']} frames from the hostile node, "
              f"{FIGURES['honest requests served']} honest requests served (all 200), router peak RSS "
              f"{FIGURES['peak_rss'] >> 20} MiB, answers to the hostile node {dict(hostile.received)}, "
              f"{seed_note()}")
        assert "Traceback" not in log, log[-5000:]
    finally:
        if hostile:
            hostile.close()
        if honest:
            honest.stop()
        router.stop()


def after_case(mesh: Mesh) -> None:
    FIGURES["cases"] += 1
    if FIGURES["cases"] % HELLO_EVERY == 0:
        mesh.hostile.hello()
    if FIGURES["cases"] % CHECK_EVERY == 0:
        mesh.honest_node_serves()
    assert mesh.router.proc is not None and mesh.router.proc.poll() is None, mesh.router.log()[-3000:]
    assert mesh.rss() < RSS_BOUND


@pytest.mark.parametrize("name", sorted(codec.MESSAGES))
@fuzz_settings(max_examples=100)
@given(data=st.data())
def test_hostile_frames_of_each_type(mesh, name, data):
    mesh.hostile.send([data.draw(hostile_frame(name))])
    after_case(mesh)


@fuzz_settings(max_examples=200)
@given(st.one_of(st.binary(max_size=512), ANY_VALUE.map(msgpack.packb),
                 st.lists(st.binary(max_size=64), min_size=2, max_size=4)))
def test_arbitrary_frames(mesh, frame):
    mesh.hostile.send(frame if isinstance(frame, list) else [frame])
    after_case(mesh)


@fuzz_settings(max_examples=300)
@given(hostile_batch())
def test_hostile_batches(mesh, frame):
    mesh.hostile.send([frame])
    after_case(mesh)


def test_the_honest_node_still_serves_and_the_router_is_healthy(mesh):
    mesh.hostile.drain()
    mesh.honest_node_serves()
    status, body = mesh.http_request("GET", "/healthz")
    assert status == 200, body
    assert mesh.honest.link.state == LinkState.CONNECTED
    assert mesh.rss() < RSS_BOUND
