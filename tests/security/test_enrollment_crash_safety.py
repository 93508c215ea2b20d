"""Finding 8: enrollment survives a failure between spending the join key and saving the identity.

The join key is single-use. The crash is made exactly where it hurts: the node
reaches the real router through a small HTTP relay that, once the router has
answered POST /v1/enroll (the key is spent), fills the tiny tmpfs that holds the
node's state directory before the answer reaches the node. The save then fails
with "No space left on device", as on a full disk. After space is freed, the
same join key must enroll the node as the same agent; a different CURVE key
must still get `join_key_used`. The daemon must say what happened and wait
(STATUS, the watchdog still fed), never die silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.standin_engine import write_model_dir
from tests.mesh.helpers import load_config, write_agent_config
from tests.support.daemon import Daemon
from tests.support.router import RouterProcess, wait_for
from xim_router import store as store_mod
from ximd import enrollment
from ximd.enrollment import EnrollmentRejected
from ximd.exitcodes import EX_CANTCREAT, EX_OK
from ximd.identity import identity_path, pending_path

REPO = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: run as root")


# ---------------------------------------------------------------- a disk that fills at the wrong moment


class TinyDisk:
    """A 64 KiB tmpfs as the state directory; fill() takes every free byte."""

    def __init__(self, path: Path):
        self.path = path
        self.filler = path / "filler"

    def __enter__(self) -> TinyDisk:
        self.path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(self.path)],
                       check=True)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            with contextlib.suppress(OSError):     # until ENOSPC
                while True:
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink()


class EnrollRelay:
    """An HTTP relay in front of the router that runs `after_enroll` once the router has
    answered an enroll request, before the node sees the answer; it keeps the answers."""

    def __init__(self, upstream: str, after_enroll: Callable[[], None]):
        self.answers: list[dict] = []
        self.public_keys: list[str] = []      # the CURVE key of each enroll request
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = urllib.request.Request(upstream + self.path, data=body, method="POST",
                                                 headers={k: v for k, v in self.headers.items()
                                                          if k.lower() in ("content-type", "authorization")})
                try:
                    with urllib.request.urlopen(request, timeout=30) as resp:
                        status, payload = resp.status, resp.read()
                except urllib.error.HTTPError as err:
                    status, payload = err.code, err.read()
                if self.path == "/v1/enroll":
                    relay.public_keys.append(json.loads(body)["curve_public_key"])
                if self.path == "/v1/enroll" and status == 200:
                    relay.answers.append(json.loads(payload))
                    if len(relay.answers) == 1:
                        after_enroll()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def full_after_spend(tmp_path, router) -> Iterator[tuple[TinyDisk, EnrollRelay]]:
    with TinyDisk(tmp_path / "state") as disk:
        relay = EnrollRelay(router.http_url, after_enroll=disk.fill)
        try:
            yield disk, relay
        finally:
            relay.close()


def run_ximd(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "XEROTIER_AGENT_CONFIG": str(config),
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ximd.cli", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def refresh_status(router: RouterProcess, token: str) -> int:
    request = urllib.request.Request(router.http_url + "/v1/enroll/refresh", data=b"{}", method="POST",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


# ---------------------------------------------------------------- `ximd enroll`


@needs_root
def test_a_full_disk_after_the_key_is_spent_is_recovered_with_the_same_agent(tmp_path, router,
                                                                             full_after_spend):
    disk, relay = full_after_spend
    key = router.join_key()
    config = write_agent_config(tmp_path / "agent.toml", url=relay.url, state_dir=disk.path, join_key=key)

    failed = run_ximd(config, "enroll")

    assert len(relay.answers) == 1, "the router was asked once and spent the key"
    agent_id = relay.answers[0]["agent_id"]
    assert failed.returncode == EX_CANTCREAT, (failed.returncode, failed.stderr)
    assert "No space left on device" in failed.stderr and agent_id in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr

    disk.free()
    retried = run_ximd(config, "enroll")

    assert retried.returncode == EX_OK, retried.stderr
    saved = json.loads(identity_path(disk.path).read_text())
    assert saved["agent_id"] == agent_id
    assert [a["agent_id"] for a in router.agents()] == [agent_id], "one agent, the same one"
    assert relay.public_keys == [saved["agent_public_key"]] * 2, "the retry reused the saved keypair"
    assert not pending_path(disk.path).exists(), "the pending keypair is gone once the identity is saved"
    # The token the node never saved is void; the fresh one works.
    assert refresh_status(router, relay.answers[0]["token"]) == 401
    assert refresh_status(router, saved["token"]) == 200


@needs_root
def test_the_spent_key_from_another_curve_key_is_still_refused(tmp_path, router, full_after_spend):
    disk, relay = full_after_spend
    key = router.join_key()
    config = write_agent_config(tmp_path / "agent.toml", url=relay.url, state_dir=disk.path, join_key=key)
    assert run_ximd(config, "enroll").returncode == EX_CANTCREAT

    other = load_config(write_agent_config(tmp_path / "other.toml", url=router.http_url,
                                           state_dir=tmp_path / "other-state"))
    with pytest.raises(EnrollmentRejected) as info:
        asyncio.run(enrollment.enroll_and_save(other, key, source="the test", hostname="thief", hardware={}))
    assert info.value.code == "join_key_used"
    assert len(router.agents()) == 1


@needs_root
def test_a_full_disk_before_enrolling_spends_nothing(tmp_path, router):
    key = router.join_key()
    with TinyDisk(tmp_path / "state") as disk:
        disk.fill()
        config = write_agent_config(tmp_path / "agent.toml", url=router.http_url, state_dir=disk.path,
                                    join_key=key)

        done = run_ximd(config, "enroll")

        assert done.returncode == EX_CANTCREAT, done.stderr
        assert "No space left on device" in done.stderr, done.stderr
        assert "join key is still unused" in done.stderr, done.stderr
        assert router.agents() == []

        disk.free()
        assert run_ximd(config, "enroll").returncode == EX_OK
        assert len(router.agents()) == 1


# ---------------------------------------------------------------- the router's side (its real store)


def spent_once(tmp_path: Path) -> tuple[store_mod.Store, str, str, store_mod.Enrolled]:
    store = store_mod.Store(tmp_path / "router")
    key = store.create_join_key(ttl_s=10 * store_mod.ENROLL_REPLAY_WINDOW_S, uses=1, model=None, now=1000.0)
    public = "P" * 40
    first = store.enroll(join_key=key, public_key=public, hostname="n", hardware={}, max_concurrent=4,
                         agent_version="t", token_ttl_s=600, now=1000.0)
    return store, key, public, first


def replay(store: store_mod.Store, key: str, public: str, now: float) -> store_mod.Enrolled:
    return store.enroll(join_key=key, public_key=public, hostname="n", hardware={}, max_concurrent=4,
                        agent_version="t", token_ttl_s=600, now=now)


def test_a_repeated_enrollment_is_the_same_agent_with_a_fresh_token(tmp_path):
    store, key, public, first = spent_once(tmp_path)
    again = replay(store, key, public, now=1060.0)
    assert again.agent.agent_id == first.agent.agent_id and again.token != first.token
    with pytest.raises(store_mod.StoreError, match="invalid_token"):
        store.check_token(first.token, now=1061.0)
    assert len(store.agents()) == 1


def test_no_replay_after_the_window(tmp_path):
    store, key, public, _ = spent_once(tmp_path)
    with pytest.raises(store_mod.StoreError) as info:
        replay(store, key, public, now=1000.0 + store_mod.ENROLL_REPLAY_WINDOW_S + 1)
    assert info.value.code == "join_key_used"


def test_no_replay_once_the_agent_has_connected(tmp_path):
    store, key, public, first = spent_once(tmp_path)
    store.set_state(first.agent.agent_id, store_mod.ACTIVE, now=1010.0)
    with pytest.raises(store_mod.StoreError) as info:
        replay(store, key, public, now=1020.0)
    assert info.value.code == "join_key_used"


def test_no_replay_with_another_join_key(tmp_path):
    store, _, public, _ = spent_once(tmp_path)
    other = store.create_join_key(ttl_s=3600, uses=1, model=None, now=1000.0)
    with pytest.raises(store_mod.StoreError) as info:
        replay(store, other, public, now=1010.0)
    assert info.value.code == "key_in_use"


# ---------------------------------------------------------------- the daemon


def daemon_for(tmp_path: Path, url: str, key: str, state: Path) -> Daemon:
    model = write_model_dir(tmp_path / "model")
    config = (f'[router]\nurl = "{url}"\njoin_key = "{key}"\ninsecure = true\n'
              f'[engine]\nmodel = "{model}"\nserved_model_name = "tiny"\n'
              f'python = "{REPO / "bench" / "standin-python"}"\n')
    daemon = Daemon(tmp_path / "d", config=config, env={"XEROTIER_AGENT_STATE_DIR": str(state)})
    return daemon


@needs_root
def test_the_daemon_waits_with_a_clear_status_and_recovers(tmp_path, router, full_after_spend):
    disk, relay = full_after_spend
    (tmp_path / "d").mkdir()
    daemon = daemon_for(tmp_path, relay.url, router.join_key(), disk.path)
    try:
        daemon.start()
        status = wait_for(lambda: next((f["STATUS"] for _, f in reversed(daemon.notify.messages)
                                        if "STATUS" in f and "cannot save" in f["STATUS"]), None)
                          or daemon.notify.poll(0.2), 60, "a STATUS line about the failed save")
        agent_id = relay.answers[0]["agent_id"]
        assert "No space left on device" in status and agent_id in status, status
        assert "retrying in" in status
        assert "No space left on device" in daemon.log()
        # Waiting, not wedged: the watchdog keeps being fed after the failure.
        seen = len(daemon.notify.times_of("WATCHDOG"))
        wait_for(lambda: len(daemon.notify.times_of("WATCHDOG")) >= seen + 3 or daemon.notify.poll(0.5),
                 30, "watchdog pings after the failed save")
        assert daemon.proc.poll() is None

        disk.free()
        daemon.wait_for_log(f"enrolled as agent {agent_id}", timeout=120)
        assert json.loads(identity_path(disk.path).read_text())["agent_id"] == agent_id
        assert [a["agent_id"] for a in router.agents()] == [agent_id]
    finally:
        daemon.stop()


def test_faulthandler_dumps_every_thread_on_sigabrt(tmp_path):
    """The unit's comment: a wedged daemon killed by the watchdog (SIGABRT) leaves its stacks."""
    daemon = Daemon(tmp_path)
    try:
        daemon.start()
        daemon.notify.wait_for("READY", "1")
        daemon.signal(signal.SIGABRT)
        daemon.wait(timeout=30)
        log = daemon.log()
        assert "Fatal Python error: Aborted" in log, log[-2000:]
        assert "most recent call first" in log
    finally:
        daemon.stop()
