"""LMCache's remote tier against a real redis-server, checked by LMCache's own loader.

Runs with the lmcache engine environment (tools/setup-engine.sh lmcache). On this CPU
host LMCache is forced on (`lmcache.enabled = true`; `auto` would keep it off): it has
no CPU connector and works in degraded mode, but vLLM starts and serves with it, which
is what "the engine still starts" needs to show.
"""

from __future__ import annotations

import logging

import psutil
import pytest
import yaml

from tests.engine.conftest import ENGINE_START_TIMEOUT_S, StateLog
from tests.support.engine import (
    SupervisorThread,
    engine_python,
    load_config,
    post_json,
    short_tempdir,
    tiny_cpu_plan,
    tiny_launch,
)
from tests.support.redis_server import redis_server
from ximd import kvcache
from ximd.engine import EngineSupervisor

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def lmcache_py() -> str:
    return engine_python("lmcache")


def lmcache_config(root, redis_url: str):
    return load_config(root, XEROTIER_AGENT_LMCACHE_ENABLED="true", XEROTIER_AGENT_LMCACHE_REDIS_URL=redis_url,
                       XEROTIER_AGENT_LMCACHE_CPU_SIZE_GB="1", XEROTIER_AGENT_LMCACHE_DISK_SIZE_GB="1")


def test_reachable_redis_becomes_the_remote_tier_and_lmcache_loads_the_file(lmcache_py, recorder):
    with redis_server() as server, short_tempdir() as root:
        cfg = lmcache_config(root, f"valkey://127.0.0.1:{server.port}/0")
        setup = kvcache.prepare(cfg, tiny_cpu_plan(), engine_python=lmcache_py)
        assert setup.enabled, setup.reasons
        written = yaml.safe_load(setup.config_path.read_text())
        assert written == {"chunk_size": 256, "local_cpu": True, "max_local_cpu_size": 1.0,
                           "local_disk": f"file://{root}/state/lmcache/", "max_local_disk_size": 1.0,
                           "remote_url": f"redis://127.0.0.1:{server.port}/0", "remote_serde": "naive"}
        assert setup.config_path == root / "state" / "lmcache_config.yaml"
        assert (root / "state" / "lmcache").is_dir()
    messages = recorder.messages("ximd.kvcache")
    assert "LMCache enabled" in messages
    assert f"Wrote LMCache configuration config_path={setup.config_path}" in messages


def test_lmcaches_loader_rejects_a_key_it_does_not_know(lmcache_py, tmp_path):
    path = tmp_path / "lmcache_config.yaml"
    kvcache.write_config(path, {"chunk_size": 256, "max_local_cpu_sise": 1.0})
    assert kvcache.check_with_lmcache(lmcache_py, path) == "keys LMCache does not know: max_local_cpu_sise"


def test_stopped_redis_is_dropped_with_a_warning_and_the_engine_still_starts(lmcache_py, tiny_model_dir, recorder):
    with redis_server() as server:
        url = server.url
    with short_tempdir() as root:
        cfg = lmcache_config(root, url)
        setup = kvcache.prepare(cfg, tiny_cpu_plan(), engine_python=lmcache_py, probe_timeout_s=0.5)
        assert setup.enabled and "remote_url" not in yaml.safe_load(setup.config_path.read_text())
        warnings = recorder.messages("ximd.kvcache", logging.WARNING)
        assert any(m.startswith(f"LMCache remote tier {url} unreachable") and "local tiers only" in m
                   for m in warnings)
        launch, _ = tiny_launch(root, lmcache_py, tiny_model_dir, kv=setup, XEROTIER_AGENT_LMCACHE_ENABLED="true")
        supervisor = EngineSupervisor(launch, on_state=StateLog())
        with SupervisorThread(supervisor) as runner:
            runner.wait_for(lambda: supervisor.healthy, ENGINE_START_TIMEOUT_S, "healthy engine with LMCache")
            assert not supervisor.lmcache_dropped and supervisor.starts == 1
            assert psutil.Process(supervisor.pid).environ()["LMCACHE_CONFIG_FILE"] == str(setup.config_path)
            body = post_json(supervisor.socket_path, "/v1/completions", {
                "model": launch.served_model_name, "prompt": "import os", "max_tokens": 4, "temperature": 0,
                "ignore_eos": True})
            assert body["usage"]["completion_tokens"] == 4
    assert any("LMCache" in m for m in recorder.messages("ximd.engine"))
