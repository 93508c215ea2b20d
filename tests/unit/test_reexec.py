"""The re-exec's pure parts: the state handed across execve, the engine's adoption rules,
and what `ximd reexec` concludes from the daemon's answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.support.engine import load_config
from ximd import reexec
from ximd.commands import reexec as reexec_cmd
from ximd.engine import EngineLaunch
from ximd.engine.child import EngineChild, spawn
from ximd.engine.handover import EngineHandover, fingerprint, process_start_time, refusal


def launch(**changes) -> EngineLaunch:
    base = {"argv": ("/usr/bin/python3", "-m", "vllm.entrypoints.openai.api_server", "--max-num-seqs", "8"),
            "env": {"HF_HUB_OFFLINE": "1"}, "socket_path": "/run/ximd/engine.sock", "served_model_name": "tiny",
            "instance_id": "abc"}
    return EngineLaunch(**{**base, **changes})


def handover(pid: int, the_launch: EngineLaunch, create_time: float | None = None) -> EngineHandover:
    return EngineHandover(pid=pid, output_fd=99, create_time=create_time or process_start_time(pid) or 0.0,
                          fingerprint=fingerprint(the_launch), started_at=time.time() - 60, healthy_at=None,
                          starts=1, model="tiny")


def test_the_state_crosses_execve_intact_and_is_read_once(tmp_path):
    engine = handover(os.getpid(), launch())
    state = reexec.new_state("0.1.0", "0.2.0", 0, engine)
    path = reexec.write_state(tmp_path, state)
    assert path.stat().st_mode & 0o777 == 0o600
    env = {reexec.STATE_ENV: str(path)}
    assert reexec.take_state(env) == state
    assert state.generation == 1 and not path.exists() and reexec.STATE_ENV not in env
    assert reexec.take_state({}) is None


def test_a_state_from_another_format_or_half_written_is_refused(tmp_path):
    path = tmp_path / "reexec.json"
    path.write_text(json.dumps({"format": 99}))
    with pytest.raises(reexec.ReexecError, match="format 99; this version reads 1"):
        reexec.take_state({reexec.STATE_ENV: str(path)})
    path.write_text('{"format": 1, "from_version": "x"')
    with pytest.raises(reexec.ReexecError, match="not JSON"):
        reexec.take_state({reexec.STATE_ENV: str(path)})
    path.write_text(json.dumps({"format": 1, "from_version": "x"}))
    with pytest.raises(reexec.ReexecError, match="incomplete"):
        reexec.take_state({reexec.STATE_ENV: str(path)})


def test_the_engine_is_adopted_only_when_it_is_the_same_process_started_the_same_way():
    mine = launch()
    same = handover(os.getpid(), mine)
    assert refusal(same, mine, process_start_time(os.getpid())) is None
    assert "would start the engine differently" in refusal(
        same, launch(argv=(*mine.argv[:-1], "16")), process_start_time(os.getpid()))
    assert "would start the engine differently" in refusal(same, launch(env={"HF_HUB_OFFLINE": "0"}),
                                                           process_start_time(os.getpid()))
    assert refusal(same, mine, None) == f"the engine (pid {os.getpid()}) is gone"
    reused = handover(os.getpid(), mine, create_time=1.0)
    assert refusal(reused, mine, process_start_time(os.getpid())) == f"pid {os.getpid()} is another process now"


def test_a_spawned_engine_is_a_bare_child_reaped_by_waitpid():
    child = spawn([sys.executable, "-c", "import sys; print('hello'); sys.exit(3)"], {"PATH": "/usr/bin:/bin"})
    try:
        deadline = time.monotonic() + 10
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.returncode == 3
        assert os.read(child.output_fd, 100) == b"hello\n"
        assert os.getpgid(0) != child.pid          # it led a session of its own
    finally:
        os.close(child.output_fd)
    assert EngineChild(os.getpid(), -1).poll() == 255      # not ours to reap: unknown


def test_a_missing_engine_program_is_a_clear_error():
    with pytest.raises(FileNotFoundError):
        spawn(["no-such-engine-program"], {"PATH": "/nonexistent"})


def test_preflight_names_the_installed_version_or_says_why_it_cannot_run(tmp_path):
    from ximd import __version__
    assert reexec.preflight() == __version__
    with pytest.raises(reexec.ReexecError, match="cannot be run"):
        reexec.preflight(str(tmp_path / "no-python"))
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named ximd' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(reexec.ReexecError, match="does not start: ModuleNotFoundError"):
        reexec.preflight(str(broken))


def test_the_command_waits_for_a_new_generation_that_settled():
    before = {"pid": 10, "generation": 0, "phase": "serving", "version": "0.1.0"}
    assert not reexec_cmd.settled(before, {**before, "phase": "reexec"})
    assert not reexec_cmd.settled(before, {**before, "generation": 1, "phase": "loading"})
    now = {"pid": 10, "generation": 1, "phase": "serving", "version": "0.2.0", "status": "serving tiny",
           "engine": {"pid": 77, "handover": "adopted"}}
    assert reexec_cmd.settled(before, now)
    assert reexec_cmd.summary(before, now, 2.34) == ("ximd re-executed in place (pid 10): 0.1.0 → 0.2.0 in 2.3 s; "
                                                     "engine pid 77 kept; now: serving tiny")


def test_the_command_notices_a_restart_instead_of_a_reexec(tmp_path):
    before = {"pid": 10, "generation": 0, "phase": "serving"}
    answers = iter([{"pid": 11, "generation": 0, "phase": "serving"}])
    status, line = reexec_cmd.follow(tmp_path / "sock", before, 5, ask=lambda path: next(answers))
    assert status == 1 and "restarted instead (pid 10 → 11)" in line


def test_the_daemon_refuses_a_second_reexec_and_a_broken_install(tmp_path, monkeypatch):
    import asyncio

    from ximd.agent import Agent
    from ximd.systemd import Notifier
    cfg = load_config(tmp_path)
    agent = Agent(cfg, Notifier(None), lambda: cfg)

    def broken():
        raise reexec.ReexecError("the installed ximd does not start: SyntaxError")
    monkeypatch.setattr(reexec, "preflight", broken)
    assert asyncio.run(agent.request_reexec()) == {"error": "re-exec refused: the installed ximd does not start: "
                                                            "SyntaxError"}
    agent.phase = "stopping"
    assert "already under way" in asyncio.run(agent.request_reexec())["error"]


def test_exec_argv_is_this_interpreter_and_this_command_line():
    argv = reexec.exec_argv()
    assert argv[0] == sys.executable and os.path.isabs(argv[0])
    assert subprocess.run([*argv[:1], "-c", "print(1)"], capture_output=True).returncode == 0
