"""The watchdog is fed by the main loop only while the health predicate holds."""

from __future__ import annotations

import asyncio

from tests.support.notify import NotifyReceiver
from ximd.agent import Agent
from ximd.config import load
from ximd.systemd import Notifier


def make_agent(tmp_path, receiver: NotifyReceiver, monkeypatch) -> Agent:
    cfg = load(None, env={"XEROTIER_AGENT_RUNTIME_DIR": str(tmp_path / "run"),
                          "XEROTIER_AGENT_STATE_DIR": str(tmp_path / "state")})
    # Both notification libraries read NOTIFY_SOCKET from the process's environment.
    for key, value in receiver.env(watchdog_usec=400_000).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    return Agent(cfg, Notifier.from_env(), lambda: cfg)


async def run_for(agent: Agent, seconds: float) -> None:
    loop = asyncio.create_task(agent.main_loop())
    await asyncio.sleep(seconds)
    agent.request_stop("test")
    await asyncio.wait_for(loop, timeout=2)


def test_fed_while_healthy_and_starved_when_not(tmp_path, monkeypatch):
    receiver = NotifyReceiver(tmp_path)
    try:
        agent = make_agent(tmp_path, receiver, monkeypatch)
        agent.phase = "not-enrolled"
        asyncio.run(run_for(agent, 1.0))
        receiver.poll(0.2)
        healthy_pings = len(receiver.times_of("WATCHDOG"))

        receiver.messages.clear()
        agent = make_agent(tmp_path, receiver, monkeypatch)
        agent.phase = "not-enrolled"
        agent.healthy = lambda: False  # e.g. an engine wedged past its threshold
        asyncio.run(run_for(agent, 1.0))
        receiver.poll(0.2)
        assert healthy_pings >= 4  # every 0.2 s for 1 s
        assert receiver.times_of("WATCHDOG") == []
    finally:
        receiver.close()
