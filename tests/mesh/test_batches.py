"""Several frames per message (`batch`, protocol revision 1.3) between old and new peers.

Real ZeroMQ with CURVE: ximd's MeshLink against a real `xim-router serve`, and
against a stand-in router (a raw CURVE ROUTER socket) that plays one of an
earlier revision, whose welcome offers no `batch`. An old node is the link with
`batch` taken out of its hello: it then never packs frames either.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import zmq
import zmq.asyncio

from tests.mesh.helpers import LinkProbe, enroll_fresh, make_link, running, stand_in_router, until
from xim_proto import codec
from ximd.mesh import link as link_mod
from ximd.mesh.state import LinkState

CHUNKS = 12                      # within the router's initial credit (16 frames)


def payload(i: int) -> bytes:
    return json.dumps({"object": "chat.completion.chunk", "model": "tiny",
                       "choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}).encode()


class StreamingNode(LinkProbe):
    """Answers each infer with CHUNKS chunk frames and a done, sent back to back: the first
    chunk leaves at once, the others gather in the outbox until the done flushes them."""

    def __init__(self, identity):
        super().__init__()
        self.link = make_link(identity, self)

    async def on_message(self, msg: codec.Message) -> None:
        await super().on_message(msg)
        if isinstance(msg, codec.Infer):
            for seq in range(CHUNKS):
                await self.link.send(codec.Chunk(id=msg.id, seq=seq, data=[payload(seq)]))
            await self.link.send(codec.Done(id=msg.id, finish_reason="stop",
                                            usage=codec.Usage(1, CHUNKS, CHUNKS + 1)))


async def streamed_text(http_url: str) -> str:
    body = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client, \
            client.post(f"{http_url}/v1/chat/completions", json=body) as response:
        raw = await response.read()
        assert response.status == 200, raw[:500]
    events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(c["delta"].get("content", "") for e in events[:-1] for c in json.loads(e)["choices"])


@pytest.mark.parametrize("node", ["new", "old"])
def test_a_stream_reaches_the_client_whole_and_in_order_from_new_and_old_nodes(router, agent_cfg,
                                                                               monkeypatch, node):
    """A new node sends its burst as a batch; an old one (no `batch` in its hello) sends the same
    frames one by one, and the new router serves both alike."""
    if node == "old":
        monkeypatch.setattr(link_mod, "CAPABILITIES", [c for c in link_mod.CAPABILITIES if c != codec.BATCH])
    streaming = StreamingNode(enroll_fresh(router, agent_cfg()))

    async def scenario() -> str:
        async with running(streaming.link):
            await until(lambda: streaming.link.state == LinkState.CONNECTED, 30, "the link to connect")
            assert codec.BATCH in streaming.link.welcome.capabilities       # the router offers it
            texts = [await streamed_text(router.http_url) for _ in range(3)]
            assert len(set(texts)) == 1
            return texts[0]

    text = asyncio.run(scenario())
    assert text == "".join(f"t{i} " for i in range(CHUNKS))
    assert (router.mesh_event("batch_in") >= 3) == (node == "new")
    assert router.mesh_event("batch_in") == 0 or node == "new"
    assert "Traceback" not in router.log() and "malformed" not in router.log()


# ---------------------------------------------------------------- against a router of an earlier revision


async def serve_as_router(sock: zmq.asyncio.Socket, offers: list[str], got: list, messages: list) -> None:
    """Welcome the hello offering ``offers``, ack leases; record each message the agent sent
    (``got``: its type, a batch as one) and every frame in order (``messages``)."""
    while True:
        rid, frame = await sock.recv_multipart()
        msg = codec.decode(frame, sender=codec.AGENT)
        got.append(msg.TYPE)
        inner = [codec.decode(f, sender=codec.AGENT, batched=True) for f in msg.frames] \
            if isinstance(msg, codec.Batch) else [msg]
        messages.extend(inner)
        for m in inner:
            if isinstance(m, codec.Hello):
                await sock.send_multipart([rid, codec.encode(codec.Welcome(
                    version=1, session="s", router_version="stand-in", lease_interval_s=5.0,
                    lease_timeout_s=15.0, max_frame_bytes=codec.MAX_FRAME_BYTES, capabilities=offers))])
            elif isinstance(m, codec.Lease):
                await sock.send_multipart([rid, codec.encode(codec.LeaseAck(seq=m.seq))])


@pytest.mark.parametrize("offers", [["credit", "cancel", "drain"], ["credit", "cancel", "drain", codec.BATCH]],
                         ids=["router-1.2", "router-1.3"])
def test_the_node_batches_only_for_a_router_that_offers_it(offers):
    async def scenario() -> tuple[list, list, codec.Hello]:
        ctx = zmq.asyncio.Context()
        sock, identity = stand_in_router(ctx)
        got: list = []
        messages: list = []
        server = asyncio.ensure_future(serve_as_router(sock, offers, got, messages))
        link = make_link(identity, LinkProbe())
        try:
            async with running(link):
                await until(lambda: link.state == LinkState.CONNECTED, 30, "the link to connect")
                for burst in range(3):
                    for seq in range(50):          # back to back: they gather in the outbox
                        await link.send(codec.Chunk(id=f"r{burst}", seq=seq, data=[b"%d" % seq]))
                    await link.send(codec.Done(id=f"r{burst}"))
                await until(lambda: sum(isinstance(m, codec.Done) for m in messages) == 3, 10,
                            "every frame to arrive")
        finally:
            server.cancel()
            sock.close(0)
            ctx.term()
        return got, messages, messages[0]

    got, messages, hello = asyncio.run(scenario())
    assert isinstance(hello, codec.Hello) and codec.BATCH in hello.capabilities
    answers = [(m.id, m.seq if isinstance(m, codec.Chunk) else "done") for m in messages
               if isinstance(m, (codec.Chunk, codec.Done))]
    assert answers == [(f"r{b}", s) for b in range(3) for s in [*range(50), "done"]]
    if codec.BATCH in offers:
        assert got.count("batch") >= 3 and len(got) < len(messages) / 10
    else:
        assert "batch" not in got and len(got) == len(messages)
