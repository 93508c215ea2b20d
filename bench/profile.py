"""Profile ximd or the router with py-spy while bench.run's through load runs.

    .venv/bin/python -m bench.profile --target ximd --pacing stream --concurrency 256 --seconds 10
    .venv/bin/python -m bench.profile --target router --out /tmp/router-prof

The set-up is bench.run's (a real router, a real ximd supervising the stand-in
engine, a fresh join key); the load is its through phase (``c`` workers
streaming chat completions through router → CurveZMQ → ximd → engine). Once
the load has run for ``--ramp`` seconds, ``py-spy record`` samples the chosen
process for ``--seconds``; then the load stops. Printed: the process's CPU
during the recording, the functions with the most self time and with the most
total time (shares of the samples at work: py-spy drops most idle samples, and
those it keeps with a waiting leaf — epoll, a lock, an executor's queue — are
counted apart; with uvloop its loop is C, so its idle time and its own work
show as ``Runner.run``), and where the profile is: ``profile.txt`` (py-spy's raw collapsed stacks, for
flamegraph.pl or https://www.speedscope.app) and ``profile.speedscope.json``.
Threads that run no Python (libzmq's I/O thread) are not sampled unless
``--native`` (then their C frames appear too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.loadgen import Target, run_load
from bench.run import MODEL, REPO, VENV_BIN, Proc, Stack, add_standin_arguments, run_main, running_stack, standin_setup

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
# Leaves where a thread waits, not works: py-spy (pausing the process to sample)
# does not always tell these from running code, so they are counted apart.
WAITS = frozenset({
    "EpollSelector.select (selectors.py)",              # asyncio's loop, idle in epoll_wait
    "Condition.wait (threading.py)", "Event.wait (threading.py)",
    "_worker (concurrent/futures/thread.py)",           # an executor thread waiting for work
    "Queue.get (queue.py)", "Thread._wait_for_tstate_lock (threading.py)",
})


def py_spy() -> str:
    found = shutil.which("py-spy", path=f"{VENV_BIN}:/usr/local/bin:/usr/bin")
    if found is None:
        raise RuntimeError("py-spy not found: `.venv/bin/pip install py-spy` (or `make venv`)")
    return found


def short_path(path: str) -> str:
    """A frame's file without the long prefixes: the repository, site-packages, the stdlib."""
    for prefix in (f"{REPO}/", "/site-packages/", "/lib/python3."):
        at = path.find(prefix)
        if at >= 0:
            rest = path[at + len(prefix):]
            return rest.split("/", 1)[1] if prefix == "/lib/python3." and "/" in rest else rest
    return path


def function(frame: str) -> str:
    """``func (file:line)`` → ``func (file)``: self time adds up per function, not per line."""
    match = FRAME.match(frame)
    if match is None:
        return frame
    return f"{match['func']} ({short_path(match['file'])})"


def read_raw(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's ``--format raw``: one ``frame;frame;…;leaf count`` line per distinct stack."""
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def top(stacks: list[tuple[list[str], int]], n: int) -> tuple[int, int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(samples at work, samples waiting, the n functions with the most self samples, the n with
    the most total samples below the common trunk); both leave out the samples that wait (WAITS)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = waiting = 0
    for frames, count in stacks:
        names = [function(f) for f in frames]
        if names[-1] in WAITS:
            waiting += count
            continue
        samples += count
        own[names[-1]] += count
        for name in set(names):
            total[name] += count
    # The trunk every sample shares (runpy, main, the loop's run_forever) says nothing.
    inner = Counter({name: count for name, count in total.items() if count < samples})
    return samples, waiting, own.most_common(n), inner.most_common(n)


def speedscope(stacks: list[tuple[list[str], int]], name: str) -> dict:
    """The same samples in speedscope's file format (one sampled profile, weights = samples)."""
    index: dict[str, int] = {}
    frames: list[dict] = []
    samples, weights = [], []
    for stack, count in stacks:
        ids = []
        for frame in stack:
            if frame not in index:
                index[frame] = len(frames)
                match = FRAME.match(frame)
                entry = {"name": match["func"] if match else frame}
                if match:
                    entry["file"] = match["file"]
                    if match["line"]:
                        entry["line"] = int(match["line"])
                frames.append(entry)
            ids.append(index[frame])
        samples.append(ids)
        weights.append(count)
    return {"$schema": "https://www.speedscope.app/file-format-schema.json", "exporter": "bench.profile",
            "name": name, "activeProfileIndex": 0, "shared": {"frames": frames},
            "profiles": [{"type": "sampled", "name": name, "unit": "none", "startValue": 0,
                          "endValue": sum(weights), "samples": samples, "weights": weights}]}


def table(title: str, rows: list[tuple[str, int]], samples: int) -> str:
    lines = [f"{title} (of {samples} samples):"]
    lines += [f"  {100 * count / samples:5.1f} %  {name}" for name, count in rows]
    return "\n".join(lines)


async def record(args, stack: Stack, out: Path) -> dict:
    target: Proc = stack.ximd if args.target == "ximd" else stack.router
    through = Target("through", base_url=stack.router_url)
    # Warm the path (connections, first-request costs) outside the recording.
    await run_load(through, model=MODEL, concurrency=min(args.concurrency, 8), requests_per_worker=1,
                   max_tokens=4)
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(through, model=MODEL, concurrency=args.concurrency,
                                        requests_per_worker=1 << 30, max_tokens=args.max_tokens, until=stop))
    try:
        await asyncio.sleep(args.ramp)
        raw = out / "profile.txt"
        argv = [py_spy(), "record", "--pid", str(target.popen.pid), "--duration", f"{args.seconds:g}",
                "--rate", str(args.rate), "--format", "raw", "--output", str(raw)]
        argv += [flag for flag, on in (("--native", args.native), ("--nonblocking", args.nonblocking),
                                       ("--idle", args.idle), ("--gil", args.gil)) if on]
        cpu, wall = target.cpu_s(), time.perf_counter()
        spy = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
        spy_out, _ = await spy.communicate()
        cpu, wall = target.cpu_s() - cpu, time.perf_counter() - wall
        if spy.returncode != 0 or not raw.exists():
            raise RuntimeError(f"py-spy failed ({spy.returncode}): {spy_out.decode(errors='replace')[-2000:]}")
    finally:
        stop.set()
    phase = await load
    return {"cpu_s": cpu, "wall_s": wall, "phase": phase, "py_spy": spy_out.decode(errors="replace").strip()}


async def main_async(args) -> int:
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix=f"ximd-profile-{args.target}-", dir="/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    with running_stack(standin_setup(args, args.concurrency * 2), "profile", args.keep_workdir) as stack:
        print(f"profile: {args.concurrency} streams ({args.pacing}) through the router; recording "
              f"{args.target} (pid {(stack.ximd if args.target == 'ximd' else stack.router).popen.pid}) "
              f"for {args.seconds:g} s at {args.rate} Hz ...", flush=True)
        result = await record(args, stack, out)
    stacks = read_raw(out / "profile.txt")
    samples, waiting, own, total = top(stacks, args.top)
    name = f"{args.target} c={args.concurrency} {args.pacing}"
    (out / "profile.speedscope.json").write_text(json.dumps(speedscope(stacks, name)))
    phase = result["phase"]
    print()
    print(f"{args.target}: {100 * result['cpu_s'] / result['wall_s']:.0f} % of a core during the recording "
          f"({result['cpu_s']:.2f} s CPU in {result['wall_s']:.1f} s); load: {phase.tokens_per_s:.0f} tokens/s, "
          f"{len(phase.samples)} requests, {phase.errors} errors")
    if samples == 0:
        print("no samples: py-spy said: " + result["py_spy"])
        return 1
    said = next((line.split("Samples:", 1)[1].strip() for line in result["py_spy"].splitlines()
                 if "Samples:" in line), "?")
    print(f"py-spy: {said}; {samples} samples at work ({samples / args.rate:.2f} s running or "
          f"waiting for a core: above the CPU on busy cores), {waiting} waiting in epoll or on a lock or queue (left out below)")
    print(table("self time", own, samples))
    print(table("total time (below what every sample shares)", total, samples))
    print(f"profile: {out / 'profile.txt'} (py-spy raw: flamegraph.pl, speedscope) and "
          f"{out / 'profile.speedscope.json'}")
    return 0 if phase.errors == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("ximd", "router"), required=True, help="the process to profile")
    add_standin_arguments(parser, pacing="stream")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to record")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds of load before the recording starts")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25, help="how many functions to print")
    parser.add_argument("--native", action="store_true", help="py-spy --native: C frames and C-only threads")
    parser.add_argument("--nonblocking", action="store_true",
                        help="py-spy --nonblocking: do not pause the process to sample (cheaper, less exact)")
    parser.add_argument("--idle", action="store_true", help="py-spy --idle: count idle samples too")
    parser.add_argument("--gil", action="store_true", help="py-spy --gil: only the thread holding the GIL")
    parser.add_argument("--out", help="directory for the profile (default: a new /tmp/ximd-profile-*)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the stack's logs and state")
    return run_main(main_async, parser.parse_args(argv), "profile")


if __name__ == "__main__":
    sys.exit(main())
