"""A group member's node (ximd/member.py): assignments become model fetches, engine starts and
stops, the lease's report and STATUS, without a router or an engine (those are the namespace test's)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import ClassVar

import pytest

from tests.unit.test_node_host import RecordingHost
from xim_proto import codec
from ximd import member as member_mod
from ximd.agent import Agent
from ximd.config import load
from ximd.engine import EngineReport, EngineState, LaunchError
from ximd.member import MemberNode
from ximd.node import Node
from ximd.systemd import Notifier

MODEL = "ximd-test/tiny"


def config(tmp_path, **env):
    values = {"XEROTIER_AGENT_RUNTIME_DIR": str(tmp_path / "run"), "XEROTIER_AGENT_STATE_DIR": str(tmp_path / "state"),
              "XEROTIER_AGENT_GROUP_ENABLED": "1", "XEROTIER_AGENT_GROUP_FABRIC_ADDRESS": "127.0.0.1"}
    values.update(env)
    return load(None, env=values)


def assignment(action="wait", epoch=3, rank=1, **changes) -> codec.Group:
    values = dict(group="g", epoch=epoch, action=action, model=MODEL, tensor_parallel_size=2,
                  pipeline_parallel_size=1, rank=rank, size=2,
                  leader_address="127.0.0.1" if action == "run" else None,
                  leader_port=29500 if action == "run" else None,
                  reason="waiting for worker-b (not connected)" if action == "wait" else None)
    values.update(changes)
    return codec.Group(**values)


class FakeLink:
    def __init__(self):
        self.soon = 0
        self.last_lease_ack_at = None

    def lease_soon(self):
        self.soon += 1

    async def close(self):
        pass


class FakeSupervisor:
    """Stands in for EngineSupervisor(restart=False): records its launch, start and stop."""

    made: ClassVar[list[FakeSupervisor]] = []

    def __init__(self, launch, *, on_state, startup_timeout, restart):
        assert restart is False
        self.launch, self.on_state, self.restarts = launch, on_state, 0
        self.state = EngineState.STARTING
        self.stopped = asyncio.Event()
        FakeSupervisor.made.append(self)

    @property
    def healthy(self):
        return self.state is EngineState.HEALTHY

    async def run(self):
        await self.stopped.wait()

    async def stop(self, grace=None):
        self.stopped.set()

    def report(self, state, detail=""):
        self.state = state
        self.on_state(EngineReport(state, detail))


def prepared(model=MODEL):
    launch = SimpleNamespace(socket_path="/nonexistent/engine.sock", served_model_name=model)
    return SimpleNamespace(launch=launch, plan=SimpleNamespace(max_concurrent=4, max_model_len=2048))


@pytest.fixture
def node(tmp_path, monkeypatch):
    FakeSupervisor.made = []
    monkeypatch.setattr(member_mod, "EngineSupervisor", FakeSupervisor)
    monkeypatch.setattr(member_mod, "prepare_engine", lambda cfg, model, role: prepared(model))
    host = RecordingHost()
    me = SimpleNamespace(agent_id="agent-1", worker_id="worker-1", router_url="https://router", mesh_endpoints=(),
                         enrolled_at=0.0, token_expires_at=0.0, token="xat_test")
    n = MemberNode(config(tmp_path), identity=me, host=host)
    n.link = FakeLink()
    n.engine_version = "0.32.0"
    fetched = []

    async def acquire_model(choice=None):
        fetched.append(choice.ref)
        return True
    n.acquire_model = acquire_model
    n.fetched = fetched
    n.host_calls = host.calls
    from ximd.fabric import fabric_from_config
    n.fabric = fabric_from_config(n.cfg)
    return n


async def settle():
    for _ in range(20):
        await asyncio.sleep(0)


async def run_part(node, rank=1) -> list:
    """The router's wait (the model is fetched) and then its run; the supervisors made since."""
    node.on_group(assignment("wait", rank=rank))
    await settle()
    node.on_group(assignment("run", rank=rank))
    await settle()
    return FakeSupervisor.made


def test_the_agent_runs_a_member_node_when_groups_are_enabled(tmp_path):
    cfg = config(tmp_path)
    assert cfg.group.enabled
    assert not config(tmp_path, XEROTIER_AGENT_GROUP_ENABLED="0").group.enabled
    agent = Agent(cfg, Notifier(None), load_config=lambda: cfg)
    assert agent.cfg.group.enabled and issubclass(MemberNode, Node)


def test_hello_announces_groups_and_no_models(node):
    info = node.hello_info()
    assert info.models == () and codec.GROUPS in info.capabilities and info.max_concurrent == 0
    lease = node.lease_info()
    assert lease.group is None and lease.models == () and lease.engine_state == "stopped"


def test_wait_fetches_the_model_and_reports_waiting_then_ready(node):
    async def go():
        node.on_group(assignment("wait"))
        report = node.lease_info().group
        assert (report.state, report.epoch, report.model_ready) == ("waiting", 3, False)
        assert report.fabric_address == "127.0.0.1" and report.fabric_port == 29500
        assert report.engine_version == "0.32.0" and report.detail == "waiting for worker-b (not connected)"
        await settle()
        assert node.fetched == [MODEL] and node.lease_info().group.model_ready
        node.on_group(assignment("wait", reason="something else"))      # same model: fetched once
        await settle()
        assert node.fetched == [MODEL] and node.link.soon >= 2
    asyncio.run(go())
    assert ("set_status", "group", "group g: rank 1 of 2, waiting: waiting for worker-b (not connected)") \
        in node.host_calls


def test_run_starts_the_part_and_a_follower_serves_once_it_runs(node):
    async def go():
        [sup] = await run_part(node)
        assert node.supervisor is sup and node.bridge is None        # a follower: no API, no bridge
        assert node.lease_info().group.state == "starting"
        sup.report(EngineState.HEALTHY, "running")
        assert node.lease_info().group.state == "serving" and node.lease_info().models == ()
        node.on_group(assignment("wait", epoch=4))                   # the group starts over
        await settle()
        assert sup.stopped.is_set() and node.supervisor is None
        sup.report(EngineState.STOPPED, "engine stopped")            # the old engine's news: ignored
        assert node.lease_info().group.state == "waiting" and node.lease_info().group.epoch == 4
    asyncio.run(go())
    assert ("node_serving", "group g: serving as rank 1 of 2") in node.host_calls


def test_the_leader_declares_the_model_through_its_bridge(node):
    async def go():
        [sup] = await run_part(node, rank=0)
        assert node.bridge is not None and node.lease_info().max_concurrent == 4
        assert [m.name for m in node.lease_info().models] == [MODEL]
        sup.report(EngineState.HEALTHY, "engine ready")
        assert node.lease_info().group.state == "serving"
        await node.stop(drain_s=0)
        assert sup.stopped.is_set()
    asyncio.run(go())


def test_a_dead_engine_fails_the_part_and_is_not_restarted(node):
    async def go():
        [sup] = await run_part(node)
        sup.report(EngineState.FAILED, "the engine exited with code -9")
        report = node.lease_info().group
        assert (report.state, report.detail) == ("failed", "the engine exited with code -9")
        assert len(FakeSupervisor.made) == 1
    asyncio.run(go())


def test_an_engine_that_cannot_be_prepared_fails_the_part(node, monkeypatch):
    def refuse(cfg, model, role):
        raise LaunchError("the group asks for 2 workers per member; this node has 0 GPUs")
    monkeypatch.setattr(member_mod, "prepare_engine", refuse)

    async def go():
        await run_part(node)
        report = node.lease_info().group
        assert report.state == "failed" and "0 GPUs" in report.detail and not FakeSupervisor.made
    asyncio.run(go())


def test_a_node_without_a_fabric_cannot_take_part(node):
    node.fabric, node.problem = None, "set group.fabric_interface or group.fabric_address"

    async def go():
        node.on_group(assignment("wait"))
        assert node.lease_info().group.state == "failed"
        node.on_group(assignment("run"))
        await settle()
        assert not FakeSupervisor.made and node.lease_info().group.detail == node.problem
    asyncio.run(go())
    assert node.status()["group"]["state"] == "failed"


@pytest.mark.parametrize("leader", ["8.8.4.4", "0.0.0.0", "not-an-address"])
def test_a_follower_refuses_a_leader_off_the_private_fabric(node, leader):
    """A hostile router names a public host as the leader: the follower's engine would dial it
    and take its unauthenticated pickles (torch.distributed, vLLM's queues). Its own fabric's
    rule holds for the leader's address too."""
    async def go():
        node.on_group(assignment("wait"))
        await settle()
        node.on_group(assignment("run", leader_address=leader))
        await settle()
        report = node.lease_info().group
        assert not FakeSupervisor.made, "the engine was started towards the router's leader"
        assert report.state == "failed" and "the leader's address" in report.detail and leader in report.detail, \
            report.detail
    asyncio.run(go())


def test_allow_public_fabric_lets_a_leader_be_public(tmp_path, node):
    node.cfg = config(tmp_path, XEROTIER_AGENT_GROUP_ALLOW_PUBLIC_FABRIC="1")

    async def go():
        node.on_group(assignment("wait"))
        await settle()
        node.on_group(assignment("run", leader_address="8.8.4.4"))
        await settle()
        assert len(FakeSupervisor.made) == 1
    asyncio.run(go())


def test_leave_stops_and_forgets_the_part(node):
    async def go():
        await run_part(node)
        node.on_group(assignment("leave"))
        await settle()
        assert FakeSupervisor.made[0].stopped.is_set() and node.lease_info().group is None
    asyncio.run(go())
    assert node.host_calls[-1] == ("set_status", "group", member_mod.WAITING_FOR_ROUTER)


def test_the_link_sends_the_report_in_its_leases(node):
    from ximd.mesh.link import MeshLink

    async def go():
        link = MeshLink(node.identity, hello_info=node.hello_info, lease_info=node.lease_info,
                        on_message=node.on_message, on_state=lambda state, detail: None)
        await node.on_message(assignment("wait"))
        lease = link._lease()
        assert lease.group == node.lease_info().group and lease.group.state == "waiting"
        assert codec.decode(codec.encode(lease), sender=codec.AGENT) == lease
        hello = link._hello()
        assert codec.GROUPS in hello.capabilities and hello.models == []
        link.lease_soon()               # no session yet: only remembered
        assert link._lease_soon
    asyncio.run(go())


def test_the_routers_words_cannot_forge_log_lines(node, caplog):
    """A group name or wait reason from a hostile router is logged on one line: ximd's log
    on stderr (a foreground run, a container) would otherwise show a made-up line of ours."""
    caplog.set_level("INFO", logger=member_mod.log.name)

    async def go():
        node.on_group(assignment("wait", group="g\nximd: enrolled as a trusted node",
                                 reason="waiting\nWATCHDOG=1"))
        await settle()
    asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records if "epoch" in r.getMessage()]
    assert lines and all("\n" not in line for line in lines), lines
