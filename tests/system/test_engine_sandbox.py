"""The unit's hardening keeps a real vLLM working: the CPU engine environment (the one
xerotier-engine-install builds), bind-mounted at /opt/xerotier/engine, serves the tiny
model from inside ximd.service's own sandbox (user, ProtectSystem=strict, the syscall
filter, DevicePolicy=closed, no MemoryDenyWriteExecute, ...) and inside the engine's
own Landlock sandbox (ximd/engine/sandbox.py, as ximd starts it), which under the
unit's syscall filter hides /etc/xerotier from it.

The unit's ExecStart is swapped for the engine's command line with a drop-in, so this
holds whatever the daemon does; the daemon-driven engine test builds on the same guest.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.engine import engine_python, tiny_model
from tests.support.nspawn import Guest, wait_until
from tests.system.conftest import GUEST_DEBS

pytestmark = [pytest.mark.system, pytest.mark.engine]

UNIT = "ximd.service"
ENGINE_DIR = "/opt/xerotier/engine"
MODEL_DIR = "/srv/model"
SOCKET = "/run/ximd/engine.sock"
ENGINE_START_TIMEOUT_S = 300
# The engine's Landlock policy as ximd hands it to its launcher (ximd/engine/sandbox.py).
SANDBOX_POLICY = json.dumps({"writable": ["/var/lib/xerotier", "/var/cache/xerotier", "/run/ximd"],
                             "hidden": ["/var/lib/xerotier/enrollment", "/etc/xerotier"]})
SECRET = "/etc/xerotier/agent.toml"    # root:xerotier 0640: the unit's user may read it


def engine_dropin(launcher: str) -> str:
    """The research-tested CPU command line (research/vllm-cpu.md), over ximd's unix socket,
    behind the sandbox launcher; before it, the same launcher (and, for contrast, no
    launcher) try to read a secret as the unit's user and say what happened."""
    sandboxed = f"/usr/bin/python3 -I -S {launcher} '{SANDBOX_POLICY}'"
    probe = f'if cat {SECRET} >/dev/null; then echo SECRET-READ; else echo SECRET-HIDDEN; fi'
    return f"""[Service]
Type=simple
WatchdogSec=0
Environment=HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_CPU_KVCACHE_SPACE=1
ExecStartPre=/bin/sh -c "echo unconfined: $$({probe})"
ExecStartPre={sandboxed} /bin/sh -c "echo sandboxed: $$({probe})"
ExecStart=
ExecStart={sandboxed} {ENGINE_DIR}/bin/python -m vllm.entrypoints.openai.api_server --model {MODEL_DIR} \\
    --served-model-name tiny --uds {SOCKET} --dtype float32 --max-model-len 512 \\
    --max-num-seqs 4 --enforce-eager --distributed-executor-backend uni
"""
# A stdlib HTTP client over the unix socket, run by the guest's python3 as root.
UDS_REQUEST = r"""
import http.client, json, socket, sys
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(sys.argv[1])
conn = Conn("engine")
body = sys.argv[3] if len(sys.argv) > 3 else None
conn.request("POST" if body else "GET", sys.argv[2], body, {"Content-Type": "application/json"})
response = conn.getresponse()
print(response.status)
print(response.read().decode())
"""


@pytest.fixture(scope="module")
def engine_guest(rootfs_tarball, packages, tmp_path_factory):
    python = engine_python("cpu")
    venv = Path(python).parent.parent
    # A copy the daemon's user can read (the cached model's weights may be 0600 root).
    model = tmp_path_factory.mktemp("model") / "tiny"
    shutil.copytree(tiny_model(python), model)
    subprocess.run(["chmod", "-R", "a+rX", str(model.parent)], check=True)
    booted = Guest.boot(rootfs_tarball, tmp_path_factory.mktemp("engine-guest"),
                        binds_ro={packages.dir: GUEST_DEBS, venv: ENGINE_DIR, model: MODEL_DIR})
    try:
        yield booted
    finally:
        booted.shutdown()


def request(guest: Guest, path: str, body: dict | None = None) -> tuple[int, str]:
    argv = ["python3", "-c", UDS_REQUEST, SOCKET, path] + ([json.dumps(body)] if body else [])
    done = guest.run(argv, check=False, timeout=90)
    if done.returncode != 0:
        return 0, done.stderr
    status, _, text = done.stdout.partition("\n")
    return int(status), text


def test_cpu_engine_serves_inside_the_unit_sandbox(engine_guest, packages):
    guest = engine_guest
    guest.run(["apt-get", "install", "-y", "-q", *packages.node()], timeout=300)
    guest.wait_active(UNIT)
    launcher = guest.run(["python3", "-c", "import ximd.engine.sandbox as s; print(s.__file__)"]).stdout.strip()
    guest.write_file("/etc/systemd/system/ximd.service.d/50-systest-engine.conf", engine_dropin(launcher))
    guest.systemctl("daemon-reload")
    started = time.monotonic()
    guest.systemctl("restart", UNIT)

    def healthy():
        if guest.active_state(UNIT) != "active":
            raise AssertionError(f"the engine died in the sandbox:\n{guest.journal(UNIT, lines=60)}")
        return request(guest, "/health")[0] == 200
    wait_until(healthy, ENGINE_START_TIMEOUT_S, "vLLM's /health inside ximd.service", interval=2)
    print(f"engine healthy inside the sandbox after {time.monotonic() - started:.1f}s")

    status, text = request(guest, "/v1/completions", {"model": "tiny", "prompt": "def hello():",
                                                      "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert status == 200, text
    assert json.loads(text)["usage"]["completion_tokens"] == 8
    # It ran as the unit's user, and wrote only where the sandbox lets it.
    assert any("vllm.entrypoints" in line for line in guest.processes_of("xerotier"))
    journal = guest.journal(UNIT, output="cat")
    assert "Operation not permitted" not in journal and "Read-only file system" not in journal, journal
    # Landlock works under the unit's syscall filter: the unit's user reads the file, the
    # sandboxed engine cannot.
    assert "unconfined: SECRET-READ" in journal, journal
    assert "sandboxed: SECRET-HIDDEN" in journal, journal
    assert "cannot confine" not in journal and "cannot drop privileges" not in journal, journal

    guest.systemctl("stop", UNIT)
    # An exited worker can show for a moment as a zombie until the guest's init reaps it.
    wait_until(lambda: guest.processes_of("xerotier") == [], 15, "no process of xerotier left")
