"""The bridge against engines that misbehave at the HTTP level, and its connection pool.

The engine here is a scripted server on a real unix socket (asyncio's own
server): each connection runs a script that reads the bridge's request and
writes exactly the bytes the test wants — a stream cut mid-chunk, garbage,
``Connection: close``, a close while idle. The bridge, its HTTP client and
the socket are the real ones; ``send`` collects the frames (tests.serving.test_bridge.Wire).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

from tests.serving.test_bridge import Wire, infer, payloads, run, started
from xim_proto import codec
from ximd.serve import Bridge

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n")


def event(text: str, finish: str | None = None) -> bytes:
    chunk = {"object": "chat.completion.chunk",
             "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\n'
DONE = b"data: [DONE]\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def whole_stream(*, close: bool = False) -> bytes:
    head = SSE_HEAD.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n") if close else SSE_HEAD
    return head + chunk(event("a")) + chunk(event("b", "stop")) + chunk(USAGE) + chunk(DONE) + b"0\r\n\r\n"


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request (head and body) off the connection; None when the bridge closed it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


class ScriptedEngine:
    """A unix-socket server whose every connection runs ``script``; counts connections."""

    def __init__(self, path, script: Script):
        self.socket_path = path
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()            # set whenever a connection's script ended

    async def __aenter__(self) -> ScriptedEngine:
        self.server = await asyncio.start_unix_server(self._handle, str(self.socket_path))
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.closed.set()


def serve_each_request(answer: bytes) -> Script:
    """A keep-alive engine: ``answer`` to every request on the connection, until the bridge closes it."""
    async def script(reader, writer):
        while await read_request(reader) is not None:
            writer.write(answer)
            await writer.drain()
    return script


@contextlib.asynccontextmanager
async def bridged(engine: ScriptedEngine) -> AsyncIterator[tuple[Bridge, Wire]]:
    """A started bridge on ``engine`` and the wire it sends on; closed at the end."""
    wire = Wire()
    bridge = await started(engine, wire)
    try:
        yield bridge, wire
    finally:
        await bridge.close()


async def exchange(engine: ScriptedEngine, *messages: codec.Infer) -> list[list[codec.Message]]:
    """Run ``messages`` one after the other through one bridge; the frames of each."""
    async with bridged(engine) as (bridge, wire):
        out = []
        for msg in messages:
            await bridge.handle(msg)
            out.append(await wire.until_end(msg.id))
        return out


def one(tmp_path, script: Script, msg: codec.Infer | None = None) -> list[codec.Message]:
    async def scenario():
        async with ScriptedEngine(tmp_path / "engine.sock", script) as engine:
            return (await exchange(engine, msg or infer("f1")))[0]
    return run(scenario())


# ---------------------------------------------------------------- broken answers


def test_an_engine_that_closes_mid_chunk_is_engine_unavailable_after_what_was_complete(tmp_path):
    async def script(reader, writer):
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(event("whole")))
        cut = chunk(event("cut"))
        writer.write(cut[:len(cut) // 2])
        await writer.drain()

    messages = one(tmp_path, script)
    assert [p["choices"][0]["delta"]["content"] for p in payloads(messages)] == ["whole"]
    error = messages[-1]
    assert isinstance(error, codec.Error), messages
    assert (error.code, error.retryable) == ("engine_unavailable", True)
    assert "closed the connection mid-answer" in error.message


def test_an_engine_that_answers_garbage_is_engine_unavailable(tmp_path):
    async def script(reader, writer):
        await read_request(reader)
        writer.write(b"this is not HTTP at all\r\n\r\n")
        await reader.read()                      # wait for the bridge to hang up

    error = one(tmp_path, script)[-1]
    assert (error.code, error.http_status) == ("engine_unavailable", 503)
    assert "not HTTP" in error.message


def test_garbage_in_the_chunked_body_is_engine_unavailable(tmp_path):
    async def script(reader, writer):
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(event("ok")) + b"not-hex\r\n")
        await reader.read()

    messages = one(tmp_path, script)
    assert len(payloads(messages)) == 1
    assert messages[-1].code == "engine_unavailable" and "chunk size" in messages[-1].message


def test_an_engine_that_closes_without_answering_is_engine_unavailable(tmp_path):
    async def script(reader, writer):
        await read_request(reader)

    error = one(tmp_path, script)[-1]
    assert error.code == "engine_unavailable" and "before answering" in error.message


def test_a_socket_nobody_listens_on_is_engine_unavailable(tmp_path):
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))                    # the file exists; connecting is refused

        async def scenario():
            return (await exchange(ScriptedEngine(path, serve_each_request(b"")), infer("f2")))[0]
        error = run(scenario())[-1]
    assert (error.code, error.retryable) == ("engine_unavailable", True)
    assert "cannot reach the engine" in error.message and "dead.sock" in error.message


def test_an_engine_error_with_connection_close_keeps_its_status(tmp_path):
    # What uvicorn sends when the app raised before answering.
    answer = (b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain; charset=utf-8\r\n"
              b"content-length: 21\r\nconnection: close\r\n\r\nInternal Server Error")
    error = one(tmp_path, serve_each_request(answer))[-1]
    assert (error.code, error.http_status) == ("internal", 500)
    assert error.message == "engine answered HTTP 500: Internal Server Error"


# ---------------------------------------------------------------- the pool


def test_connections_are_reused_unless_the_engine_says_connection_close(tmp_path):
    async def scenario(close: bool):
        async with ScriptedEngine(tmp_path / f"{close}.sock", serve_each_request(whole_stream(close=close))) as engine:
            answers = await exchange(engine, infer("p1"), infer("p2"), infer("p3"))
            return answers, engine.connections

    for close, connections in ((False, 1), (True, 3)):
        answers, seen = run(scenario(close))
        for messages in answers:
            done = messages[-1]
            assert isinstance(done, codec.Done), messages
            assert done.finish_reason == "stop" and done.usage.total_tokens == 3
        assert seen == connections, f"close={close}"


def test_a_pooled_connection_the_engine_closed_while_idle_is_replaced(tmp_path):
    async def one_answer_then_close(reader, writer):
        await read_request(reader)
        writer.write(whole_stream())
        await writer.drain()
        await asyncio.sleep(0.1)                 # idle in the bridge's pool, then closed

    async def scenario():
        async with ScriptedEngine(tmp_path / "engine.sock", one_answer_then_close) as engine, \
                bridged(engine) as (bridge, wire):
            answers = []
            for rid in ("i1", "i2"):
                engine.closed.clear()
                await bridge.handle(infer(rid))
                answers.append(await wire.until_end(rid))
                await asyncio.wait_for(engine.closed.wait(), 5)
            return answers, engine.connections

    answers, connections = run(scenario())
    assert all(isinstance(messages[-1], codec.Done) for messages in answers), answers
    assert connections == 2


def test_a_cancelled_request_drops_its_connection_and_the_next_gets_a_fresh_one(tmp_path):
    async def script(reader, writer):
        while (request := await read_request(reader)) is not None:
            if b"hang" in request:
                writer.write(SSE_HEAD + chunk(event("x")))
                await writer.drain()
                await reader.read()              # until the bridge hangs up
                return
            writer.write(whole_stream())

    async def scenario():
        async with ScriptedEngine(tmp_path / "engine.sock", script) as engine, bridged(engine) as (bridge, wire):
            await bridge.handle(infer("c1", hang=True))
            assert isinstance(await wire.next(), codec.Chunk)
            engine.closed.clear()
            await bridge.handle(codec.Cancel(id="c1"))
            await asyncio.wait_for(engine.closed.wait(), 5)   # the engine saw the hang-up
            await bridge.handle(infer("c2"))
            return await wire.until_end("c2"), engine.connections

    messages, connections = run(scenario())
    assert isinstance(messages[-1], codec.Done) and connections == 2


def test_out_of_credit_the_bridge_stops_reading_so_the_engine_blocks(tmp_path):
    """Bounded memory: with no credit, what the engine manages to write is the socket's buffers
    and the client's high-water mark, not the answer."""
    written = []

    async def endless(reader, writer):
        await read_request(reader)
        writer.write(SSE_HEAD)
        piece = chunk(event("token " * 20) * 20)
        sent = 0
        while True:
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
            written.append(sent)

    async def scenario():
        async with ScriptedEngine(tmp_path / "engine.sock", endless) as engine, bridged(engine) as (bridge, wire):
            await bridge.handle(infer("b1", credit=1))
            assert isinstance(await wire.next(), codec.Chunk)
            await asyncio.sleep(1.0)
            stalled_at = written[-1]
            await asyncio.sleep(0.5)
            return stalled_at, written[-1]

    stalled_at, later = run(scenario())
    assert later == stalled_at, "the engine kept writing to a bridge without credit"
    assert stalled_at < 8 * 1024 * 1024


def test_an_sse_event_that_never_ends_is_refused_at_the_frame_limit_not_buffered(tmp_path):
    """A hostile engine streams data without the blank line that ends an event: credit does not
    stop it (no chunk frame is sent, so none is spent); the size of one frame does."""
    written = []

    async def endless_event(reader, writer):
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(b"data: "))
        piece = chunk(b"x" * 65536)
        for _ in range(128):                    # 8 MiB, then silence
            writer.write(piece)
            await writer.drain()
            written.append(len(piece))
        await reader.read()

    messages = one(tmp_path, endless_event, infer("e1", deadline_s=20))
    error = messages[-1]
    assert isinstance(error, codec.Error), messages
    assert error.code == "internal" and "an SSE event over" in error.message, error.message
    assert sum(written) < 4 * codec.MAX_FRAME_BYTES


def test_a_request_id_no_header_can_carry_is_refused_before_the_engine(tmp_path):
    error = one(tmp_path, serve_each_request(whole_stream()), infer("bad\r\nX-Injected: 1"))[-1]
    assert error.code == "bad_request" and "cannot travel in an HTTP header" in error.message


# ---------------------------------------------------------------- probing


def test_the_probe_reads_the_engines_endpoints_and_context_length_on_the_pooled_connection(tmp_path):
    models = json.dumps({"object": "list", "data": [{"id": "tiny", "max_model_len": 4096}]}).encode()

    async def script(reader, writer):
        while (request := await read_request(reader)) is not None:
            if request.startswith(b"GET /v1/embeddings "):
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(models), models))

    async def scenario():
        async with ScriptedEngine(tmp_path / "engine.sock", script) as engine, bridged(engine) as (bridge, _):
            await bridge.probe_engine()
            return bridge.optional_endpoints, bridge.max_model_len, engine.connections

    assert run(scenario()) == (frozenset({codec.EMBEDDINGS}), 4096, 1)


def test_a_probe_the_engine_does_not_answer_finds_nothing(tmp_path):
    async def silent(reader, writer):
        await reader.read()

    async def scenario():
        async with ScriptedEngine(tmp_path / "engine.sock", silent) as engine, bridged(engine) as (bridge, _):
            await bridge.probe_engine(timeout_s=0.3)
            return bridge.optional_endpoints, bridge.max_model_len

    assert run(scenario()) == (frozenset(), None)
