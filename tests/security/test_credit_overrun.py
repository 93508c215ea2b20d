"""Finding 6: a node that ignores its credit window loses the request, not the router its memory.

The router grants `chunk` frames per streamed request (docs/protocol.md §5.4)
but used to queue whatever an agent sent: a node answering one request with
a flood of chunks, for a client that reads slowly, filled the router's memory.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.mesh.helpers import enroll_fresh, until
from tests.security.mesh_actors import CLIENT_TIMEOUT_S, HonestNode, HostilePeer, chat, router_rss
from tests.support.router import RouterProcess
from xim_proto import codec

FRAME_DATA = b'{"pad":"' + b"x" * (256 * 1024) + b'"}'     # one chunk of about 256 KiB per frame
FRAMES_PER_BURST = 32
BURSTS = 25                                                  # 800 frames, 200 MiB in all
MAX_GROWTH = 64 * 1024 * 1024                                # the router may hold at most this more


@pytest.fixture
def router(tmp_path):
    proc = RouterProcess(tmp_path, lease_interval="1s", lease_timeout="120s")
    try:
        yield proc.start()
    finally:
        proc.stop()


async def flood(hostile: HostilePeer, infer: codec.Infer, router_pid: int) -> int:
    """Send every burst regardless of credit; the router's peak RSS, read once it has taken each burst in."""
    peak = 0
    seq = 0
    for burst in range(BURSTS):
        for _ in range(FRAMES_PER_BURST):
            await hostile.send(codec.Chunk(id=infer.id, seq=seq, data=[FRAME_DATA]))
            seq += 1
        # Frames of one connection are read in order: the lease's ack says the burst was taken in.
        await hostile.send(codec.Lease(seq=burst + 1, running=1, waiting=0, kv_cache_usage=0.0,
                                       engine_state="ready", models=[codec.Model(name="flood", state="ready")],
                                       in_flight=[infer.id], max_concurrent=4, draining=False))
        await until(lambda b=burst: any(a.seq == b + 1 for a in hostile.got(codec.LeaseAck)), 120,
                    f"the router to take in burst {burst}")
        peak = max(peak, router_rss(router_pid))
    return peak


def test_a_node_flooding_chunks_past_its_credit_loses_the_request_and_the_router_stays_bounded(
        router, agent_cfg):
    honest_id, hostile_id = enroll_fresh(router, agent_cfg("honest")), enroll_fresh(router, agent_cfg("hostile"))

    async def scenario() -> None:
        honest = HonestNode(honest_id, "honest")
        hostile = HostilePeer(hostile_id, router.mesh_endpoint, routing_id=None)
        try:
            async with honest.serving():
                await hostile.connect()
                await hostile.hello(models=("flood",))
                await until(lambda: hostile.got(codec.Welcome), 60, "a welcome for the hostile node")
                body = {"model": "flood", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as client:
                    # A client that does not read yet: nothing the router holds can drain to it.
                    pending = asyncio.ensure_future(client.post(f"{router.http_url}/v1/chat/completions",
                                                                json=body))
                    infer = (await until(hostile.infers, 60, "the request to reach the hostile node"))[0]
                    baseline = router_rss(router.pid)
                    peak = await flood(hostile, infer, router.pid)
                    growth = peak - baseline
                    assert growth < MAX_GROWTH, (
                        f"the router grew by {growth / 2**20:.0f} MiB while a node sent "
                        f"{BURSTS * FRAMES_PER_BURST} chunk frames against a credit of {infer.credit}")
                    response = await asyncio.wait_for(pending, CLIENT_TIMEOUT_S)
                    stream = await asyncio.wait_for(response.read(), CLIENT_TIMEOUT_S)
                assert response.status == 200
                events = [e for e in stream.split(b"\n\n") if e]
                # What the client took in meanwhile earned the node more credit, nothing else did.
                granted = infer.credit + sum(c.n for c in hostile.got(codec.Credit) if c.id == infer.id)
                assert len(events) - 1 <= granted < BURSTS * FRAMES_PER_BURST, (len(events), granted)
                assert b"credit" in events[-1] and b'"error"' in events[-1], events[-1][:300]
                assert any(isinstance(m, codec.Cancel) and m.id == infer.id for m in hostile.received)
                assert router.log().count("overran its credit") == 1
                status, answer = await chat(router.http_url)            # the honest node still serves
                assert (status, b"served by honest" in answer) == (200, True), (status, answer[:200])
        finally:
            hostile.close()

    asyncio.run(scenario())
