"""Node metrics: the text format, the listen address, and a real scrape with the engine's series."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.standin_engine import StandinProcess
from ximd.engine import EngineState
from ximd.mesh.state import LinkState
from ximd.metrics import NODE_STATES, MetricsServer, NodeMetrics, parse_listen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(text: str) -> dict[str, float]:
    """Every sample of the text through prometheus_client's own parser, keyed as the line writes it."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:7394", ("127.0.0.1", 7394)), ("[::1]:9100", ("::1", 9100)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
])
def test_parse_listen(value, expected):
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value, problem", [
    ("7394", "expected HOST:PORT"), (":7394", "expected HOST:PORT"),
    ("localhost:http", "not a number"), ("localhost:70000", "out of range"),
])
def test_parse_listen_rejects_bad_values_with_a_message(value, problem):
    with pytest.raises(ValueError, match=problem):
        parse_listen(value)


def test_render_has_every_family_with_help_and_type():
    m = NodeMetrics(started_at=1000.0)
    m.request_finished("ok")
    m.request_finished("ok")
    m.request_finished("at_capacity")
    m.first_token(0.004)
    m.first_token(0.2)
    m.tokens(10, 32)
    m.set_link_state(LinkState.CONNECTED)
    m.lease_acknowledged(at=1990.0)
    m.set_engine("healthy", 2)
    m.set_kv_tier("cpu", True)
    m.set_kv_tier("remote", False)
    text = m.render()
    values = samples(text)
    assert values['ximd_requests_total{outcome="ok"}'] == 2
    assert values['ximd_requests_total{outcome="at_capacity"}'] == 1
    assert values['ximd_time_to_first_token_seconds_bucket{le="0.005"}'] == 1
    assert values['ximd_time_to_first_token_seconds_bucket{le="0.2"}'] == 2
    assert values['ximd_time_to_first_token_seconds_bucket{le="+Inf"}'] == 2
    assert values["ximd_time_to_first_token_seconds_count"] == 2
    assert values['ximd_tokens_total{kind="completion"}'] == 32
    assert values['ximd_link_state{state="connected"}'] == 1
    assert values['ximd_link_state{state="disconnected"}'] == 0
    assert values["ximd_lease_last_acknowledged_timestamp_seconds"] == 1990.0
    assert values['ximd_engine_state{state="healthy"}'] == 1
    assert values["ximd_engine_restarts_total"] == 2
    assert values['ximd_kv_tier_enabled{tier="remote"}'] == 0
    assert values["ximd_start_time_seconds"] == 1000.0
    assert values["process_resident_memory_bytes"] > 0
    for family in ("ximd_requests_total", "ximd_time_to_first_token_seconds", "ximd_tokens_total",
                   "ximd_link_state", "ximd_engine_restarts_total", "ximd_kv_tier_enabled", "ximd_state"):
        assert f"# TYPE {family} " in text and f"# HELP {family} " in text


def test_state_families_keep_every_series_when_the_state_changes():
    m = NodeMetrics(started_at=1000.0)
    before = samples(m.render())
    m.set_link_state(LinkState.REJECTED)
    m.set_engine("backoff", 1)
    m.set_state("serving")
    m.set_state("a-phase-added-later")
    after = samples(m.render())
    assert set(before) <= set(after)
    assert [k for k, v in after.items() if k.startswith("ximd_link_state{") and v] == \
        ['ximd_link_state{state="rejected"}']
    assert {k for k in after if k.startswith("ximd_link_state{")} == \
        {f'ximd_link_state{{state="{s.value}"}}' for s in LinkState}
    assert {k for k, v in after.items() if k.startswith("ximd_engine_state{")} == \
        {f'ximd_engine_state{{state="{s.value}"}}' for s in EngineState}
    assert after['ximd_engine_state{state="backoff"}'] == 1 and after['ximd_engine_state{state="stopped"}'] == 0
    assert after['ximd_state{state="a-phase-added-later"}'] == 1 and after['ximd_state{state="serving"}'] == 0
    assert {f'ximd_state{{state="{s}"}}' for s in NODE_STATES} <= set(after)


def test_no_lease_yet_is_a_zero_timestamp():
    assert samples(NodeMetrics().render())["ximd_lease_last_acknowledged_timestamp_seconds"] == 0


def test_scrape_passes_the_engines_series_through(tmp_path):
    engine = StandinProcess(tmp_path / "engine.sock").start()
    port = free_port()

    async def scenario():
        metrics = NodeMetrics()
        metrics.request_finished("ok")
        server = MetricsServer(f"127.0.0.1:{port}", metrics, engine.socket_path)
        await server.start()
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    return resp.status, resp.headers["Content-Type"], await resp.text()
        finally:
            await server.close()

    try:
        status, content_type, text = asyncio.run(scenario())
    finally:
        engine.stop()
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    values = samples(text)
    assert values['ximd_requests_total{outcome="ok"}'] == 1
    assert values["ximd_engine_metrics_up"] == 1
    assert values['vllm:num_requests_running{engine="0",model_name="tiny"}'] == 0


def test_scrape_without_an_engine_says_so_and_still_answers(tmp_path):
    port = free_port()

    async def scenario():
        server = MetricsServer(f"127.0.0.1:{port}", NodeMetrics(), tmp_path / "no-engine.sock")
        await server.start()
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    return await resp.text()
        finally:
            await server.close()

    text = asyncio.run(scenario())
    assert samples(text)["ximd_engine_metrics_up"] == 0
    assert "vllm:" not in text


def test_a_taken_port_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def scenario():
            server = MetricsServer(f"127.0.0.1:{port}", NodeMetrics(), None)
            with pytest.raises(OSError, match=r"metrics: cannot listen on 127.0.0.1:\d+.*metrics.enabled"):
                await server.start()

        asyncio.run(scenario())
