"""Finding 10: lease timing from a hostile router is clamped by the node.

A real MeshLink dials a real CURVE ROUTER socket played by the test (the hostile
router: it holds the node's pinned router key, as a compromised or rogue router
would). Its welcome carries lease timing meant to hurt: an interval of 0 makes a
node that believes it send leases in a busy loop; a timeout of 0 or NaN makes it
never notice that the router went silent. docs/protocol.md §9 gives the ranges.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import zmq
import zmq.asyncio

from tests.mesh.helpers import LinkProbe, make_link, running, until
from xim_proto import codec
from ximd.identity import Identity
from ximd.mesh.link import LEASE_INTERVAL_RANGE_S, LeaseTiming, lease_timing
from ximd.mesh.state import LinkState

WINDOW_S = 2.0
# A node that honours the range sends at most one lease per minimum interval (plus the
# first one at once); one that spins sends thousands in the same window.
MOST_LEASES_IN_WINDOW = int(WINDOW_S / LEASE_INTERVAL_RANGE_S[0]) + 5


class HostileRouter:
    """A CURVE ROUTER that welcomes every hello with the timing it is given."""

    def __init__(self, *, lease_interval_s: float, lease_timeout_s: float, ack_leases: bool):
        self.public, secret = (k.decode() for k in zmq.curve_keypair())
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.CURVE_SERVER, 1)
        self.sock.setsockopt(zmq.CURVE_SECRETKEY, secret.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.timing = (lease_interval_s, lease_timeout_s)
        self.ack_leases = ack_leases
        self.hellos = 0
        self.lease_times: list[float] = []

    def identity(self) -> Identity:
        public, secret = (k.decode() for k in zmq.curve_keypair())
        return Identity(agent_id="a1", worker_id="worker-000000000001", router_url="http://127.0.0.1:9",
                        mesh_endpoints=(self.endpoint,), router_public_key=self.public,
                        agent_public_key=public, agent_secret_key=secret, token="xat_fake",
                        token_expires_at=time.time() + 3600, enrolled_at=time.time())

    async def serve(self) -> None:
        while True:
            rid, frame = await self.sock.recv_multipart()
            msg = codec.decode(frame, sender=codec.AGENT)
            if isinstance(msg, codec.Hello):
                self.hellos += 1
                await self.sock.send_multipart([rid, codec.encode(codec.Welcome(
                    version=1, session=f"s{self.hellos}", router_version="hostile",
                    lease_interval_s=self.timing[0], lease_timeout_s=self.timing[1],
                    max_frame_bytes=codec.MAX_FRAME_BYTES, capabilities=[]))])
            elif isinstance(msg, codec.Lease):
                self.lease_times.append(time.monotonic())
                if self.ack_leases:
                    await self.sock.send_multipart([rid, codec.encode(codec.LeaseAck(seq=msg.seq))])

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


async def with_hostile_router(router: HostileRouter, body) -> None:
    server = asyncio.ensure_future(router.serve())
    try:
        await body()
    finally:
        server.cancel()
        router.close()


@pytest.mark.parametrize("interval", [0.0, -5.0, 1e-9], ids=["zero", "negative", "a nanosecond"])
def test_a_tiny_lease_interval_does_not_make_the_node_spin(interval):
    router = HostileRouter(lease_interval_s=interval, lease_timeout_s=15.0, ack_leases=True)
    probe = LinkProbe()
    link = make_link(router.identity(), probe, lease_interval=5.0)

    async def body():
        async with running(link):
            await until(lambda: router.lease_times, 30, "the first lease")
            first = router.lease_times[0]
            await asyncio.sleep(WINDOW_S)
            sent = sum(1 for t in router.lease_times if t - first <= WINDOW_S)
            assert sent <= MOST_LEASES_IN_WINDOW, \
                f"{sent} leases in {WINDOW_S} s: the node spins on the router's interval {interval}"
            assert link.state == LinkState.CONNECTED
            assert link.lease_timing == LeaseTiming(LEASE_INTERVAL_RANGE_S[0], 15.0)

    asyncio.run(with_hostile_router(router, body))


@pytest.mark.parametrize("timeout", [0.0, math.nan, -1.0], ids=["zero", "NaN", "negative"])
def test_a_silent_router_is_noticed_whatever_timeout_it_announced(timeout):
    router = HostileRouter(lease_interval_s=0.5, lease_timeout_s=timeout, ack_leases=False)
    probe = LinkProbe()
    link = make_link(router.identity(), probe, lease_interval=0.5)

    async def body():
        async with running(link):
            await until(lambda: probe.saw(LinkState.CONNECTED), 30, "the session")
            # The router never answers a lease: the node must end the session on its own.
            await until(lambda: probe.saw(LinkState.DISCONNECTED, "no answer from the router"), 60,
                        f"the node to notice the router's silence (announced timeout {timeout})")
            assert router.hellos >= 1

    asyncio.run(with_hostile_router(router, body))


@pytest.mark.parametrize("asked, applied", [
    ((5.0, 15.0), (5.0, 15.0)),                      # the defaults pass untouched
    ((0.5, 2.0), (0.5, 2.0)),
    ((0.0, 15.0), (0.1, 15.0)),
    ((math.nan, math.nan), (5.0, 15.0)),           # not a number: the documented default
    ((math.inf, math.inf), (5.0, 300.0)),            # never less often than the node's own 5 s
    ((1.0, 1e12), (1.0, 300.0)),
    ((1.0, -math.inf), (1.0, 2.0)),                  # at least two intervals
    ((4.0, 1.0), (4.0, 8.0)),
])
def test_lease_timing_ranges(asked, applied):
    welcome = codec.Welcome(version=1, session="s", router_version="r", lease_interval_s=asked[0],
                            lease_timeout_s=asked[1], max_frame_bytes=codec.MAX_FRAME_BYTES,
                            capabilities=[])
    assert lease_timing(5.0, welcome) == LeaseTiming(*applied)
