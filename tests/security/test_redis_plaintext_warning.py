"""Finding 10: plain redis:// to another host went without a word.

The LMCache remote tier's password and every KV block it stores cross the
network; over plain redis:// to a non-loopback host anyone on the path reads
and changes them. `kvcache.prepare` (what the node runs before each engine
start) must warn once per process, suggest rediss://, and never print the
password; a loopback server (a real redis-server here) and rediss:// are fine.
"""

from __future__ import annotations

import logging

import pytest

from tests.support.engine import load_config, tiny_cpu_plan
from tests.support.redis_server import redis_server
from ximd import kvcache

PASSWORD = "p4ssw0rd-in-the-url"
RAM = 64 << 30


def prepare(tmp_path, url: str, caplog, reasons: list[str] | None = None) -> list[str]:
    """The plaintext warnings one prepare() logged (its reasons go into ``reasons``)."""
    cfg = load_config(tmp_path, XEROTIER_AGENT_LMCACHE_ENABLED="true", XEROTIER_AGENT_LMCACHE_REDIS_URL=url)
    caplog.clear()
    setup = kvcache.prepare(cfg, tiny_cpu_plan(accelerator="cuda"), engine_python=str(tmp_path / "no-python"),
                            ram_bytes=RAM, probe_timeout_s=0.2)
    if reasons is not None:
        reasons += setup.reasons
    return [r.getMessage() for r in caplog.records if "in clear" in r.getMessage()]


@pytest.mark.parametrize("scheme", ["redis", "valkey"])
def test_plain_redis_to_another_host_warns_once(tmp_path, caplog, scheme):
    caplog.set_level(logging.WARNING, logger="ximd.kvcache")
    url = f"{scheme}://:{PASSWORD}@192.0.2.10:6379"          # TEST-NET-1: never answers
    first = prepare(tmp_path, url, caplog)
    assert len(first) == 1, f"no warning for {scheme}:// to another host"
    assert f"use {scheme}s://" in first[0] and PASSWORD not in caplog.text
    assert prepare(tmp_path, url, caplog) == []              # once per process


@pytest.mark.parametrize("url", ["rediss://:pw@192.0.2.11:6379", "valkeys://192.0.2.12:6379",
                                 "redis://localhost:6379", "redis://[::1]:6379"])
def test_tls_or_loopback_is_quiet(tmp_path, caplog, url):
    caplog.set_level(logging.WARNING, logger="ximd.kvcache")
    assert prepare(tmp_path, url, caplog) == []


def test_a_real_loopback_redis_is_used_without_a_warning(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ximd.kvcache")
    with redis_server(password=PASSWORD) as server:
        url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}"
        reasons: list[str] = []
        assert prepare(tmp_path, url, caplog, reasons) == []
        assert any("answered PING" in r for r in reasons) and PASSWORD not in caplog.text + str(reasons)
