"""The bridge against a real engine process (the paced stand-in) over its unix socket.

The link is the one seam replaced: ``send`` collects the frames the bridge
would put on the mesh, and the test plays the router (credits, cancels).
Every frame is run through the real codec, so what is asserted is what
would travel.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from tests.support.standin_engine import engine_gauge, wait_for_gauge
from xim_proto import codec
from ximd.serve import Bridge

CHAT = "chat.completions"


def run(coro, timeout: float = 30):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


class Wire:
    """What the bridge sent, decoded again by the real codec."""

    def __init__(self, fail: bool = False):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.fail = fail

    async def send(self, msg: codec.Message) -> None:
        if self.fail:
            raise ConnectionError("link down")
        await self.queue.put(codec.decode(codec.encode(msg), sender=codec.AGENT))

    async def next(self, timeout: float = 10) -> codec.Message:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def until_end(self, request_id: str, timeout: float = 10) -> list[codec.Message]:
        out = []
        while True:
            msg = await self.next(timeout)
            if getattr(msg, "id", None) == request_id:
                out.append(msg)
                if isinstance(msg, (codec.Done, codec.Error)):
                    return out


def infer(request_id: str, *, endpoint: str = CHAT, stream: bool = True, credit: int = 64,
          deadline_s: float = 30, model: str = "tiny", **body) -> codec.Infer:
    payload = {"model": model, "max_tokens": 8, "stream": stream, **body}
    if endpoint == CHAT:
        payload.setdefault("messages", [{"role": "user", "content": "say something"}])
    else:
        payload.setdefault("prompt", "say something")
    return codec.Infer(id=request_id, model=model, endpoint=endpoint,
                       body=json.dumps(payload).encode(), stream=stream, deadline_s=deadline_s,
                       credit=credit)


async def started(engine, wire: Wire, **kwargs) -> Bridge:
    kwargs.setdefault("max_concurrent", 8)
    bridge = Bridge(engine.socket_path, send=wire.send, **kwargs)
    await bridge.start()
    return bridge


async def one_request(engine, msg: codec.Infer, **bridge_options) -> list[codec.Message]:
    """Start a bridge, run ``msg`` to its done/error, return the frames for it."""
    wire = Wire()
    bridge = await started(engine, wire, **bridge_options)
    try:
        await bridge.handle(msg)
        return await wire.until_end(msg.id)
    finally:
        await bridge.close()


async def wait_idle(bridge: Bridge, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while bridge.running and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def payloads(messages: list[codec.Message]) -> list[dict]:
    return [json.loads(p) for m in messages if isinstance(m, codec.Chunk) for p in m.data]


# ---------------------------------------------------------------- happy paths


def test_streamed_chat_passes_the_engines_chunks_through_and_ends_with_usage(engine):
    async def scenario():
        wire = Wire()
        bridge = await started(engine, wire)
        try:
            await bridge.handle(infer("r1"))
            messages = await wire.until_end("r1")
        finally:
            await bridge.close()
        return messages, bridge

    messages, bridge = run(scenario())
    done = messages[-1]
    assert isinstance(done, codec.Done), messages
    chunks = payloads(messages)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(text.split()) == 8
    assert all(c["choices"] for c in chunks), "the usage-only chunk must travel in done, not as a chunk"
    assert [m.seq for m in messages if isinstance(m, codec.Chunk)] == list(
        range(sum(isinstance(m, codec.Chunk) for m in messages)))
    assert done.finish_reason == "length"
    assert done.usage == codec.Usage(prompt_tokens=2, completion_tokens=8, total_tokens=10)
    assert json.loads(done.body)["choices"] == []          # the engine's own usage chunk
    assert bridge.metrics.requests_by_outcome == {"ok": 1}
    assert bridge.metrics.completion_tokens == 8
    assert bridge.metrics.first_tokens == 1
    assert bridge.running == 0


def test_non_streamed_completion_comes_back_whole_in_done(engine):
    messages = run(one_request(engine, infer("r2", endpoint="completions", stream=False)))
    assert len(messages) == 1 and isinstance(messages[0], codec.Done)
    body = json.loads(messages[0].body)
    assert body["object"] == "text_completion"
    assert len(body["choices"][0]["text"].split()) == 8
    assert messages[0].usage.completion_tokens == 8
    assert messages[0].finish_reason == "length"


def test_a_non_streamed_answer_longer_than_one_read_comes_back_whole(engine):
    msg = infer("r2b", endpoint="completions", stream=False, max_tokens=30000,
                x_standin={"ttft_ms": 0, "tokens_per_s": 1e7})
    done = run(one_request(engine, msg))[-1]
    assert isinstance(done, codec.Done), done
    assert len(done.body) > 100_000
    assert len(json.loads(done.body)["choices"][0]["text"].split()) == 30000


def test_ready_events_are_coalesced_into_one_frame(engine):
    """With one credit the bridge sends one frame and stops reading; what piles up meanwhile
    leaves as a single frame when the next credit comes."""
    async def scenario():
        wire = Wire()
        bridge = await started(engine, wire)
        try:
            await bridge.handle(infer("r3", credit=1, max_tokens=40,
                                      x_standin={"ttft_ms": 0, "tokens_per_s": 2000}))
            first = await wire.next()
            await asyncio.sleep(0.3)            # 40 tokens at 2000/s are ready by now
            assert wire.queue.empty(), "the bridge sent without credit"
            await bridge.handle(codec.Credit(id="r3", n=10))
            rest = await wire.until_end("r3")
            return [first, *rest]
        finally:
            await bridge.close()

    messages = run(scenario())
    chunks = [m for m in messages if isinstance(m, codec.Chunk)]
    assert len(chunks[0].data) >= 1
    assert len(chunks[1].data) >= 30, [len(c.data) for c in chunks]
    assert len(payloads(messages)) == 41                      # role + 40 tokens
    assert isinstance(messages[-1], codec.Done)


# ---------------------------------------------------------------- limits, cancel, credits


def test_out_of_credit_the_bridge_waits_and_a_cancel_frees_the_engine_slot(engine):
    async def scenario():
        wire = Wire()
        bridge = await started(engine, wire)
        try:
            await bridge.handle(infer("r4", credit=1, max_tokens=2000))
            assert isinstance(await wire.next(), codec.Chunk)
            await wait_for_gauge(engine.socket_path, 1)
            await asyncio.sleep(0.5)
            assert wire.queue.empty()                   # no credit, no frames
            assert await engine_gauge(engine.socket_path) == 1
            await bridge.handle(codec.Cancel(id="r4"))
            await wait_for_gauge(engine.socket_path, 0)   # the engine aborted the request
            await wait_idle(bridge)
            return bridge
        finally:
            await bridge.close()

    bridge = run(scenario())
    assert bridge.running == 0
    assert bridge.metrics.requests_by_outcome == {"cancelled": 1}


def test_requests_beyond_max_concurrent_get_an_immediate_retryable_at_capacity(engine):
    async def scenario():
        wire = Wire()
        bridge = await started(engine, wire, max_concurrent=2)
        try:
            for i in range(2):
                await bridge.handle(infer(f"slow{i}", x_standin={"hang": True}))
            t0 = time.monotonic()
            await bridge.handle(infer("extra"))
            error = await wire.next(timeout=2)
            refused_in = time.monotonic() - t0
            for i in range(2):
                await bridge.handle(codec.Cancel(id=f"slow{i}"))
            await wait_for_gauge(engine.socket_path, 0)
            return error, refused_in
        finally:
            await bridge.close()

    error, refused_in = run(scenario())
    assert isinstance(error, codec.Error) and error.id == "extra"
    assert (error.code, error.retryable, error.http_status) == ("at_capacity", True, 429)
    assert refused_in < 0.5


def test_credit_starvation_times_out_instead_of_holding_the_slot(engine):
    messages = run(one_request(engine, infer("r5", credit=1, max_tokens=500), credit_timeout_s=0.5))
    assert messages[-1].code == "timeout" and "credit" in messages[-1].message


def test_deadline_gives_a_timeout_error_and_frees_the_slot(engine):
    async def scenario():
        wire = Wire()
        bridge = await started(engine, wire)
        try:
            await bridge.handle(infer("r6", deadline_s=0.5, stream=False, x_standin={"hang": True}))
            messages = await wire.until_end("r6")
            await wait_for_gauge(engine.socket_path, 0)
            return messages, bridge.running
        finally:
            await bridge.close()

    messages, running = run(scenario())
    assert (messages[-1].code, messages[-1].http_status) == ("timeout", 504)
    assert running == 0


def test_a_link_that_refuses_frames_abandons_the_request_and_frees_the_engine(engine):
    async def scenario():
        wire = Wire(fail=True)
        bridge = await started(engine, wire)
        try:
            await bridge.handle(infer("r7", max_tokens=2000))
            await wait_idle(bridge)
            await wait_for_gauge(engine.socket_path, 0)
            return bridge
        finally:
            await bridge.close()

    bridge = run(scenario())
    assert bridge.running == 0
    assert bridge.metrics.requests_by_outcome == {"link_lost": 1}


def test_lease_ack_naming_a_request_stale_cancels_it(engine):
    async def scenario():
        wire = Wire()
        bridge = await started(engine, wire)
        try:
            await bridge.handle(infer("r8", x_standin={"hang": True}))
            await wait_for_gauge(engine.socket_path, 1)
            await bridge.handle(codec.LeaseAck(seq=1, stale=["r8"]))
            await wait_for_gauge(engine.socket_path, 0)
        finally:
            await bridge.close()

    run(scenario())


# ---------------------------------------------------------------- engine errors


@pytest.mark.parametrize("status, code, http", [
    (500, "internal", 500), (503, "engine_unavailable", 503), (400, "bad_request", 400),
])
def test_engine_http_errors_map_to_protocol_errors(engine, status, code, http):
    error = run(one_request(engine, infer("e1", x_standin={"fail_status": status})))[-1]
    assert (error.code, error.http_status) == (code, http)
    assert f"HTTP {status}" in error.message and "told to fail" in error.message


def test_unknown_model_at_the_engine_is_model_not_found(engine):
    error = run(one_request(engine, infer("e2", model="nope")))[-1]
    assert (error.code, error.http_status, error.retryable) == ("model_not_found", 404, False)
    assert "nope" in error.message


def test_models_the_node_does_not_serve_are_refused_before_the_engine(engine):
    error = run(one_request(engine, infer("e3", model="other"), models=lambda: {"tiny"}))[-1]
    assert error.code == "model_not_found" and "serving: tiny" in error.message


def test_an_engine_that_is_not_there_is_engine_unavailable(tmp_path):
    class Missing:
        socket_path = tmp_path / "absent.sock"

    error = run(one_request(Missing, infer("e4")))[-1]
    assert (error.code, error.retryable, error.http_status) == ("engine_unavailable", True, 503)
    assert "absent.sock" in error.message


def test_an_engine_that_drops_the_stream_is_engine_unavailable(engine):
    messages = run(one_request(engine, infer("e5", x_standin={"fail_after_tokens": 3})))
    assert len(payloads(messages)) >= 1
    assert messages[-1].code == "engine_unavailable"


def test_unhealthy_engine_and_unknown_endpoint_are_refused(engine):
    async def scenario():
        wire = Wire()
        bridge = await started(engine, wire, engine_ready=lambda: False)
        try:
            await bridge.handle(infer("e6"))
            first = await wire.next()
            bridge.engine_ready = None
            await bridge.handle(infer("e7", endpoint="embeddings"))
            return first, await wire.next()
        finally:
            await bridge.close()

    unhealthy, unknown = run(scenario())
    assert unhealthy.code == "engine_unavailable"
    assert unknown.code == "bad_request" and "embeddings" in unknown.message


# ---------------------------------------------------------------- drain


def test_drain_lets_in_flight_requests_finish_and_refuses_new_ones(engine):
    async def scenario():
        wire = Wire()
        bridge = await started(engine, wire)
        try:
            await bridge.handle(infer("d1", max_tokens=40, x_standin={"tokens_per_s": 100}))
            drained = asyncio.ensure_future(bridge.drain(10))
            await asyncio.sleep(0.05)
            await bridge.handle(infer("d2"))
            messages = []
            while not drained.done() or not wire.queue.empty():
                try:
                    messages.append(await wire.next(timeout=0.2))
                except TimeoutError:
                    pass
            return messages, drained.result()
        finally:
            await bridge.close()

    messages, cancelled = run(scenario())
    assert cancelled == 0
    refused = [m for m in messages if isinstance(m, codec.Error)]
    assert [(m.id, m.code, m.retryable) for m in refused] == [("d2", "draining", True)]
    assert any(isinstance(m, codec.Done) and m.id == "d1" for m in messages)


def test_drain_cancels_what_is_left_after_the_grace(engine):
    async def scenario():
        wire = Wire()
        bridge = await started(engine, wire)
        try:
            await bridge.handle(infer("d3", x_standin={"hang": True}))
            await wait_for_gauge(engine.socket_path, 1)
            t0 = time.monotonic()
            cancelled = await bridge.drain(0.5)
            took = time.monotonic() - t0
            await wait_for_gauge(engine.socket_path, 0)
            messages = [wire.queue.get_nowait() for _ in range(wire.queue.qsize())]
            return cancelled, took, messages
        finally:
            await bridge.close()

    cancelled, took, messages = run(scenario())
    assert cancelled == 1 and took < 3
    errors = [m for m in messages if isinstance(m, codec.Error)]
    assert [(m.id, m.code) for m in errors] == [("d3", "draining")]


# ---------------------------------------------------------------- logging


def test_log_records_carry_the_request_id(engine, caplog):
    async def scenario():
        wire = Wire()
        bridge = await started(engine, wire)
        try:
            await bridge.handle(infer("logged-1", x_standin={"fail_status": 500}))
            await wire.until_end("logged-1")
        finally:
            await bridge.close()

    with caplog.at_level(logging.INFO, logger="ximd.serve"):
        run(scenario())
    tagged = [r for r in caplog.records if getattr(r, "fields", {}).get("XIM_REQUEST_ID") == "logged-1"]
    assert tagged and "HTTP 500" in tagged[0].getMessage()
