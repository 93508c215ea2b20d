"""The supervisor's mechanics on real processes that start in milliseconds.

The engine here is a real interpreter without vLLM (what ximd runs when the engine
environment is missing), or the stand-in engine (bench/standin_engine.py: a real
OpenAI-compatible server on the unix socket), sometimes wrapped in a shell that
misbehaves on purpose. The real vLLM engine is in the tests marked `engine`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from tests.engine.conftest import StateLog
from tests.support.engine import REPO, SupervisorThread, http_get, kill_all, processes_of, short_tempdir
from ximd.engine import EngineLaunch, EngineSupervisor, instance_id
from ximd.engine.launch import INSTANCE_ENV
from ximd.engine.processes import find_ours

STANDIN = (sys.executable, "-m", "bench.standin_engine")


@pytest.fixture
def root():
    with short_tempdir() as path:
        yield path


def launch_of(root: Path, argv: tuple[str, ...], **changes) -> EngineLaunch:
    """A launch like build_launch's, for an engine command given by hand."""
    socket_path = root / "run" / "engine.sock"
    instance = instance_id(root / "state")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), INSTANCE_ENV: instance}
    values = dict(argv=argv, env=env, socket_path=socket_path, served_model_name="tiny", instance_id=instance,
                  model="standin", dirs=(root / "run",))
    values.update(changes)
    return EngineLaunch(**values)


def standin(root: Path, shell_prefix: str = "") -> tuple[str, ...]:
    """The stand-in engine, optionally behind `sh -c '<prefix> <newline> exec standin'`."""
    argv = (*STANDIN, "--uds", str(root / "run" / "engine.sock"))
    if not shell_prefix:
        return argv
    return ("/bin/sh", "-c", f"{shell_prefix}\nexec \"$@\"", "sh", *argv)


@contextmanager
def supervised(launch: EngineLaunch, **changes):
    """A supervisor with quick timings, running; yields (supervisor, runner, states)."""
    states = StateLog()
    values = dict(on_state=states, health_interval=0.2, health_timeout=0.5, unhealthy_threshold=3,
                  startup_timeout=20, backoff=(0.2, 1.0), loading_report_interval=0.5, stop_grace=3)
    values.update(changes)
    supervisor = EngineSupervisor(launch, **values)
    with SupervisorThread(supervisor) as runner:
        yield supervisor, runner, states


def test_standin_goes_from_loading_to_healthy_and_reports_loading_periodically(root, recorder):
    launch = launch_of(root, standin(root, "echo 'WARNING 11-27 pretending to load'; sleep 1.5"))
    with supervised(launch) as (supervisor, runner, states):
        runner.wait_for(lambda: supervisor.healthy, 20, "healthy")
        assert http_get(launch.socket_path, "/health")[0] == 200
        assert supervisor.started_at and supervisor.pid and supervisor.restarts == 0
    assert [s for _, s, _ in states.events][:2] == ["starting", "loading"]
    loading = [detail for _, detail in states.of("loading")]
    assert len(loading) >= 3 and all(re.fullmatch(r"loading standin: \d+ s", d) for d in loading)
    # The seconds come as a number too; the line is made from it.
    reports = [r for r in states.reports if r.state == "loading"]
    assert reports[0].loading_s == 0.0 and all(r.detail == f"loading standin: {r.loading_s:.0f} s" for r in reports)
    assert [r.loading_s for r in reports] == sorted(r.loading_s for r in reports)
    assert all(r.loading_s is None for r in states.reports if r.state != "loading")
    assert states.of("healthy")[0][1] == "engine ready"
    assert states.events[-1][1] == "stopped" and supervisor.state == "stopped"
    engine_lines = [r for r in recorder.records if r.name == "ximd.engine"]
    assert any(r.levelno == logging.WARNING and "pretending to load" in r.getMessage() for r in engine_lines)


def test_stop_before_run_starts_means_run_returns_without_starting(root):
    async def scenario():
        supervisor = EngineSupervisor(launch_of(root, standin(root)))
        await supervisor.stop()
        await asyncio.wait_for(supervisor.run(), timeout=5)
        return supervisor
    supervisor = asyncio.run(scenario())
    assert supervisor.starts == 0 and supervisor.state == "stopped"


def test_interpreter_without_vllm_exits_at_once_and_backs_off_instead_of_looping(root, recorder):
    # What ximd runs when the engine environment is missing: its own python, no vLLM.
    launch = launch_of(root, ("/usr/bin/python3", "-m", "vllm.entrypoints.openai.api_server"))
    window_s = 4.0
    with supervised(launch, backoff=(0.2, 0.8)) as (supervisor, _, states):
        time.sleep(window_s)
        starts = supervisor.starts
    # Delays 0.2, 0.4, 0.8, 0.8 ... allow at most ~7 starts in 4 s; a busy loop makes hundreds.
    assert 3 <= starts <= 7, starts
    assert "No module named 'vllm'" in supervisor.last_error
    assert "during start-up" in supervisor.last_error
    delays = [float(re.match(r"restarting in ([\d.]+) s", d).group(1)) for _, d in states.of("backoff")]
    assert delays[:3] == [0.2, 0.4, 0.8] and set(delays[3:]) <= {0.8}
    errors = recorder.messages("ximd.engine.supervisor", logging.ERROR)
    assert any("No module named 'vllm'" in m and "Last engine output" in m for m in errors)
    assert errors[-1].count("No module named") == 2   # the reason, then this start's output only


def test_missing_engine_interpreter_is_a_clear_error_with_backoff(root):
    launch = launch_of(root, (str(root / "no-such-python"), "-m", "vllm.entrypoints.openai.api_server"))
    with supervised(launch) as (supervisor, runner, states):
        runner.wait_for(lambda: len(states.of("backoff")) >= 2, 10, "two backoffs")
    assert supervisor.starts == 0
    assert supervisor.last_error == f"cannot start the engine ({root}/no-such-python): no such executable file"


def test_startup_timeout_kills_an_engine_that_never_gets_healthy(root):
    launch = launch_of(root, standin(root, "sleep 60"))
    with supervised(launch, startup_timeout=1.0) as (supervisor, runner, states):
        first = runner.wait_for(lambda: supervisor.pid, 10, "the first start")
        runner.wait_for(lambda: supervisor.starts >= 2, 15, "the second start")
        assert not alive(first)
    assert "engine not healthy 1 s after its start" in supervisor.last_error


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_wedged_engine_is_restarted_after_the_health_threshold(root):
    launch = launch_of(root, standin(root))
    with supervised(launch) as (supervisor, runner, states):
        runner.wait_for(lambda: supervisor.healthy, 20, "healthy")
        wedged = supervisor.pid
        os.kill(wedged, signal.SIGSTOP)   # alive, holds its socket, answers nothing
        runner.wait_for(lambda: supervisor.restarts == 1 and supervisor.healthy, 30, "a healthy restart")
        assert not alive(wedged)
        assert http_get(launch.socket_path, "/health")[0] == 200
    # The state changes once to unhealthy (first failure); the count is in the log and the failure.
    assert states.of("unhealthy")[0][1] == "health check failed (1/3): no answer within 0.5 s"
    assert any(d.startswith("engine wedged: 3 health checks in a row failed") for _, d in states.of("failed"))


def test_killed_engine_is_noticed_at_once_though_its_child_keeps_the_output_pipe(root):
    # Like vLLM's EngineCore outliving a SIGKILLed API server: the pipe stays open.
    launch = launch_of(root, standin(root, "(exec sleep 300) &"))
    with supervised(launch, health_interval=5.0) as (supervisor, runner, states):
        runner.wait_for(lambda: supervisor.healthy, 20, "healthy")
        killed = supervisor.pid
        child = [p for p in processes_of(launch.instance_id) if p.pid != killed]
        os.kill(killed, signal.SIGKILL)
        runner.wait_for(lambda: states.of("failed"), 3, "the exit noticed well before a health check")
        assert supervisor.last_error.startswith("engine killed by SIGKILL while serving: ")
        runner.wait_for(lambda: supervisor.restarts == 1 and supervisor.healthy, 20, "a healthy restart")
        assert len(child) == 1 and not alive(child[0].pid)   # the old group went with it


def test_stop_takes_the_whole_group_even_children_that_ignore_sigterm(root, recorder):
    # A child of the engine that ignores SIGTERM, like a stuck worker.
    launch = launch_of(root, standin(root, "(trap '' TERM; exec sleep 300) &"))
    with supervised(launch) as (supervisor, runner, states):
        runner.wait_for(lambda: supervisor.healthy, 20, "healthy")
        assert len(processes_of(launch.instance_id)) == 2   # the engine and its stubborn child
        took = runner.stop(grace_s=1.0)
    assert took < 1.0 + 6.0
    assert processes_of(launch.instance_id) == []
    assert not launch.socket_path.exists() or http_get_fails(launch.socket_path)
    assert any("ignored SIGTERM" in m for m in recorder.messages("ximd.engine.supervisor", logging.WARNING))


def http_get_fails(socket_path: Path) -> bool:
    try:
        http_get(socket_path, "/health", timeout=1)
    except OSError:
        return True
    return False


SUPERVISING_PROCESS = """
import asyncio, sys
from pathlib import Path
from ximd.engine import EngineLaunch, EngineSupervisor
argv, socket_path, instance, ready = sys.argv[1:-3], Path(sys.argv[-3]), sys.argv[-2], Path(sys.argv[-1])
async def main():
    launch = EngineLaunch(tuple(argv), {"PATH": "/usr/bin:/bin", "PYTHONPATH": sys.path[0],
                                        "XIMD_ENGINE_INSTANCE": instance}, socket_path, "tiny", instance,
                          dirs=(socket_path.parent,))
    supervisor = EngineSupervisor(launch, loading_poll_interval=0.1)
    task = asyncio.create_task(supervisor.run())
    while not supervisor.healthy:
        await asyncio.sleep(0.1)
    ready.write_text(str(supervisor.pid))
    await task
asyncio.run(main())
"""


@pytest.mark.skipif(not shutil.which("setpriv"), reason="the parent-death signal comes from util-linux's setpriv")
def test_engine_goes_down_with_a_supervisor_killed_without_a_chance_to_stop_it(root):
    launch = launch_of(root, standin(root))
    ready = root / "ready"
    ximd = subprocess.Popen([sys.executable, "-c", SUPERVISING_PROCESS, *launch.argv, str(launch.socket_path),
                             launch.instance_id, str(ready)], cwd=REPO, env={"PATH": "/usr/bin:/bin",
                                                                             "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline and ximd.poll() is None:
            time.sleep(0.05)
        engine = int(ready.read_text())
        assert alive(engine)
        ximd.kill()
        ximd.wait(5)
        deadline = time.monotonic() + 5
        while alive(engine) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(engine), "the engine outlived its SIGKILLed supervisor"
    finally:
        if ximd.poll() is None:
            ximd.kill()
            ximd.wait(5)
        kill_all(launch.instance_id)


def test_engine_left_by_a_killed_supervisor_is_removed_before_the_next_start(root, recorder):
    launch = launch_of(root, standin(root))
    (root / "run").mkdir()
    # An engine of ours whose supervisor died without stopping it: own session, our marker.
    orphan = subprocess.Popen(launch.argv, env=dict(launch.env), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not launch.socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p.pid for p in find_ours(launch.instance_id, launch.socket_path)] == [orphan.pid]
        with supervised(launch) as (supervisor, runner, _):
            runner.wait_for(lambda: supervisor.healthy, 20, "healthy")
            assert orphan.wait(timeout=5) is not None
            assert supervisor.pid != orphan.pid
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait(5)
    warnings = recorder.messages("ximd.engine.supervisor", logging.WARNING)
    assert any(f"Found an earlier engine of ours still running: pid {orphan.pid}" in m for m in warnings)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to leave an engine the check may not kill")
def test_engine_of_ours_that_cannot_be_killed_is_refused_with_a_clear_message(root):
    socket_path = root / "run" / "engine.sock"
    # An engine holding our socket that another user owns (e.g. left by a root-run ximd when
    # the service runs as xerotier): the check, run without CAP_KILL, may not signal it.
    holder = subprocess.Popen(["/usr/bin/python3", "-c", "import time; time.sleep(300)", "--uds", str(socket_path)],
                              user=65534, group=65534)
    try:
        code = ("from pathlib import Path\n"
                "from ximd.engine.processes import OrphanError, remove_orphans\n"
                "try:\n"
                f"    remove_orphans('no-marker', Path({str(socket_path)!r}), grace_s=0.3)\n"
                "except OrphanError as exc:\n"
                "    print('REFUSED', exc)\n")
        done = subprocess.run(["setpriv", "--bounding-set=-kill", "--inh-caps=-kill", "--", sys.executable, "-c", code],
                              cwd=REPO, capture_output=True, text=True, timeout=30,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    finally:
        holder.kill()
        holder.wait(5)
    assert done.stdout.startswith("REFUSED an earlier engine of ours survives SIGKILL"), done.stdout + done.stderr
    assert f"pid {holder.pid}" in done.stdout and "not starting a second one" in done.stdout


def test_engine_that_dies_during_start_up_with_lmcache_is_retried_once_without_it(root, recorder):
    # Dies the way vLLM does when the LMCache connector cannot start, and only then.
    script = ('case "$*" in *--kv-transfer-config*) '
              'echo "RuntimeError: No supported cpu connector found."; exit 1;; esac')
    argv = (*standin(root, script), "--kv-transfer-config", '{"kv_connector":"LMCacheConnectorV1"}')
    launch = launch_of(root, argv, lmcache=True,
                       env={**launch_of(root, ()).env, "LMCACHE_CONFIG_FILE": str(root / "lmcache.yaml")})
    with supervised(launch) as (supervisor, runner, states):
        runner.wait_for(lambda: supervisor.healthy, 20, "healthy without LMCache")
        assert supervisor.starts == 2 and supervisor.lmcache_dropped
        assert "--kv-transfer-config" not in supervisor.launch.argv
        assert "LMCACHE_CONFIG_FILE" not in supervisor.launch.env
    backoffs = [d for _, d in states.of("backoff")]
    assert backoffs == ["engine died during start-up with LMCache on; retrying at once without LMCache"]
    assert "No supported cpu connector found" in supervisor.last_error
    assert any("retrying once without LMCache" in m for m in recorder.messages(level=logging.WARNING))


# ---------------------------------------------------------------- a group's part (docs/groups.md)


def test_a_follower_without_health_endpoint_counts_as_healthy_once_it_has_run_for_the_grace(root):
    """vLLM's headless worker serves no /health: running past the grace is what it shows."""
    launch = launch_of(root, ("/bin/sh", "-c", "echo headless worker up; exec sleep 300"), health_check=False)
    with supervised(launch, headless_grace=1.0) as (supervisor, runner, states):
        runner.wait_for(lambda: supervisor.healthy, 10, "healthy")
        assert not launch.socket_path.exists()
        assert states.of("loading") and states.of("healthy")
        time.sleep(1.0)
        assert supervisor.healthy and supervisor.restarts == 0


def test_a_follower_that_exits_within_the_grace_failed_during_start_up(root):
    launch = launch_of(root, ("/bin/sh", "-c", "echo 'RuntimeError: no leader'; exit 3"), health_check=False)
    with supervised(launch, headless_grace=2.0, restart=False) as (supervisor, runner, _):
        runner.wait_for(lambda: supervisor.state == "failed", 10, "failed")
    assert "during start-up" in supervisor.last_error and "RuntimeError: no leader" in supervisor.last_error


def test_a_groups_part_that_dies_stays_down_for_the_group_to_restart_as_one(root):
    launch = launch_of(root, standin(root))
    with supervised(launch, restart=False) as (supervisor, runner, states):
        runner.wait_for(lambda: supervisor.healthy, 20, "healthy")
        os.kill(supervisor.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not runner.future.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.future.done(), "run() goes on after a part's engine died"
        assert supervisor.state == "failed" and supervisor.starts == 1 and not states.of("backoff")
        assert "while serving" in supervisor.last_error
