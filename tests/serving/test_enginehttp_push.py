"""`Response.push`: a body handed to a sink in the read callback, against a scripted engine.

The engine is tests.serving.test_bridge_engine_faults' scripted unix-socket server;
the client, its connection and the socket are the real ones. The bridge's use of
push mode is in tests/serving/test_bridge_push.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.serving.test_bridge import run
from tests.serving.test_bridge_engine_faults import SSE_HEAD, Script, ScriptedEngine, chunk, read_request
from ximd.enginehttp import Broken, EngineClient, ProtocolError, Response


@contextlib.asynccontextmanager
async def answer(path: Path, script: Script) -> AsyncIterator[tuple[ScriptedEngine, EngineClient, Response]]:
    """A request to an engine running ``script``: the engine, the client and the response
    (closed at the end, unless released before)."""
    async with ScriptedEngine(path, script) as engine:
        client = EngineClient(engine.socket_path)
        response = await client.request("POST", "/v1/chat/completions", b"{}")
        try:
            yield engine, client, response
        finally:
            response.close()
            client.close()


def test_a_pushed_body_reaches_the_sink_read_by_read_and_ends_pushed(tmp_path):
    async def script(reader, writer):
        while await read_request(reader) is not None:
            writer.write(SSE_HEAD + chunk(b"one"))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(chunk(b"two"))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(chunk(b"three") + b"0\r\n\r\n")

    async def scenario():
        async with answer(tmp_path / "e.sock", script) as (engine, client, response):
            got: list[bytes] = []
            response.push(got.append)
            ended = await response.pushed()
            response.release()
            again = await client.request("POST", "/v1/chat/completions", b"{}")   # the same connection
            again.close()
            return got, ended, engine.connections

    got, ended, connections = run(scenario())
    assert ended is True
    assert b"".join(got) == b"onetwothree" and len(got) >= 3, got       # handed on as it came
    assert connections == 1, "a fully pushed body returns its connection to the pool"


def test_what_arrived_before_push_goes_to_the_sink_at_once(tmp_path):
    async def script(reader, writer):
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(b"early") + b"0\r\n\r\n")
        await reader.read()

    async def scenario():
        async with answer(tmp_path / "e.sock", script) as (engine, client, response):
            await asyncio.sleep(0.1)                   # the whole body is buffered by now
            got: list[bytes] = []
            response.push(got.append)
            delivered_by_push = list(got)
            ended = await response.pushed()
            return delivered_by_push, ended

    delivered, ended = run(scenario())
    assert delivered == [b"early"] and ended is True


def test_pause_stops_reading_so_the_engine_blocks_and_resume_goes_on(tmp_path):
    written: list[int] = []
    piece = chunk(b"x" * 16384)

    async def endless(reader, writer):
        await read_request(reader)
        writer.write(SSE_HEAD)
        while True:
            writer.write(piece)
            await writer.drain()
            written.append(len(piece))

    async def scenario():
        async with answer(tmp_path / "e.sock", endless) as (engine, client, response):
            got: list[bytes] = []

            def sink(data: bytes) -> None:
                got.append(data)
                response.pause()                   # at once: as a relay out of credit does

            response.push(sink)
            assert await response.pushed() is False          # woken by the pause
            await asyncio.sleep(0.5)
            stalled = sum(written)
            reads_while_paused = len(got)
            await asyncio.sleep(0.3)
            assert sum(written) == stalled, "the engine kept writing to a paused response"
            assert len(got) == reads_while_paused == 1
            response.resume()
            assert await response.pushed() is False          # the next read paused it again
            return len(got), stalled

    reads, stalled = run(scenario())
    assert reads == 2
    assert stalled < 8 * 1024 * 1024


def test_an_exception_from_the_sink_is_raised_by_pushed_and_drops_the_connection(tmp_path):
    seen_by_loop: list[dict] = []

    async def script(reader, writer):
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(b"boom"))
        await writer.drain()
        await reader.read()                        # until the client hangs up

    async def scenario():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: seen_by_loop.append(context))
        async with answer(tmp_path / "e.sock", script) as (engine, client, response):

            def sink(data: bytes) -> None:
                raise ValueError(f"cannot take {data!r}")

            response.push(sink)
            with pytest.raises(ValueError, match="cannot take"):
                await response.pushed()
            await asyncio.wait_for(engine.closed.wait(), 5)      # the engine saw the hang-up
            response.release()                     # a failed exchange is never pooled

    run(scenario())
    assert seen_by_loop == []


def test_the_engine_dying_mid_body_is_raised_after_the_sink_had_what_came_before(tmp_path):
    async def script(reader, writer):
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(b"whole"))
        cut = chunk(b"cut short")
        writer.write(cut[:len(cut) // 2])
        await writer.drain()

    async def scenario():
        async with answer(tmp_path / "e.sock", script) as (engine, client, response):
            got: list[bytes] = []
            response.push(got.append)
            with pytest.raises(Broken, match="mid-answer"):
                await response.pushed()
            return b"".join(got)

    assert run(scenario()).startswith(b"whole")


def test_a_paused_response_hands_over_its_failure_only_after_resume(tmp_path):
    """The relay sends what it kept before it learns that the engine failed."""
    async def script(reader, writer):
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(b"ok") + b"not-hex\r\n")
        await reader.read()

    async def scenario():
        async with answer(tmp_path / "e.sock", script) as (engine, client, response):
            got: list[bytes] = []

            def sink(data: bytes) -> None:
                got.append(data)
                response.pause()

            response.push(sink)
            first = await response.pushed()
            response.resume()
            with pytest.raises(ProtocolError, match="chunk size"):
                await response.pushed()
            return first, got

    first, got = run(scenario())
    assert first is False and got == [b"ok"]
