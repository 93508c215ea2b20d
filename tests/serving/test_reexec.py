"""`ximd reexec` with real processes: a real xim-router, `ximd run` and the paced stand-in
engine (bench/standin-python), under a steady stream of client requests through the
router's OpenAI API (the official client).

The daemon replaces its program image in place: the same PID, the engine adopted
(same PID), no client request fails; a changed engine-facing setting makes it a clean
engine restart, said in the journal (here: the daemon's log).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from tests.integration.test_node_lifecycle import engine_processes, make_daemon
from tests.support.daemon import Daemon
from tests.support.router import RouterProcess

SWITCH_TIMEOUT_S = 60


@dataclass
class Load:
    """Streamed chat completions one after another from a few threads, for as long as it runs."""
    base_url: str
    threads: int = 3
    sent: int = 0
    failed: list[str] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)   # (start, seconds)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _one(self, client: openai.OpenAI) -> None:
        began = time.monotonic()
        try:
            stream = client.chat.completions.create(model="tiny", stream=True, max_tokens=8,
                                                    messages=[{"role": "user", "content": "hi"}])
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            ok = bool(text)
            why = "" if ok else "empty answer"
        except openai.APIError as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.sent += 1
            self.latencies.append((began, time.monotonic() - began))
            if not ok:
                self.failed.append(why)

    def _run(self) -> None:
        client = openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=60)
        while not self._stop.is_set():
            self._one(client)
            time.sleep(0.05)

    def __enter__(self) -> Load:
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(70)

    def longest_during(self, start: float, end: float) -> float:
        return max((s for t, s in self.latencies if start - s <= t <= end), default=0.0)


def serving_daemon(tmp_path: Path, router: RouterProcess) -> Daemon:
    daemon = make_daemon(tmp_path, router, router.join_key())
    daemon.start()
    daemon.notify.wait_for("STATUS", "serving tiny; router connected", timeout=60)
    return daemon


def reexec_while_listening(daemon: Daemon, timeout_s: float = SWITCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`ximd reexec`, reading the notify socket meanwhile as systemd would (a datagram
    queue nobody reads fills up after ten messages, and the next READY=1 is dropped)."""
    argv = [sys.executable, "-m", "ximd.cli", "reexec", "--timeout", str(timeout_s)]
    proc = subprocess.Popen(argv, env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s + 30
    while proc.poll() is None and time.monotonic() < deadline:
        daemon.notify.poll(0.2)
    out, err = proc.communicate(timeout=5)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def status_of(daemon: Daemon) -> dict:
    return json.loads(daemon.cli("status", "--format", "json").stdout)


def test_reexec_under_load_keeps_the_pid_and_the_engine_and_fails_nothing(tmp_path, router):
    daemon = serving_daemon(tmp_path, router)
    try:
        engine_before = [p.pid for p in engine_processes(daemon)]
        before = status_of(daemon)
        with Load(router.http_url + "/v1") as load:
            time.sleep(2)
            switch_began = time.monotonic()
            done = reexec_while_listening(daemon)
            switch_took = time.monotonic() - switch_began
            time.sleep(2)
        assert done.returncode == 0, done.stderr + daemon.log()[-3000:]
        assert "re-executed in place" in done.stdout and f"engine pid {before['engine']['pid']} kept" in done.stdout
        after = status_of(daemon)
        assert after["pid"] == before["pid"] == daemon.proc.pid and daemon.proc.poll() is None
        assert after["generation"] == 1 and after["engine"]["handover"] == "adopted"
        assert after["engine"]["pid"] == before["engine"]["pid"]
        assert [p.pid for p in engine_processes(daemon)] == engine_before
        assert load.sent > 10 and load.failed == [], load.failed[:5]
        print(json.dumps({"requests": load.sent, "failed": len(load.failed), "switch_s": round(switch_took, 2),
                          "longest_latency_during_switch_s":
                              round(load.longest_during(switch_began, switch_began + switch_took), 2),
                          "ximd_pid": after["pid"], "engine_pid": after["engine"]["pid"]}))
        log = daemon.log()
        assert "re-executed in place from" in log and "Adopted the running engine" in log
        daemon.notify.poll(1.0)
        reloading, ready = daemon.notify.times_of("RELOADING"), daemon.notify.times_of("READY")
        assert reloading and ready and ready[-1] > reloading[-1], \
            f"systemd hears RELOADING=1 … READY=1: {[f for t, f in daemon.notify.messages if t >= reloading[-1]]}"
    finally:
        daemon.stop()


def test_a_changed_engine_setting_makes_it_a_clean_engine_restart(tmp_path, router):
    daemon = serving_daemon(tmp_path, router)
    try:
        before = status_of(daemon)
        daemon.env["XEROTIER_AGENT_MAX_NUM_SEQS"] = "7"   # not seen: the daemon's own environment persists
        config = daemon.config_path.read_text()
        daemon.config_path.write_text(config + "[engine]\nmax_num_seqs = 9\n")
        done = daemon.cli("reexec", "--timeout", str(SWITCH_TIMEOUT_S), timeout=SWITCH_TIMEOUT_S + 30)
        assert done.returncode == 0, done.stderr + daemon.log()[-3000:]
        after = status_of(daemon)
        assert after["pid"] == before["pid"] and after["engine"]["pid"] != before["engine"]["pid"]
        assert after["engine"]["handover"].startswith("restarted: this version would start the engine differently")
        assert "not keeping the engine the previous image handed over" in daemon.log()
        assert "--max-num-seqs 9" in " ".join(" ".join(p.cmdline()) for p in engine_processes(daemon))
    finally:
        daemon.stop()


def test_reexec_of_a_daemon_that_is_not_running_says_so(tmp_path):
    daemon = Daemon(tmp_path)
    done = daemon.cli("reexec")
    assert done.returncode == 3 and "ximd is not running" in done.stderr
    daemon.stop()


@pytest.mark.parametrize("phase", ["not-enrolled"])
def test_reexec_without_an_engine_just_comes_back(tmp_path, phase):
    daemon = Daemon(tmp_path).start()
    try:
        daemon.notify.wait_for("READY", "1", timeout=30)
        pid = daemon.proc.pid
        done = daemon.cli("reexec", "--timeout", "30", timeout=60)
        assert done.returncode == 0, done.stderr + daemon.log()
        assert "no engine to keep" in done.stdout
        after = status_of(daemon)
        assert after["pid"] == pid and after["generation"] == 1 and after["phase"] == phase
    finally:
        daemon.stop()
