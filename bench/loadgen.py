"""A closed-loop load generator for OpenAI-compatible streaming endpoints.

``concurrency`` workers each send ``requests_per_worker`` streamed chat
requests back to back, over HTTP (the router) or a unix socket (the engine
directly), and record per request: time to first token, the gaps between
tokens, tokens, errors. Small on purpose: it runs on the same 2 cores as
what it measures, so each SSE event costs it a split and two byte searches,
never a JSON parse.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass(frozen=True)
class Target:
    """Where requests go: ``base_url`` over TCP, or the same path over ``unix_socket``."""

    name: str
    base_url: str = "http://engine"
    unix_socket: str | None = None
    api_key: str | None = None


@dataclass
class Sample:
    """One request as the client saw it."""

    start: float
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    end: float = 0.0
    error: str | None = None


@dataclass
class Phase:
    """One run of the workload against one target."""

    target: str
    concurrency: int
    samples: list[Sample]
    wall_s: float

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.error is None]

    @property
    def errors(self) -> int:
        return len(self.samples) - len(self.ok)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def ttft(self, q: float) -> float:
        return quantile([s.ttft for s in self.ok if s.ttft is not None], q)

    def itl(self, q: float) -> float:
        return quantile([g for s in self.ok for g in s.gaps], q)

    def itl_mean(self) -> float:
        gaps = [g for s in self.ok for g in s.gaps]
        return statistics.fmean(gaps) if gaps else float("nan")

    def first_error(self) -> str | None:
        return next((s.error for s in self.samples if s.error), None)


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def is_token_event(event: bytes) -> bool:
    """A chunk that carries generated text: not the role-only, usage or [DONE] events."""
    return b'"choices":[{' in event and b'"content":""' not in event


def chat_body(model: str, max_tokens: int, prompt: str = "Tell me about ximd.") -> bytes:
    return json.dumps({"model": model, "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": prompt}]}).encode()


async def stream_one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict) -> Sample:
    sample = Sample(start=time.perf_counter())
    last = None
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                sample.error = f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
                return sample
            tail = b""
            done = False
            while not done:
                data = await resp.content.readany()
                if not data:
                    break
                now = time.perf_counter()
                events = (tail + data).split(b"\n\n")
                tail = events.pop()
                for event in events:
                    if event == b"data: [DONE]":
                        done = True
                    elif b'"error"' in event[:20]:
                        sample.error = event[:200].decode(errors="replace")
                    elif is_token_event(event):
                        sample.tokens += 1
                        if last is None:
                            sample.ttft = now - sample.start
                        else:
                            sample.gaps.append(now - last)
                        last = now
            if not done and sample.error is None:
                sample.error = "stream ended without [DONE]"
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"
    sample.end = time.perf_counter()
    return sample


async def run_load(target: Target, *, model: str, concurrency: int, requests_per_worker: int,
                   max_tokens: int, timeout_s: float = 300, until: asyncio.Event | None = None) -> Phase:
    """Run the workload once; every worker waits for its answer before the next request.
    With ``until``, a worker also stops (after its request in flight) once that is set."""
    connector = (aiohttp.UnixConnector(path=target.unix_socket, limit=0) if target.unix_socket
                 else aiohttp.TCPConnector(limit=0))
    headers = {"Content-Type": "application/json"}
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    url = target.base_url.rstrip("/") + "/v1/chat/completions"
    body = chat_body(model, max_tokens)
    samples: list[Sample] = []

    async def worker() -> None:
        for _ in range(requests_per_worker):
            if until is not None and until.is_set():
                break
            samples.append(await stream_one(session, url, body, headers))

    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return Phase(target=target.name, concurrency=concurrency, samples=samples, wall_s=wall)
