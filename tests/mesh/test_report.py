"""The node's reports become hello and lease: the link adds only what the session owns."""

from __future__ import annotations

import socket

from xim_proto import codec
from ximd import __version__
from ximd.identity import Identity
from ximd.mesh.link import CAPABILITIES, MeshLink
from ximd.mesh.report import HelloInfo, LeaseInfo

IDENTITY = Identity(agent_id="a", worker_id="w", router_url="http://unused", mesh_endpoints=("tcp://127.0.0.1:1",),
                    router_public_key="r" * 40, agent_public_key="p" * 40, agent_secret_key="s" * 40,
                    token="tok", token_expires_at=1e10)
MODELS = (codec.Model(name="tiny", state="ready", max_model_len=4096),)


async def _ignore(msg: codec.Message) -> None:
    pass


def link_with(hello: HelloInfo, lease: LeaseInfo) -> MeshLink:
    return MeshLink(IDENTITY, hello_info=lambda: hello, lease_info=lambda: lease, on_message=_ignore,
                    on_state=lambda state, detail: None)


def test_hello_carries_the_report_and_the_sessions_own_fields():
    hardware = {"accelerator": "cpu", "gpus": 0, "host": "h"}
    link = link_with(HelloInfo(models=MODELS, max_concurrent=3, hardware=hardware), LeaseInfo(max_concurrent=3))
    assert link._hello() == codec.Hello(
        token="tok", versions=list(codec.PROTOCOL_VERSIONS), agent_version=__version__,
        hostname=socket.gethostname(), capabilities=list(CAPABILITIES), hardware=hardware,
        models=list(MODELS), max_concurrent=3)
    named = link_with(HelloInfo(max_concurrent=1, hostname="test-node"), LeaseInfo(max_concurrent=1))
    assert named._hello().hostname == "test-node"


def test_leases_carry_the_report_with_a_rising_sequence():
    report = LeaseInfo(running=1, waiting=2, kv_cache_usage=0.5, in_flight=("r1", "r2"), engine_state="healthy",
                       models=MODELS, max_concurrent=3, draining=True)
    link = link_with(HelloInfo(max_concurrent=3), report)
    first, second = link._lease(), link._lease()
    assert first == codec.Lease(seq=1, running=1, waiting=2, kv_cache_usage=0.5, engine_state="healthy",
                                models=list(MODELS), in_flight=["r1", "r2"], max_concurrent=3, draining=True)
    assert second.seq == 2
    # Lists on the wire, as before the reports were typed: the frame is the same bytes.
    assert codec.decode(codec.encode(first)) == first


def test_a_bare_lease_reports_nothing_running():
    lease = link_with(HelloInfo(max_concurrent=2), LeaseInfo(max_concurrent=2))._lease()
    assert (lease.running, lease.waiting, lease.kv_cache_usage, lease.engine_state, lease.models,
            lease.in_flight, lease.draining) == (0, 0, 0.0, "unknown", [], [], False)
