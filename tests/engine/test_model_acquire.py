"""Getting a model from a hub: the official client (the engine environment's
huggingface_hub) against the stand-in hub (tests/support/hubstub.py), through
ximd.models.acquire and `ximd model pull`.

Normal, gated, unknown, down and corrupting hubs; a pull killed mid-file that
resumes where it was; a stop that ends the downloader at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support.engine import engine_python, load_config, tiny_model
from tests.support.hubstub import HubStub
from ximd.models import ModelCache
from ximd.models.acquire import HubSource, ModelWait, acquire
from ximd.models.credentials import HubToken
from ximd.models.hub import Downloader, download_env

pytestmark = pytest.mark.engine

REPO = "acme/tiny-chat"
TOKEN = "hf_stubtoken_0123456789"
PULL_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def engine_py() -> str:
    return engine_python("cpu")


@pytest.fixture(scope="module")
def model_dir(engine_py) -> Path:
    return tiny_model(engine_py)


@pytest.fixture
def hub(model_dir):
    with HubStub({REPO: model_dir}) as stub:
        yield stub


class Recorder:
    def __init__(self):
        self.steps: list[str] = []
        self.seen = []

    def step(self, hf_id, line):
        self.steps.append(line)

    def progress(self, p):
        self.seen.append(p)


def source(engine_py: str, hub: HubStub, cache: ModelCache, token: str | None = None) -> HubSource:
    hub_token = HubToken(token, "a test") if token else None
    env = download_env({"HF_ENDPOINT": hub.url}, str(cache.root), hub_token)
    return HubSource(Downloader(engine_py, env), hub.url, hub_token)


def fetch(engine_py, hub, cache, token=None, reporter=None):
    snapshot, hold = asyncio.run(acquire(REPO, cache, source(engine_py, hub, cache, token), reporter or Recorder()))
    os.close(hold)
    return snapshot


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    return names == sorted(p.name for p in b.iterdir()) and all((a / n).read_bytes() == (b / n).read_bytes()
                                                                 for n in names)


def test_a_model_arrives_complete_checked_and_marked(engine_py, hub, model_dir, tmp_path):
    cache = ModelCache(tmp_path / "models", 10**10)
    reporter = Recorder()
    snapshot = fetch(engine_py, hub, cache, reporter=reporter)
    assert same_files(model_dir, snapshot)
    assert cache.snapshot(REPO) == snapshot and [e.complete for e in cache.entries()] == [True]
    assert reporter.steps == [f"asking the hub at {hub.url} about {REPO}"]
    phases = {p.phase for p in reporter.seen}
    assert phases == {"downloading", "verifying"}
    last = [p for p in reporter.seen if p.phase == "downloading"][-1]
    assert last.done == last.total == sum(f.stat().st_size for f in model_dir.iterdir())
    served = hub.bytes_served
    assert fetch(engine_py, hub, cache) == snapshot and hub.bytes_served == served   # nothing fetched again


def test_a_gated_model_waits_for_a_token_and_the_token_goes_to_the_hub(engine_py, hub, tmp_path):
    hub.token = TOKEN
    hub.mode = "gated"
    cache = ModelCache(tmp_path / "models", 10**10)
    with pytest.raises(ModelWait) as waiting:
        fetch(engine_py, hub, cache)
    assert waiting.value.kind == "gated"
    assert waiting.value.line == (f"model {REPO} is gated: accept its licence at {hub.url}/{REPO}, put a token of "
                                  "that account in /etc/xerotier/hf-token (or model_cache.hf_token_file), then "
                                  "`systemctl restart ximd`")
    with pytest.raises(ModelWait, match="the token from a test has no access"):
        fetch(engine_py, hub, cache, token="hf_wrong")
    assert cache.snapshot(REPO) is None
    fetch(engine_py, hub, cache, token=TOKEN)
    assert cache.snapshot(REPO) is not None
    bodies = [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path and r.status in (200, 206)]
    assert bodies and all(r.authorized for r in bodies)


@pytest.mark.parametrize("mode, repo, kind, wording", [
    ("down", REPO, "http", "answered HTTP 503"),
    ("normal", "acme/absent", "not_found", "model acme/absent was not found at"),
])
def test_hub_trouble_is_a_waiting_state_that_says_what_to_do(engine_py, hub, tmp_path, mode, repo, kind, wording):
    hub.mode = mode
    cache = ModelCache(tmp_path / "models", 10**10)
    src = source(engine_py, hub, cache)
    with pytest.raises(ModelWait) as waiting:
        asyncio.run(acquire(repo, cache, src, Recorder()))
    assert waiting.value.kind == kind and wording in waiting.value.line


def test_no_hub_at_all_is_a_network_wait(engine_py, tmp_path):
    cache = ModelCache(tmp_path / "models", 10**10)
    env = download_env({"HF_ENDPOINT": "http://127.0.0.1:9"}, str(cache.root), None)
    with pytest.raises(ModelWait) as waiting:
        asyncio.run(acquire(REPO, cache, HubSource(Downloader(engine_py, env), "http://127.0.0.1:9", None),
                            Recorder()))
    assert waiting.value.kind == "network"
    assert waiting.value.line.startswith(f"cannot reach the Hugging Face hub at http://127.0.0.1:9 to fetch {REPO}")


def test_corrupted_bytes_are_caught_by_the_checksums_and_never_marked_complete(engine_py, hub, tmp_path, caplog):
    hub.mode = "corrupt"
    cache = ModelCache(tmp_path / "models", 10**10)
    with pytest.raises(ModelWait) as waiting:
        fetch(engine_py, hub, cache)
    assert waiting.value.kind == "corrupt" and "failed the hub's checksums twice" in waiting.value.line
    assert cache.snapshot(REPO) is None and "fetching them again" in caplog.text
    hub.mode = "normal"
    assert fetch(engine_py, hub, cache) is not None      # the next try mends it


def test_a_model_that_cannot_fit_is_refused_before_a_byte_is_fetched(engine_py, hub, tmp_path):
    cache = ModelCache(tmp_path / "models", 1000)
    with pytest.raises(ModelWait, match=r"cannot download acme/tiny-chat needs .* more than the model cache's cap"):
        fetch(engine_py, hub, cache)
    assert hub.bytes_served == 0


# ---------------------------------------------------------------- `ximd model pull`, killed and resumed


def pull_command(tmp_path: Path, engine_py: str, hub: HubStub) -> tuple[list[str], dict[str, str]]:
    cfg = load_config(tmp_path)
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nstate_dir = "{cfg.state_dir}"\n[engine]\npython = "{engine_py}"\n')
    env = {"PATH": os.environ["PATH"], "HF_ENDPOINT": hub.url, "HOME": str(tmp_path)}
    return [sys.executable, "-m", "ximd", "model", "pull", REPO, "--config", str(config)], env


def downloaders_of(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and "fetch" in p.info["cmdline"]
            and str(pid) in p.info["cmdline"]]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_pull_killed_mid_file_resumes_where_it_was(engine_py, hub, model_dir, tmp_path):
    size = sum(f.stat().st_size for f in model_dir.iterdir())
    hub.rate = size // 8                       # about 8 s for the whole model
    hub.mode = "throttled"
    argv, env = pull_command(tmp_path, engine_py, hub)
    pull = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cache = ModelCache(Path(load_config(tmp_path).model_cache_path), 10**11)
    partials = cache.entry_path(REPO) / "blobs"
    wait_for(lambda: any(p.name.endswith(".ximd-partial") and p.stat().st_size > size // 3
                         for p in partials.glob("*")) if partials.is_dir() else False, 60, "a third of the weights")
    children = downloaders_of(pull.pid)
    pull.send_signal(signal.SIGKILL)            # a crash: no chance to clean anything up
    pull.wait(10)
    wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children), 10,
             "the downloader to die with its parent")
    assert cache.snapshot(REPO) is None         # what is there is partial: never served
    fetched_before = hub.bytes_served
    hub.mode = "normal"
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=PULL_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert f"{REPO} is complete in" in done.stdout
    assert same_files(model_dir, cache.snapshot(REPO))
    resumed = [r for r in hub.requests if r.status == 206]
    assert resumed, "the second pull asked for the rest of the file (a Range request)"
    total = hub.bytes_served
    print(json.dumps({"model_bytes": size, "before_kill": fetched_before, "in_total": total,
                      "ratio": round(total / size, 3)}))
    assert total < size * 1.25, f"fetched {total} bytes in all for a {size}-byte model"


def test_a_stopped_pull_ends_its_downloader_at_once_and_keeps_the_bytes(engine_py, hub, model_dir, tmp_path):
    size = sum(f.stat().st_size for f in model_dir.iterdir())
    hub.rate = size // 20
    hub.mode = "throttled"
    argv, env = pull_command(tmp_path, engine_py, hub)
    pull = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cache = ModelCache(Path(load_config(tmp_path).model_cache_path), 10**11)
    children = wait_for(lambda: downloaders_of(pull.pid), 60, "the downloader to start")
    time.sleep(3)                               # some bytes arrive
    began = time.monotonic()
    pull.send_signal(signal.SIGTERM)
    pull.wait(15)
    assert time.monotonic() - began < 10
    wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children), 10,
             "the downloader to stop")
    assert any(p.name.endswith(".ximd-partial") for p in (cache.entry_path(REPO) / "blobs").glob("*"))
