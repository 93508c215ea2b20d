"""`ximd plan`: the model the daemon would serve and where from, and what it decides for
LMCache (on or off and why, each tier's size and path, the remote URL masked), sized by
kvcache's own functions and never probed."""

from __future__ import annotations

import json

import pytest

from tests.unit.test_autoconfig import cpu_host, nvidia_host
from tests.unit.test_modelsource import ASSIGNED, cache_snapshot, make_cfg, save_assignment
from ximd import kvcache
from ximd.commands import plan as plan_cmd
from ximd.config import SEED_DEFAULT_MODEL
from ximd.units import GIB

RAM = 125 * GIB
PARTITION = 1000 * GIB


def tiers(tmp_path, extra: str = "", accelerator: str = "cuda", tp: int = 2) -> kvcache.TierPlan:
    return kvcache.plan_tiers(make_cfg(tmp_path, extra), accelerator, tp, ram_bytes=RAM,
                              disk_partition_bytes=PARTITION)


# ---------------------------------------------------------------- kvcache.plan_tiers


def test_tiers_auto_on_a_gpu_are_a_tenth_of_ram_and_partition_per_tp_rank(tmp_path):
    t = tiers(tmp_path)
    assert (t.enabled, t.reason) == (True, "LMCache on: cuda engine (lmcache.enabled = auto)")
    assert (t.tp_size, t.cpu_gb, t.disk_gb) == (2, 6.25, 50.0)
    assert t.disk_path == tmp_path / "state" / "lmcache"
    assert (t.remote_url, t.warnings) == ("", ())
    # The same numbers the engine's lmcache_config.yaml gets.
    config = kvcache.config_from(make_cfg(tmp_path), ram_bytes=RAM, disk_partition_bytes=PARTITION, tp_size=2,
                                 remote_url=None)
    assert (config["max_local_cpu_size"], config["max_local_disk_size"]) == (t.cpu_gb, t.disk_gb)


def test_tiers_are_off_on_a_cpu_engine_because_lmcache_has_no_cpu_connector(tmp_path):
    t = tiers(tmp_path, accelerator="cpu", tp=1)
    assert not t.enabled and "LMCache has no CPU connector" in t.reason
    assert (t.cpu_gb, t.disk_path) == (0.0, None)


def test_tiers_off_by_configuration(tmp_path):
    t = tiers(tmp_path, "[lmcache]\nenabled = false\n")
    assert (t.enabled, t.reason) == (False, "LMCache off: lmcache.enabled = false")


def test_explicit_sizes_and_no_disk_tier(tmp_path):
    t = tiers(tmp_path, "[lmcache]\ncpu_size_gb = 20\ndisk_size_gb = 0\n")
    assert (t.cpu_gb, t.disk_path, t.disk_gb) == (20.0, None, 0.0)


def test_the_remote_url_is_masked_and_a_plaintext_one_to_another_host_warned(tmp_path):
    t = tiers(tmp_path, '[lmcache]\nredis_url = "redis://:s3cret@cache.example:6379/0"\n')
    assert t.remote_url == "redis://:****@cache.example:6379/0"
    assert len(t.warnings) == 1 and "use rediss://" in t.warnings[0] and "s3cret" not in t.warnings[0]
    assert tiers(tmp_path, '[lmcache]\nredis_url = "valkey://127.0.0.1:6379"\n').warnings == ()


# ---------------------------------------------------------------- the command


def test_plan_says_which_model_from_where_and_that_it_is_cached(tmp_path, capsys):
    cfg = make_cfg(tmp_path)
    save_assignment(cfg, ASSIGNED)
    snapshot = cache_snapshot(cfg, ASSIGNED)
    assert plan_cmd.main(cfg, "text", hw=nvidia_host(2)) == 0
    out = capsys.readouterr().out
    assert f"model                   {ASSIGNED} (router assignment), cached at {snapshot}: 2 layers" in out


def test_plan_says_when_sizes_are_estimates(tmp_path, capsys):
    assert plan_cmd.main(make_cfg(tmp_path), "text", hw=nvidia_host(1)) == 0
    out = capsys.readouterr().out
    assert (f"{SEED_DEFAULT_MODEL} (seed default), not cached yet (fetched at the first start): "
            "sizes are estimates") in out


def test_plan_text_shows_each_lmcache_tier(tmp_path, capsys):
    cfg = make_cfg(tmp_path, '[lmcache]\nredis_url = "rediss://:s3cret@cache.example:6380"\n')
    assert plan_cmd.main(cfg, "text", hw=nvidia_host(2)) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = {line[:24].strip(): line[24:] for line in lines if line.startswith("lmcache")}
    assert shown["lmcache"].split(None, 1) == ["on", "LMCache on: cuda engine (lmcache.enabled = auto)"]
    ram_share = int(nvidia_host(2).ram_bytes * 0.10 / 2 / GIB * 100) / 100
    assert shown["lmcache cpu tier"] == (f"{ram_share:.2f} GiB per TP rank × 2 TP ranks = "
                                         f"{ram_share * 2:.2f} GiB of RAM")
    assert shown["lmcache disk tier"].startswith(f"{tmp_path / 'state' / 'lmcache'}: ")
    assert "GiB per TP rank × 2 TP ranks" in shown["lmcache disk tier"]
    assert shown["lmcache remote tier"].startswith("rediss://:****@cache.example:6380 (not probed here")
    assert "s3cret" not in "\n".join(lines)


def test_plan_text_says_lmcache_is_off_on_a_cpu_engine_and_why(tmp_path, capsys):
    assert plan_cmd.main(make_cfg(tmp_path), "text", hw=cpu_host()) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("lmcache"))
    assert line[24:].startswith("off") and "LMCache has no CPU connector" in line
    assert "lmcache cpu tier" not in out


def test_plan_text_with_empty_tiers_and_a_plaintext_remote(tmp_path, capsys):
    cfg = make_cfg(tmp_path, '[lmcache]\ncpu_size_gb = 0\ndisk_size_gb = 0\n'
                             'redis_url = "redis://:s3cret@cache.example:6379"\n')
    assert plan_cmd.main(cfg, "text", hw=nvidia_host(1)) == 0
    out = capsys.readouterr().out
    assert "lmcache cpu tier        off (size 0)" in out and "lmcache disk tier       off (size 0)" in out
    assert "warning: LMCache remote tier redis://:****@cache.example:6379 is plain redis://" in out
    assert "s3cret" not in out


def test_plan_text_without_a_remote_tier(tmp_path, capsys):
    assert plan_cmd.main(make_cfg(tmp_path, "[lmcache]\ncpu_size_gb = 4\n"), "text", hw=nvidia_host(1)) == 0
    out = capsys.readouterr().out
    assert "lmcache cpu tier        4.00 GiB per TP rank of RAM" in out
    assert "lmcache remote tier     none (lmcache.redis_url is empty)" in out


@pytest.mark.parametrize("hw, enabled", [(nvidia_host(2), True), (cpu_host(), False)])
def test_plan_json_has_the_model_source_and_lmcache(tmp_path, capsys, hw, enabled):
    cfg = make_cfg(tmp_path, '[lmcache]\nredis_url = "rediss://:s3cret@cache.example:6380"\n')
    save_assignment(cfg, ASSIGNED)
    snapshot = cache_snapshot(cfg, ASSIGNED)
    assert plan_cmd.main(cfg, "json", hw=hw) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert data["model_source"] == {"model": ASSIGNED, "origin": "router", "where": "router assignment",
                                    "found": "cached", "facts_dir": str(snapshot), "note": ""}
    assert data["lmcache"]["enabled"] is enabled
    if enabled:
        assert data["lmcache"]["remote_url"] == "rediss://:****@cache.example:6380"
        assert data["lmcache"]["disk_path"] == str(tmp_path / "state" / "lmcache")
    assert "s3cret" not in out
