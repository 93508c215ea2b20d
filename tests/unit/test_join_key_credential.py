"""A join key put in /etc/xerotier/join-key after ximd started: systemd hands credentials over
only at a start, so the waiting STATUS says restart, not reload."""

from __future__ import annotations

from ximd import agent as agent_mod
from ximd import enrollment
from ximd.agent import KEY_AWAITS_RESTART_HINT, NOT_ENROLLED_HINT, Agent
from ximd.config import load
from ximd.systemd import Notifier


def credentials(tmp_path, text: str):
    directory = tmp_path / "credentials"
    directory.mkdir(exist_ok=True)
    (directory / "join-key").write_text(text)
    return {"CREDENTIALS_DIRECTORY": str(directory)}


def test_a_key_file_that_came_after_the_start_awaits_a_restart(tmp_path):
    source = tmp_path / "join-key"
    blank = credentials(tmp_path, "\n")                       # SetCredential=join-key:\n
    assert not enrollment.join_key_awaits_restart(blank, str(source))   # no file: nothing waits
    source.write_text("xjk_later\n")
    assert enrollment.join_key_awaits_restart(blank, str(source))
    delivered = credentials(tmp_path, "xjk_delivered\n")
    assert not enrollment.join_key_awaits_restart(delivered, str(source))
    assert not enrollment.join_key_awaits_restart({}, str(source))      # not under the unit


def test_the_not_enrolled_line_says_restart_only_when_the_key_awaits_one(tmp_path, monkeypatch):
    cfg = load(None, env={"XEROTIER_AGENT_STATE_DIR": str(tmp_path / "state"),
                          "XEROTIER_AGENT_RUNTIME_DIR": str(tmp_path / "run")})
    agent = Agent(cfg, Notifier(None), lambda: cfg)
    monkeypatch.setattr(enrollment, "JOIN_KEY_CREDENTIAL_SOURCE", str(tmp_path / "join-key"))
    for name, value in credentials(tmp_path, "\n").items():
        monkeypatch.setenv(name, value)
    agent.enter_not_enrolled("not enrolled: no join key")
    assert agent.status_line == NOT_ENROLLED_HINT
    (tmp_path / "join-key").write_text("xjk_later\n")
    agent.enter_not_enrolled("not enrolled: no join key")
    assert agent.status_line == KEY_AWAITS_RESTART_HINT == agent_mod.KEY_AWAITS_RESTART_HINT
    assert "systemctl restart ximd" in agent.status_line
