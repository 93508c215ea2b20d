"""`xim-router serve --workers N`: the core and its HTTP workers, all real processes.

The official `openai` client → a worker (SO_REUSEPORT on the shared --http port)
→ the core over its channel → CurveZMQ → `ximd run` → the stand-in engine
(tests/serving/test_daemon.py's ServedNode with `--workers 2`). What is shown:
streams through the workers, connections spread over both, a killed worker
restarted, a killed core taking its workers with it, SIGTERM draining, a client
that goes away cancelling on the node, and the mistakes an operator can make.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.serving.test_daemon import MESSAGES, MODEL, check_disconnect_frees_the_engine_slot, standin_node, text_of
from tests.support.engine import short_tempdir
from tests.support.router import RouterProcess, wait_for
from tests.support.standin_engine import wait_for_gauge
from tests.support.tls import loopback_cert
from xim_router import workers

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def node():
    with short_tempdir("xw-") as root:
        served = standin_node(root, router_args=("--workers", "2"))
        try:
            yield served.start()
        finally:
            served.stop()


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (its HTTP workers)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def metrics(node) -> str:
    with urllib.request.urlopen(node.router.http_url + "/metrics", timeout=5) as resp:
        return resp.read().decode()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def stream_once(node, tokens: int = 8) -> None:
    """One streamed completion on a connection of its own (the kernel picks the worker)."""
    with node.client() as c:
        chunks = list(c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=tokens,
                                                stream=True, stream_options={"include_usage": True}))
    assert text_of(chunks) and chunks[-1].usage.completion_tokens == tokens


def test_streams_go_through_both_workers_and_metrics_count_them(node):
    workers_now = children(node.router.pid)
    assert len(workers_now) == 2
    assert "2 HTTP worker processes serve" in node.router.log()
    for _ in range(16):
        stream_once(node)
    whole = node.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert whole.usage.completion_tokens == 4
    text = metrics(node)            # itself answered by the core, through a worker
    per_worker = [metric(text, f'xim_router_http_worker_requests_total{{worker="{i}"}}') for i in (0, 1)]
    assert sum(per_worker) == 17 and all(n > 0 for n in per_worker), per_worker
    assert metric(text, 'xim_router_requests_total{endpoint="chat.completions",status="200"}') == 17
    assert metric(text, 'xim_router_tokens_total{kind="completion"}') == 16 * 8 + 4
    assert metric(text, "xim_router_http_workers") == 2
    # The paths the core answers, through the workers: health and the model list.
    with urllib.request.urlopen(node.router.http_url + "/health", timeout=5) as resp:
        assert resp.status == 200
    assert [m.id for m in node.client().models.list()] == [MODEL]


def test_a_killed_worker_is_restarted_and_requests_keep_working(node):
    first = children(node.router.pid)
    victim = first[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: "restarted (pid" in node.router.log(), 20, "the worker's restart")
    assert "exited with status -9; restarting it" in node.router.log()
    now = wait_for(lambda: (lambda c: c if len(c) == 2 else None)(children(node.router.pid)), 10,
                   "two workers again")
    assert victim not in now and first[1] in now
    for _ in range(8):
        stream_once(node)
    assert metric(metrics(node), "xim_router_http_worker_restarts_total") == 1


def test_a_killed_core_takes_its_workers_with_it(node):
    pids = children(node.router.pid)
    assert len(pids) == 2
    node.router.proc.send_signal(signal.SIGKILL)
    node.router.proc.wait(10)
    # The workers were the core's children: they are reparented, then they exit.
    wait_for(lambda: not any(alive(p) for p in pids), 10, "the workers to exit")


def test_sigterm_ends_streams_and_stops_every_process(node):
    async def scenario():
        ac = node.async_client()
        stream = await ac.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5000,
                                                  stream=True)
        got = [await stream.__anext__()]
        await wait_for_gauge(node.engine_socket, 1, timeout=20)
        pids = children(node.router.pid)
        node.router.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="the router is stopping"):
            async for chunk in stream:
                got.append(chunk)
        await ac.close()
        return pids

    pids = asyncio.run(scenario())
    assert node.router.proc.wait(20) == 0
    assert not any(alive(p) for p in pids)
    asyncio.run(wait_for_gauge(node.engine_socket, 0, timeout=20))      # cancelled on the node
    assert "did not stop" not in node.router.log()


def test_a_client_that_goes_away_cancels_on_the_node(node):
    check_disconnect_frees_the_engine_slot(node, {"max_tokens": 5000})


def test_one_worker_is_the_single_process_router(tmp_path):
    with short_tempdir("xw1-") as root:
        served = standin_node(root, router_args=("--workers", "1"))
        try:
            served.start()
            assert children(served.router.pid) == []
            stream_once(served)
            assert "HTTP worker" not in served.router.log()
        finally:
            served.stop()


# ---------------------------------------------------------------- what an operator can get wrong


def serve(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xim_router.cli", "serve", "--state-dir",
                           str(tmp_path / "state"), "--mesh", "tcp://127.0.0.1:0", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("value, message", [
    ("0", "--workers must be 1 to 64 (or auto), not 0"),
    ("65", "--workers must be 1 to 64 (or auto), not 65"),
    ("many", "'many' is not a number of workers (1 to 64, or auto)"),
])
def test_a_bad_workers_value_is_a_usage_error(tmp_path, value, message):
    result = serve(tmp_path, "--workers", value)
    assert result.returncode == 2 and message in result.stderr


def test_auto_is_a_worker_per_core_up_to_four():
    assert workers.parse_workers("auto") == max(1, min(len(os.sched_getaffinity(0)), 4))
    assert workers.parse_workers(" AUTO ") == workers.parse_workers("auto")
    assert workers.parse_workers("3") == 3


def test_an_unwritable_socket_directory_fails_the_start_saying_where(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as root: a 0500 directory is still writable")
    result = serve(tmp_path, "--http", "127.0.0.1:0", "--workers", "2", env={"RUNTIME_DIRECTORY": str(locked)})
    assert result.returncode == 1
    assert f"cannot create the workers' socket directory in {locked}: Permission denied" in result.stderr


@pytest.mark.parametrize("make, why", [
    (lambda path: None, "No such file or directory"),
    (lambda path: path.write_text(""), "Not a directory"),
])
def test_a_socket_directory_that_cannot_be_made_fails_the_start_saying_where(tmp_path, make, why):
    parent = tmp_path / "run"
    make(parent)
    result = serve(tmp_path, "--http", "127.0.0.1:0", "--workers", "2", env={"RUNTIME_DIRECTORY": str(parent)})
    assert result.returncode == 1
    assert f"cannot create the workers' socket directory in {parent}: {why}" in result.stderr


def test_a_taken_port_fails_the_start_even_for_a_port_sharer(tmp_path):
    """Another process of this user listening with SO_REUSEPORT must not quietly get half
    of the router's clients: the port is checked without it first."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = serve(tmp_path, "--http", f"127.0.0.1:{port}", "--workers", "2")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr


def test_the_socket_directory_is_private_and_removed_at_the_end(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "xim_router.cli", "serve", "--state-dir",
                             str(tmp_path / "state"), "--mesh", "tcp://127.0.0.1:0", "--http", "127.0.0.1:0",
                             "--workers", "2"], stdout=subprocess.PIPE, stderr=(tmp_path / "log").open("w"),
                            text=True, env={**os.environ, "RUNTIME_DIRECTORY": str(runtime)})
    try:
        assert "xim-router serving" in proc.stdout.readline()
        # Logged once SIGTERM is the router's to handle (the line above comes a moment before).
        wait_for(lambda: "HTTP worker processes serve" in (tmp_path / "log").read_text(), 10, "the log")
        (made,) = runtime.iterdir()
        assert made.stat().st_mode & 0o777 == 0o700
        assert (made / "core.sock").is_socket()
        assert len(children(proc.pid)) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert list(runtime.iterdir()) == []


def test_https_and_api_keys_through_the_workers_and_a_separate_enrollment_listener(tmp_path):
    ca, cert_path, key_path = loopback_cert(tmp_path)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    args = ("--workers", "2", "--api-key", "sk-w", "--enroll-http", "127.0.0.1:0")
    with RouterProcess(tmp_path, tls=(cert_path, key_path), extra_args=args) as router:
        assert router.http_url.startswith("https://") and router.enroll_url != router.http_url

        def get(url: str, key: str | None = None, body: bytes | None = None) -> int:
            request = urllib.request.Request(url, data=body, headers={"Authorization": f"Bearer {key}"}
                                             if key else {})
            try:
                with urllib.request.urlopen(request, timeout=10, context=context) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        body = json.dumps({"model": MODEL, "messages": MESSAGES}).encode()
        # The worker checks the key of a completion; the core that of the model list and /metrics.
        assert get(router.http_url + "/v1/chat/completions", body=body) == 401
        assert get(router.http_url + "/v1/models") == 401 and get(router.http_url + "/metrics") == 401
        assert get(router.http_url + "/v1/models", "sk-w") == 200
        assert get(router.http_url + "/v1/chat/completions", "sk-w", body) == 404      # no node serves it
        assert get(router.http_url + "/version") == 200
        assert get(router.enroll_url + "/version") == 200      # the core's own listener
