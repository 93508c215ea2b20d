"""How many tokens/s one ximd process, or one router process, carries at 100 % of one core.

    .venv/bin/python -m bench.saturate --target ximd --streams 64 --seconds 10
    .venv/bin/python -m bench.saturate --target router --streams 64 --seconds 10

bench.run's set-up (a real router, a real ximd supervising the stand-in engine)
with the stand-in unpaced: every stream gets its tokens as fast as they are
read, one per SSE event and HTTP chunk (``--pacing stream`` and many
``--streams`` instead: paced streams, a wake-up for fewer tokens each). The process under test runs alone on one
core (``--cpu``, every thread of it); the router or ximd, the engine and the
load generator share the other core(s). The load generator is a bare asyncio
protocol on keep-alive connections that counts token events with one byte
search per read (no HTTP parser, no JSON).

After ``--warmup`` seconds of load, one window of ``--seconds``: the tokens
delivered per second, each process's CPU (user + system, all threads) as a
share of one core, the tokens per CPU-second of each, and each core's busy
share from /proc/stat (which counts other jobs on the machine too). The tokens
per CPU-second of the process under test is the saturation figure when that
process is the bottleneck: its core near 100 % busy. When the other side's
core is the busier one, it is a lower bound of what the process would carry,
and the report says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from bench.loadgen import chat_body
from bench.run import MODEL, Stack, add_standin_arguments, run_main, running_stack, standin_setup

TOKEN = b'"delta":{"content":'       # in every token event of the stand-in's chat stream, in no other
END = b"0\r\n\r\n"                   # the last chunk of a chunked HTTP/1.1 body


class Counts:
    def __init__(self) -> None:
        self.tokens = 0
        self.reads = 0
        self.requests = 0
        self.errors: list[str] = []


class Stream(asyncio.Protocol):
    """One keep-alive connection sending the same streamed request again as soon as one ends."""

    def __init__(self, request: bytes, counts: Counts):
        self.request, self.counts = request, counts
        self.tail = b""
        self.fresh = True
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.send()

    def send(self) -> None:
        self.tail, self.fresh = b"", True
        assert self.transport is not None
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.fresh:
            self.fresh = False
            if not data.startswith(b"HTTP/1.1 200"):
                self.counts.errors.append(data[:300].decode(errors="replace"))
                assert self.transport is not None
                self.transport.close()
                return
        # The tail keeps a token marker cut by a read boundary; it is too short to hold a whole one.
        buf = self.tail + data
        self.counts.tokens += buf.count(TOKEN)
        self.counts.reads += 1
        self.tail = buf[-(len(TOKEN) - 1):]
        if buf.endswith(END):
            self.counts.requests += 1
            self.send()

    def connection_lost(self, exc) -> None:
        self.transport = None


async def open_streams(url: str, streams: int, max_tokens: int, counts: Counts) -> list[Stream]:
    parts = urlsplit(url)
    body = chat_body(MODEL, max_tokens)
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    opened = []
    for _ in range(streams):
        _, protocol = await loop.create_connection(lambda: Stream(request, counts), parts.hostname, parts.port)
        opened.append(protocol)
    return opened


# ---------------------------------------------------------------- pinning and CPU


def pin(pid: int, cpus: set[int], children: bool = False) -> None:
    """Every thread of ``pid`` (and of its descendants) onto ``cpus``: sched_setaffinity is per thread."""
    pids = [pid]
    if children:
        pids += [child.pid for child in psutil.Process(pid).children(recursive=True)]
    for one in pids:
        for task in os.listdir(f"/proc/{one}/task"):
            try:
                os.sched_setaffinity(int(task), cpus)
            except (ProcessLookupError, PermissionError):
                pass


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def core_busy() -> list[tuple[float, float]]:
    """(busy, total) seconds of each core so far, from /proc/stat (steal counts as busy: not ours)."""
    out = []
    for times in psutil.cpu_times(percpu=True):
        total = sum(times)
        out.append((total - times.idle - getattr(times, "iowait", 0.0), total))
    return out


@dataclass
class Result:
    target: str
    event_loop: str
    streams: int
    seconds: float
    tokens_per_s: float
    requests: int
    tokens_per_client_read: float       # how many tokens the router's writes carried, on average
    target_cpu_pct: float               # of one core
    target_tokens_per_cpu_s: float      # the saturation figure, when the target is the bottleneck
    other_side_cpu_pct: float           # the other processes, over the other core(s)
    processes: dict                     # name -> {"cpu_pct", "tokens_per_cpu_s", "cpus"}
    cores_busy_pct: list                # each core, everything on it (other jobs too)
    bottleneck: str
    errors: int


def bottleneck(target: str, target_pct: float, other_pct: float) -> str:
    if target_pct >= 90 and target_pct >= other_pct:
        return f"{target} (its core {target_pct:.0f} % busy): the figure is its saturation"
    if other_pct >= 90:
        return (f"the other side (its core(s) {other_pct:.0f} % busy, {target} {target_pct:.0f} %): "
                f"{target}'s tokens per CPU-second is its cost per token, but it was not saturated")
    return (f"neither core is saturated ({target} {target_pct:.0f} %, other side {other_pct:.0f} %): "
            f"more --streams, or the machine's other jobs took the time")


async def measure(args, stack: Stack) -> Result:
    cpus = sorted(os.sched_getaffinity(0))
    if args.cpu not in cpus or len(cpus) < 2:
        raise RuntimeError(f"--cpu {args.cpu} must be one of at least two usable CPUs {cpus}")
    mine, rest = {args.cpu}, set(cpus) - {args.cpu}
    engine = psutil.Process(stack.ximd.popen.pid).children(recursive=True)
    if not engine:
        raise RuntimeError("ximd has no engine child")
    procs = {"router": stack.router.popen.pid, "ximd": stack.ximd.popen.pid,
             "engine": engine[0].pid, "loadgen": os.getpid()}
    for name, pid in procs.items():
        pin(pid, mine if name == args.target else rest, children=name == "engine")
    counts = Counts()
    streams = await open_streams(stack.router_url, args.streams, args.max_tokens, counts)
    try:
        await asyncio.sleep(args.warmup)
        cpu0 = {name: cpu_s(pid) for name, pid in procs.items()}
        cores0, tokens0, requests0, reads0 = core_busy(), counts.tokens, counts.requests, counts.reads
        wall0 = time.perf_counter()
        await asyncio.sleep(args.seconds)
        cpu = {name: cpu_s(pid) - cpu0[name] for name, pid in procs.items()}
        cores1, tokens, wall = core_busy(), counts.tokens - tokens0, time.perf_counter() - wall0
        requests, reads = counts.requests - requests0, counts.reads - reads0
    finally:
        for stream in streams:
            if stream.transport is not None:
                stream.transport.abort()
    processes = {name: {"cpu_pct": round(100 * c / wall, 1),
                        "tokens_per_cpu_s": round(tokens / c) if c > 0 else None,
                        "cpus": sorted(mine if name == args.target else rest)} for name, c in cpu.items()}
    target_pct = 100 * cpu[args.target] / wall
    other_pct = 100 * sum(c for name, c in cpu.items() if name != args.target) / wall / len(rest)
    cores = [round(100 * (b1 - b0) / (t1 - t0), 1) if t1 > t0 else None
             for (b0, t0), (b1, t1) in zip(cores0, cores1)]
    return Result(target=args.target, event_loop=args.event_loop or "default", streams=args.streams, seconds=round(wall, 2),
                  tokens_per_s=round(tokens / wall), requests=requests,
                  tokens_per_client_read=round(tokens / reads, 1) if reads else 0.0,
                  target_cpu_pct=round(target_pct, 1),
                  target_tokens_per_cpu_s=round(tokens / cpu[args.target]) if cpu[args.target] > 0 else 0,
                  other_side_cpu_pct=round(other_pct, 1), processes=processes, cores_busy_pct=cores,
                  bottleneck=bottleneck(args.target, target_pct, other_pct), errors=len(counts.errors))


def report(result: Result) -> str:
    lines = [f"{result.target} ({result.event_loop} event loop) alone on CPU {result.processes[result.target]['cpus']}: "
             f"{result.tokens_per_s} tokens/s delivered over {result.seconds:g} s "
             f"({result.requests} requests completed, {result.errors} errors; "
             f"{result.tokens_per_client_read:g} tokens per read at the client)",
             "| process | CPUs | CPU % of one core | tokens per CPU-second |", "|---|---|---|---|"]
    for name, row in result.processes.items():
        lines.append(f"| {name} | {','.join(map(str, row['cpus']))} | {row['cpu_pct']:g} | {row['tokens_per_cpu_s']} |")
    lines.append("cores busy (everything on them, other jobs too): "
                 + ", ".join(f"CPU {i} {pct} %" for i, pct in enumerate(result.cores_busy_pct)))
    lines.append(f"{result.target}: {result.target_tokens_per_cpu_s} tokens per CPU-second "
                 f"at {result.target_cpu_pct:g} % of its core; bottleneck: {result.bottleneck}")
    return "\n".join(lines)


async def main_async(args) -> int:
    with running_stack(standin_setup(args, max(16, args.streams * 2)), "saturate", args.keep_workdir) as stack:
        print(f"saturate: {args.streams} {args.pacing} streams of {args.max_tokens} tokens through the router, "
              f"{args.target} pinned to CPU {args.cpu}; {args.warmup:g} s warm-up, {args.seconds:g} s "
              f"measured ...", flush=True)
        result = await measure(args, stack)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2))
    return 0 if result.errors == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.saturate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("ximd", "router"), required=True,
                        help="the process that gets a core of its own")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams (keep-alive connections)")
    parser.add_argument("--seconds", type=float, default=10.0, help="the measured window")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the window")
    parser.add_argument("--cpu", type=int, default=0, help="the core of the process under test")
    add_standin_arguments(parser, pacing="unpaced", max_tokens=2000)
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs and state for a look")
    return run_main(main_async, parser.parse_args(argv), "saturate")


if __name__ == "__main__":
    sys.exit(main())
