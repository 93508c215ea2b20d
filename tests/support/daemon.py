"""Run a real `ximd run` process with its own directories and a notify socket."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.notify import NotifyReceiver


class Daemon:
    def __init__(self, tmp_path: Path, *, config: str = "", env: dict[str, str] | None = None,
                 watchdog_usec: int | None = 2_000_000):
        self.dir = tmp_path
        self.state_dir = tmp_path / "state"
        # Unix socket paths are limited to 107 bytes and pytest's tmp paths are long.
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="ximd-run-", dir="/tmp"))
        self.config_path = tmp_path / "agent.toml"
        self.config_path.write_text(config)
        self.log_path = tmp_path / "ximd.log"
        self.notify = NotifyReceiver(tmp_path)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "XEROTIER_AGENT_CONFIG": str(self.config_path),
            "XEROTIER_AGENT_STATE_DIR": str(self.state_dir),
            "XEROTIER_AGENT_RUNTIME_DIR": str(self.runtime_dir),
            "XEROTIER_AGENT_CACHE_DIR": str(tmp_path / "cache"),
            "XEROTIER_AGENT_METRICS_ENABLED": "false",
            **self.notify.env(watchdog_usec),
            **(env or {}),
        }
        self.proc: subprocess.Popen | None = None

    def start(self, *args: str) -> Daemon:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "ximd.cli", "run", *args], env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def cli(self, *args: str, input: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ximd.cli", *args], env=self.env, input=input,
                              capture_output=True, text=True, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged (rc={self.proc.poll()}):\n{self.log()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self._log.close()
        self.notify.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
