"""The real engine for tests: its environment, the tiny model, and launches to supervise.

Both the engine environment and the tiny model are built on first use and cached
under $XIMD_CACHE_DIR (default /var/cache/ximd-dev), so `pytest tests/engine` works
on a fresh machine (about 4 minutes the first time) and is fast afterwards.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import http.client
import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import psutil

from ximd import config as ximd_config
from ximd.autoconfig import Plan
from ximd.engine.launch import INSTANCE_ENV, EnginePaths, GroupRole, build_launch
from ximd.models import ModelCache, ModelChoice, resolve

REPO = Path(__file__).resolve().parents[2]
SETUP_ENGINE = REPO / "tools" / "setup-engine.sh"
MAKE_TINY_MODEL = REPO / "tools" / "make_tiny_model.py"
ENGINE_BUILD_TIMEOUT_S = 1800
TINY_MODEL_TIMEOUT_S = 300


def cache_dir() -> Path:
    return Path(os.environ.get("XIMD_CACHE_DIR", "/var/cache/ximd-dev"))


def engine_python(flavour: str = "cpu") -> str:
    """The engine environment's interpreter (tools/setup-engine.sh builds it when missing)."""
    done = subprocess.run(["bash", str(SETUP_ENGINE), flavour], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=ENGINE_BUILD_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"tools/setup-engine.sh {flavour} failed:\n{done.stderr[-4000:]}")
    return done.stdout.strip().splitlines()[-1]


def tiny_model(python: str) -> Path:
    """The tiny random Llama, cached by the hash of the script that makes it."""
    key = hashlib.sha256(MAKE_TINY_MODEL.read_bytes()).hexdigest()[:12]
    dest = cache_dir() / f"tiny-llama-{key}"
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "config.json").exists():
            subprocess.run([python, str(MAKE_TINY_MODEL), str(dest)], check=True, timeout=TINY_MODEL_TIMEOUT_S,
                           env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                "HOME": str(dest.parent)}, stdout=subprocess.DEVNULL)
    return dest


def dev_mode_python(python: str, directory: Path) -> str:
    """An engine interpreter, written into ``directory``: ``python`` with vLLM's development
    endpoints on (VLLM_SERVER_DEV_MODE=1; `generation_paused` needs its /pause and /resume).

    ximd builds the engine's environment itself and passes nothing of its own on
    (ximd.engine.launch.engine_env), so the variable cannot come from the test's: it
    travels in this wrapper (the way bench/standin-python stands in for the interpreter).
    The real interpreter's directory goes first on PATH, where ximd puts the directory of
    the interpreter it is given.
    """
    wrapper = directory / "vllm-dev-python"
    wrapper.write_text(f'#!/bin/sh\nPATH={shlex.quote(str(Path(python).parent))}:"$PATH" '
                       f'VLLM_SERVER_DEV_MODE=1 exec {shlex.quote(python)} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@contextmanager
def short_tempdir(prefix: str = "ximd-"):
    """A directory with a short path: unix socket paths must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def tiny_cpu_plan(**changes) -> Plan:
    """What the planner decides for the tiny model on a small CPU host."""
    values = dict(accelerator="cpu", visible_devices=(), tensor_parallel_size=1, gpu_memory_utilization=None,
                  max_model_len=512, max_concurrent=4, max_num_seqs=4, cpu_kvcache_space_gb=1, cpu_threads=None,
                  engine_env={"VLLM_CPU_KVCACHE_SPACE": "1"}, reasons={})
    values.update(changes)
    return Plan(**values)


def load_config(root: Path, **env: str) -> ximd_config.Config:
    """ximd's real configuration for directories under `root` (no /etc file, no host env)."""
    config_file = root / "agent.toml"
    config_file.touch()
    base = {"XEROTIER_AGENT_STATE_DIR": str(root / "state"),
            "XEROTIER_AGENT_CACHE_DIR": str(root / "cache"),
            "XEROTIER_AGENT_RUNTIME_DIR": str(root / "run")}
    return ximd_config.load(config_file, env={**base, **env})


def tiny_launch(root: Path, python: str, model_dir: Path, *, kv=None, plan: Plan | None = None,
                group: GroupRole | None = None, **env: str):
    """The launch ximd builds for the tiny model: config → model → build_launch."""
    cfg = load_config(root, XEROTIER_AGENT_ENGINE_PYTHON=python, VLLM_MODEL=str(model_dir), **env)
    paths = EnginePaths.from_config(cfg)
    model = resolve(ModelChoice(str(model_dir), "config"), ModelCache.from_config(cfg))
    return build_launch(cfg, plan or tiny_cpu_plan(), model, paths, kv=kv, group=group), cfg


def processes_of(instance: str) -> list[psutil.Process]:
    """Live processes that carry the engine instance marker."""
    found = []
    for proc in psutil.process_iter(["environ", "status"], ad_value=None):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and (proc.info["environ"] or {}).get(INSTANCE_ENV) == instance:
            found.append(proc)
    return found


def kill_all(instance: str) -> None:
    """Last-resort cleanup for fixtures: SIGKILL every process of the instance."""
    procs = processes_of(instance)
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


# ---------------------------------------------------------------- talking to an engine


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over the engine's unix socket (what ximd's serve bridge does with aiohttp)."""

    def __init__(self, socket_path: Path, timeout: float = 60.0):
        super().__init__("engine", timeout=timeout)
        self.socket_path = str(socket_path)

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()             # no engine there yet: do not leak the socket
            raise
        self.sock = sock


def http_call(socket_path: Path, method: str, path: str, timeout: float) -> tuple[int, bytes]:
    """A request without a body: its status and its body."""
    conn = UnixHTTPConnection(socket_path, timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def http_get(socket_path: Path, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    return http_call(socket_path, "GET", path, timeout)


@asynccontextmanager
async def generation_paused(socket_path: Path):
    """Inside, vLLM runs no step (its /pause?mode=keep, an endpoint of `dev_mode_python`'s):
    a request sent meanwhile waits in its queue and stays in flight on ximd for as long as
    the test needs, however slow the machine. /resume on the way out, whatever happened:
    the module's later tests share the engine.
    """
    status, body = await asyncio.to_thread(http_call, socket_path, "POST", "/pause?mode=keep", 30)
    assert status == 200, f"the engine did not pause: {status} {body[:300]!r}"
    try:
        yield
    finally:
        status, body = await asyncio.to_thread(http_call, socket_path, "POST", "/resume", 30)
        assert status == 200, f"the engine did not resume: {status} {body[:300]!r}"


def post_json(socket_path: Path, path: str, body: dict, timeout: float = 60.0) -> dict:
    conn = UnixHTTPConnection(socket_path, timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        assert response.status == 200, (response.status, data[:500])
        return json.loads(data)
    finally:
        conn.close()


def post_stream(socket_path: Path, path: str, body: dict, timeout: float = 60.0) -> list[str]:
    """The `data:` payloads of a server-sent-event stream, "[DONE]" included."""
    conn = UnixHTTPConnection(socket_path, timeout)
    events = []
    try:
        conn.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, (response.status, response.read()[:500])
        assert response.getheader("Content-Type", "").startswith("text/event-stream")
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data:"):
                events.append(line[len("data:"):].strip())
                if events[-1] == "[DONE]":
                    break
        return events
    finally:
        conn.close()


# ---------------------------------------------------------------- running a supervisor from sync tests


class SupervisorThread:
    """Runs `supervisor.run()` on an event loop in a thread of its own.

    Tests stay plain synchronous functions; every wait is bounded and the exit
    path stops the supervisor and, as a last resort, kills whatever carries the
    engine's instance marker.
    """

    def __init__(self, supervisor):
        self.supervisor = supervisor
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="supervisor-loop", daemon=True)
        self.future = None

    def __enter__(self) -> SupervisorThread:
        self.thread.start()
        self.future = asyncio.run_coroutine_threadsafe(self.supervisor.run(), self.loop)
        return self

    def wait_for(self, predicate, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.future.done():
                self.future.result()   # raises what run() raised
                raise AssertionError(f"supervisor ended while waiting for {what}")
            time.sleep(0.1)
        sup = self.supervisor
        raise AssertionError(f"no {what} within {timeout_s:g} s: state={sup.state}, starts={sup.starts}, "
                             f"last_error={sup.last_error}")

    def stop(self, grace_s: float = 15.0, timeout_s: float = 40.0) -> float:
        """Stop the supervisor; return how long it took."""
        began = time.monotonic()
        asyncio.run_coroutine_threadsafe(self.supervisor.stop(grace_s), self.loop).result(timeout_s)
        self.future.result(timeout_s)
        return time.monotonic() - began

    def __exit__(self, *exc):
        try:
            if self.future is not None and not self.future.done():
                self.stop()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
            kill_all(self.supervisor.launch.instance_id)
