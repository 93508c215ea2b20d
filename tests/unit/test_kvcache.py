"""LMCache decisions, tier sizes and the written file; the remote probe against a real Redis."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.engine import load_config, tiny_cpu_plan
from tests.support.redis_server import free_port, redis_server
from ximd import kvcache
from ximd.kvcache import (
    GIB,
    KVCacheSetup,
    decide,
    lmcache_config,
    prepare,
    probe_remote,
    remote_url_for_lmcache,
    retry_without_lmcache,
    size_gb,
    write_config,
)

RAM = 256 * GIB
DISK = 2000 * GIB


def config(**changes):
    values = dict(chunk_size=256, cpu_size="auto", disk_size="auto", disk_path=Path("/var/lib/xerotier/lmcache"),
                  ram_bytes=RAM, disk_partition_bytes=DISK, tp_size=1, remote_url=None)
    values.update(changes)
    return lmcache_config(**values)


# ---------------------------------------------------------------- decisions


@pytest.mark.parametrize("setting, accelerator, on, words", [
    ("false", "cuda", False, "lmcache.enabled = false"),
    ("false", "cpu", False, "lmcache.enabled = false"),
    ("auto", "cpu", False, "no CPU connector"),
    ("auto", "cuda", True, "cuda engine"),
    ("auto", "rocm", True, "rocm engine"),
    ("true", "cuda", True, "cuda engine"),
    ("true", "cpu", True, "3 s lookup timeout"),
])
def test_decide_says_why(setting, accelerator, on, words):
    enabled, reason = decide(setting, accelerator)
    assert enabled is on and words in reason


@pytest.mark.parametrize("on, healthy, retried, expected", [
    (True, False, False, True),
    (True, True, False, False),    # it ran with LMCache: the death is not LMCache's start-up problem
    (True, False, True, False),    # once only
    (False, False, False, False),
])
def test_retry_without_lmcache_only_once_and_only_for_start_up_deaths(on, healthy, retried, expected):
    assert retry_without_lmcache(on, healthy, retried) is expected


# ---------------------------------------------------------------- sizes and file content


def test_auto_sizes_are_ten_percent_split_per_tp_rank():
    assert size_gb("auto", RAM, 1) == 25.6
    assert size_gb("auto", RAM, 4) == 6.4
    assert size_gb("auto", 23 * GIB + 123, 1) == 2.3   # rounded down to 0.01 GiB
    assert size_gb(12, RAM, 4) == 12.0                  # explicit sizes are per rank already


def test_cpu_and_disk_tiers_by_default():
    assert config() == {"chunk_size": 256, "local_cpu": True, "max_local_cpu_size": 25.6,
                        "local_disk": "file:///var/lib/xerotier/lmcache/", "max_local_disk_size": 200.0}


def test_tensor_parallel_ranks_share_both_local_tiers():
    two = config(tp_size=2)
    assert two["max_local_cpu_size"] == 12.8 and two["max_local_disk_size"] == 100.0


def test_explicit_sizes_override_the_percentages():
    explicit = config(cpu_size=8.0, disk_size=50.0, tp_size=2)
    assert explicit["max_local_cpu_size"] == 8.0 and explicit["max_local_disk_size"] == 50.0


def test_zero_sizes_turn_a_tier_off():
    assert config(disk_size=0.0).keys() == {"chunk_size", "local_cpu", "max_local_cpu_size"}
    assert config(cpu_size=0.0)["local_cpu"] is False


def test_remote_tier_with_its_serde():
    remote = config(remote_url="redis://cache.internal:6379/0")
    assert remote["remote_url"] == "redis://cache.internal:6379/0" and remote["remote_serde"] == "naive"


@pytest.mark.parametrize("given, spoken", [
    ("valkey://cache:6379", "redis://cache:6379"),
    ("valkeys://:pw@cache:6380/1", "rediss://:pw@cache:6380/1"),
    ("rediss://cache", "rediss://cache"),
])
def test_valkey_urls_are_spoken_as_redis(given, spoken):
    assert remote_url_for_lmcache(given) == spoken


def test_a_non_redis_url_is_refused_without_showing_its_password():
    with pytest.raises(ValueError, match=r"not a redis://") as err:
        remote_url_for_lmcache("http://user:hunter2@cache:80")
    assert "hunter2" not in str(err.value)


def test_written_file_is_atomic_private_yaml(tmp_path):
    path = tmp_path / "state" / "lmcache_config.yaml"
    write_config(path, config(remote_url="redis://:secret@cache:6379"))
    assert yaml.safe_load(path.read_text())["remote_url"] == "redis://:secret@cache:6379"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_config(path, config())
    assert "remote_url" not in yaml.safe_load(path.read_text())
    assert sorted(p.name for p in path.parent.iterdir()) == ["lmcache_config.yaml"]  # no temporary left


def test_setup_exports_the_connector_only_when_on(tmp_path):
    on = KVCacheSetup(True, (), tmp_path / "c.yaml", {})
    assert json.loads(on.kv_transfer_config) == {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    assert on.env == {"LMCACHE_CONFIG_FILE": str(tmp_path / "c.yaml")}
    off = KVCacheSetup(False, ("off",))
    assert off.kv_transfer_config is None and off.env == {}


def test_disk_partition_is_found_for_a_directory_not_created_yet(tmp_path):
    assert kvcache.partition_bytes(tmp_path / "a" / "b") == os.statvfs(tmp_path).f_blocks * os.statvfs(tmp_path).f_frsize


# ---------------------------------------------------------------- the remote probe, for real


def test_probe_answers_none_for_a_live_redis_and_speaks_valkey_urls_to_it():
    with redis_server() as server:
        assert probe_remote(server.url) is None
        assert probe_remote(f"valkey://127.0.0.1:{server.port}") is None


def test_probe_checks_the_password():
    with redis_server(password="s3cret") as server:
        assert probe_remote(f"redis://:s3cret@127.0.0.1:{server.port}") is None
        problem = probe_remote(f"redis://:wrong@127.0.0.1:{server.port}")
        assert problem and ("WRONGPASS" in problem or "invalid" in problem.lower())


def test_probe_of_a_stopped_server_says_why_quickly():
    problem = probe_remote(f"redis://127.0.0.1:{free_port()}", timeout_s=0.5)
    assert problem and "ConnectionError" in problem


# ---------------------------------------------------------------- prepare() before LMCache is needed


def test_prepare_auto_on_cpu_is_off_with_the_reason_and_writes_nothing(tmp_path, caplog):
    cfg = load_config(tmp_path)
    caplog.set_level(logging.INFO, "ximd.kvcache")
    setup = prepare(cfg, tiny_cpu_plan(), engine_python="/usr/bin/python3")
    assert not setup.enabled and "no CPU connector" in setup.reasons[0]
    assert "no CPU connector" in caplog.text
    assert not (Path(cfg.state_dir) / "lmcache_config.yaml").exists()


def test_prepare_with_lmcache_missing_from_the_engine_is_off_with_a_warning(tmp_path, caplog):
    # A real interpreter with no site packages at all, like an engine built without lmcache
    # (nor PyYAML: a GPU host's python3 showed that the check must name lmcache first).
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    cfg = load_config(tmp_path, XEROTIER_AGENT_LMCACHE_ENABLED="true", XEROTIER_AGENT_LMCACHE_DISK_SIZE_GB="1")
    caplog.set_level(logging.INFO, "ximd.kvcache")
    setup = prepare(cfg, tiny_cpu_plan(), engine_python=str(bare), ram_bytes=RAM)
    assert not setup.enabled and setup.kv_transfer_config is None
    assert "lmcache is not installed in the engine environment" in setup.reasons[-1]
    assert any(r.levelno == logging.WARNING and "lmcache is not installed" in r.getMessage() for r in caplog.records)
    assert "LMCache enabled" not in caplog.text


def test_prepare_with_a_missing_engine_interpreter_is_off(tmp_path):
    cfg = load_config(tmp_path, XEROTIER_AGENT_LMCACHE_ENABLED="true")
    setup = prepare(cfg, tiny_cpu_plan(accelerator="cuda"), engine_python=str(tmp_path / "no-python"), ram_bytes=RAM)
    assert not setup.enabled and "not found" in setup.reasons[-1]
