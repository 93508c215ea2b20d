"""The link over real sockets: a real xim-router subprocess, MeshLink in this process."""

from __future__ import annotations

import asyncio

from tests.mesh.helpers import LinkProbe, enroll_fresh, make_link, running, until, wait_for
from ximd import enrollment
from ximd.mesh.link import CONNECTED, DISCONNECTED, REJECTED


def test_enroll_link_up_and_leases_reach_the_router(router, agent_cfg):
    cfg = agent_cfg()
    identity = enroll_fresh(router, cfg)
    probe = LinkProbe(running=3)

    async def scenario():
        link = make_link(identity, probe)
        async with running(link):
            await until(lambda: link.state == CONNECTED, 10, "the link to connect")
            await until(lambda: link.last_lease_ack_at, 5, "a lease_ack")
            return await asyncio.get_running_loop().run_in_executor(
                None, lambda: wait_for(lambda: router.agent(identity.agent_id)["running"] == 3, 5,
                                       "the router to record the lease"))

    asyncio.run(scenario())
    agent = router.agent(identity.agent_id)
    assert agent["state"] in ("active", "disconnected")   # disconnected after bye at close
    assert agent["kv_cache_usage"] == 0.125
    assert agent["models"] == ["tiny:ready"]
    assert probe.saw(CONNECTED)
