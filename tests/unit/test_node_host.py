"""The node's reports to its host (the daemon): typed calls, the same STATUS lines."""

from __future__ import annotations

from types import SimpleNamespace

from ximd.agent import Agent
from ximd.config import load
from ximd.engine import EngineReport, EngineState
from ximd.node import Node
from ximd.systemd import Notifier


class RecordingHost:
    """A NodeHost that writes down what the node told it."""

    def __init__(self):
        self.calls: list[tuple] = []

    def set_status(self, phase: str, line: str) -> None:
        self.calls.append(("set_status", phase, line))

    def ready(self) -> None:
        self.calls.append(("ready",))

    def engine_loading(self, model: str, loading_s: float) -> None:
        self.calls.append(("engine_loading", model, loading_s))

    def node_serving(self, line: str) -> None:
        self.calls.append(("node_serving", line))

    def node_degraded(self, phase: str, line: str) -> None:
        self.calls.append(("node_degraded", phase, line))

    def config_invalid(self, problem: str) -> None:
        self.calls.append(("config_invalid", problem))

    async def identity_revoked(self, reason: str) -> None:
        self.calls.append(("identity_revoked", reason))


def config(tmp_path):
    return load(None, env={"XEROTIER_AGENT_RUNTIME_DIR": str(tmp_path / "run"),
                           "XEROTIER_AGENT_STATE_DIR": str(tmp_path / "state")})


def node_with_engine(tmp_path, host: RecordingHost) -> Node:
    node = Node(config(tmp_path), identity=None, host=host)
    node.prepared = SimpleNamespace(launch=SimpleNamespace(served_model_name="tiny"))
    node.supervisor = SimpleNamespace(restarts=1, healthy=False, state=EngineState.LOADING)
    node.bridge = SimpleNamespace()
    node.link = object()        # the link is up already: a healthy report does not start one
    return node


def test_engine_reports_become_host_calls(tmp_path):
    host = RecordingHost()
    node = node_with_engine(tmp_path, host)
    node.on_engine_state(EngineReport(EngineState.LOADING, "loading /models/tiny: 37 s", loading_s=37.4))
    node.on_engine_state(EngineReport(EngineState.HEALTHY, "engine ready"))
    node.on_engine_state(EngineReport(EngineState.BACKOFF, "restarting in 2 s: boom"))
    assert host.calls == [("engine_loading", "tiny", 37.4),
                          ("node_serving", "serving tiny; router not connected, retrying"),
                          ("node_degraded", "engine-backoff", "engine backoff: restarting in 2 s: boom")]
    assert node.metrics.engine_state == "backoff" and node.metrics.engine_restarts == 1


def test_the_agent_writes_the_loading_line_from_the_seconds(tmp_path):
    agent = Agent(config(tmp_path), Notifier(None), lambda: config(tmp_path))
    agent.engine_loading("tiny", 0.0)
    assert (agent.phase, agent.status_line) == ("loading", "loading tiny: 0 s")
    agent.engine_loading("tiny", 37.6)
    assert agent.status_line == "loading tiny: 38 s"
