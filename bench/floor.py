"""The platform's floor: CPU per streamed token of a process that only READS the engine's stream.

    .venv/bin/python -m bench.floor [--concurrency 64] [--tokens-per-s 75] [--event-loop uvloop]

Streams from the paced stand-in engine (its own process) are read by this
process in two ways, and the CPU this process spends per token is printed:

- ``asyncio-protocol``: a bare asyncio.Protocol that appends the bytes and
  looks for the end — the least any Python reader can do per event;
- ``aiohttp-readany``: aiohttp's client reading the body with readany(), as
  ximd's bridge did before ximd.enginehttp, without anything else;
- ``enginehttp-read-some``: ximd's own engine client (ximd.enginehttp) reading
  with read_some(), as the bridge does now, without anything else.

ximd does strictly more per token than either (SSE framing, the frame to the
router), so its CPU per 1,000 tokens cannot be below these numbers on the
same machine; docs/performance.md compares them with the target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.standin_engine import Pacing, StandinEngine, serve
from xim_proto import eventloop
from ximd.enginehttp import EngineClient

MODEL = "tiny"


def body(max_tokens: int) -> bytes:
    return json.dumps({"model": MODEL, "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()


class ReadAll(asyncio.Protocol):
    """Send one HTTP request, read until the chunked body's last chunk."""

    def __init__(self, request: bytes, done: asyncio.Future):
        self.request, self.done, self.tail = request, done, b""

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.tail = (self.tail + data)[-16:]
        if self.tail.endswith(b"0\r\n\r\n"):
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def protocol_reader(sock: str, concurrency: int, rounds: int, max_tokens: int) -> None:
    payload = body(max_tokens)
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: engine\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(payload)) + payload
    loop = asyncio.get_running_loop()

    async def one() -> None:
        done = loop.create_future()
        await loop.create_unix_connection(lambda: ReadAll(request, done), sock)
        await asyncio.wait_for(done, 120)

    for _ in range(rounds):
        await asyncio.gather(*(one() for _ in range(concurrency)))


async def aiohttp_reader(sock: str, concurrency: int, rounds: int, max_tokens: int) -> None:
    payload = body(max_tokens)
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock, limit=0)) as session:
        async def one() -> None:
            async with session.post("http://engine/v1/chat/completions", data=payload) as resp:
                while await resp.content.readany():
                    pass

        await one()       # first-use costs (SSL context, pools) outside the measurement
        for _ in range(rounds):
            await asyncio.gather(*(one() for _ in range(concurrency)))


async def enginehttp_reader(sock: str, concurrency: int, rounds: int, max_tokens: int) -> None:
    payload = body(max_tokens)
    client = EngineClient(sock)

    async def one() -> None:
        response = await client.request("POST", "/v1/chat/completions", payload, request_id="floor")
        while await response.read_some():
            pass
        response.release()

    try:
        await one()
        for _ in range(rounds):
            await asyncio.gather(*(one() for _ in range(concurrency)))
    finally:
        client.close()


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def measure(name: str, reader, sock: str, args) -> dict:
    start = cpu_s()
    wall = time.perf_counter()
    eventloop.choose(args.event_loop).run(reader(sock, args.concurrency, args.rounds, args.max_tokens))
    cpu = cpu_s() - start
    tokens = args.concurrency * args.rounds * args.max_tokens
    return {"reader": name, "event_loop": args.event_loop, "concurrency": args.concurrency, "tokens": tokens,
            "wall_s": round(time.perf_counter() - wall, 2),
            "cpu_ms_per_1k_tokens": round(cpu / tokens * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--tokens-per-s", type=float, default=75.0)
    parser.add_argument("--batched", action="store_true", help="vLLM-like steps in the stand-in")
    parser.add_argument("--event-loop", choices=eventloop.CHOICES, default="asyncio",
                        help="the readers' loop (the stand-in's stays asyncio's)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ximd-floor-", dir="/tmp"))
    sock = str(workdir / "engine.sock")
    pid = os.fork()
    if pid == 0:          # the engine: a process of its own, so its CPU is not counted here
        engine = StandinEngine(Pacing(ttft_ms=20, tokens_per_s=args.tokens_per_s,
                                      max_tokens=args.max_tokens, batched=args.batched))
        asyncio.run(serve(engine, uds=Path(sock), host=None, port=None))
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        for name, reader in (("asyncio-protocol", protocol_reader), ("aiohttp-readany", aiohttp_reader),
                             ("enginehttp-read-some", enginehttp_reader)):
            print(json.dumps(measure(name, reader, sock, args)), flush=True)
    finally:
        os.kill(pid, 15)
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
