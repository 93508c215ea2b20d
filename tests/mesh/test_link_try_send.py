"""MeshLink.try_send: the link's send that never waits (the bridge's fast path for a stream).

No router: the session's outbox is a real transport.Outbox on an inproc socket nobody
reads, set where a session puts it, so the test decides when it is full.
"""

from __future__ import annotations

import asyncio

import pytest
import zmq

from tests.mesh.helpers import LinkProbe, make_link
from tests.mesh.test_outbox import received, socket_pair
from xim_proto import codec, transport
from ximd import enrollment
from ximd.mesh.link import LinkDown
from ximd.mesh.state import LinkState


def fake_identity() -> enrollment.Identity:
    public, secret = (k.decode() for k in zmq.curve_keypair())
    return enrollment.Identity(
        agent_id="a1", worker_id="worker-fake", router_url="http://127.0.0.1:9",
        mesh_endpoints=("tcp://127.0.0.1:9",), router_public_key=public,
        agent_public_key=public, agent_secret_key=secret, token="xat_fake")


def chunk(seq: int) -> codec.Chunk:
    return codec.Chunk(id="r1", seq=seq, data=[b"x"])


def test_try_send_queues_while_the_outbox_has_room_and_refuses_without_queueing_when_full():
    async def scenario():
        with socket_pair(sndhwm=1) as (rx, tx):
            link = make_link(fake_identity(), LinkProbe())
            outbox = transport.Outbox(asyncio.get_running_loop(), tx, lambda: None, interval_s=0.05, limit=3)
            link.state, link._outbox = LinkState.CONNECTED, outbox     # as a session sets them
            sent = [link.try_send(chunk(seq)) for seq in range(6)]
            assert sent == [True] * 4 + [False] * 2       # one in the socket, three in the outbox
            outbox.close()                                 # room again
            assert link.try_send(chunk(6)) is True
            return [codec.decode(frame, sender=codec.AGENT).seq for frame in received(rx)]

    assert asyncio.run(scenario())[0] == 0


def test_try_send_without_a_session_raises_link_down():
    link = make_link(fake_identity(), LinkProbe())
    with pytest.raises(LinkDown, match="no session"):
        link.try_send(chunk(0))
