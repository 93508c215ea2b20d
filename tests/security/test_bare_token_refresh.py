"""Finding 10: a bare token could renew (and unenroll) its node forever.

A token is a bearer secret: whoever holds a copy could refresh it before each
expiry, for ever, and unenroll the node whenever they liked, without the node's
CURVE key. Now a token alone renews or unenrolls a node only while that node
has proven its key — a lease over the CURVE mesh, or its enrollment — within
the refresh grace. Driven against a real `xim-router serve` with a short grace
(3 s): a node that never comes to the mesh loses its token's power after it; a
node that leases keeps refreshing and may still unenroll.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.mesh.helpers import LinkProbe, load_config, make_link, running, until, write_agent_config
from tests.support.router import RouterProcess, wait_for
from xim_proto.cliout import from_rfc3339
from ximd import enrollment
from ximd.enrollment import EnrollmentRejected
from ximd.mesh.state import LinkState

GRACE_S = 3.0


@pytest.fixture
def router(tmp_path):
    with RouterProcess(tmp_path, token_ttl="1h", extra_args=("--refresh-grace", f"{GRACE_S:g}s")) as proc:
        yield proc


def node(tmp_path, router, name: str):
    cfg = load_config(write_agent_config(tmp_path / f"{name}.toml", url=router.http_url,
                                         state_dir=tmp_path / f"{name}-state"))
    return cfg, asyncio.run(enrollment.enroll(cfg, router.join_key(), hostname=name, hardware={}))


def test_a_token_alone_stops_renewing_a_node_that_is_not_on_the_mesh(tmp_path, router):
    cfg, identity = node(tmp_path, router, "absent")
    stolen = identity
    deadline = identity.enrolled_at + GRACE_S + 30
    refused = None
    # The thief refreshes as fast as it likes: the chain must end after the grace.
    while time.time() < deadline:
        try:
            stolen = asyncio.run(enrollment.refresh(cfg, stolen))
        except EnrollmentRejected as exc:
            refused = exc
            break
        time.sleep(0.5)
    assert refused is not None, f"a bare token was refreshed for {GRACE_S + 30:g} s with the node never on the mesh"
    assert refused.code == "token_expired" and time.time() > identity.enrolled_at + GRACE_S
    with pytest.raises(EnrollmentRejected, match="token_expired"):
        asyncio.run(enrollment.unenroll(cfg, stolen))
    assert router.agent(identity.agent_id)["state"] == "pending"


def last_seen(router, agent_id: str) -> float:
    """When the router last heard the agent (`agents --format json` writes RFC 3339); 0 for never."""
    seen = router.agent(agent_id)["last_seen_at"]
    return from_rfc3339(seen) if seen else 0.0


def test_a_node_on_the_mesh_keeps_refreshing_and_may_unenroll(tmp_path, router):
    cfg, identity = node(tmp_path, router, "present")
    probe = LinkProbe()

    async def scenario():
        link = make_link(identity, probe, token_refresher=enrollment.token_refresher(cfg))
        async with running(link):
            await until(lambda: link.state == LinkState.CONNECTED, 30, "the link to connect")
            # Past the grace since enrollment, with leases still arriving.
            await until(lambda: time.time() > identity.enrolled_at + GRACE_S + 1, 30, "the grace to pass")
            await until(lambda: last_seen(router, identity.agent_id) > time.time() - GRACE_S, 30, "a recent lease")
            renewed = await enrollment.refresh(cfg, identity)
            assert renewed.token != identity.token
            await enrollment.unenroll(cfg, renewed)
            await until(lambda: link.state == LinkState.REJECTED, 30, "the link to learn it unenrolled")

    asyncio.run(scenario())
    wait_for(lambda: router.agent(identity.agent_id)["state"] == "unenrolled", 30, "the agent to be unenrolled")
