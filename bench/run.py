"""What ximd (and the router) add: the same workload direct to the engine and through the mesh.

    .venv/bin/python -m bench.run                       # paced stand-in, c = 1, 16, 64, 256
    .venv/bin/python -m bench.run --engine vllm --concurrency 1,4 --max-tokens 32

One run starts a real `xim-router serve`, a real `ximd run` (enrolled with a
fresh join key) supervising the engine, and then, for each concurrency,
runs the workload twice — straight at the engine's unix socket, then through
router → CurveZMQ → ximd → engine — and prints the ratios: added time to
first token (p50, p99), added inter-token latency, throughput ratio, CPU
seconds per 1,000 tokens of ximd and of the router, ximd's peak RSS.

With ``--engine standin`` ximd supervises bench/standin_engine.py (through
bench/standin-python) streaming at a fixed pace, so what the through run
loses against the direct one is our overhead, not the engine's. Only
loopback is used. Everything started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from bench.loadgen import Target, run_load
from bench.standin_engine import write_model_dir
from xim_proto import eventloop

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# The programs by module, not console script: works from a checkout without `pip install -e`.
ROUTER_CMD = [sys.executable, "-m", "xim_router.cli"]
XIMD_CMD = [sys.executable, "-m", "ximd.cli"]
MODEL = "tiny"
READY_TIMEOUT_S = {"standin": 60, "vllm": 600}
PACINGS = ("step", "stream", "unpaced")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- processes


class Proc:
    """A process the benchmark started; stop() always reaps it (and its process group)."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None):
        self.name, self.log = name, log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env, cwd=REPO,
                                          start_new_session=True)
        self.ps = psutil.Process(self.popen.pid)

    def cpu_s(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def peak_rss_mb(self) -> float:
        """VmHWM: the process's peak resident set, exact (no sampling)."""
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree_cpu_s(self) -> float:
        """CPU of this process and its children (ximd's engine is its child)."""
        total = self.cpu_s()
        for child in self.ps.children(recursive=True):
            try:
                times = child.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def stop(self, timeout: float = 60) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def wait_for(what: str, check, timeout: float, procs: list[Proc]):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited while waiting for {what}; log "
                                   f"{proc.log}:\n{tail(proc.log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}; log {procs[-1].log}:\n{tail(procs[-1].log)}")
        time.sleep(0.2)
    return result


def tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def engine_python() -> str:
    done = subprocess.run(["bash", str(REPO / "tools" / "setup-engine.sh")], capture_output=True,
                          text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def tiny_model(python: str) -> Path:
    sys.path.insert(0, str(REPO))
    from tools.demo import tiny_model as build  # one cache for demo, tests and bench
    return build(python)


@dataclass
class Setup:
    engine: str
    pacing: str
    ttft_ms: float
    tokens_per_s: float
    max_tokens: int
    max_concurrent: int
    router_workers: int = 1             # xim-router serve --workers
    event_loop: str | None = None       # both programs' (--event-loop, tuning.event_loop); None: their default


class Stack:
    """router + ximd (+ the engine ximd supervises), in a scratch directory."""

    def __init__(self, setup: Setup, workdir: Path):
        self.setup, self.dir = setup, workdir
        self.procs: list[Proc] = []

    def start(self) -> None:
        router_log = self.dir / "router.log"
        self.router = Proc("router", [*ROUTER_CMD, "serve", "--state-dir",
                                      str(self.dir / "router"), "--http", "127.0.0.1:0",
                                      "--mesh", "tcp://127.0.0.1:0", "--log-level", "warning",
                                      # Only when asked: a router older than --workers can be measured too.
                                      *(["--workers", str(self.setup.router_workers)]
                                        if self.setup.router_workers != 1 else []),
                                      *(["--event-loop", self.setup.event_loop] if self.setup.event_loop else [])],
                           router_log)
        self.procs.append(self.router)
        pattern = re.compile(r"xim-router serving http=(\S+)")
        self.router_url = wait_for("the router", lambda: (m := pattern.search(router_log.read_text()))
                                   and m.group(1), 30, [self.router])
        key = subprocess.run([*ROUTER_CMD, "join-key", "create", "--state-dir",
                              str(self.dir / "router"), "--allow-model", MODEL],
                             capture_output=True, text=True, check=True)
        join_key = key.stdout.split()[0]
        if self.setup.engine == "standin":
            python = str(REPO / "bench" / "standin-python")
            model_dir = write_model_dir(self.dir / "model")     # no weights: ximd only plans from it
            extra = (f"--standin-ttft-ms {self.setup.ttft_ms:g} --standin-tokens-per-s "
                     f"{self.setup.tokens_per_s:g} --standin-max-tokens {self.setup.max_tokens}")
            if self.setup.pacing == "step":
                extra += " --standin-batched"
            elif self.setup.pacing == "unpaced":
                extra += " --standin-unpaced"
        else:
            python = engine_python()
            model_dir = tiny_model(python)
            extra = ""
        config = self.dir / "agent.toml"
        config.write_text(
            f'[agent]\nmax_concurrent = {self.setup.max_concurrent}\nlog_level = "warning"\n'
            f'[router]\nurl = "{self.router_url}"\njoin_key = "{join_key}"\ninsecure = true\n'
            f'[engine]\nmodel = "{model_dir}"\nserved_model_name = "{MODEL}"\npython = "{python}"\n'
            f'[metrics]\nenabled = false\n')
        # PYTHONPATH keeps what the caller had (packages installed with --target, say).
        python_path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
        env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(self.dir), "PYTHONPATH": python_path,
               "XEROTIER_AGENT_CONFIG": str(config),
               "XEROTIER_AGENT_STATE_DIR": str(self.dir / "state"),
               "XEROTIER_AGENT_RUNTIME_DIR": str(self.dir / "run"),
               "XEROTIER_AGENT_CACHE_DIR": str(self.dir / "cache")}
        if extra:
            env["XEROTIER_AGENT_VLLM_ARGS"] = extra
        if self.setup.event_loop:
            env["XEROTIER_AGENT_EVENT_LOOP"] = self.setup.event_loop
        self.ximd = Proc("ximd", [*XIMD_CMD, "run"], self.dir / "ximd.log", env)
        self.procs.append(self.ximd)
        self.engine_socket = self.dir / "run" / "engine.sock"
        wait_for("the agent to serve the model", self._serving, READY_TIMEOUT_S[self.setup.engine],
                 self.procs)

    def _serving(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.router_url}/v1/models", timeout=2) as resp:
                return any(m["id"] == MODEL for m in json.load(resp)["data"])
        except OSError:
            return False

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@contextlib.contextmanager
def running_stack(setup: Setup, name: str, keep_workdir: bool = False):
    """A started Stack in a fresh scratch directory; stopped (and the directory removed) after."""
    workdir = Path(tempfile.mkdtemp(prefix="ximd-bench-", dir="/tmp"))   # short: unix socket paths
    stack = Stack(setup, workdir)
    try:
        print(f"{name}: starting router ({setup.router_workers} HTTP worker(s)) + ximd + {setup.engine} engine "
              f"in {workdir} ...", flush=True)
        stack.start()
        yield stack
    finally:
        stack.stop()
        if keep_workdir:
            print(f"{name}: logs and state kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def standin_setup(args: argparse.Namespace, max_concurrent: int) -> Setup:
    """The stand-in's Setup from add_standin_arguments' flags."""
    return Setup(engine="standin", pacing=args.pacing, ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s,
                 max_tokens=args.max_tokens, max_concurrent=max_concurrent, event_loop=args.event_loop)


# ---------------------------------------------------------------- one comparison


@dataclass
class Row:
    concurrency: int
    requests: int
    direct_tokens_per_s: float
    through_tokens_per_s: float
    throughput_ratio: float
    ttft_p50_direct_ms: float
    ttft_p50_added_ms: float
    ttft_p99_added_ms: float
    itl_mean_added_ms: float
    itl_p99_added_ms: float
    ximd_cpu_ms_per_1k_tokens: float
    ximd_net_cpu_ms_per_1k_tokens: float
    router_cpu_ms_per_1k_tokens: float
    router_net_cpu_ms_per_1k_tokens: float
    ximd_idle_cpu_pct: float
    ximd_peak_rss_mb: float
    cores_busy_direct: float           # CPU of every process of the run / wall time
    cores_busy_through: float
    errors_direct: int
    errors_through: int
    first_error: str | None


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def machine_cpu_s(stack: Stack) -> float:
    """Everything the benchmark runs: router, ximd and its engine, and this load generator."""
    own = os.times()
    return stack.router.tree_cpu_s() + stack.ximd.tree_cpu_s() + own.user + own.system


async def compare(stack: Stack, concurrency: int, requests_per_worker: int, max_tokens: int) -> Row:
    direct = Target("direct", unix_socket=str(stack.engine_socket))
    through = Target("through", base_url=stack.router_url)
    # Warm both paths (connections, first-request costs) outside the measurement.
    for target in (direct, through):
        await run_load(target, model=MODEL, concurrency=min(concurrency, 8), requests_per_worker=1,
                       max_tokens=4)
    # During the direct run ximd and the router only idle (leases, health and
    # metrics polls, the watchdog): that rate, taken off the through run's
    # CPU, leaves what serving itself cost ("net").
    idle_ximd, idle_router, all_cpu = stack.ximd.cpu_s(), stack.router.tree_cpu_s(), machine_cpu_s(stack)
    d = await run_load(direct, model=MODEL, concurrency=concurrency,
                       requests_per_worker=requests_per_worker, max_tokens=max_tokens)
    ximd_cpu, router_cpu = stack.ximd.cpu_s(), stack.router.tree_cpu_s()
    idle_ximd, idle_router = (ximd_cpu - idle_ximd) / d.wall_s, (router_cpu - idle_router) / d.wall_s
    all_cpu, cores_direct = machine_cpu_s(stack), (machine_cpu_s(stack) - all_cpu) / d.wall_s
    t = await run_load(through, model=MODEL, concurrency=concurrency,
                       requests_per_worker=requests_per_worker, max_tokens=max_tokens)
    ximd_cpu, router_cpu = stack.ximd.cpu_s() - ximd_cpu, stack.router.tree_cpu_s() - router_cpu
    cores_through = (machine_cpu_s(stack) - all_cpu) / t.wall_s
    per_1k = 1000 / t.tokens if t.tokens else math.nan
    return Row(
        concurrency=concurrency, requests=len(t.samples),
        direct_tokens_per_s=round(d.tokens_per_s, 1), through_tokens_per_s=round(t.tokens_per_s, 1),
        throughput_ratio=round(t.tokens_per_s / d.tokens_per_s, 4) if d.tokens_per_s else math.nan,
        ttft_p50_direct_ms=ms(d.ttft(0.5)),
        ttft_p50_added_ms=ms(t.ttft(0.5) - d.ttft(0.5)), ttft_p99_added_ms=ms(t.ttft(0.99) - d.ttft(0.99)),
        itl_mean_added_ms=ms(t.itl_mean() - d.itl_mean()), itl_p99_added_ms=ms(t.itl(0.99) - d.itl(0.99)),
        ximd_cpu_ms_per_1k_tokens=round(ximd_cpu * 1000 * per_1k, 2),
        ximd_net_cpu_ms_per_1k_tokens=round((ximd_cpu - idle_ximd * t.wall_s) * 1000 * per_1k, 2),
        router_cpu_ms_per_1k_tokens=round(router_cpu * 1000 * per_1k, 2),
        router_net_cpu_ms_per_1k_tokens=round((router_cpu - idle_router * t.wall_s) * 1000 * per_1k, 2),
        ximd_idle_cpu_pct=round(idle_ximd * 100, 2),
        ximd_peak_rss_mb=round(stack.ximd.peak_rss_mb(), 1),
        cores_busy_direct=round(cores_direct, 2), cores_busy_through=round(cores_through, 2),
        errors_direct=d.errors, errors_through=t.errors,
        first_error=t.first_error() or d.first_error())


COLUMNS = [("c", "concurrency"), ("direct tok/s", "direct_tokens_per_s"),
           ("through tok/s", "through_tokens_per_s"), ("ratio", "throughput_ratio"),
           ("TTFT p50 direct ms", "ttft_p50_direct_ms"), ("+TTFT p50 ms", "ttft_p50_added_ms"),
           ("+TTFT p99 ms", "ttft_p99_added_ms"), ("+ITL mean ms", "itl_mean_added_ms"),
           ("+ITL p99 ms", "itl_p99_added_ms"),
           ("ximd CPU ms/1k tok net (gross)", ("ximd_net_cpu_ms_per_1k_tokens", "ximd_cpu_ms_per_1k_tokens")),
           ("router CPU ms/1k tok net (gross)",
            ("router_net_cpu_ms_per_1k_tokens", "router_cpu_ms_per_1k_tokens")),
           ("ximd peak RSS MB", "ximd_peak_rss_mb"),
           ("cores busy d/t", ("cores_busy_direct", "cores_busy_through")),
           ("errors d/t", ("errors_direct", "errors_through"))]


def cell(row: Row, key) -> str:
    if isinstance(key, tuple):
        first, second = (getattr(row, k) for k in key)
        slash = key[0].startswith(("errors", "cores"))
        return f"{first:g}/{second:g}" if slash else f"{first:g} ({second:g})"
    return f"{getattr(row, key):g}"


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(title for title, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [cell(row, key) for _, key in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def requests_per_worker(setup: Setup, phase_s: float) -> int:
    one_request_s = setup.ttft_ms / 1000 + (setup.max_tokens - 1) / setup.tokens_per_s
    return max(2, math.ceil(phase_s / one_request_s))


async def main_async(args) -> int:
    setup = Setup(engine=args.engine, pacing=args.pacing, ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s,
                  max_tokens=args.max_tokens, max_concurrent=max(args.concurrency) * 2,
                  router_workers=args.router_workers, event_loop=args.event_loop)
    rows = []
    with running_stack(setup, "bench", args.keep_workdir) as stack:
        per_worker = args.requests_per_worker or requests_per_worker(setup, args.phase_seconds)
        for c in args.concurrency:
            print(f"bench: concurrency {c}, {per_worker} request(s) per worker, direct then through ...",
                  flush=True)
            rows.append(await compare(stack, c, per_worker, args.max_tokens))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(f"engine={args.engine} pacing={args.pacing} ttft_ms={args.ttft_ms:g} tokens_per_s={args.tokens_per_s:g} "
          f"max_tokens={args.max_tokens} cpus={len(os.sched_getaffinity(0))} event_loop={args.event_loop or 'default'}")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": asdict(setup), "rows": [asdict(r) for r in rows]},
                                              indent=2))
    return 0 if all(r.errors_through == 0 and r.errors_direct == 0 for r in rows) else 1


def add_standin_arguments(parser: argparse.ArgumentParser, pacing: str, max_tokens: int = 64) -> None:
    """The workload's and the stand-in's flags, alike in bench.run, bench.profile and bench.saturate."""
    parser.add_argument("--pacing", choices=PACINGS, default=pacing,
                        help="stand-in: step = vLLM-like batched decode steps (all streams' tokens "
                             "on one clock); stream = each stream on its own phase; unpaced = as "
                             "fast as it is read (for bench.saturate)")
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--ttft-ms", type=float, default=20.0, help="stand-in: time to first token")
    parser.add_argument("--tokens-per-s", type=float, default=75.0, help="stand-in: per-stream pace")
    parser.add_argument("--event-loop", choices=eventloop.CHOICES,
                        help="the router's and ximd's event loop (default: theirs, auto)")


def run_main(main_async, args: argparse.Namespace, name: str) -> int:
    """asyncio.run(main_async(args)); a RuntimeError (a start that failed, say) is one line on stderr."""
    try:
        return asyncio.run(main_async(args))
    except RuntimeError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("standin", "vllm"), default="standin")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 16, 64, 256])
    add_standin_arguments(parser, pacing="step")
    parser.add_argument("--phase-seconds", type=float, default=10.0,
                        help="about how long each direct/through phase runs")
    parser.add_argument("--requests-per-worker", type=int, default=0, help="override --phase-seconds")
    parser.add_argument("--router-workers", type=int, default=1,
                        help="xim-router serve --workers (its CPU counts the core and its workers)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs and state for a look")
    return run_main(main_async, parser.parse_args(argv), "bench")


if __name__ == "__main__":
    sys.exit(main())
