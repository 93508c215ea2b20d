"""Install to first token under a real systemd 252 (Debian bookworm, systemd-nspawn):
`apt install ./xerotier-agent_*.deb` → a join key in /etc/xerotier/agent.toml →
`systemctl enable --now ximd` → the real CPU vLLM engine on the tiny model → an answer
through the router's OpenAI API → restart without the key → watchdog → stop.

Everything runs inside one guest with a private network: the router from its own
package (xim-router.service, same source) on loopback, the CPU engine environment bind-mounted at
/opt/xerotier/engine (what xerotier-engine-install builds on a real host), the tiny
model at /srv/model. vLLM starts three times in this module (first start, restart
without the key, restart after the watchdog), about a minute each on this machine.

The tests run in file order and share the module's guest; each one states the state
it starts from.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

import pytest

from tests.support.nspawn import Guest, GuestError, wait_until
from tests.system import test_engine_sandbox as sandbox
from tests.system.conftest import print_guest_state

pytestmark = [pytest.mark.system, pytest.mark.engine]

# The sandbox test's guest: the CPU engine at /opt/xerotier/engine and the tiny model at
# MODEL_DIR, readable by xerotier. A module-scoped fixture, so this module boots its own;
# its name is one of the conftest's GUEST_FIXTURES, so a failing test prints the journal.
engine_guest = sandbox.engine_guest
MODEL_DIR = sandbox.MODEL_DIR

UNIT = "ximd.service"
CONFIG = "/etc/xerotier/agent.toml"
IDENTITY = "/var/lib/xerotier/enrollment/identity.json"
MODEL = "tiny"
SERVING_STATUS = f"serving {MODEL}; router connected"
ENGINE_MARKER = "vllm.entrypoints.openai.api_server"
# A vLLM start on the shared 2-core machine takes 45-80 s; leave room for a busy host.
ENGINE_START_TIMEOUT_S = 420
REQUEST_TIMEOUT_S = 120
# How long a unit may still look "inactive" after a --no-block start or restart.
INACTIVE_GRACE_S = 15

ROUTER_UNIT = "xim-router.service"
ROUTER_STATE = "/var/lib/xim-router"
ROUTER_CONFIG = "/etc/xim-router/router.toml"
ROUTER_HTTP = "127.0.0.1:8080"
ROUTER_URL = f"http://{ROUTER_HTTP}"
ROUTER_MESH = "tcp://127.0.0.1:5555"

# A short watchdog so that a wedged daemon is noticed within the test's patience, and a
# short RestartSec so the restart follows at once. Installed before the first start, so
# every start in this module runs under it (the daemon must keep pinging while serving).
WATCHDOG_DROPIN = "/etc/systemd/system/ximd.service.d/50-systest-watchdog.conf"
WATCHDOG_SEC = 10

# The guest's python3 (from the .deb's dependencies) as the OpenAI client: one request,
# the reply as JSON on stdout, HTTP errors included.
HTTP_CLIENT = r"""
import json, sys, urllib.error, urllib.request
url, body, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
request = urllib.request.Request(url, body.encode() if body else None,
                                 {"Content-Type": "application/json"} if body else {})
try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
        status, headers, data = response.status, response.headers, response.read()
except urllib.error.HTTPError as error:
    status, headers, data = error.code, error.headers, error.read()
print(json.dumps({"status": status, "content_type": headers.get("Content-Type", ""),
                  "body": data.decode(errors="replace")}))
"""


@dataclass
class Reply:
    status: int
    content_type: str
    body: str

    def json(self) -> dict:
        return json.loads(self.body)

    def events(self) -> list[str]:
        """The `data:` payloads of a server-sent-event stream, "[DONE]" included."""
        return [line[len("data:"):].strip() for line in self.body.splitlines() if line.startswith("data:")]


def http(guest: Guest, path: str, body: dict | None = None, timeout: float = REQUEST_TIMEOUT_S) -> Reply:
    """A request to the router's HTTP API, made from inside the guest."""
    argv = ["python3", "-c", HTTP_CLIENT, ROUTER_URL + path, json.dumps(body) if body else "", str(timeout)]
    done = guest.run(argv, timeout=timeout + 15, check=False)
    if done.returncode != 0:
        raise GuestError(f"request to {path} failed inside the guest:\n{done.stderr}")
    return Reply(**json.loads(done.stdout))


@dataclass
class Sample:
    """One look at the unit while it starts."""
    at_s: float
    active_state: str
    sub_state: str
    status_text: str


@dataclass
class Node:
    """What the module's first start established, for the tests to check."""
    guest: Guest
    join_key: str
    cursor: str                  # the journal before `systemctl enable --now`
    samples: list[Sample] = field(default_factory=list)
    start_to_active_s: float = 0.0
    agent_id: str = ""


def main_pid(guest: Guest) -> int:
    return int(guest.show(UNIT, "MainPID")["MainPID"])


def engine_pids(guest: Guest) -> list[int]:
    """PIDs of the engine's API server processes anywhere in the guest (one per engine)."""
    done = guest.run(["ps", "-eo", "pid=,args="])
    return [int(line.split(None, 1)[0]) for line in done.stdout.splitlines() if ENGINE_MARKER in line]


def process_tree(guest: Guest) -> dict[int, int]:
    """pid -> ppid of every process in the guest."""
    done = guest.run(["ps", "-eo", "pid=,ppid="])
    return {int(pid): int(ppid) for pid, ppid in (line.split() for line in done.stdout.splitlines())}


def descends_from(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    while pid not in (0, 1):
        if pid == ancestor:
            return True
        pid = parents.get(pid, 0)
    return False


def engine_journal(guest: Guest, after_cursor: str | None = None) -> str:
    """The engine's own lines: ximd forwards them under SYSLOG_IDENTIFIER=ximd-engine."""
    return guest.journal(UNIT, identifier="ximd-engine", after_cursor=after_cursor, output="cat")


def journal_entries(guest: Guest, after_cursor: str | None = None) -> list[dict]:
    text = guest.journal(UNIT, after_cursor=after_cursor, output="json")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def first_entry(entries: list[dict], pattern: str) -> dict:
    regex = re.compile(pattern)
    found = next((e for e in entries if isinstance(e.get("MESSAGE"), str) and regex.search(e["MESSAGE"])), None)
    assert found is not None, f"no journal entry matches {pattern!r}"
    return found


def wait_serving(guest: Guest, timeout: float = ENGINE_START_TIMEOUT_S,
                 samples: list[Sample] | None = None) -> dict[str, str]:
    """Wait until ximd is active and says it serves through the router; fail at once on
    "failed". Records what the unit looked like on the way when `samples` is given."""
    began = time.monotonic()

    def serving() -> dict[str, str] | None:
        props = guest.show(UNIT, "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
        if samples is not None:
            samples.append(Sample(time.monotonic() - began, props["ActiveState"], props["SubState"],
                                  props["StatusText"]))
        # "inactive" is fine for a moment: a --no-block start job may not have run yet.
        gave_up = props["ActiveState"] == "inactive" and time.monotonic() - began > INACTIVE_GRACE_S
        # "engine backoff: …", "engine failed: …": the engine did not come up; say so now
        # rather than after the whole start timeout.
        engine_trouble = props["StatusText"].startswith("engine ")
        if props["ActiveState"] == "failed" or gave_up or engine_trouble:
            raise GuestError(f"{UNIT} is {props['ActiveState']} ({props['StatusText']!r}) instead of serving:\n"
                             f"{guest.journal(UNIT, lines=20)}")
        return props if props["ActiveState"] == "active" and props["StatusText"] == SERVING_STATUS else None
    return wait_until(serving, timeout, f"{UNIT} to be active with STATUS {SERVING_STATUS!r}", interval=0.5)


def start_router(guest: Guest, packages) -> str:
    """The router from its own package, xim-router.service, on the guest's loopback with
    short lease timings in its router.toml; returns a fresh single-use join key."""
    guest.run(["apt-get", "install", "-y", "-q", *packages.router()], timeout=300)
    guest.write_file(ROUTER_CONFIG, f'http = "{ROUTER_HTTP}"\nmesh = "{ROUTER_MESH}"\n'
                                    'lease_interval = "1s"\nlease_timeout = "3s"\n')
    guest.systemctl("restart", ROUTER_UNIT)
    guest.wait_active(ROUTER_UNIT)

    def healthy() -> bool:
        if guest.active_state(ROUTER_UNIT) not in ("active", "activating"):
            raise GuestError(f"xim-router did not start:\n{guest.journal(ROUTER_UNIT, lines=40)}")
        try:
            return http(guest, "/healthz", timeout=5).status == 200
        except GuestError:
            return False
    wait_until(healthy, 60, "xim-router's /healthz", interval=0.5)
    return guest.run(["xim-router", "join-key", "create", "--state-dir", ROUTER_STATE,
                      "--allow-model", MODEL]).stdout.strip()


def router_agent(guest: Guest, agent_id: str) -> dict | None:
    out = guest.run(["xim-router", "agents", "--state-dir", ROUTER_STATE, "--format", "json"]).stdout
    return next((a for a in json.loads(out) if a["agent_id"] == agent_id), None)


def agent_config(join_key: str | None) -> str:
    key = f'join_key = "{join_key}"\n' if join_key else ""
    return (f'[agent]\nmax_concurrent = 4\n\n'
            f'[router]\nurl = "{ROUTER_URL}"\n# plain http on the guest\'s loopback\ninsecure = true\n{key}\n'
            f'[engine]\nmodel = "{MODEL_DIR}"\nserved_model_name = "{MODEL}"\nmax_model_len = 512\n')


def write_config(guest: Guest, join_key: str | None) -> None:
    # The package's mode: the file may hold the join key.
    guest.write_file(CONFIG, agent_config(join_key), mode="0640", owner="root:xerotier")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def node(engine_guest, packages) -> Node:
    """The operator's path: install, mint a key, configure, `systemctl enable --now ximd`."""
    guest = engine_guest
    try:
        return start_node(guest, packages)
    except BaseException:
        # The conftest prints the guest's state for failed tests, not for fixtures.
        print_guest_state(guest)
        raise


def start_node(guest: Guest, packages) -> Node:
    guest.run(["apt-get", "install", "-y", "-q", *packages.node()], timeout=300)
    # Installed without a key, the package's unit waits, not enrolled, and says so.
    props = guest.wait_active(UNIT)
    assert props["StatusText"].startswith("not enrolled"), props

    join_key = start_router(guest, packages)
    assert join_key.startswith("xjk_"), join_key
    guest.write_file(WATCHDOG_DROPIN, f"[Service]\nWatchdogSec={WATCHDOG_SEC}s\nRestartSec=1s\n")
    guest.systemctl("daemon-reload")
    # From a stopped unit, so that the README's `systemctl enable --now ximd` is the
    # command that starts the configured node (on an installed, running node the same
    # key is applied with `systemctl reload ximd`).
    guest.systemctl("stop", UNIT)
    write_config(guest, join_key)

    node = Node(guest, join_key, guest.journal_cursor())
    began = time.monotonic()
    guest.systemctl("enable", "--now", "--no-block", UNIT)
    wait_serving(guest, samples=node.samples)
    node.start_to_active_s = active_after_start_s(guest)
    print(f"systemctl enable --now ximd → active in {node.start_to_active_s:.1f} s "
          f"(serving through the router after {time.monotonic() - began:.1f} s)")
    node.agent_id = json.loads(guest.read_file(IDENTITY))["agent_id"]
    return node


def active_after_start_s(guest: Guest) -> float:
    """systemd's own clock: from the main process's exec to the unit entering active."""
    props = guest.show(UNIT, "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    return (int(props["ActiveEnterTimestampMonotonic"]) - int(props["ExecMainStartTimestampMonotonic"])) / 1e6


# ---------------------------------------------------------------- tests


def test_unit_is_activating_while_the_engine_loads_and_active_once_healthy(node, record_property):
    record_property("start_to_active_s", round(node.start_to_active_s, 1))
    loading = [s for s in node.samples if s.active_state == "activating" and s.status_text.startswith(f"loading {MODEL}")]
    assert loading, f"never saw the unit activating with a 'loading {MODEL}: …' STATUS: {node.samples}"
    # Active never came before the engine was healthy: systemd's "Started" line (written
    # when READY=1 arrived) follows the daemon's "Engine healthy after" line.
    entries = journal_entries(node.guest, after_cursor=node.cursor)
    healthy = first_entry(entries, r"^Engine healthy after \d+(\.\d+)? s")
    started = first_entry(entries, r"^Started ximd\.service|^Started Xerotier inference node agent")
    assert int(healthy["__REALTIME_TIMESTAMP"]) <= int(started["__REALTIME_TIMESTAMP"])
    first_active = next(i for i, s in enumerate(node.samples) if s.active_state == "active")
    assert {s.active_state for s in node.samples[:first_active]} <= {"inactive", "activating"}, node.samples
    # A vLLM start takes tens of seconds here: READY=1 cannot have come with the process.
    assert node.start_to_active_s > 5, node.start_to_active_s


def test_systemctl_status_shows_the_daemons_status_line(node):
    status = node.guest.systemctl("status", "--no-pager", "-l", UNIT, check=False).stdout
    assert f'Status: "{SERVING_STATUS}"' in status, status
    assert node.guest.show(UNIT, "StatusText")["StatusText"] == SERVING_STATUS


def test_journal_tells_the_story(node):
    journal = node.guest.journal(UNIT, output="cat")
    assert re.search(r"kernel socket buffers|net\.core\.[rw]mem_max", journal), journal
    assert f"enrolled as agent {node.agent_id}" in journal, journal
    assert "LMCache off on a CPU engine" in journal, journal
    assert re.search(r"Engine healthy after \d+(\.\d+)? s", journal), journal
    # The unit lets ximd confine its engine (Landlock: the syscall filter allows it).
    assert "The engine runs in a Landlock sandbox" in journal, journal
    assert "runs without a sandbox" not in journal, journal
    # The engine's own output, under its own identifier, in the unit's journal.
    engine_lines = engine_journal(node.guest)
    assert "vLLM API server version" in engine_lines or "Starting vLLM" in engine_lines, engine_lines[-3000:]
    daemon_only = node.guest.run(["journalctl", "--no-pager", "-o", "cat", "-u", UNIT, "-t", "ximd"]).stdout
    assert "enrolled as agent" in daemon_only and "vLLM API server version" not in daemon_only
    # The join key is a secret: it never reaches the journal.
    assert node.join_key not in node.guest.journal(output="cat")


def test_completion_through_the_router_is_answered_by_the_node(node):
    reply = http(node.guest, "/v1/completions", {"model": MODEL, "prompt": "def hello():", "max_tokens": 8,
                                                 "temperature": 0, "ignore_eos": True})
    assert reply.status == 200, reply
    body = reply.json()
    assert body["model"] == MODEL
    assert isinstance(body["choices"][0]["text"], str) and body["choices"][0]["text"]
    assert body["usage"]["completion_tokens"] == 8 and body["usage"]["prompt_tokens"] > 0
    # The router knows the node that answered: it is leased and active.
    agent = router_agent(node.guest, node.agent_id)
    assert agent is not None and agent["state"] == "active", agent


def test_streamed_chat_completion_through_the_router(node):
    reply = http(node.guest, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hello from the system test"}],
        "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}})
    assert reply.status == 200, reply
    assert reply.content_type.startswith("text/event-stream"), reply.content_type
    events = reply.events()
    assert events and events[-1] == "[DONE]", events
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text, chunks
    assert chunks[-1]["usage"]["completion_tokens"] == 6, chunks[-1]


def test_restart_without_the_key_comes_back_enrolled(node):
    guest = node.guest
    write_config(guest, None)
    assert "join_key" not in guest.read_file(CONFIG)
    old_pid = main_pid(guest)
    cursor = guest.journal_cursor()
    guest.systemctl("restart", "--no-block", UNIT)
    props = wait_serving(guest)
    assert int(props["MainPID"]) != old_pid
    assert json.loads(guest.read_file(IDENTITY))["agent_id"] == node.agent_id
    after = guest.journal(UNIT, after_cursor=cursor, output="cat")
    assert "enrolled as agent" not in after.replace("already enrolled as agent", ""), after
    assert "not enrolled" not in after, after
    wait_until(lambda: (router_agent(guest, node.agent_id) or {}).get("state") == "active", 30,
               "the router to list the agent active again", interval=0.5)
    reply = http(guest, "/v1/completions", {"model": MODEL, "prompt": "again", "max_tokens": 2, "ignore_eos": True})
    assert reply.status == 200 and reply.json()["usage"]["completion_tokens"] == 2, reply


def test_watchdog_restarts_a_wedged_daemon_and_one_engine_survives(node):
    guest = node.guest
    before = wait_serving(guest)
    old_pid, restarts = int(before["MainPID"]), int(before["NRestarts"])
    old_engines = engine_pids(guest)
    assert len(old_engines) == 1, old_engines
    cursor = guest.journal_cursor()
    guest.run(["kill", "-STOP", str(old_pid)])

    def restarted() -> bool:
        props = guest.show(UNIT, "MainPID", "NRestarts")
        return int(props["NRestarts"]) > restarts and int(props["MainPID"]) not in (0, old_pid)
    wait_until(restarted, WATCHDOG_SEC + 60, "systemd to restart ximd after the watchdog timeout", interval=0.5)
    props = wait_serving(guest)
    journal = guest.journal(UNIT, after_cursor=cursor, output="cat")
    assert "Watchdog timeout" in journal, journal
    assert not guest.exists(f"/proc/{old_pid}")

    # Exactly one engine, the new daemon's child; nothing of the old tree is left.
    engines = engine_pids(guest)
    assert len(engines) == 1 and engines[0] not in old_engines, (old_engines, engines)
    new_pid = int(props["MainPID"])
    parents = process_tree(guest)
    assert descends_from(engines[0], new_pid, parents), (engines, new_pid)
    owned = [int(line.split(None, 1)[0]) for line in guest.processes_of("xerotier")]
    strays = [pid for pid in owned if pid in parents and not descends_from(pid, new_pid, parents)]
    assert not strays, f"processes of the old daemon survived: {guest.processes_of('xerotier')}"
    reply = http(guest, "/v1/completions", {"model": MODEL, "prompt": "after", "max_tokens": 2, "ignore_eos": True})
    assert reply.status == 200 and reply.json()["usage"]["completion_tokens"] == 2, reply


def test_stop_leaves_no_engine_process(node):
    guest = node.guest
    wait_serving(guest)
    assert engine_pids(guest)
    guest.systemctl("stop", UNIT, timeout=90)
    assert guest.active_state(UNIT) == "inactive"
    assert guest.show(UNIT, "Result")["Result"] == "success"
    assert engine_pids(guest) == []
    assert guest.processes_of("xerotier") == []
