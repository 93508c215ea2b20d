"""Upgrading a serving node in place under a real systemd 252 (Debian bookworm,
systemd-nspawn): the real CPU vLLM engine on the tiny model, the router from the same
.deb, a steady stream of streamed chat completions from inside the guest, and
`apt install` of a higher version of the package, whose postinst runs
`ximd reexec --no-wait`.

    1. the upgrade under load: same ximd PID, same engine PID, NRestarts 0, the new
       version serving, no failed request
    2. a changed engine setting + `ximd reexec`: the engine restarts, cleanly, said why
    3. `ximd reexec` with the router away: the new image serves, retrying the router
    4. a new image that hangs: the watchdog kills it, systemd starts ximd afresh, no
       engine of the old process survives, the node serves again

One guest for the module (the install-to-first-token test's node: a WATCHDOG drop-in
of 10 s); the tests run in file order and each states the state it starts from. vLLM
starts three times here: the first start, after the changed setting, after the
watchdog.
"""

from __future__ import annotations

import json
import re
import shlex
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from tests.support.nspawn import Guest, wait_until
from tests.system import test_engine_sandbox as sandbox
from tests.system import test_install_to_first_token as first
from tests.system.conftest import print_guest_state

pytestmark = [pytest.mark.system, pytest.mark.engine]

# The sandbox test's guest (the CPU engine and the tiny model); see test_install_to_first_token.
engine_guest = sandbox.engine_guest

UNIT = first.UNIT
MODEL = first.MODEL
CONFIG = first.CONFIG
SERVING_STATUS = first.SERVING_STATUS
# How long a re-exec that keeps the engine may take to serve again (the drain, two
# Python starts on a busy 2-core machine); one that restarts it takes a vLLM start.
SWITCH_TIMEOUT_S = 120

# The load: one streamed chat completion every LOAD_INTERVAL_S from inside the guest,
# each on its own thread, one JSON line per request in LOAD_LOG; it stops once
# LOAD_STOP exists and the requests it started have ended.
LOAD_UNIT = "systest-load.service"
LOAD_SCRIPT = "/var/tmp/systest-load.py"
LOAD_LOG = "/var/tmp/systest-load.jsonl"
LOAD_STOP = "/var/tmp/systest-load.stop"
LOAD_INTERVAL_S = 0.4
# Load before and after the upgrade, for the latency outside the switch.
LOAD_AROUND_S = 10
LOAD_CLIENT = r"""
import json, os, sys, threading, time, urllib.error, urllib.request
url, out_path, stop_path, interval, model = sys.argv[1:6]
interval = float(interval)
lock = threading.Lock()
out = open(out_path, "a", buffering=1)

def one(n):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": f"request {n}"}],
                       "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    started, status, done, error, chunks = time.time(), 0, False, "", 0
    try:
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            status = response.status
            for raw in response:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                elif '"error"' in data:
                    error = data[:300]
                else:
                    chunks += 1
    except urllib.error.HTTPError as exc:
        status, error = exc.code, exc.read().decode(errors="replace")[:300]
    except Exception as exc:
        error = repr(exc)[:300]
    record = {"n": n, "start": started, "duration": time.time() - started, "status": status,
              "done": done, "chunks": chunks, "error": error}
    with lock:
        out.write(json.dumps(record) + "\n")

threads, n, next_at = [], 0, time.monotonic()
while not os.path.exists(stop_path):
    n += 1
    thread = threading.Thread(target=one, args=(n,))
    thread.start()
    threads.append(thread)
    next_at += interval
    time.sleep(max(0.0, next_at - time.monotonic()))
for thread in threads:
    thread.join()
"""

# Test 4's hang: appended to the installed ximd/agent.py, it makes run_daemon of an image
# started by a re-exec (XIMD_REEXEC_STATE set; never in the old image, its preflight or
# a fresh start) say so and sleep, so the old image's preflight (which imports the
# module) passes and only the new image hangs.
HANG_MARKER = "systest: the re-executed image hangs"
HANG_PATCH = f"""

_systest_run_daemon = run_daemon


def run_daemon(load_config):  # noqa: F811
    if os.environ.get(reexec.STATE_ENV):
        print({HANG_MARKER!r}, file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    return _systest_run_daemon(load_config)
"""


@dataclass
class Request:
    n: int
    start: float
    duration: float
    status: int
    done: bool
    chunks: int
    error: str

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def failed(self) -> bool:
        return self.status != 200 or not self.done or bool(self.error)


# ---------------------------------------------------------------- helpers


def ximd_status(guest: Guest) -> dict | None:
    """`ximd status --format json` as root inside the guest; None while no daemon answers."""
    done = guest.run(["ximd", "status", "--format", "json"], check=False, timeout=30)
    return json.loads(done.stdout) if done.returncode == 0 else None


def unit_props(guest: Guest) -> dict[str, str]:
    return guest.show(UNIT, "MainPID", "NRestarts", "StatusText", "ActiveState", "Result")


def journal_since(guest: Guest, cursor: str) -> str:
    return guest.journal(UNIT, after_cursor=cursor, output="cat")


def reexec(guest: Guest, *args: str, timeout: float = SWITCH_TIMEOUT_S + 240) -> str:
    """`ximd reexec` as root; its one line of output."""
    done = guest.run(["ximd", "reexec", *args], timeout=timeout, check=False)
    assert done.returncode == 0, f"ximd reexec exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout.strip()


def start_load(guest: Guest) -> None:
    guest.write_file(LOAD_SCRIPT, LOAD_CLIENT)
    guest.run(["rm", "-f", LOAD_LOG, LOAD_STOP])
    guest.run(["systemd-run", f"--unit={LOAD_UNIT}", "--property=Type=exec", "/usr/bin/python3", LOAD_SCRIPT,
               f"{first.ROUTER_URL}/v1/chat/completions", LOAD_LOG, LOAD_STOP, str(LOAD_INTERVAL_S), MODEL])


def stop_load(guest: Guest) -> list[Request]:
    guest.run(["touch", LOAD_STOP])
    wait_until(lambda: guest.active_state(LOAD_UNIT) not in ("active", "activating", "deactivating"), 180,
               "the load client to finish its requests", interval=0.5)
    text = guest.run(["cat", LOAD_LOG], check=False).stdout
    return sorted((Request(**json.loads(line)) for line in text.splitlines() if line.strip()),
                  key=lambda r: r.start)


def journal_time(guest: Guest, cursor: str, needle: str) -> float:
    """Wall-clock time of the first of the unit's journal entries after `cursor` containing `needle`."""
    entries = first.journal_entries(guest, after_cursor=cursor)
    entry = first.first_entry(entries, re.escape(needle))
    return int(entry["__REALTIME_TIMESTAMP"]) / 1e6


# The router of these tests lives on the node's host (in production it runs elsewhere):
# the node's upgrade must not restart it under the load, so policy-rc.d, which every
# package script asks first, says no for it alone.
POLICY_RC_D = "/usr/sbin/policy-rc.d"
KEEP_THE_ROUTER = '#!/bin/sh\n[ "$1" = "xim-router.service" ] && exit 101\nexit 0\n'


def apt_install(guest: Guest, deb_paths: list[str]) -> tuple[str, float]:
    """apt's output, and when it returned (wall clock); the router is left running."""
    guest.write_file(POLICY_RC_D, KEEP_THE_ROUTER, mode="0755", owner="root:root")
    try:
        done = guest.run(["apt-get", "install", "-y", "-q", "-o", "Dpkg::Options::=--force-confold", *deb_paths],
                         timeout=300)
    finally:
        guest.run(["rm", "-f", POLICY_RC_D])
    return done.stdout + done.stderr, time.time()


def wait_new_image_serving(guest: Guest, generation: int, timeout: float = SWITCH_TIMEOUT_S) -> dict:
    """Poll `ximd status` until the image of `generation` says it serves through the router."""
    def serving() -> dict | None:
        status = ximd_status(guest)
        if status and status.get("generation") == generation and status.get("status") == SERVING_STATUS:
            return status
        return None
    return wait_until(serving, timeout, f"ximd generation {generation} to serve through the router", interval=0.25)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def node(engine_guest, packages) -> first.Node:
    """The install-to-first-token node: installed, enrolled, serving the real engine."""
    try:
        return first.start_node(engine_guest, packages)
    except BaseException:
        print_guest_state(engine_guest)
        raise


# ---------------------------------------------------------------- tests


def test_upgrade_under_load_keeps_the_process_and_the_engine(node, packages, record_property):
    guest = node.guest
    props = first.wait_serving(guest)
    before = ximd_status(guest)
    assert before is not None and before["version"] == packages.version and before["generation"] == 0, before
    ximd_pid, restarts = int(props["MainPID"]), int(props["NRestarts"])
    engines = first.engine_pids(guest)
    assert engines == [before["engine"]["pid"]], (engines, before["engine"])
    cursor = guest.journal_cursor()

    start_load(guest)
    try:
        time.sleep(LOAD_AROUND_S)
        with ThreadPoolExecutor(1) as pool:
            upgrade_began = time.time()
            # The three packages of one source upgrade together (they depend on each other's version).
            apt = pool.submit(apt_install, guest, [packages.guest_path(deb) for deb in packages.upgrade_debs.values()])
            after = wait_new_image_serving(guest, 1, timeout=SWITCH_TIMEOUT_S + 180)
            serving_at = time.time()
            apt_output, apt_done = apt.result()
        time.sleep(LOAD_AROUND_S)
    finally:
        requests = stop_load(guest)
    props_after = unit_props(guest)
    engines_after = first.engine_pids(guest)

    journal = journal_since(guest, cursor)
    switch_began = journal_time(guest, cursor, "re-executing ximd")
    during = [r for r in requests if r.start <= serving_at and r.end >= switch_began]
    outside = [r for r in requests if r.end < switch_began or r.start > serving_at]
    failed = [r for r in requests if r.failed]
    median_outside = statistics.median(r.duration for r in outside) if outside else 0.0
    longest_during = max((r.duration for r in during), default=0.0)
    figures = {
        "requests": len(requests), "failed": len(failed), "requests_during_switch": len(during),
        "longest_during_switch_s": round(longest_during, 2), "median_outside_s": round(median_outside, 2),
        "added_latency_s": round(longest_during - median_outside, 2),
        "switch_s": round(serving_at - switch_began, 2),
        "upgrade_to_serving_s": round(serving_at - upgrade_began, 2),
        "apt_install_s": round(apt_done - upgrade_began, 2),
        "ximd_pid": f"{ximd_pid} -> {props_after['MainPID']}",
        "engine_pid": f"{engines} -> {engines_after}",
    }
    print("upgrade under load: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    for key, value in figures.items():
        record_property(key, value)

    assert "re-executing in place" in apt_output, apt_output
    assert int(props_after["MainPID"]) == ximd_pid, props_after
    assert int(props_after["NRestarts"]) == restarts == 0, props_after
    assert engines_after == engines, (engines, engines_after)
    assert after["version"] == packages.upgrade_version, after
    assert after["generation"] == 1 and after["pid"] == ximd_pid, after
    assert after["engine"]["handover"] == "adopted" and after["engine"]["pid"] == engines[0], after["engine"]
    assert f"re-executed in place from {packages.version}" in journal, journal
    assert f"Adopted the running engine (pid {engines[0]})" in journal, journal
    assert during, f"no request overlapped the switch ({switch_began:.1f}..{serving_at:.1f}): {requests}"
    assert not failed, f"{len(failed)} of {len(requests)} requests failed: {failed[:10]}"


def test_a_changed_engine_setting_restarts_the_engine_and_says_why(node, packages):
    guest = node.guest
    props = first.wait_serving(guest)
    before = ximd_status(guest)
    assert before is not None
    ximd_pid, restarts, generation = int(props["MainPID"]), int(props["NRestarts"]), before["generation"]
    engines = first.engine_pids(guest)
    assert len(engines) == 1, engines
    config = guest.read_file(CONFIG)
    assert "max_num_seqs" not in config, config
    guest.write_file(CONFIG, config.replace("[engine]\n", "[engine]\nmax_num_seqs = 6\n"), mode="0640",
                     owner="root:xerotier")
    cursor = guest.journal_cursor()

    line = reexec(guest)
    print(line)
    after = wait_new_image_serving(guest, generation + 1, timeout=first.ENGINE_START_TIMEOUT_S)
    journal = journal_since(guest, cursor)
    engines_after = first.engine_pids(guest)
    props_after = unit_props(guest)
    assert int(props_after["MainPID"]) == ximd_pid and int(props_after["NRestarts"]) == restarts, props_after
    assert len(engines_after) == 1 and engines_after[0] not in engines, (engines, engines_after)
    assert after["engine"]["pid"] == engines_after[0], after
    assert after["engine"]["handover"].startswith("restarted: this version would start the engine differently"), \
        after["engine"]
    assert f"not keeping the engine the previous image handed over (pid {engines[0]})" in journal, journal
    assert "would start the engine differently" in journal, journal
    assert "--max-num-seqs 6" in " ".join(guest.run(["ps", "-o", "args=", "-p", str(engines_after[0])]).stdout.split())
    reply = first.http(guest, "/v1/completions", {"model": MODEL, "prompt": "changed", "max_tokens": 2,
                                                  "ignore_eos": True})
    assert reply.status == 200 and reply.json()["usage"]["completion_tokens"] == 2, reply


def test_reexec_with_the_router_away_serves_and_reconnects(node):
    guest = node.guest
    props = first.wait_serving(guest)
    before = ximd_status(guest)
    assert before is not None
    ximd_pid, generation = int(props["MainPID"]), before["generation"]
    engines = first.engine_pids(guest)
    guest.systemctl("stop", first.ROUTER_UNIT)
    guest.systemctl("reset-failed", first.ROUTER_UNIT, check=False)
    wait_until(lambda: "retrying" in guest.show(UNIT, "StatusText")["StatusText"], 60,
               "ximd to notice the router is gone", interval=0.5)
    cursor = guest.journal_cursor()

    line = reexec(guest)
    print(line)
    status = ximd_status(guest)
    assert status is not None and status["generation"] == generation + 1, status
    assert status["phase"] == "serving" and status["engine"]["handover"] == "adopted", status
    text = guest.show(UNIT, "StatusText")["StatusText"]
    assert text.startswith(f"serving {MODEL}; router ") and text.endswith("retrying"), text
    assert guest.active_state(UNIT) == "active"
    assert first.engine_pids(guest) == engines

    guest.systemctl("start", first.ROUTER_UNIT)
    first.wait_serving(guest, timeout=60)
    assert first.main_pid(guest) == ximd_pid
    assert first.engine_pids(guest) == engines
    reply = first.http(guest, "/v1/completions", {"model": MODEL, "prompt": "back", "max_tokens": 2,
                                                  "ignore_eos": True})
    assert reply.status == 200, reply
    assert "Adopted the running engine" in journal_since(guest, cursor)


def test_a_hanging_new_image_is_killed_by_the_watchdog_and_the_node_comes_back(node):
    guest = node.guest
    props = first.wait_serving(guest)
    ximd_pid, restarts = int(props["MainPID"]), int(props["NRestarts"])
    engines = first.engine_pids(guest)
    assert len(engines) == 1, engines
    agent_py = guest.run(["python3", "-c", "import ximd.agent as a; print(a.__file__)"]).stdout.strip()
    backup = "/var/tmp/systest-agent.py"
    guest.run(["cp", "-p", agent_py, backup])
    cursor = guest.journal_cursor()
    try:
        guest.run(f"cat >> {shlex.quote(agent_py)}", input=HANG_PATCH)
        reexec(guest, "--no-wait")
        wait_until(lambda: HANG_MARKER in journal_since(guest, cursor), 60, "the new image to hang", interval=0.5)
    finally:
        guest.run(["cp", "-p", backup, agent_py])
    hung_at = time.time()

    def restarted() -> dict[str, str] | None:
        now = unit_props(guest)
        return now if int(now["NRestarts"]) > restarts and int(now["MainPID"]) not in (0, ximd_pid) else None
    now = wait_until(restarted, first.WATCHDOG_SEC + 60, "systemd to restart the hung ximd", interval=0.5)
    print(f"watchdog restart {time.time() - hung_at:.1f} s after the new image hung")
    assert int(now["NRestarts"]) == restarts + 1, now
    journal = journal_since(guest, cursor)
    print("\n".join(line for line in journal.splitlines()
                    if "Watchdog" in line or "watchdog" in line or "ABRT" in line or HANG_MARKER in line))
    assert "Watchdog timeout" in journal, journal
    assert "Failed with result 'watchdog'" in journal, journal
    assert "ABRT" in journal, journal
    assert not guest.exists(f"/proc/{ximd_pid}")
    # No engine of the hung process is left, not even for a moment beside the new one.
    for pid in engines:
        assert not guest.exists(f"/proc/{pid}"), f"the old engine (pid {pid}) outlived its ximd"

    props = first.wait_serving(guest)
    new_pid = int(props["MainPID"])
    status = ximd_status(guest)
    assert status is not None and status["generation"] == 0 and "handover" not in status["engine"], status
    engines_after = first.engine_pids(guest)
    assert len(engines_after) == 1 and engines_after[0] not in engines, (engines, engines_after)
    assert first.descends_from(engines_after[0], new_pid, first.process_tree(guest))
    reply = first.http(guest, "/v1/completions", {"model": MODEL, "prompt": "again", "max_tokens": 2,
                                                  "ignore_eos": True})
    assert reply.status == 200 and reply.json()["usage"]["completion_tokens"] == 2, reply
