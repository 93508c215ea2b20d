"""Run a real `xim-router serve` subprocess on free loopback ports with its own state dir.

    with RouterProcess(tmp_path) as router:
        key = router.join_key()
        ... enroll against router.http_url, connect to router.mesh_endpoint ...

Ports are picked by the router itself (port 0) and read from the line it
prints at start; restart() brings it back on the same ports. Every process
started here is stopped (SIGTERM, then SIGKILL) by stop() / the context exit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

READY_LINE = re.compile(r"xim-router serving http=(\S+) mesh=(\S+) public_key=(\S+)")
ENROLL_URL = re.compile(r" enroll=(\S+)")
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class RouterProcess:
    def __init__(self, tmp_path: Path, *, lease_interval: str = "1s", lease_timeout: str = "3s",
                 dead_after: str = "30s", token_ttl: str = "1h", tls: tuple[Path, Path] | None = None,
                 extra_args: tuple[str, ...] = (), http: str = "127.0.0.1:0"):
        self.dir = tmp_path
        self.state_dir = tmp_path / "router-state"
        self.log_path = tmp_path / "router.log"
        self.stdout_path = tmp_path / "router.stdout"
        self.timing = ["--lease-interval", lease_interval, "--lease-timeout", lease_timeout,
                       "--dead-after", dead_after, "--token-ttl", token_ttl]
        self.tls = tls
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.http_url = ""
        self.mesh_endpoint = ""
        self.public_key = ""
        self.enroll_url = ""          # = http_url unless --enroll-http is among extra_args
        self._http = http
        self._mesh = "tcp://127.0.0.1:0"

    # ------------------------------------------------------------ process

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "xim_router.cli", *args]

    def start(self) -> RouterProcess:
        argv = self.command("serve", "--state-dir", str(self.state_dir), "--http", self._http,
                            "--mesh", self._mesh, "--log-level", "debug", *self.timing,
                            *self.extra_args)
        if self.tls:
            argv += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        self.stdout_path.write_text("")
        with open(self.log_path, "a") as err, open(self.stdout_path, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        try:
            match = wait_for(self._ready, START_TIMEOUT_S, "xim-router to print its endpoints")
        except AssertionError:
            self.stop()
            raise AssertionError(f"xim-router did not start; its log:\n{self.log()}") from None
        self.http_url, self.mesh_endpoint, self.public_key = match.groups()
        enroll = ENROLL_URL.search(match.string)
        self.enroll_url = enroll.group(1) if enroll else self.http_url
        # Keep the ports for restart(): agents hold these endpoints.
        self._http = self.http_url.split("://", 1)[1]
        self._mesh = self.mesh_endpoint
        return self

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"xim-router exited with {self.proc.returncode}:\n{self.log()}")
        return READY_LINE.search(self.stdout_path.read_text())

    def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT_S)
        return proc.returncode

    def restart(self) -> RouterProcess:
        self.stop()
        return self.start()

    def __enter__(self) -> RouterProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def metrics(self) -> str:
        with urllib.request.urlopen(self.http_url + "/metrics", timeout=30) as resp:
            return resp.read().decode()

    def mesh_event(self, event: str) -> float:
        """A count of /metrics' xim_router_mesh_events_total (frame_in, batch_in, rate_limited, …)."""
        found = re.search(rf'^xim_router_mesh_events_total\{{event="{re.escape(event)}"\}} (\S+)$',
                          self.metrics(), re.M)
        assert found, f"no mesh event {event!r} in /metrics"
        return float(found.group(1))

    def in_flight(self) -> int:
        """Requests the router has on its nodes now (/metrics' xim_router_node_in_flight, summed):
        its own count, by which it refuses (at_capacity) before a node is even asked."""
        values = re.findall(r'^xim_router_node_in_flight\{[^}]*\} (\S+)$', self.metrics(), re.M)
        return int(sum(float(v) for v in values))

    # ------------------------------------------------------------ admin commands

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(*args, "--state-dir", str(self.state_dir)),
                                capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise AssertionError(f"xim-router {' '.join(args)} failed: {result.stderr}")
        return result

    def join_key(self, *, ttl: str = "1h", uses: int = 1, model: str | None = None,
                 allow_models: tuple[str, ...] = (), max_concurrent: int | None = None) -> str:
        """A fresh join key. Without ``model`` or ``allow_models`` its nodes may serve any
        model (--allow-any-model): the tests that do not exercise the policy pick their own."""
        args = ["join-key", "create", "--ttl", ttl, "--uses", str(uses)]
        if model:
            args += ["--model", model]
        for name in allow_models:
            args += ["--allow-model", name]
        if not model and not allow_models:
            args.append("--allow-any-model")
        if max_concurrent is not None:
            args += ["--max-concurrent", str(max_concurrent)]
        return self.admin(*args).stdout.strip()

    def set_agent(self, agent_id: str, *options: str) -> subprocess.CompletedProcess:
        """`xim-router agents set AGENT OPTIONS…`: what the agent may serve, from now on."""
        return self.admin("agents", "set", agent_id, *options)

    def agents(self) -> list[dict]:
        return json.loads(self.admin("agents", "--format", "json").stdout)

    def agent(self, agent_id: str) -> dict:
        return next(a for a in self.agents() if a["agent_id"] == agent_id)

    def revoke(self, agent_id: str) -> subprocess.CompletedProcess:
        return self.admin("revoke", agent_id)
