"""A real engine of its own, because these tests break it: LMCache start-up death, kill -9, stop.

One engine for the module, in order: it starts with the LMCache connector in an engine
environment that has no lmcache (vLLM dies during start-up), is retried once without it
and serves; it is then killed with SIGKILL and must be restarted and serve again; last,
stop() must leave no engine process within 15 s.
"""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from tests.engine.conftest import ENGINE_START_TIMEOUT_S, StateLog, recording_logs
from tests.support.engine import SupervisorThread, post_json, processes_of, short_tempdir, tiny_launch
from ximd import kvcache
from ximd.engine import EngineSupervisor

pytestmark = pytest.mark.engine

STOP_DEADLINE_S = 15.0


@pytest.fixture(scope="module")
def recovering(engine_py, tiny_model_dir):
    with recording_logs() as recorder, short_tempdir() as root:
        config_path = root / "state" / kvcache.CONFIG_FILENAME
        kvcache.write_config(config_path, {"chunk_size": 256, "local_cpu": True, "max_local_cpu_size": 1.0})
        kv = kvcache.KVCacheSetup(True, ("forced on by the test",), config_path)
        launch, _ = tiny_launch(root, engine_py, tiny_model_dir, kv=kv)
        assert "--kv-transfer-config" in launch.argv
        states = StateLog()
        supervisor = EngineSupervisor(launch, on_state=states, backoff=(1.0, 8.0))
        with SupervisorThread(supervisor) as runner:
            runner.wait_for(lambda: supervisor.healthy, 2 * ENGINE_START_TIMEOUT_S, "healthy after the LMCache retry")
            yield supervisor, runner, states, recorder


def complete(supervisor) -> dict:
    return post_json(supervisor.socket_path, "/v1/completions", {
        "model": supervisor.launch.served_model_name, "prompt": "import os", "max_tokens": 4,
        "temperature": 0, "ignore_eos": True})


def test_engine_that_died_during_start_up_with_lmcache_was_retried_without_it(recovering):
    supervisor, _, states, recorder = recovering
    assert supervisor.starts == 2 and supervisor.lmcache_dropped
    assert "--kv-transfer-config" not in supervisor.launch.argv
    assert "LMCACHE_CONFIG_FILE" not in psutil.Process(supervisor.pid).environ()
    assert "during start-up" in supervisor.last_error
    assert [d for _, d in states.of("backoff")] == [
        "engine died during start-up with LMCache on; retrying at once without LMCache"]
    assert any("No module named 'lmcache'" in m for m in recorder.messages("ximd.engine"))
    assert complete(supervisor)["usage"]["completion_tokens"] == 4


def test_killed_engine_is_restarted_and_serves_again(recovering):
    supervisor, runner, states, _ = recovering
    starts_before = supervisor.starts
    killed = supervisor.pid
    os.kill(killed, signal.SIGKILL)
    runner.wait_for(lambda: supervisor.starts == starts_before + 1 and supervisor.healthy,
                    ENGINE_START_TIMEOUT_S, "a healthy restart after SIGKILL")
    assert "killed by SIGKILL while serving" in supervisor.last_error
    assert supervisor.pid != killed
    # Nothing of the killed engine's group (its EngineCore included) survived the restart.
    assert all(os.getpgid(p.pid) == supervisor.pid for p in processes_of(supervisor.launch.instance_id))
    assert complete(supervisor)["usage"]["completion_tokens"] == 4


def test_stop_leaves_no_engine_process_within_15_seconds(recovering):
    supervisor, runner, _, _ = recovering
    instance = supervisor.launch.instance_id
    assert processes_of(instance)
    took = runner.stop(grace_s=STOP_DEADLINE_S - 5)
    assert took < STOP_DEADLINE_S
    assert processes_of(instance) == []
    assert supervisor.state == "stopped" and supervisor.pid is None
