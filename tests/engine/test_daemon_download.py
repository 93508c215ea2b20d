"""The daemon fetching its model: `ximd run` (enrolled with a real xim-router) whose
model is a hub id behind the stand-in hub; the download runs in the real engine
environment's huggingface_hub. No engine starts here: these are the waits and the
stop before it (the system test, tests/system/test_model_download.py, goes on to
serve under a real systemd).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.support.daemon import Daemon
from tests.support.engine import engine_python, tiny_model
from tests.support.hubstub import HubStub
from tests.support.router import RouterProcess, wait_for

pytestmark = pytest.mark.engine

REPO = "acme/tiny-chat"
TOKEN = "hf_daemontoken_0123456789"


@pytest.fixture(scope="module")
def engine_py() -> str:
    return engine_python("cpu")


@pytest.fixture
def hub(engine_py):
    with HubStub({REPO: tiny_model(engine_py)}, token=TOKEN, mode="gated") as stub:
        yield stub


def start_daemon(tmp_path: Path, router: RouterProcess, hub: HubStub, engine_py: str) -> tuple[Daemon, Path]:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "hf-token").write_text("\n")          # the unit's fallback: no token
    config = (f'[router]\nurl = "{router.http_url}"\nallow_http = true\njoin_key = "{router.join_key()}"\n'
              f'[engine]\nmodel = "{REPO}"\npython = "{engine_py}"\n')
    daemon = Daemon(tmp_path, config=config, env={"HF_ENDPOINT": hub.url,
                                                  "CREDENTIALS_DIRECTORY": str(credentials)})
    return daemon.start(), credentials


def statuses(daemon: Daemon) -> list[str]:
    return [fields["STATUS"] for _, fields in daemon.notify.messages if "STATUS" in fields]


def downloaders() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and "fetch" in p.info["cmdline"]
            and REPO in p.info["cmdline"]]


def test_gated_waits_ready_then_a_reload_with_a_token_file_downloads_and_a_stop_ends_it(tmp_path, router, hub,
                                                                                   engine_py):
    daemon, credentials = start_daemon(tmp_path, router, hub, engine_py)
    try:
        ready = daemon.notify.wait_for("READY", "1", timeout=60)
        gated = (f"model {REPO} is gated: accept its licence at {hub.url}/{REPO}, put a token of that account "
                 "in /etc/xerotier/hf-token (or model_cache.hf_token_file), then `systemctl restart ximd` "
                 "(next try in 30 s)")
        assert ready["STATUS"] == gated
        status = json.loads(daemon.cli("status", "--format", "json").stdout)
        assert status["phase"] == "model-waiting" and status["status"] == gated
        assert daemon.log().count(f"model {REPO} is gated") == 1

        # The token arrives in a file named by the configuration: a reload reads it at once
        # (a token in /etc/xerotier/hf-token reaches the unit only at a restart).
        token_file = tmp_path / "hf-token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        daemon.config_path.write_text(daemon.config_path.read_text().replace(
            "[engine]\n", f'[model_cache]\nhf_token_file = "{token_file}"\n[engine]\n'))
        hub.rate = 400_000                         # about 16 s: slow enough to stop it half-way
        hub.mode = "throttled"
        hub.token = TOKEN
        daemon.signal(signal.SIGHUP)
        daemon.notify.wait_for("STATUS", None, timeout=5)
        wait_for(lambda: any(s.startswith(f"downloading {REPO}: ") for s in statuses(daemon)), 30,
                 "a downloading STATUS")
        wait_for(lambda: json.loads(daemon.cli("status", "--format", "json").stdout).get("download"), 10,
                 "the download in `ximd status`")
        download = json.loads(daemon.cli("status", "--format", "json").stdout)["download"]
        assert download["model"] == REPO and download["total_bytes"] > download["done_bytes"] >= 0
        assert "trying to fetch the model again now" in daemon.log()
        children = wait_for(downloaders, 10, "the downloader process")
        blobs = Path(daemon.state_dir) / "models" / "hub" / "models--acme--tiny-chat" / "blobs"
        wait_for(lambda: any(p.name.endswith(".ximd-partial") and p.stat().st_size > 0 for p in blobs.iterdir()),
                 20, "the first MiB of the weights")

        began = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=15) == 0
        assert time.monotonic() - began < 8, "a stop during a download must not wait for it"
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive
        assert any(p.name.endswith(".ximd-partial") and p.stat().st_size > 0 for p in blobs.iterdir()), \
            "what was fetched stays for the next start"
        log = daemon.log()
        assert TOKEN not in log and all(TOKEN not in s for s in statuses(daemon))
        assert "stopped" in log.splitlines()[-1]
    finally:
        daemon.stop()
    assert os.environ.get("HF_TOKEN") != TOKEN
