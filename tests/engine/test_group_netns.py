"""Two group members, each in its own network namespace and /dev/shm, under a real router (issue 15).

The host gets a bridge on a private subnet with the router on it; each member is a real
`ximd run` with `group.enabled` inside `ip netns exec` + `unshare -m` (its own network,
its own tmpfs on /dev/shm), its fabric the namespace's veth. The real CPU engine runs the
tiny model split TP=2 over the two. One engine pair at a time: the VM has 2 cores.

One scenario, in order (each step needs the one before):
- the group is declared while the follower has never connected: the leader waits with a
  STATUS that names it, and starts no engine;
- the follower arrives: the group forms and serves a completion through the router's
  OpenAI API; the fabric variables reached both engines;
- kill -9 of the follower's engine: a new epoch, and the group serves again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest

from tests.support.daemon import Daemon
from tests.support.engine import engine_python, tiny_model
from tests.support.router import RouterProcess, wait_for
from ximd.identity import load_identity

pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"),
                                 reason="needs root, iproute2 and unshare (network namespaces)")]

MODEL = "ximd-test/tiny-llama"
GROUP = "tiny"
SUBNET = "10.77.0"                 # RFC 1918: a private fabric
ROUTER_IP = f"{SUBNET}.254"
SERVE_TIMEOUT_S = 600              # both engines' start on a loaded 2-core VM
SHM = "mount -t tmpfs -o size=2g tmpfs /dev/shm && exec \"$@\""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Lan:
    """A bridge with the router's address and one namespace per member, each on a veth."""

    def __init__(self, members: int):
        tag = str(os.getpid() % 100000)
        self.bridge = f"xbr{tag}"
        self.namespaces = [f"xim{tag}m{i}" for i in range(members)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(members)]

    def __enter__(self) -> Lan:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{ROUTER_IP}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, (ns, address) in enumerate(zip(self.namespaces, self.addresses, strict=True)):
            veth = f"{self.bridge}v{i}"
            ip("netns", "add", ns)
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", veth, "master", self.bridge, "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc) -> None:
        for i, ns in enumerate(self.namespaces):
            # The host's end too: a namespace something still holds outlives its name.
            subprocess.run(["ip", "link", "del", f"{self.bridge}v{i}"], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


class Member(Daemon):
    """`ximd run` inside a member's namespace, with its own /dev/shm."""

    def __init__(self, tmp_path: Path, ns: str, **kwargs):
        super().__init__(tmp_path, **kwargs)
        self.ns = ns

    def start(self, *args: str) -> Member:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "unshare", "-m", "--propagation", "private",
                                      "sh", "-c", SHM, "sh", sys.executable, "-m", "ximd.cli", "run", *args],
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def status(self) -> dict:
        done = self.cli("status", "--format", "json")
        return json.loads(done.stdout) if done.returncode == 0 else {}

    def statuses(self) -> list[str]:
        self.notify.poll(0.05)
        return [fields["STATUS"] for _, fields in self.notify.messages if "STATUS" in fields]


def member(tmp_path: Path, lan: Lan, rank: int, router: RouterProcess, engine_py: str, model_dir: Path) -> Member:
    root = tmp_path / f"member{rank}"
    root.mkdir()
    config = (f'[router]\nurl = "{router.http_url}"\nallow_http = true\njoin_key = "{router.join_key()}"\n'
              f'[engine]\npython = "{engine_py}"\nmax_model_len = 512\n'
              f'[group]\nenabled = true\nfabric_address = "{lan.addresses[rank]}"\n')
    m = Member(root, lan.namespaces[rank], config=config, watchdog_usec=None)
    imported = m.cli("model", "import", str(model_dir), "--as", MODEL, timeout=120)
    assert imported.returncode == 0, imported.stderr
    enrolled = m.cli("enroll", timeout=60)
    assert enrolled.returncode == 0, enrolled.stderr
    return m


def complete(router: RouterProcess) -> dict | None:
    request = urllib.request.Request(router.http_url + "/v1/completions", method="POST", data=json.dumps({
        "model": MODEL, "prompt": "def hello():", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
    }).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=20) as answer:
            return json.loads(answer.read())
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return None


def served(router: RouterProcess, *members: Member) -> dict | None:
    """A completion through the router, or None; meanwhile the members' notifications are read
    (a receiver left unread fills up and ximd's STATUS lines are lost)."""
    for m in members:
        m.statuses()
    return complete(router)


def group_row(router: RouterProcess) -> dict:
    [row] = json.loads(router.admin("groups", "--format", "json").stdout)
    return row


def engine_environ(pid: int) -> dict[str, str]:
    return psutil.Process(pid).environ()


@pytest.fixture(scope="module")
def engine_py() -> str:
    return engine_python("cpu")


def test_a_group_of_two_namespaces_waits_forms_serves_and_restarts_as_one(tmp_path, engine_py):
    model_dir = tiny_model(engine_py)
    with ExitStack() as stack:
        lan = stack.enter_context(Lan(2))
        # A private bridge of this test alone: plain HTTP off loopback is what it is for.
        router = RouterProcess(tmp_path, http=f"{ROUTER_IP}:0", extra_args=("--allow-insecure-http",))
        router._mesh = f"tcp://{ROUTER_IP}:0"
        stack.enter_context(router)
        leader, follower = (member(tmp_path, lan, rank, router, engine_py, model_dir) for rank in (0, 1))
        stack.callback(follower.stop)
        stack.callback(leader.stop)
        workers = [load_identity(m.state_dir).worker_id for m in (leader, follower)]

        # Declared while the follower has never connected: the leader waits and says for whom.
        router.admin("groups", "create", GROUP, *workers, "--model", MODEL, "--tp", "2")
        leader.start()
        waiting = f"group {GROUP}: rank 0 of 2 (leader), waiting: waiting for {workers[1]} (not connected)"
        wait_for(lambda: waiting in leader.statuses(), 120, "the leader's waiting STATUS")
        assert leader.notify.wait_for("READY", "1", timeout=5)
        assert leader.status()["group"]["state"] == "waiting" and "engine" not in leader.status()

        # The follower arrives: the group forms and serves through the router.
        began = time.monotonic()
        follower.start()
        answer = wait_for(lambda: served(router, leader, follower), SERVE_TIMEOUT_S,
                          "a completion through the router", 2)
        formed_s = time.monotonic() - began
        assert answer["usage"]["completion_tokens"] == 8, answer
        row = group_row(router)
        epoch = row["epoch"]
        assert f"group {GROUP}: serving as rank 0 of 2 (leader)" in leader.statuses(), leader.notify.messages
        wait_for(lambda: f"group {GROUP}: serving as rank 1 of 2" in follower.statuses(), 30, "the follower serving")
        for m, address in zip((leader, follower), lan.addresses, strict=True):
            env = engine_environ(m.status()["engine"]["pid"])
            assert env["VLLM_HOST_IP"] == address and env["GLOO_SOCKET_IFNAME"] == "eth0", env

        # kill -9 of the follower's engine: every member starts over in a new epoch, and serves again.
        began = time.monotonic()
        os.kill(follower.status()["engine"]["pid"], 9)
        wait_for(lambda: group_row(router)["epoch"] > epoch, 60, "a new epoch", 0.5)
        answer = wait_for(lambda: served(router, leader, follower), SERVE_TIMEOUT_S,
                          "a completion after the restart", 2)
        restarted_s = time.monotonic() - began
        assert answer["usage"]["completion_tokens"] == 8
        assert f"epoch {epoch} ended" in router.log()
        print(f"group formed and served {formed_s:.0f} s after the follower started; "
              f"served again {restarted_s:.0f} s after its engine was killed")
