"""Serving end to end: the official `openai` client → `xim-router serve` → CurveZMQ → `ximd run` → engine.

Every process is the real one: the router and the daemon run as
subprocesses (tests/support/router.py, tests/support/daemon.py), the daemon
enrolls with a fresh join key and supervises its engine. Two engines:

- the paced stand-in (bench/standin_engine.py, started by ximd through
  bench/standin-python): fast, and able to hang or fail on request;
- real vLLM on the tiny model (`-m engine`): one daemon start for the whole
  module (about a minute here), the tests share it, the SIGTERM test last. Its
  development endpoints are on (tests.support.engine.dev_mode_python): the
  max_concurrent test pauses its scheduler to hold requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from bench.standin_engine import write_model_dir
from tests.support.daemon import Daemon
from tests.support.engine import dev_mode_python, engine_python, generation_paused, short_tempdir, tiny_model
from tests.support.router import RouterProcess
from tests.support.standin_engine import wait_for_gauge
from ximd import control

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "hello from the test"}]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedNode:
    """A router and an enrolled `ximd run` serving MODEL, in a short scratch directory."""

    def __init__(self, root: Path, *, python: str, model_dir: Path, max_concurrent: int = 4,
                 drain_grace_s: float = 20, vllm_args: str = "", ready_timeout_s: float = 60,
                 router_args: tuple[str, ...] = (), event_loop: str = ""):
        self.root = root
        self.python, self.model_dir = python, model_dir
        self.max_concurrent, self.drain_grace_s = max_concurrent, drain_grace_s
        self.vllm_args = vllm_args
        self.ready_timeout_s = ready_timeout_s
        self.metrics_port = free_port()
        # A generous lease timeout: next to a real vLLM the two cores are busy, and a late
        # lease must not look like a lost node to these tests.
        # event_loop: both programs' (ximd's tuning.event_loop, the router's --event-loop); "": their default.
        self.event_loop = event_loop
        loop_args = ("--event-loop", event_loop) if event_loop else ()
        self.router = RouterProcess(root / "r", lease_interval="1s", lease_timeout="10s",
                                    extra_args=(*router_args, *loop_args))
        self.daemon: Daemon | None = None

    @property
    def engine_socket(self) -> Path:
        return self.daemon.runtime_dir / "engine.sock"

    def start(self) -> ServedNode:
        (self.root / "r").mkdir()
        self.router.start()
        key = self.router.join_key()
        config = (f'[agent]\nmax_concurrent = {self.max_concurrent}\ndrain_grace_s = {self.drain_grace_s}\n'
                  f'[router]\nurl = "{self.router.http_url}"\njoin_key = "{key}"\ninsecure = true\n'
                  f'[engine]\nmodel = "{self.model_dir}"\nserved_model_name = "{MODEL}"\n'
                  f'python = "{self.python}"\n')
        env = {"XEROTIER_AGENT_METRICS_ENABLED": "true",
               "XEROTIER_AGENT_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}"}
        if self.vllm_args:
            env["XEROTIER_AGENT_VLLM_ARGS"] = self.vllm_args
        if self.event_loop:
            env["XEROTIER_AGENT_EVENT_LOOP"] = self.event_loop
        (self.root / "d").mkdir()
        self.daemon = Daemon(self.root / "d", config=config, env=env, watchdog_usec=None).start()
        # Read sd_notify messages as systemd would: an unread datagram queue fills
        # after a few messages and the daemon's next notify would block.
        self._reading = threading.Thread(target=self._read_notify, daemon=True)
        self._reading.start()
        self.wait_serving()
        return self

    def _read_notify(self) -> None:
        while self.daemon.notify.sock.fileno() != -1:
            try:
                self.daemon.notify.poll(0.2)
            except OSError:
                return

    def models(self) -> list[str]:
        try:
            with urllib.request.urlopen(f"{self.router.http_url}/v1/models", timeout=2) as resp:
                return [m["id"] for m in json.load(resp)["data"]]
        except OSError:
            return []

    def wait_serving(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.ready_timeout_s)
        while MODEL not in self.models():
            if self.daemon.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the node did not start serving (ximd rc={self.daemon.proc.poll()})"
                                     f"\n--- ximd log ---\n{self.daemon.log()[-6000:]}"
                                     f"\n--- router log ---\n{self.router.log()[-3000:]}")
            time.sleep(0.2)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.router.http_url + "/v1", api_key="unused", max_retries=0,
                             timeout=60)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.router.http_url + "/v1", api_key="unused",
                                  max_retries=0, timeout=60)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    async def in_flight(self) -> int:
        """The requests ximd itself counts in flight (the slots max_concurrent limits). Asked
        over the control socket: /metrics also scrapes the engine, which a busy CPU engine
        answers late."""
        path = control.socket_path(self.daemon.runtime_dir)
        return (await asyncio.to_thread(control.query, path))["requests"]["in_flight"]

    async def wait_in_flight(self, count: int, timeout: float) -> None:
        """Until ximd counts ``count`` requests in flight."""
        deadline = time.monotonic() + timeout
        while (seen := await self.in_flight()) != count:
            assert time.monotonic() < deadline, f"ximd never had {count} request(s) in flight (last: {seen})"
            await asyncio.sleep(0.02)

    async def wait_idle(self, timeout: float) -> None:
        """Until neither ximd nor the router counts a request in flight. Each frees a slot on
        its own schedule (the router once it notices a client gone or reads done, ximd once
        the cancel arrives or it has sent done), and either one full refuses (at_capacity)."""
        deadline = time.monotonic() + timeout
        while (seen := (await self.in_flight(), await asyncio.to_thread(self.router.in_flight))) != (0, 0):
            assert time.monotonic() < deadline, f"requests stayed in flight (ximd, router): {seen}"
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        try:
            if self.daemon is not None:
                self.daemon.stop()
        finally:
            self.router.stop()


def standin_node(root: Path, **options) -> ServedNode:
    return ServedNode(root, python=str(REPO / "bench" / "standin-python"),
                      model_dir=write_model_dir(root / "model"),
                      vllm_args=options.pop("vllm_args", "--standin-ttft-ms 5 --standin-tokens-per-s 200"),
                      **options)


@pytest.fixture
def node(request):
    options = getattr(request, "param", {})
    with short_tempdir("xs-") as root:
        served = standin_node(root, **options)
        try:
            yield served.start()
        finally:
            served.stop()


def text_of(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# ---------------------------------------------------------------- scenarios (shared by both engines)


def check_openai_client_sync_and_async(node: ServedNode, tokens: int) -> None:
    c = node.client()
    stream = list(c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=tokens,
                                            stream=True, stream_options={"include_usage": True}))
    assert text_of(stream) and stream[-1].usage.completion_tokens == tokens
    whole = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=tokens)
    assert whole.choices[0].message.content and whole.usage.completion_tokens == tokens
    done = c.completions.create(model=MODEL, prompt="def main():", max_tokens=tokens)
    assert done.choices[0].text and done.usage.completion_tokens == tokens

    async def asynchronous():
        ac = node.async_client()
        parts = [p async for p in await ac.completions.create(
            model=MODEL, prompt="import os", max_tokens=tokens, stream=True,
            stream_options={"include_usage": True})]
        chat = await ac.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=tokens)
        await ac.close()
        return parts, chat

    parts, chat = asyncio.run(asynchronous())
    assert "".join(p.choices[0].text for p in parts if p.choices)
    assert parts[-1].usage.completion_tokens == tokens and chat.usage.completion_tokens == tokens


def as_json_body(request: dict) -> dict:
    """The fields of an openai-client call as the HTTP body: the client merges ``extra_body``
    into the top level, and a raw POST must too (sent as it is, vLLM ignored ``ignore_eos`` and
    ``min_tokens``, and the "long" stream could end after a few tokens)."""
    body = {k: v for k, v in request.items() if k != "extra_body"}
    return body | request.get("extra_body", {})


def check_disconnect_frees_the_engine_slot(node: ServedNode, long_request: dict) -> None:
    async def scenario():
        import aiohttp
        async with aiohttp.ClientSession() as s:
            resp = await s.post(node.router.http_url + "/v1/chat/completions",
                                json={"model": MODEL, "messages": MESSAGES, "stream": True,
                                      **as_json_body(long_request)})
            assert resp.status == 200, await resp.text()
            await resp.content.readany()
            # ximd's own count, not the engine's gauge: a busy CPU engine answers /metrics
            # seconds late, and the stream could end on its own before the gauge shows it.
            await node.wait_in_flight(1, timeout=20)
            resp.close()
        await wait_for_gauge(node.engine_socket, 0, timeout=20)

    asyncio.run(scenario())


def check_extras_beyond_max_concurrent_are_refused(node: ServedNode, held_request: dict,
                                                   hold=contextlib.nullcontext) -> None:
    """Hold max_concurrent streamed requests in flight; the extras are refused (429) and
    nothing hangs; a request afterwards works.

    A held request must not end on its own before the extras are answered, however slow the
    machine: ``held_request`` does not end while in ``hold()`` (the stand-in: a request that
    hangs; vLLM: any request, its scheduler paused). A long stream is no hold: next to a busy
    vLLM this VM stalls for seconds, and 1500 tokens were generated, relayed and done before
    the test looked (ximd never counted 2 in flight). Nor does a client that stops reading
    hold one: the router's socket buffer to it grows to megabytes and takes the whole answer.
    """
    async def scenario():
        c = node.async_client()
        # A request of the previous test may still hold a slot (a cancel or a done on its way):
        # a held request would then be the one refused.
        await node.wait_idle(timeout=30)
        async with hold():
            held = [asyncio.ensure_future(c.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True, **held_request)) for _ in range(node.max_concurrent)]
            try:
                await node.wait_in_flight(node.max_concurrent, timeout=60)
                extras = await asyncio.wait_for(asyncio.gather(*(
                    c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2) for _ in range(3)),
                    return_exceptions=True), timeout=60)                   # nothing hangs
                # Every slot was held throughout: no held request got an answer (a refusal
                # included), and ximd still counts them all.
                answered = [task.exception() or task.result() for task in held if task.done()]
                assert not answered, f"held requests were answered while held: {answered}"
                assert await node.in_flight() == node.max_concurrent
            finally:
                for task in held:
                    task.cancel()
                await asyncio.gather(*held, return_exceptions=True)
        await node.wait_idle(timeout=30)              # the cancelled held requests, before the one after
        await wait_for_gauge(node.engine_socket, 0, timeout=30)
        await c.close()
        return extras

    extras = asyncio.run(scenario())
    assert all(isinstance(e, openai.RateLimitError) and e.code == "at_capacity" for e in extras), \
        f"extras were not refused while every slot was held: {extras}"
    after = node.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert after.usage.completion_tokens == 2


def check_router_restart_mid_stream(node: ServedNode, long_request: dict) -> None:
    c = node.client()
    stream = c.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **long_request)
    iterator = iter(stream)
    next(iterator)
    t0 = time.monotonic()
    assert node.router.stop() == 0                 # SIGTERM ends the open stream, no SIGKILL needed
    assert time.monotonic() - t0 < 5
    with pytest.raises((openai.APIError, openai.APIConnectionError)):
        for _ in iterator:
            pass
    node.router.start()
    asyncio.run(wait_for_gauge(node.engine_socket, 0, timeout=20))   # ximd dropped the orphan
    node.wait_serving(timeout=60)                                   # the link came back by itself
    after = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert after.usage.completion_tokens == 3


def refused_while_draining(c: openai.OpenAI, timeout: float = 10) -> openai.APIStatusError:
    """The first refusal of a new request once the node drains (SIGTERM takes a moment to arrive)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
        except openai.APIStatusError as exc:
            return exc
        assert time.monotonic() < deadline, "the node kept taking new requests after SIGTERM"
        time.sleep(0.1)


def check_sigterm_lets_the_stream_finish(node: ServedNode, request: dict, tokens: int) -> None:
    c = node.client()
    stream = iter(c.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}, **request))
    chunks = [next(stream)]
    node.daemon.signal(signal.SIGTERM)
    t0 = time.monotonic()
    refusal = refused_while_draining(c)                    # no new work while draining ...
    assert refusal.status_code == 503, refusal
    chunks += list(stream)                                 # ... but the stream completes, no error
    assert chunks[-1].usage.completion_tokens == tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert node.daemon.wait(timeout=node.drain_grace_s + 30) == 0
    assert time.monotonic() - t0 < node.drain_grace_s + 30
    assert any(fields.get("STOPPING") == "1" for _, fields in node.daemon.notify.messages)


# ---------------------------------------------------------------- with the stand-in engine


def test_openai_client_through_router_and_daemon(node):
    check_openai_client_sync_and_async(node, tokens=6)
    metrics = node.metrics()
    assert 'ximd_requests_total{outcome="ok"}' in metrics
    assert "vllm:num_requests_running" in metrics            # the engine's series passed through


@pytest.mark.parametrize("node", [{"max_concurrent": 2}], indirect=True)
def test_more_requests_than_max_concurrent(node):
    check_extras_beyond_max_concurrent_are_refused(node, {"extra_body": {"x_standin": {"hang": True}}})


def test_client_disconnect_frees_the_engine_slot(node):
    check_disconnect_frees_the_engine_slot(node, {"max_tokens": 5000})


def test_router_restarted_mid_stream(node):
    check_router_restart_mid_stream(node, {"max_tokens": 5000})


@pytest.mark.parametrize("node", [{"vllm_args": "--standin-ttft-ms 5 --standin-tokens-per-s 25"}],
                         indirect=True)
def test_sigterm_during_a_stream_lets_it_finish(node):
    check_sigterm_lets_the_stream_finish(node, {"max_tokens": 50}, tokens=50)    # about 2 s


# ---------------------------------------------------------------- with real vLLM


@pytest.fixture(scope="module")
def vllm_node():
    python = engine_python()
    with short_tempdir("xv-") as root:
        served = ServedNode(root, python=dev_mode_python(python, root), model_dir=tiny_model(python),
                            max_concurrent=2, ready_timeout_s=600, event_loop=os.environ.get("XIM_TEST_LOOP", ""))
        try:
            yield served.start()
        finally:
            served.stop()


# Enough tokens at vLLM's ~250 tokens/s on this CPU to keep a stream open for a few seconds.
LONG = {"max_tokens": 1500, "extra_body": {"ignore_eos": True, "min_tokens": 1500}}


@pytest.mark.engine
def test_vllm_openai_client_through_router_and_daemon(vllm_node):
    check_openai_client_sync_and_async(vllm_node, tokens=8)
    assert "vllm:num_requests_running" in vllm_node.metrics()


@pytest.mark.engine
def test_vllm_client_disconnect_frees_the_engine_slot(vllm_node):
    check_disconnect_frees_the_engine_slot(vllm_node, LONG)


@pytest.mark.engine
def test_vllm_more_requests_than_max_concurrent(vllm_node):
    # The pause holds the requests, not their length: a short one costs nothing if it ever runs.
    check_extras_beyond_max_concurrent_are_refused(
        vllm_node, {"max_tokens": 8}, hold=lambda: generation_paused(vllm_node.engine_socket))


@pytest.mark.engine
def test_vllm_router_restarted_mid_stream(vllm_node):
    check_router_restart_mid_stream(vllm_node, LONG)


@pytest.mark.engine
def test_vllm_sigterm_during_a_stream_lets_it_finish(vllm_node):      # last: it stops the daemon
    check_sigterm_lets_the_stream_finish(vllm_node, {"max_tokens": 400, "extra_body": {
        "ignore_eos": True, "min_tokens": 400}}, tokens=400)
