"""A hub model under the real systemd 252: downloaded, resumed, and waited for.

One guest (the sandbox test's: the CPU engine at /opt/xerotier/engine, the tiny model at
MODEL_DIR) runs the stand-in hub (tests/support/hubstub.py, by the guest's python3, as a
transient unit on 127.0.0.1:8099) serving the tiny model as `acme/tiny-chat`, throttled and
gated by a token; ximd downloads it through the engine environment's huggingface_hub.

1. A throttled download longer than the unit's TimeoutStartSec (25 s here) keeps the unit
   activating with a `downloading …` STATUS (EXTEND_TIMEOUT_USEC while bytes arrive) and ends
   active and serving, without a restart; the token reaches the hub and nothing else.
2. ximd SIGKILLed mid-download is restarted by systemd, resumes the partial file and never
   starts the engine on a partial snapshot.
3. A gated model without a token is a waiting state (READY=1, a STATUS that says what to do,
   one error line), not a restart loop; with the token in place the download starts at once.

vLLM starts three times in this module (about a minute each on this machine). The tests
run in file order and share the module's guest; each one states the state it starts from.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.nspawn import Guest, GuestError, wait_until
from tests.system import test_engine_sandbox as sandbox
from tests.system import test_install_to_first_token as first_token
from tests.system.conftest import print_guest_state

pytestmark = [pytest.mark.system, pytest.mark.engine]

# The sandbox test's guest, booted again for this module (a failing test prints its journal).
engine_guest = sandbox.engine_guest
MODEL_DIR = sandbox.MODEL_DIR
UNIT, CONFIG = first_token.UNIT, first_token.CONFIG
journal_entries = first_token.journal_entries
HF_ID = "acme/tiny-chat"
SERVING_STATUS = f"serving {HF_ID}; router connected"
DOWNLOADING = re.compile(rf"^downloading {re.escape(HF_ID)}: \d+\.\d of \d+\.\d MB, ")
CACHE = "/var/lib/xerotier/models"
BLOBS = f"{CACHE}/hub/models--acme--tiny-chat/blobs"

HUBSTUB = Path(__file__).resolve().parents[1] / "support" / "hubstub.py"
HUB_UNIT = "hubstub.service"
HUB_PORT = 8099
HUB_URL = f"http://127.0.0.1:{HUB_PORT}"
HUB_SCRIPT = "/srv/hubstub.py"
HUB_TOKEN_FILE = "/srv/hubstub-token"       # the stub's own copy: /etc/xerotier/hf-token comes and goes
TOKEN_FILE = "/etc/xerotier/hf-token"
# The whole model takes about this long at the stub's rate: longer than TIMEOUT_START_S.
DOWNLOAD_S = 45
TIMEOUT_START_S = 25
DROPIN = "/etc/systemd/system/ximd.service.d/50-systest-download.conf"
ENGINE_START_TIMEOUT_S = first_token.ENGINE_START_TIMEOUT_S
SAMPLE_S = 0.5
GATED_WATCH_S = 10


@dataclass
class Sample:
    at_s: float
    active_state: str
    sub_state: str
    status_text: str
    n_restarts: int


@dataclass
class Hub:
    """What the module's set-up established."""
    guest: Guest
    token: str
    model_bytes: int
    weights_bytes: int
    samples: list[Sample] = field(default_factory=list)
    start_to_active_s: float = 0.0          # systemd's clock: exec of ximd → active
    wall_to_active_s: float = 0.0           # ours: `systemctl start` → the first active sample
    download_s: float = 0.0


# ---------------------------------------------------------------- helpers


def stub_request(guest: Guest, path: str, body: dict | None = None) -> dict:
    argv = ["python3", "-c", first_token.HTTP_CLIENT, HUB_URL + path, json.dumps(body) if body else "", "10"]
    reply = json.loads(guest.run(argv, timeout=30).stdout)
    assert reply["status"] == 200, reply
    return json.loads(reply["body"])


def hub_stats(guest: Guest) -> dict:
    return stub_request(guest, "/_stub/stats")


def configure_hub(guest: Guest, **settings) -> dict:
    return stub_request(guest, "/_stub/config", settings)


def start_hub(guest: Guest, rate: int) -> None:
    guest.write_file(HUB_SCRIPT, HUBSTUB.read_text())
    guest.run(["systemd-run", f"--unit={HUB_UNIT}", "/usr/bin/python3", "-I", HUB_SCRIPT,
               "--repo", f"{HF_ID}={MODEL_DIR}", "--port", str(HUB_PORT), "--mode", "throttled",
               "--rate", str(rate), "--token-file", HUB_TOKEN_FILE, "--require-token"])

    def answering() -> bool:
        if guest.active_state(HUB_UNIT) not in ("active", "activating"):
            raise GuestError(f"the stub hub did not start:\n{guest.journal(HUB_UNIT, lines=40)}")
        try:
            return bool(hub_stats(guest)["repos"])
        except (GuestError, AssertionError, ValueError):
            return False
    wait_until(answering, 30, "the stub hub to answer", interval=0.3)


def agent_config(join_key: str) -> str:
    """The first-token test's configuration, with the hub model instead of the local directory."""
    local = f'model = "{MODEL_DIR}"\nserved_model_name = "{first_token.MODEL}"\n'
    text = first_token.agent_config(join_key)
    assert local in text, text
    return text.replace(local, f'model = "{HF_ID}"\n')


def show(guest: Guest) -> dict[str, str]:
    return guest.show(UNIT, "ActiveState", "SubState", "StatusText", "NRestarts", "MainPID")


def sample(guest: Guest, began: float) -> Sample:
    props = show(guest)
    return Sample(round(time.monotonic() - began, 1), props["ActiveState"], props["SubState"], props["StatusText"],
                  int(props["NRestarts"]))


def watch_until_serving(guest: Guest, samples: list[Sample], timeout: float = ENGINE_START_TIMEOUT_S,
                        on_sample=None) -> Sample:
    """Sample the unit every SAMPLE_S until it is active and serving; fail at once on "failed"."""
    began = time.monotonic()
    while True:
        s = sample(guest, began)
        samples.append(s)
        if on_sample is not None:
            on_sample(s)
        if s.active_state == "failed" or s.status_text.startswith("engine "):
            raise GuestError(f"{UNIT} is {s.active_state} ({s.status_text!r}) instead of serving:\n"
                             f"{guest.journal(UNIT, lines=40)}")
        if s.active_state == "active" and s.status_text == SERVING_STATUS:
            return s
        if s.at_s > timeout:
            raise GuestError(f"{UNIT} not serving after {timeout} s; last: {s}\n{guest.journal(UNIT, lines=40)}")
        time.sleep(SAMPLE_S)


def message(entry: dict) -> str:
    text = entry.get("MESSAGE")
    return text if isinstance(text, str) else ""


def entries_matching(entries: list[dict], pattern: str) -> list[dict]:
    regex = re.compile(pattern)
    return [e for e in entries if regex.search(message(e))]


def at_s(entry: dict) -> float:
    return int(entry["__REALTIME_TIMESTAMP"]) / 1e6


def partial_bytes(guest: Guest) -> int:
    out = guest.run(f"stat -c %s {BLOBS}/*.ximd-partial 2>/dev/null || true", check=False).stdout.split()
    return max((int(n) for n in out), default=0)


def served_bodies(stats: dict) -> list[dict]:
    return [r for r in stats["requests"] if r["method"] == "GET" and "/resolve/" in r["path"]
            and r["status"] in (200, 206)]


def not_owned_by_xerotier(guest: Guest) -> list[str]:
    out = guest.run(["find", CACHE, "(", "!", "-user", "xerotier", "-o", "!", "-group", "xerotier", ")"]).stdout
    return out.split()


# ---------------------------------------------------------------- the module's node


@pytest.fixture(scope="module")
def hub(engine_guest, packages) -> Hub:
    """Install, start the router and the stub hub, configure a hub model, `systemctl start ximd`,
    watching the unit all the way to serving."""
    guest = engine_guest
    try:
        return first_download(guest, packages)
    except BaseException:
        print_guest_state(guest)
        raise


def first_download(guest: Guest, packages) -> Hub:
    guest.run(["apt-get", "install", "-y", "-q", *packages.node()], timeout=300)
    guest.wait_active(UNIT)
    model_bytes = int(guest.run(["python3", "-c", "import os, sys; print(sum(os.path.getsize(os.path.join(d, f)) "
                                 "for d, _, fs in os.walk(sys.argv[1]) for f in fs))", MODEL_DIR]).stdout)
    weights_bytes = int(guest.run(["stat", "-c", "%s", f"{MODEL_DIR}/model.safetensors"]).stdout)
    token = "hf_systest_" + secrets.token_hex(12)
    guest.write_file(HUB_TOKEN_FILE, token + "\n", mode="0600")
    start_hub(guest, rate=model_bytes // DOWNLOAD_S)
    stats = hub_stats(guest)
    assert stats["repos"][HF_ID]["size"] == model_bytes, stats["repos"]
    assert stats["require_token"] is True and stats["mode"] == "throttled"

    first_token.start_router(guest, packages)   # (and a join key for its own model, left unused)
    join_key = guest.run(["xim-router", "join-key", "create", "--state-dir", first_token.ROUTER_STATE,
                          "--allow-model", HF_ID]).stdout.strip()
    guest.write_file(DROPIN, f"[Service]\nEnvironment=HF_ENDPOINT={HUB_URL}\nTimeoutStartSec={TIMEOUT_START_S}s\n"
                             "RestartSec=2s\n")
    guest.systemctl("daemon-reload")
    guest.systemctl("stop", UNIT)
    guest.write_file(CONFIG, agent_config(join_key), mode="0640", owner="root:xerotier")
    guest.write_file(TOKEN_FILE, token + "\n", mode="0600")

    node = Hub(guest, token, model_bytes, weights_bytes)
    began = time.monotonic()
    guest.systemctl("start", "--no-block", UNIT)
    final = watch_until_serving(guest, node.samples)
    node.wall_to_active_s = next(s.at_s for s in node.samples if s.active_state == "active")
    node.start_to_active_s = first_token.active_after_start_s(guest)
    entries = journal_entries(guest)
    started = entries_matching(entries, rf"^downloading {re.escape(HF_ID)} \(revision ")
    complete = entries_matching(entries, rf"^model {re.escape(HF_ID)} is complete")
    assert len(started) == 1 and len(complete) == 1, [message(e) for e in started + complete]
    node.download_s = at_s(complete[0]) - at_s(started[0])
    print(f"\nsystemctl start ximd → active in {node.start_to_active_s:.1f} s (systemd's clock; "
          f"{node.wall_to_active_s:.1f} s by the test's), download {node.download_s:.1f} s for "
          f"{model_bytes} bytes, NRestarts={final.n_restarts}, {time.monotonic() - began:.1f} s to serving")
    return node


# ---------------------------------------------------------------- 1. longer than TimeoutStartSec


def test_a_download_longer_than_the_start_timeout_ends_active_and_serving(hub, record_property):
    record_property("start_to_active_s", round(hub.start_to_active_s, 1))
    record_property("download_s", round(hub.download_s, 1))
    samples = hub.samples
    downloading = [s for s in samples if DOWNLOADING.match(s.status_text)]
    assert downloading, f"never saw a `downloading {HF_ID}: … of … MB, …` STATUS: {samples}"
    assert {s.active_state for s in downloading} == {"activating"}, downloading
    # The download alone outlasted TimeoutStartSec: EXTEND_TIMEOUT_USEC kept the start alive.
    assert hub.download_s > TIMEOUT_START_S, hub.download_s
    assert downloading[-1].at_s - downloading[0].at_s > TIMEOUT_START_S, (downloading[0], downloading[-1])
    first_active = next(i for i, s in enumerate(samples) if s.active_state == "active")
    assert {s.active_state for s in samples[:first_active]} <= {"inactive", "activating"}, samples
    assert {s.n_restarts for s in samples} == {0}, samples
    assert show(hub.guest)["NRestarts"] == "0"
    assert hub.start_to_active_s > hub.download_s
    print("STATUS samples while downloading:", *sorted({s.status_text for s in downloading})[:3], sep="\n  ")


def test_the_journal_shows_the_download_in_paced_progress_lines(hub):
    entries = journal_entries(hub.guest)
    progress = [e for e in entries if e.get("XIM_PHASE") == "model"
                and re.match(rf"^downloading {re.escape(HF_ID)}: \d+%", message(e))]
    # Every 10 % or 30 s: at least a handful over 45 s, and never one per second.
    assert 3 <= len(progress) <= 15, [message(e) for e in progress]
    assert all(e.get("XIM_MODEL") == HF_ID for e in progress)
    engine = entries_matching(entries, r"^Engine started \(pid \d+\)")
    complete = entries_matching(entries, rf"^model {re.escape(HF_ID)} is complete")
    assert engine and at_s(engine[0]) >= at_s(complete[0])


def test_the_token_reaches_the_hub_and_nothing_else(hub):
    guest, token = hub.guest, hub.token
    stats = hub_stats(guest)
    bodies = served_bodies(stats)
    assert bodies and all(r["authorized"] for r in bodies), bodies
    assert token not in json.dumps(stats)
    # Not in any journal entry of the boot (every unit, every field), nor in STATUS.
    assert token not in guest.run(["journalctl", "-b", "--no-pager", "-o", "json"]).stdout
    assert all(token not in s.status_text for s in hub.samples)
    # Not in any process's command line.
    cmdlines = guest.run("for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done", check=False).stdout
    assert "vllm.entrypoints" in cmdlines and token not in cmdlines
    # Not in the engine's environment (the downloader had it, and has exited).
    engines = first_token.engine_pids(guest)
    assert len(engines) == 1, engines
    environ = guest.run(["cat", f"/proc/{engines[0]}/environ"]).stdout
    assert "HF_HUB_OFFLINE=1" in environ and token not in environ and "HF_TOKEN" not in environ


# ---------------------------------------------------------------- 2. killed mid-download


def test_killed_mid_download_the_daemon_resumes_and_never_serves_the_partial_snapshot(hub):
    guest = hub.guest
    guest.systemctl("stop", UNIT, timeout=90)
    removed = guest.run(["ximd", "model", "rm", HF_ID])
    assert removed.stdout.startswith(f"removed {HF_ID}"), removed.stdout
    assert not_owned_by_xerotier(guest) == []
    before = hub_stats(guest)["bytes_served"]
    restarts_before = int(show(guest)["NRestarts"])
    cursor = guest.journal_cursor()

    guest.systemctl("start", "--no-block", UNIT)
    wait_until(lambda: partial_bytes(guest) > hub.weights_bytes // 3, 90, "a third of the weights", interval=0.3)
    killed_pid = int(show(guest)["MainPID"])
    at_kill = hub_stats(guest)["bytes_served"] - before
    kill_cursor = guest.journal_cursor()
    assert first_token.engine_pids(guest) == []
    # The daemon alone, as a crash would: its downloader follows it (PDEATHSIG). Killing the
    # whole unit races with processes already on their way out (EIO from systemd 252).
    guest.systemctl("kill", "--kill-who=main", "-s", "SIGKILL", UNIT)

    def restarted() -> bool:
        props = show(guest)
        return int(props["NRestarts"]) > restarts_before and int(props["MainPID"]) not in (0, killed_pid)
    wait_until(restarted, 60, "systemd to restart the killed ximd", interval=0.3)
    # Owned by xerotier whatever the kill left behind.
    assert not_owned_by_xerotier(guest) == []
    watch_until_serving(guest, [])
    fetched = hub_stats(guest)["bytes_served"] - before
    print(f"\nresume: model {hub.model_bytes} bytes; fetched {at_kill} before the kill, {fetched} in this round "
          f"({fetched / hub.model_bytes:.3f} x the model)")
    assert fetched < 1.25 * hub.model_bytes, (fetched, hub.model_bytes)

    before_kill = journal_entries(guest, cursor)
    before_kill = before_kill[:next((i for i, e in enumerate(before_kill) if e["__CURSOR"] == kill_cursor),
                                    len(before_kill))]
    assert not entries_matching(before_kill, r"^Engine started"), "the killed daemon started an engine"
    after = journal_entries(guest, kill_cursor)
    resuming = entries_matching(after, rf"^resuming the download of {re.escape(HF_ID)}: ")
    assert resuming, [message(e) for e in after][:60]
    complete = entries_matching(after, rf"^model {re.escape(HF_ID)} is complete")
    engine = entries_matching(after, r"^Engine started \(pid \d+\)")
    assert len(complete) == 1 and len(engine) == 1, [message(e) for e in complete + engine]
    assert at_s(engine[0]) >= at_s(complete[0]) > at_s(resuming[0])
    assert int(complete[0]["_PID"]) == int(engine[0]["_PID"]) != killed_pid
    print(f"  {message(resuming[0])}")


# ---------------------------------------------------------------- 3. gated without a token


def test_gated_without_a_token_is_a_waiting_state_and_the_token_starts_the_download(hub):
    guest = hub.guest
    guest.systemctl("stop", UNIT, timeout=90)
    guest.run(["ximd", "model", "rm", HF_ID])
    guest.run(["rm", "-f", TOKEN_FILE])
    configure_hub(guest, rate=hub.model_bytes // 10)     # the gate is what this test is about
    cursor = guest.journal_cursor()
    guest.systemctl("start", "--no-block", UNIT)
    expected = (f"model {HF_ID} is gated: accept its licence at {HUB_URL}/{HF_ID}, put a token of that account "
                f"in {TOKEN_FILE} (or model_cache.hf_token_file), then `systemctl restart ximd`")
    props = guest.wait_active(UNIT, timeout=60)
    status = props["StatusText"]
    assert status.startswith(expected), status
    restarts = int(props["NRestarts"])
    pid = props["MainPID"]
    watched = []
    began = time.monotonic()
    while time.monotonic() - began < GATED_WATCH_S:
        watched.append(sample(guest, began))
        time.sleep(SAMPLE_S)
    assert {(s.active_state, s.n_restarts) for s in watched} == {("active", restarts)}, watched
    assert show(guest)["MainPID"] == pid
    entries = journal_entries(guest, cursor)
    gated = entries_matching(entries, rf"^{re.escape(expected)}")
    assert len(gated) == 1 and gated[0]["PRIORITY"] == "3", [(e["PRIORITY"], message(e)) for e in gated]
    print(f"\ngated STATUS: {status}\ngated journal line (PRIORITY={gated[0]['PRIORITY']}): {message(gated[0])}")
    assert not [r for r in served_bodies(hub_stats(guest)) if not r["authorized"]]

    # The operator puts the token in place. systemd hands a service its credentials only when it
    # starts (LoadCredential=): a reload retries at once but cannot bring the token, and says so.
    guest.write_file(TOKEN_FILE, hub.token + "\n", mode="0600")
    reload_cursor = guest.journal_cursor()
    guest.systemctl("reload", UNIT)
    awaits = (f"model {HF_ID} is gated and {TOKEN_FILE} came after ximd started: systemd hands it over only at "
              "start, so `systemctl restart ximd`")
    props = wait_until(lambda: (p := show(guest))["StatusText"].startswith(awaits) and p, 20,
                       "the STATUS to ask for a restart")
    assert props["ActiveState"] == "active" and int(props["NRestarts"]) == restarts, props
    told = entries_matching(journal_entries(guest, reload_cursor), rf"^{re.escape(awaits)}")
    assert len(told) == 1 and told[0]["PRIORITY"] == "3", told
    print(f"after the token file and `systemctl reload ximd`:\n  STATUS: {props['StatusText']}")

    seen: list[Sample] = []
    guest.systemctl("restart", "--no-block", UNIT)
    watch_until_serving(guest, seen)
    downloading = [s for s in seen if DOWNLOADING.match(s.status_text)]
    assert downloading and downloading[0].at_s < 10, seen
    print(f"  `systemctl restart ximd`: first `downloading` STATUS after {downloading[0].at_s:.1f} s: "
          f"{downloading[0].status_text}")
    assert all(r["authorized"] for r in served_bodies(hub_stats(guest)))
    listing = guest.run(["ximd", "model", "list"]).stdout
    print(listing)
    row = next(line for line in listing.splitlines() if line.startswith(HF_ID))
    assert re.search(r"\bcomplete\s+yes\b", row), listing
    rows = json.loads(guest.run(["ximd", "model", "list", "--format", "json"]).stdout)
    assert [(r["model"], r["complete"], r["in_use"]) for r in rows] == [(HF_ID, True, True)], rows
    assert not_owned_by_xerotier(guest) == []
