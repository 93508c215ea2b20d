"""The bridge relaying streamed answers in push mode: frames leave from the engine's read
callback through the link's non-waiting send (`try_send`), the request's task takes over
only when credit runs out or the link is full.

The wire is tests.serving.test_bridge's, with a ``try_send`` whose room the test sets
(MeshLink's outbox); its ``send`` waits for room as the link's does. The engines are the
paced stand-in and the scripted one of test_bridge_engine_faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from bench.standin_engine import WORDS
from tests.serving.test_bridge import Wire, infer, payloads, run, wait_idle
from tests.serving.test_bridge_engine_faults import (
    DONE,
    SSE_HEAD,
    USAGE,
    ScriptedEngine,
    chunk,
    event,
    read_request,
)
from tests.support.standin_engine import wait_for_gauge
from xim_proto import codec
from ximd.serve import Bridge


class PushWire(Wire):
    """A wire with the link's non-waiting send. ``room``: frames the outbox takes before it is
    full (None: no limit); the waiting ``send`` waits until `make_room()`."""

    def __init__(self, room: int | None = None, fail: bool = False):
        super().__init__(fail=fail)
        self.room = room
        self.pushed = 0                     # frames that went through try_send
        self.waited = 0                     # frames that went through the waiting send
        self._roomy = asyncio.Event()

    def try_send(self, msg: codec.Message) -> bool:
        if self.fail:
            raise ConnectionError("link down")
        if self.room is not None:
            if self.room <= 0:
                return False
            self.room -= 1
        self.queue.put_nowait(codec.decode(codec.encode(msg), sender=codec.AGENT))
        self.pushed += 1
        return True

    async def send(self, msg: codec.Message) -> None:
        while self.room is not None and self.room <= 0 and not self.fail:
            self._roomy.clear()
            await self._roomy.wait()
        self.waited += 1
        await super().send(msg)

    def make_room(self) -> None:
        self.room = None
        self._roomy.set()


@contextlib.asynccontextmanager
async def pushing(engine, wire: Wire, **kwargs) -> AsyncIterator[Bridge]:
    """A started bridge on ``engine`` that pushes through ``wire`` (waits only, for a plain Wire)."""
    kwargs.setdefault("max_concurrent", 8)
    bridge = Bridge(engine.socket_path, send=wire.send, try_send=getattr(wire, "try_send", None), **kwargs)
    await bridge.start()
    try:
        yield bridge
    finally:
        await bridge.close()


def chunk_seqs(messages: list[codec.Message]) -> list[int]:
    return [m.seq for m in messages if isinstance(m, codec.Chunk)]


def contents(messages: list[codec.Message]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in payloads(messages))


# ---------------------------------------------------------------- the fast path


def test_with_credit_and_room_every_frame_leaves_from_the_read_callback(engine):
    async def scenario():
        wire = PushWire()
        async with pushing(engine, wire) as bridge:
            await bridge.handle(infer("p1", max_tokens=16))
            messages = await wire.until_end("p1")
            await wait_idle(bridge)
            return messages, wire, bridge

    messages, wire, bridge = run(scenario())
    done = messages[-1]
    assert isinstance(done, codec.Done), messages
    chunks = [m for m in messages if isinstance(m, codec.Chunk)]
    assert (wire.pushed, wire.waited) == (len(chunks), 1)        # the task sent only the done
    assert chunk_seqs(messages) == list(range(len(chunks)))
    assert len(contents(messages).split()) == 16
    assert all(c["choices"] for c in payloads(messages)), "the usage-only chunk travels in done"
    assert done.finish_reason == "length" and done.usage.completion_tokens == 16
    assert json.loads(done.body)["choices"] == []
    assert bridge.metrics.first_tokens == 1
    assert bridge.metrics.requests_by_outcome == {"ok": 1}


def test_push_and_the_waiting_way_send_the_same_frames(tmp_path):
    """One scripted answer, read by a bridge that pushes and by one that cannot (no try_send)."""
    answer = SSE_HEAD + chunk(event("a") + event("b")) + chunk(event("c", "stop")) + chunk(USAGE) \
        + chunk(DONE) + b"0\r\n\r\n"

    async def script(reader, writer):
        while await read_request(reader) is not None:
            writer.write(answer)
            await writer.drain()

    async def frames(push: bool):
        async with ScriptedEngine(tmp_path / f"{push}.sock", script) as engine:
            wire = PushWire() if push else Wire()
            async with pushing(engine, wire) as bridge:
                await bridge.handle(infer("same"))
                return await wire.until_end("same")

    pushed, waited = run(frames(True)), run(frames(False))
    assert pushed == waited
    assert contents(pushed) == "abc" and pushed[-1].usage.total_tokens == 3


# ---------------------------------------------------------------- credit


def test_credit_exhausted_mid_stream_pauses_and_the_rest_leaves_coalesced_once_granted(engine):
    async def scenario():
        wire = PushWire()
        async with pushing(engine, wire) as bridge:
            await bridge.handle(infer("c1", credit=2, max_tokens=40,
                                      x_standin={"ttft_ms": 0, "tokens_per_s": 2000}))
            first = [await wire.next(), await wire.next()]
            await asyncio.sleep(0.3)                # the 40 tokens are ready by now
            assert wire.queue.empty(), "the bridge sent without credit"
            await bridge.handle(codec.Credit(id="c1", n=10))
            rest = await wire.until_end("c1")
            return [*first, *rest], wire

    messages, wire = run(scenario())
    chunks = [m for m in messages if isinstance(m, codec.Chunk)]
    assert len(payloads(messages)) == 41                       # role + 40 tokens, none lost
    assert len(chunks[2].data) >= 30, [len(c.data) for c in chunks]
    assert chunk_seqs(messages) == list(range(len(chunks)))
    assert isinstance(messages[-1], codec.Done)
    assert wire.pushed >= 2                                   # the first frames took the fast path


def test_credit_never_granted_ends_in_the_credit_timeout(engine):
    async def scenario():
        wire = PushWire()
        async with pushing(engine, wire, credit_timeout_s=0.5) as bridge:
            await bridge.handle(infer("c2", credit=1, max_tokens=500))
            messages = await wire.until_end("c2")
            await wait_for_gauge(engine.socket_path, 0)         # the engine aborted the request
            return messages, bridge

    messages, bridge = run(scenario())
    assert len(chunk_seqs(messages)) == 1
    error = messages[-1]
    assert isinstance(error, codec.Error) and error.code == "timeout" and "credit" in error.message
    assert bridge.metrics.requests_by_outcome == {"timeout": 1}


# ---------------------------------------------------------------- the link


def test_a_full_outbox_keeps_the_frames_in_order_until_it_drains(engine):
    async def scenario():
        wire = PushWire(room=2)
        async with pushing(engine, wire) as bridge:
            await bridge.handle(infer("o1", max_tokens=30, x_standin={"ttft_ms": 0, "tokens_per_s": 1000}))
            first = [await wire.next(), await wire.next()]
            await asyncio.sleep(0.2)
            assert wire.queue.empty(), "a frame went past a full outbox"
            wire.make_room()
            rest = await wire.until_end("o1")
            return [*first, *rest], wire

    messages, wire = run(scenario())
    assert len(payloads(messages)) == 31
    assert chunk_seqs(messages) == list(range(len(chunk_seqs(messages))))
    assert contents(messages).split() == [WORDS[i % len(WORDS)] for i in range(30)]    # in order
    assert isinstance(messages[-1], codec.Done)
    assert wire.waited >= 2                                   # the kept frame, then the done


def test_a_link_that_refuses_the_pushed_frame_abandons_the_request_and_frees_the_engine(engine):
    async def scenario():
        wire = PushWire()
        async with pushing(engine, wire) as bridge:
            await bridge.handle(infer("l1", max_tokens=2000))
            await wire.next()                                   # some frames went; then the link drops
            wire.fail = True
            await wait_idle(bridge)
            await wait_for_gauge(engine.socket_path, 0)
            return bridge

    bridge = run(scenario())
    assert bridge.running == 0
    assert bridge.metrics.requests_by_outcome == {"link_lost": 1}


# ---------------------------------------------------------------- the engine, cancel


def test_an_engine_dying_mid_push_sends_what_came_then_engine_unavailable(tmp_path):
    async def script(reader, writer):
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(event("a")))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(chunk(event("b")))
        cut = chunk(event("never"))
        writer.write(cut[:len(cut) // 2])
        await writer.drain()

    async def scenario():
        async with ScriptedEngine(tmp_path / "e.sock", script) as engine:
            wire = PushWire()
            async with pushing(engine, wire) as bridge:
                await bridge.handle(infer("x1"))
                return await wire.until_end("x1"), wire

    messages, wire = run(scenario())
    assert contents(messages) == "ab" and wire.pushed == 2
    error = messages[-1]
    assert isinstance(error, codec.Error), messages
    assert error.code == "engine_unavailable" and "closed the connection mid-answer" in error.message


def test_an_engine_dying_while_the_outbox_is_full_sends_the_kept_frames_first(tmp_path):
    async def script(reader, writer):
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(event("a")))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(chunk(event("b")) + b"not-hex\r\n")
        await reader.read()

    async def scenario():
        async with ScriptedEngine(tmp_path / "e.sock", script) as engine:
            wire = PushWire(room=1)
            async with pushing(engine, wire) as bridge:
                await bridge.handle(infer("x2"))
                first = await wire.next()
                await asyncio.sleep(0.2)
                wire.make_room()
                return [first, *await wire.until_end("x2")]

    messages = run(scenario())
    assert contents(messages) == "ab"
    assert messages[-1].code == "engine_unavailable" and "chunk size" in messages[-1].message


def test_a_cancel_while_paused_closes_the_engine_connection_and_sends_nothing_more(engine):
    async def scenario():
        wire = PushWire(room=1)
        async with pushing(engine, wire) as bridge:
            await bridge.handle(infer("k1", max_tokens=2000))
            assert isinstance(await wire.next(), codec.Chunk)
            await wait_for_gauge(engine.socket_path, 1)
            await asyncio.sleep(0.2)                            # paused on the full outbox
            await bridge.handle(codec.Cancel(id="k1"))
            await wait_for_gauge(engine.socket_path, 0)         # the engine aborted the request
            await wait_idle(bridge)
            wire.make_room()
            await asyncio.sleep(0.1)
            return wire, bridge

    wire, bridge = run(scenario())
    assert wire.queue.empty(), "frames after the cancel"
    assert bridge.running == 0
    assert bridge.metrics.requests_by_outcome == {"cancelled": 1}


def test_a_deadline_mid_push_is_a_timeout_error_and_frees_the_engine(engine):
    async def scenario():
        wire = PushWire()
        async with pushing(engine, wire) as bridge:
            await bridge.handle(infer("t1", deadline_s=0.5, max_tokens=2000))
            messages = await wire.until_end("t1")
            await wait_for_gauge(engine.socket_path, 0)         # the engine aborted the request
            return messages, wire, bridge

    messages, wire, bridge = run(scenario())
    assert wire.pushed >= 1, "the stream was on the fast path when the deadline passed"
    assert (messages[-1].code, messages[-1].http_status) == ("timeout", 504)
    assert bridge.metrics.requests_by_outcome == {"timeout": 1}
