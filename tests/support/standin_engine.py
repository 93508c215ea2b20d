"""Run the stand-in engine (bench/standin_engine.py) as a real process for a test."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[2]


class StandinProcess:
    """``python -m bench.standin_engine`` on a unix socket; `stop()` always reaps it."""

    def __init__(self, socket_path: Path, *, ttft_ms: float = 5, tokens_per_s: float = 500,
                 max_tokens: int = 16, extra: tuple[str, ...] = ()):
        self.socket_path = socket_path
        self.log_path = socket_path.with_suffix(".log")
        self.argv = [sys.executable, "-m", "bench.standin_engine", "--uds", str(socket_path),
                     "--ttft-ms", str(ttft_ms), "--tokens-per-s", str(tokens_per_s),
                     "--max-tokens", str(max_tokens), *extra]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15) -> StandinProcess:
        ready = self.socket_path.with_suffix(".ready")
        ready.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*self.argv, "--ready-file", str(ready)], cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"stand-in engine did not start:\n{self.log_path.read_text()}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()


async def engine_gauge(socket_path: Path, name: str = "vllm:num_requests_running") -> float:
    """One gauge from the engine's /metrics over its unix socket."""
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path))) as s:
        async with s.get("http://engine/metrics") as resp:
            text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the engine's metrics:\n{text}")


async def wait_for_gauge(socket_path: Path, value: float, *, timeout: float = 10,
                         name: str = "vllm:num_requests_running") -> None:
    deadline = time.monotonic() + timeout
    while (seen := await engine_gauge(socket_path, name)) != value:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} stayed at {seen}, expected {value}")
        await asyncio.sleep(0.05)
