"""Measure the engine's time to healthy under ximd's supervisor, and the supervisor's own share.

    .venv/bin/python -m tests.engine.measure_startup [--rounds 2]
    .venv/bin/python -m tests.engine.measure_startup --cold-warm [--rounds 3] [--no-compile]

Each round starts the same engine (the argv and environment ximd builds for the tiny
model) twice, alternating: once by hand (Popen + a tight /health poll, 20 ms) and once
under EngineSupervisor (default settings). It reports the medians, their difference,
and the supervisor's work measured directly: the time from run() to the spawn (orphan
scan, directories) and the time from the engine's first 200 on /health to the
supervisor noticing (bounded by its 0.25 s loading poll).

--cold-warm asks what the engine's cache directory (<cache_dir>/engine, where the
launch points HOME, XDG_CACHE_HOME, VLLM_CACHE_ROOT, TRITON_CACHE_DIR,
TORCHINDUCTOR_CACHE_DIR and TMPDIR) is worth to a restart. Each round starts the
engine by hand three times: "cold" (the cache directory emptied and the kernel's page
cache dropped, as after a reboot: needs root), "page_warm" (the cache directory
emptied, the page cache as the previous start left it) and "warm" (the directory the
page_warm start filled, as after a crash and restart). It times every start to the
first 200 on /health, stamps the engine's own log lines on arrival (the phases below,
and every "took/takes N s" vLLM reports of itself), and lists what the cache directory
holds afterwards. Then, unless --no-compile, it starts the engine once without
--enforce-eager (torch.compile) on an empty cache directory and once more on the
directory that start filled, to see what the compile cache is worth on this build and
whether it loads at all. The engines' logs stay in --log-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

from tests.support.engine import engine_python, processes_of, short_tempdir, tiny_launch, tiny_model
from ximd.engine import EngineSupervisor

DEADLINE_S = 300
HAND_POLL_S = 0.02


def health_ok(socket_path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(1)
            sock.connect(socket_path)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def by_hand(launch) -> float:
    for directory in launch.dirs:
        os.makedirs(directory, exist_ok=True)
    launch.socket_path.unlink(missing_ok=True)
    began = time.monotonic()
    proc = subprocess.Popen(launch.argv, env=dict(launch.env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while time.monotonic() - began < DEADLINE_S:
            if health_ok(str(launch.socket_path)):
                return time.monotonic() - began
            if proc.poll() is not None:
                raise RuntimeError(f"engine exited with {proc.returncode}")
            time.sleep(HAND_POLL_S)
        raise RuntimeError("engine not healthy in time")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        wait_gone(launch.instance_id)


def wait_gone(instance: str) -> None:
    deadline = time.monotonic() + 30
    while processes_of(instance) and time.monotonic() < deadline:
        time.sleep(0.2)


async def supervised(launch) -> dict[str, float]:
    supervisor = EngineSupervisor(launch)
    began = time.monotonic()
    task = asyncio.create_task(supervisor.run())
    spawned = first_ok = None
    while time.monotonic() - began < DEADLINE_S and not supervisor.healthy:
        if spawned is None and supervisor.pid:
            spawned = time.monotonic() - began
        if first_ok is None and spawned is not None and await asyncio.to_thread(health_ok, str(launch.socket_path)):
            first_ok = time.monotonic() - began
        await asyncio.sleep(HAND_POLL_S)
    healthy = time.monotonic() - began
    await supervisor.stop()
    await task
    wait_gone(launch.instance_id)
    return {"healthy_s": healthy, "spawn_s": spawned or 0.0,
            "notice_lag_s": healthy - first_ok if first_ok is not None else 0.0}


# ---------------------------------------------------------------- --cold-warm

# The engine's own milestones, in the order they appear in its log (first match wins).
PHASES = (
    ("first_output", re.compile(r".")),                       # the interpreter has imported vLLM's entry point
    ("args_parsed", re.compile(r"non-default args:")),
    ("config_resolved", re.compile(r"Resolved architecture:")),
    ("engine_core_up", re.compile(r"Initializing a V1 LLM engine")),
    ("model_load_begins", re.compile(r"Starting to load model")),
    ("weights_loaded", re.compile(r"Loading weights took|Model loading took")),
    ("engine_initialised", re.compile(r"init engine \(")),
    ("server_listening", re.compile(r"Starting vLLM server on")),
)
# What vLLM reports of itself: "Loading weights took 0.02 seconds", "init engine (...) took 1.37 s",
# "torch.compile takes 31.2 s in total", "Directly load the compiled graph ... took 2.1 s".
SELF_REPORTED = re.compile(r"\b(?:took|takes)\s+[\d.]+\s*(?:s\b|seconds)")
MESSAGE = re.compile(r"^\([^)]*\)\s+\w+\s+\S+\s+\S+\s+\[[^\]]*\]\s*")
COMPILE_WORDS = re.compile(r"finalize_loading|compiled graph|torch\.compile|[Cc]ompil(?:e|ing|ation) (?:cache|graph)|"
                           r"Dynamo|[Ii]nductor.*cache|Traceback|\bERROR\b|Error:(?! \[Errno 24\])")
CACHE_STATES = ("cold", "page_warm", "warm")


@dataclasses.dataclass
class Start:
    """One start of the engine: time to healthy, the milestones, what it said of itself."""

    healthy_s: float | None = None
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    self_reported: list[str] = dataclasses.field(default_factory=list)
    compile_lines: list[str] = dataclasses.field(default_factory=list)
    failure: str = ""
    log: str = ""


def drop_page_cache() -> str:
    """Empty the kernel's page cache (root only); '' when done, else why not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"could not drop the page cache ({e}); measured with it as it was"
    return ""


def timed_start(launch, log_path: Path) -> Start:
    """Start the engine by hand, stamp its output lines as they arrive, stop it once /health answers."""
    for directory in launch.dirs:
        os.makedirs(directory, exist_ok=True)
    launch.socket_path.unlink(missing_ok=True)
    result = Start(log=str(log_path))
    began = time.monotonic()
    proc = subprocess.Popen(launch.argv, env=dict(launch.env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)

    def read() -> None:
        with open(log_path, "w") as log:
            for raw in proc.stdout:
                at = time.monotonic() - began
                line = raw.decode(errors="replace").rstrip()
                log.write(f"{at:8.2f} {line}\n")
                for name, pattern in PHASES:
                    if name not in result.phases and pattern.search(line):
                        result.phases[name] = round(at, 2)
                        break
                message = MESSAGE.sub("", line)
                if SELF_REPORTED.search(line):
                    result.self_reported.append(message[:160])
                if COMPILE_WORDS.search(line) and len(result.compile_lines) < 20:
                    result.compile_lines.append(f"{at:.1f}s {message[:200]}")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while time.monotonic() - began < DEADLINE_S:
            if health_ok(str(launch.socket_path)):
                result.healthy_s = round(time.monotonic() - began, 2)
                break
            if proc.poll() is not None:
                result.failure = f"engine exited with {proc.returncode} after {time.monotonic() - began:.1f} s"
                break
            time.sleep(HAND_POLL_S)
        else:
            result.failure = f"engine not healthy in {DEADLINE_S} s"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        reader.join(30)
        wait_gone(launch.instance_id)
    return result


def tree_sizes(root: Path) -> dict[str, dict[str, int]]:
    """Bytes and files in all of `root` and under each subdirectory, three levels down, where there is anything."""
    sizes: dict[str, dict[str, int]] = {}
    for dirpath, _, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        keys = {"(all)"} | {str(Path(*rel.parts[:depth])) for depth in (1, 2, 3) if len(rel.parts) >= depth}
        for name in files:
            try:
                size = os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
            for key in keys:
                entry = sizes.setdefault(key, {"bytes": 0, "files": 0})
                entry["bytes"] += size
                entry["files"] += 1
    return dict(sorted(sizes.items()))


def empty(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def summary(starts: list[Start]) -> dict:
    healthy = [s.healthy_s for s in starts if s.healthy_s is not None]
    phases = {name: round(statistics.median(s.phases[name] for s in starts if name in s.phases), 2)
              for name, _ in PHASES if any(name in s.phases for s in starts)}
    return {"healthy_s": [s.healthy_s for s in starts],
            "median_healthy_s": round(statistics.median(healthy), 2) if healthy else None,
            "median_phases_s": phases,
            "failures": [s.failure for s in starts if s.failure],
            "self_reported_last": starts[-1].self_reported,
            "logs": [s.log for s in starts]}


def compile_experiment(launch, cache_root: Path, log_dir: Path) -> dict:
    """torch.compile on: an empty cache directory, then the one that start filled."""
    compiled = dataclasses.replace(launch, argv=tuple(a for a in launch.argv if a != "--enforce-eager"))
    empty(cache_root)
    out: dict = {"argv_tail": list(compiled.argv[4:])}
    for state in ("empty_cache_dir", "filled_cache_dir"):
        start = timed_start(compiled, log_dir / f"compile-{state}.log")
        print(f"compile {state}: {start.healthy_s or start.failure}", flush=True)
        text = Path(start.log).read_text(errors="replace")
        out[state] = {"healthy_s": start.healthy_s, "failure": start.failure, "phases_s": start.phases,
                      "self_reported": start.self_reported, "compile_lines": start.compile_lines,
                      "finalize_loading_failure": "finalize_loading" in text,
                      "cache_dir_after": tree_sizes(cache_root)}
        if start.failure:
            out[state]["log_tail"] = text.splitlines()[-15:]
    return out


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_kib / 2**20, 1),
            "kernel": platform.release()}


def cold_warm(rounds: int, with_compile: bool, log_dir: Path) -> dict:
    python = engine_python()
    model = tiny_model(python)
    log_dir.mkdir(parents=True, exist_ok=True)
    starts: dict[str, list[Start]] = {state: [] for state in CACHE_STATES}
    result: dict = {"machine": machine(), "engine_python": python, "model": str(model)}
    with short_tempdir() as root:
        launch, cfg = tiny_launch(root, python, model)
        cache_root = Path(cfg.cache_dir) / "engine"
        result["argv_tail"] = list(launch.argv[4:])
        for n in range(rounds):
            for state in CACHE_STATES:
                if state != "warm":
                    empty(cache_root)
                if state == "cold":
                    note = drop_page_cache()
                    if note:
                        result["drop_caches"] = note
                start = timed_start(launch, log_dir / f"round{n + 1}-{state}.log")
                starts[state].append(start)
                print(f"round {n + 1} {state}: {start.healthy_s or start.failure}", flush=True)
                if n == 0 and state != "cold":
                    result[f"cache_dir_after_{state}"] = tree_sizes(cache_root)
        result.update({state: summary(starts[state]) for state in CACHE_STATES})
        if with_compile:
            result["compile"] = compile_experiment(launch, cache_root, log_dir)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cold-warm", action="store_true", help="cold vs page-cache-warm vs fully warm starts")
    parser.add_argument("--no-compile", action="store_true", help="with --cold-warm: skip the torch.compile experiment")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/ximd-startup-logs"))
    args = parser.parse_args()
    if args.cold_warm:
        print(json.dumps(cold_warm(args.rounds, not args.no_compile, args.log_dir), indent=2))
        return 0
    python = engine_python()
    model = tiny_model(python)
    hand, sup = [], []
    with short_tempdir() as root:
        launch, _ = tiny_launch(root, python, model)
        for _ in range(args.rounds):
            hand.append(by_hand(launch))
            sup.append(asyncio.run(supervised(launch)))
    result = {
        "by_hand_healthy_s": [round(x, 2) for x in hand],
        "supervised_healthy_s": [round(s["healthy_s"], 2) for s in sup],
        "median_by_hand_s": round(statistics.median(hand), 2),
        "median_supervised_s": round(statistics.median(s["healthy_s"] for s in sup), 2),
        "supervisor_spawn_s": [round(s["spawn_s"], 3) for s in sup],
        "supervisor_notice_lag_s": [round(s["notice_lag_s"], 3) for s in sup],
    }
    result["median_difference_s"] = round(result["median_supervised_s"] - result["median_by_hand_s"], 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
