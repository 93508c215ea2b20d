"""The stand-in hub (tests/support/hubstub.py), against plain HTTP and against the official client.

The `engine` tests run huggingface_hub itself (the engine environment's, 2.4.0) in a
subprocess pointed at the stub, so what they assert is what ximd's downloads will meet.
Besides proving the stub, they pin down client behaviour ximd depends on: which
exception each failure raises, where the bytes of a running download live, and that a
killed download does not resume.
"""

from __future__ import annotations

import ast
import hashlib
import http.client
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.hubstub import CORRUPT_EVERY, HubStub, git_blob_sha1
from tests.support.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]
HUBSTUB = REPO / "tests" / "support" / "hubstub.py"
SYSTEM_PYTHON = "/usr/bin/python3"        # what the Debian guest has: no venv, no third-party packages
CLIENT_TIMEOUT_S = 120
MiB = 1024 * 1024

# Runs in the engine environment: one huggingface_hub call, its outcome as JSON on stdout.
CLIENT = r'''
import json, sys
from huggingface_hub import model_info, snapshot_download

def describe(error):
    if error is None:
        return None
    response = getattr(error, "response", None)
    return {"type": type(error).__name__, "classes": [c.__name__ for c in type(error).__mro__],
            "status": getattr(response, "status_code", None),
            "error_code": response.headers.get("X-Error-Code") if response is not None else None,
            "message": str(error)[:400], "cause": describe(error.__cause__ or error.__context__)}

op, repo_id = sys.argv[1], sys.argv[2]
try:
    if op == "snapshot":
        out = {"path": snapshot_download(repo_id)}
    else:
        info = model_info(repo_id, files_metadata=True)
        out = {"sha": info.sha, "files": {s.rfilename: {"size": s.size, "blob_id": s.blob_id,
                                                         "sha256": s.lfs.sha256 if s.lfs else None}
                                          for s in info.siblings}}
except Exception as error:
    out = {"error": describe(error)}
print(json.dumps(out))
'''


# ---------------------------------------------------------------- helpers


def make_repo(root: Path, big_bytes: int = 0) -> Path:
    """A small repo: two text files, a nested one, a small .safetensors (LFS by name) and,
    if asked, a big LFS file of deterministic bytes."""
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}\n')
    (root / "tokenizer_config.json").write_text('{"bos_token": "<s>"}\n')
    (root / "sub").mkdir()
    (root / "sub" / "notes.txt").write_text("nested files keep their folder\n")
    (root / "small.safetensors").write_bytes(bytes(range(256)) * 40)
    if big_bytes:
        block = hashlib.sha256(b"hubstub").digest() * (MiB // 32)
        data = b"".join(bytes([i % 251]) + block[1:] for i in range(big_bytes // MiB))
        (root / "big.safetensors").write_bytes(data)
    return root


def request(url: str, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout_s} s")


# ---------------------------------------------------------------- the stub over plain HTTP


def test_file_answers_carry_the_etags_sizes_and_commit_the_client_keys_on(tmp_path):
    root = make_repo(tmp_path / "repo")
    with HubStub({"org/small": root}) as hub:
        sha = hub.repos["org/small"].sha
        status, headers, body = request(hub.url, "HEAD", "/org/small/resolve/main/config.json")
        config = (root / "config.json").read_bytes()
        assert (status, body) == (200, b"")
        assert headers["ETag"] == f'"{git_blob_sha1(config)}"'
        assert headers["Content-Length"] == str(len(config))
        assert headers["X-Repo-Commit"] == sha
        assert "X-Linked-Etag" not in headers
        assert not [h for h in headers if h.lower().startswith("x-xet")]

        weights = (root / "small.safetensors").read_bytes()
        status, headers, _ = request(hub.url, "HEAD", f"/org/small/resolve/{sha}/small.safetensors")
        assert status == 200
        assert headers["X-Linked-Etag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
        assert headers["X-Linked-Size"] == str(len(weights))

        assert request(hub.url, "GET", "/org/small/resolve/main/sub/notes.txt")[2] == (root / "sub/notes.txt").read_bytes()


def test_ranges_are_served_as_206_and_bad_ones_as_416(tmp_path):
    root = make_repo(tmp_path / "repo")
    weights = (root / "small.safetensors").read_bytes()
    with HubStub({"org/small": root}) as hub:
        status, headers, body = request(hub.url, "GET", "/org/small/resolve/main/small.safetensors", {"Range": "bytes=1000-"})
        assert (status, body) == (206, weights[1000:])
        assert headers["Content-Range"] == f"bytes 1000-{len(weights) - 1}/{len(weights)}"
        assert request(hub.url, "GET", "/org/small/resolve/main/small.safetensors", {"Range": "bytes=10-19"})[2] == weights[10:20]
        status, _, _ = request(hub.url, "GET", "/org/small/resolve/main/small.safetensors", {"Range": f"bytes={len(weights)}-"})
        assert status == 416
        assert hub.bytes_served == len(weights) - 1000 + 10


def test_metadata_lists_every_file_with_sizes_blob_ids_and_lfs_info(tmp_path):
    root = make_repo(tmp_path / "repo")
    with HubStub({"org/small": root}) as hub:
        sha = hub.repos["org/small"].sha
        _, _, body = request(hub.url, "GET", "/api/models/org/small/revision/main?blobs=true")
        info = json.loads(body)
        assert info["sha"] == sha and info["id"] == "org/small"
        siblings = {s["rfilename"]: s for s in info["siblings"]}
        assert set(siblings) == set(files_of(root))
        assert siblings["small.safetensors"]["lfs"]["sha256"] == hashlib.sha256((root / "small.safetensors").read_bytes()).hexdigest()
        assert "lfs" not in siblings["config.json"]

        _, _, body = request(hub.url, "GET", f"/api/models/org/small/tree/{sha}?recursive=true&expand=false")
        tree = {e["path"]: e for e in json.loads(body)}
        assert tree["sub"]["type"] == "directory"
        assert tree["sub/notes.txt"]["size"] == (root / "sub/notes.txt").stat().st_size
        _, _, body = request(hub.url, "GET", f"/api/models/org/small/tree/{sha}?recursive=false")
        assert "sub/notes.txt" not in {e["path"] for e in json.loads(body)}

        status, headers, _ = request(hub.url, "GET", "/api/models/org/small/revision/v9")
        assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
        status, headers, _ = request(hub.url, "HEAD", "/org/other/resolve/main/config.json")
        assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")


def test_the_commit_sha_depends_on_the_files_only(tmp_path):
    one = HubStub({"org/a": make_repo(tmp_path / "a")})
    two = HubStub({"org/b": make_repo(tmp_path / "b")})
    assert one.repos["org/a"].sha == two.repos["org/b"].sha
    (tmp_path / "b" / "config.json").write_text("{}\n")
    assert HubStub({"org/b": tmp_path / "b"}).repos["org/b"].sha != one.repos["org/a"].sha


def test_corrupt_bodies_keep_their_size_and_headers(tmp_path):
    root = make_repo(tmp_path / "repo")
    weights = (root / "small.safetensors").read_bytes()
    with HubStub({"org/small": root}, mode="corrupt") as hub:
        status, headers, body = request(hub.url, "GET", "/org/small/resolve/main/small.safetensors")
        assert status == 200 and len(body) == len(weights) and body != weights
        assert headers["X-Linked-Etag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
        # the same offsets are flipped whichever way the file is fetched, so a resumed download is corrupt too
        _, _, tail = request(hub.url, "GET", "/org/small/resolve/main/small.safetensors", {"Range": f"bytes={CORRUPT_EVERY - 1}-"})
        assert tail == body[CORRUPT_EVERY - 1:]


def test_throttled_bodies_keep_to_the_rate_and_metadata_stays_fast(tmp_path):
    root = make_repo(tmp_path / "repo")
    size = (root / "small.safetensors").stat().st_size
    with HubStub({"org/small": root}, mode="throttled", rate=size * 2) as hub:
        began = time.monotonic()
        request(hub.url, "GET", "/api/models/org/small")
        assert time.monotonic() - began < 0.3
        began = time.monotonic()
        assert len(request(hub.url, "GET", "/org/small/resolve/main/small.safetensors")[2]) == size
        assert time.monotonic() - began >= 0.4


def test_cut_drops_the_connection_after_the_byte_budget(tmp_path):
    root = make_repo(tmp_path / "repo")
    with HubStub({"org/small": root}, mode="cut", cut_after_bytes=1000, cut_drops=2) as hub:
        for expected in (1000, 0):
            with pytest.raises(http.client.IncompleteRead) as err:
                request(hub.url, "GET", "/org/small/resolve/main/small.safetensors")
            assert len(err.value.partial) == expected
        assert request(hub.url, "GET", "/org/small/resolve/main/config.json")[0] == 200   # the two drops are spent
        assert hub.bytes_served == 1000 + (root / "config.json").stat().st_size


def test_gated_and_down_answers(tmp_path):
    root = make_repo(tmp_path / "repo")
    with HubStub({"org/small": root}, mode="gated", token="s3cret") as hub:
        assert request(hub.url, "GET", "/api/models/org/small")[0] == 200        # metadata stays public
        status, headers, _ = request(hub.url, "HEAD", "/org/small/resolve/main/config.json")
        assert (status, headers["X-Error-Code"]) == (401, "GatedRepo") and headers["X-Error-Message"]
        status, headers, _ = request(hub.url, "HEAD", "/org/small/resolve/main/config.json", {"Authorization": "Bearer nope"})
        assert (status, headers["X-Error-Code"]) == (403, "GatedRepo")
        assert request(hub.url, "HEAD", "/org/small/resolve/main/config.json", {"Authorization": "Bearer s3cret"})[0] == 200
        assert [(r.status, r.authorized) for r in hub.requests[1:]] == [(401, False), (403, False), (200, True)]

        hub.mode = "down"
        assert request(hub.url, "GET", "/api/models/org/small")[0] == 503
        assert request(hub.url, "GET", "/_stub/stats")[0] == 200                 # the controls still answer
        with pytest.raises(ValueError):
            hub.mode = "sideways"


def test_require_token_gates_files_in_any_mode_so_a_gated_repo_can_be_throttled(tmp_path):
    root = make_repo(tmp_path / "repo")
    size = (root / "small.safetensors").stat().st_size
    with HubStub({"org/small": root}, mode="throttled", rate=size * 2, token="s3cret", require_token=True) as hub:
        status, _, body = request(hub.url, "GET", "/api/models/org/small")
        assert status == 200 and json.loads(body)["gated"] == "manual"          # metadata stays public
        status, headers, _ = request(hub.url, "GET", "/org/small/resolve/main/small.safetensors")
        assert (status, headers["X-Error-Code"]) == (401, "GatedRepo")
        began = time.monotonic()
        status, _, body = request(hub.url, "GET", "/org/small/resolve/main/small.safetensors",
                                  {"Authorization": "Bearer s3cret"})
        assert status == 200 and len(body) == size and time.monotonic() - began >= 0.4   # and still throttled
        assert [(r.status, r.authorized) for r in hub.requests[1:]] == [(401, False), (200, True)]
        hub.configure({"require_token": False})
        assert request(hub.url, "GET", "/org/small/resolve/main/config.json")[0] == 200
        assert hub.stats()["require_token"] is False


def test_script_mode_runs_on_the_system_python_and_is_driven_over_http(tmp_path):
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"{SYSTEM_PYTHON} is not installed")
    root = make_repo(tmp_path / "repo")
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    port = free_port()
    proc = subprocess.Popen([SYSTEM_PYTHON, "-I", str(HUBSTUB), "--repo", f"org/small={root}", "--port", str(port),
                             "--mode", "gated", "--token-file", str(token_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert "serving org/small on" in proc.stdout.readline()
        url = f"http://127.0.0.1:{port}"
        status, _, body = request(url, "GET", "/api/models/org/small?blobs=true")
        assert status == 200 and json.loads(body)["gated"] == "manual"
        assert request(url, "GET", "/org/small/resolve/main/config.json")[0] == 401
        assert request(url, "GET", "/org/small/resolve/main/config.json", {"Authorization": "Bearer s3cret"})[0] == 200

        status, _, body = request(url, "POST", "/_stub/config", {"Content-Type": "application/json"},
                                  json.dumps({"mode": "normal"}).encode())
        assert status == 200 and json.loads(body)["mode"] == "normal"
        assert request(url, "POST", "/_stub/config", {}, b'{"mode": "nope"}')[0] == 400
        assert request(url, "GET", "/org/small/resolve/main/config.json")[0] == 200

        _, _, body = request(url, "GET", "/_stub/stats")
        stats = json.loads(body)
        config_size = (root / "config.json").stat().st_size
        assert stats["bytes_served"] == 2 * config_size
        assert [(r["status"], r["authorized"]) for r in stats["requests"]] == [(200, False), (401, False), (200, True), (200, False)]
        assert "s3cret" not in body.decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.stderr.read()


# ---------------------------------------------------------------- the official client against the stub


@pytest.fixture(scope="module")
def engine_py():
    from tests.support.engine import engine_python
    return engine_python("cpu")


@pytest.fixture(scope="module")
def tiny(engine_py):
    from tests.support.engine import tiny_model
    return tiny_model(engine_py)


class Client:
    """huggingface_hub in the engine environment, with its own HF_HOME, talking to one stub."""

    def __init__(self, python: str, hub: HubStub, home: Path):
        self.python, self.hub, self.home = python, hub, home

    def env(self, token: str | None) -> dict:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.home), "HF_HOME": str(self.home / "hf"),
               "HF_ENDPOINT": self.hub.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        if token:
            env["HF_TOKEN"] = token
        return env

    def command(self, op: str, repo_id: str) -> list[str]:
        return [self.python, "-c", CLIENT, op, repo_id]

    def __call__(self, op: str, repo_id: str, token: str | None = None) -> dict:
        done = subprocess.run(self.command(op, repo_id), env=self.env(token), capture_output=True, text=True,
                              timeout=CLIENT_TIMEOUT_S)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.splitlines()[-1])

    def start(self, op: str, repo_id: str) -> subprocess.Popen:
        return subprocess.Popen(self.command(op, repo_id), env=self.env(None), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    @property
    def storage(self) -> Path:
        return self.home / "hf" / "hub"


def chain(error: dict | None) -> list[tuple[str, int | None]]:
    """An error and its causes as (class, status) pairs, outermost first."""
    found = []
    while error:
        found.append((error["type"], error["status"]))
        error = error["cause"]
    return found


@pytest.fixture
def client(engine_py, tmp_path):
    def make(hub: HubStub) -> Client:
        return Client(engine_py, hub, tmp_path / "client")
    return make


@pytest.mark.engine
def test_snapshot_download_gets_every_file_byte_identical_without_xet(tiny, client):
    with HubStub({"org/tiny": tiny}) as hub:
        out = client(hub)("snapshot", "org/tiny")
        snapshot = Path(out["path"])
        assert snapshot.name == hub.repos["org/tiny"].sha
        assert files_of(snapshot) == files_of(tiny)
        paths = [r.path for r in hub.requests]
        assert all(p.startswith(("/api/models/org/tiny", "/org/tiny/resolve/")) for p in paths), paths
        assert hub.bytes_served == hub.repos["org/tiny"].total_size


@pytest.mark.engine
def test_model_info_gives_sizes_and_sha256s(tiny, client):
    with HubStub({"org/tiny": tiny}) as hub:
        out = client(hub)("info", "org/tiny")
    assert out["sha"] == hub.repos["org/tiny"].sha
    weights = (tiny / "model.safetensors").read_bytes()
    assert out["files"]["model.safetensors"] == {"size": len(weights), "sha256": hashlib.sha256(weights).hexdigest(),
                                                 "blob_id": hub.repos["org/tiny"].files["model.safetensors"].blob_id}
    assert out["files"]["config.json"]["sha256"] is None
    assert {name: f["size"] for name, f in out["files"].items()} == {n: len(b) for n, b in files_of(tiny).items()}


@pytest.mark.engine
def test_gated_repo_raises_gated_repo_error_until_the_token_is_right(tiny, client):
    with HubStub({"org/tiny": tiny}, mode="gated", token="s3cret") as hub:
        hf = client(hub)
        # GatedRepoError is a RepositoryNotFoundError: tell them apart in that order
        assert chain(hf("snapshot", "org/tiny")["error"])[0] == ("GatedRepoError", 401)
        assert hf("snapshot", "org/tiny", token="wrong")["error"]["status"] == 403
        assert "RepositoryNotFoundError" in hf("snapshot", "org/tiny", token="wrong")["error"]["classes"]
        out = hf("snapshot", "org/tiny", token="s3cret")
        assert "error" not in out, out
        assert files_of(Path(out["path"])) == files_of(tiny)
        assert all(r.authorized for r in hub.requests if r.status == 200 and "/resolve/" in r.path)


@pytest.mark.engine
def test_unknown_repo_and_a_hub_that_is_down(tiny, client):
    with HubStub({"org/tiny": tiny}) as hub:
        hf = client(hub)
        assert chain(hf("snapshot", "org/nope")["error"])[0] == ("RepositoryNotFoundError", 404)
        assert hf("info", "org/nope")["error"]["error_code"] == "RepoNotFound"
        hub.mode = "down"
        assert chain(hf("info", "org/tiny")["error"])[0] == ("HfHubHTTPError", 503)
        # snapshot_download wraps the 503 of its first call: LocalEntryNotFoundError from HfHubHTTPError
        assert chain(hf("snapshot", "org/tiny")["error"])[:2] == [("LocalEntryNotFoundError", None), ("HfHubHTTPError", 503)]


@pytest.mark.engine
def test_a_dropped_connection_is_resumed_with_a_range_within_the_same_call(tmp_path, client):
    # The client writes its file in 10 MiB chunks and resumes from what it wrote: the cut must
    # come after the first 10 MiB of the big file for a Range request to appear.
    root = make_repo(tmp_path / "repo", big_bytes=24 * MiB)
    with HubStub({"org/big": root}, mode="cut", cut_after_bytes=15 * MiB, cut_drops=1) as hub:
        out = client(hub)("snapshot", "org/big")
        assert files_of(Path(out["path"])) == files_of(root)
        size = hub.repos["org/big"].total_size
        assert hub.bytes_served < 1.5 * size
        assert ("GET", 206) in {(r.method, r.status) for r in hub.requests if r.path.endswith("/big.safetensors")}


@pytest.mark.engine
def test_a_download_cut_for_good_fails_and_the_next_one_starts_over(tmp_path, client):
    root = make_repo(tmp_path / "repo", big_bytes=12 * MiB)
    with HubStub({"org/big": root}, mode="cut", cut_after_bytes=11 * MiB) as hub:
        hf = client(hub)
        assert chain(hf("snapshot", "org/big")["error"])[0] == ("RemoteProtocolError", None)
        assert not list(hf.storage.rglob("*.incomplete"))      # the client removes its partial file
        hub.mode = "normal"
        served = hub.bytes_served
        out = hf("snapshot", "org/big")
        assert files_of(Path(out["path"])) == files_of(root)
        # a new call downloads the big file again from its first byte
        assert hub.bytes_served - served == (root / "big.safetensors").stat().st_size


@pytest.mark.engine
def test_a_killed_download_leaves_its_partial_blob_and_does_not_resume(tmp_path, client):
    root = make_repo(tmp_path / "repo", big_bytes=24 * MiB)
    with HubStub({"org/big": root}, mode="throttled", rate=8 * MiB) as hub:
        hf = client(hub)
        sha256 = hub.repos["org/big"].files["big.safetensors"].sha256
        proc = hf.start("snapshot", "org/big")
        try:
            blobs = hf.storage / "models--org--big" / "blobs"
            # the bytes in flight live in blobs/<sha256>.<8 hex>.incomplete, growing 10 MiB at a time
            partial = wait_for(lambda: [p for p in blobs.glob(f"{sha256}.*.incomplete") if p.stat().st_size >= 10 * MiB],
                               30, "10 MiB written to the partial blob")[0]
            assert len(partial.name.split(".")[1]) == 8
        finally:
            proc.kill()
            proc.wait()
        assert partial.exists()                                   # SIGKILL: nobody cleans it up
        hub.mode = "normal"
        served = hub.bytes_served
        out = hf("snapshot", "org/big")
        assert files_of(Path(out["path"])) == files_of(root)
        assert hub.bytes_served - served >= 24 * MiB               # all of it again
        assert partial.exists()                                   # …and the orphan stays
        assert not [r for r in hub.requests if r.status == 206]


@pytest.mark.engine
def test_corrupt_bytes_of_the_right_size_are_accepted_by_the_client(tiny, client):
    with HubStub({"org/tiny": tiny}, mode="corrupt") as hub:
        out = client(hub)("snapshot", "org/tiny")
    assert "error" not in out, out                                 # no hash check in hf_hub_download
    got, want = files_of(Path(out["path"])), files_of(tiny)
    assert {n: len(b) for n, b in got.items()} == {n: len(b) for n, b in want.items()}
    assert all(got[n] != want[n] for n in want)


def test_the_stub_imports_nothing_but_the_standard_library():
    tree = ast.parse(HUBSTUB.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
