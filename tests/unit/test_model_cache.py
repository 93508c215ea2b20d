"""The model cache's completeness rules, locks, room planning, progress wording and token
sources: on real files, real flocks held by another process, real checksums."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from tests.support.hubcache import manifest_of, repo_file, tiny_files, write_hub_model
from ximd.models import credentials
from ximd.models.acquire import make_room
from ximd.models.cache import CacheEntry, ModelBusy, ModelCache, plan_room
from ximd.models.choice import ModelError
from ximd.models.credentials import HubToken, read_hf_token
from ximd.models.hub import HubProblem, download_env, explain
from ximd.models.manifest import Manifest, ManifestError, RepoFile, check_files, select_for_serving
from ximd.models.progress import LogPacer, Progress, RateMeter, StallWatch, log_line, progress_line
from ximd.units import size_text

GB = 10**9
MB = 10**6


# ---------------------------------------------------------------- manifests from the hub


def test_a_manifest_round_trips_and_checks_what_the_hub_sent():
    manifest = manifest_of("org/m", tiny_files())
    assert Manifest.from_json(json.loads(json.dumps(manifest.to_json()))) == manifest


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "a/../../b", "./x", "a\\b", "", None])
def test_a_file_name_that_leaves_the_snapshot_is_refused(path):
    data = manifest_of("org/m", tiny_files()).to_json()
    data["files"][0]["path"] = path
    with pytest.raises(ManifestError):
        Manifest.from_json(data)


@pytest.mark.parametrize("change", [{"size": -1}, {"size": "12"}, {"blob_id": "xyz"}, {"sha256": "00"}])
def test_malformed_sizes_and_checksums_are_refused(change):
    data = manifest_of("org/m", tiny_files()).to_json()
    data["files"][0].update(change)
    with pytest.raises(ManifestError):
        Manifest.from_json(data)


def test_checksums_are_sha256_for_lfs_files_and_git_blob_ids_for_the_rest(tmp_path):
    files = tiny_files()
    manifest = manifest_of("org/m", files)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert check_files(tmp_path, manifest.files) == []
    weights = next(f for f in manifest.files if f.path == "model.safetensors")
    assert weights.sha256 == hashlib.sha256(files["model.safetensors"]).hexdigest()
    (tmp_path / "model.safetensors").write_bytes(b"\2" * len(files["model.safetensors"]))  # same size
    (tmp_path / "config.json").write_bytes(b'{"model_type": "LLAMA"}')                     # same size
    assert sorted(f.path for f in check_files(tmp_path, manifest.files)) == ["config.json", "model.safetensors"]
    (tmp_path / "tokenizer.json").unlink()
    assert len(check_files(tmp_path, manifest.files)) == 3


def test_only_the_weights_the_engine_loads_are_fetched():
    manifest = manifest_of("org/m", {**tiny_files(), "pytorch_model.bin": b"x", "original/consolidated.00.pth": b"y"})
    assert sorted(f.path for f in select_for_serving(manifest).files) == \
        ["config.json", "model.safetensors", "tokenizer.json"]
    bin_only = manifest_of("org/m", {"config.json": b"{}", "pytorch_model.bin": b"x"})
    assert select_for_serving(bin_only) == bin_only


# ---------------------------------------------------------------- completeness on disk


def test_a_model_is_complete_only_with_the_marker_and_every_file_at_its_size(tmp_path):
    cache = ModelCache(tmp_path, GB)
    manifest, snapshot = write_hub_model(cache, "org/m", tiny_files(), complete=False)
    assert cache.snapshot("org/m") is None
    assert [e.complete for e in cache.entries()] == [False]
    cache.mark_complete(manifest)
    assert cache.snapshot("org/m") == snapshot
    assert (cache.entry_path("org/m") / "refs" / "main").read_text() == manifest.revision
    assert [e.revision for e in cache.entries()] == [manifest.revision]
    (snapshot / "tokenizer.json").unlink()           # a file lost after it was marked
    assert cache.snapshot("org/m") is None


def test_bytes_present_count_finished_blobs_and_the_partial_files(tmp_path):
    cache = ModelCache(tmp_path, GB)
    files = tiny_files(5000)
    manifest = manifest_of("org/m", files)
    blobs = cache.entry_path("org/m") / "blobs"
    blobs.mkdir(parents=True)
    assert cache.present_bytes(manifest) == 0
    config, weights = (next(f for f in manifest.files if f.path == p) for p in ("config.json", "model.safetensors"))
    (blobs / config.etag).write_bytes(files["config.json"])
    (blobs / (weights.etag + ".ximd-partial")).write_bytes(b"\1" * 1200)
    assert cache.present_bytes(manifest) == len(files["config.json"]) + 1200


# ---------------------------------------------------------------- locks across processes

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[2] == "shared" else fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def other_process(tmp_path):
    started = []

    def hold(path, mode="shared"):
        path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "held"
        started.append(proc)
        return proc
    yield hold
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_model_another_process_serves_is_neither_removed_nor_evicted(tmp_path, other_process):
    cache = ModelCache(tmp_path, 1)                    # a cap everything is over
    write_hub_model(cache, "org/served", tiny_files(), last_used=time.time() - 100)
    write_hub_model(cache, "org/idle", tiny_files())
    other_process(cache.lock_path("org/served"))
    [served] = [e for e in cache.entries() if e.hf_id == "org/served"]
    with pytest.raises(ModelBusy):
        cache.remove(served)
    evicted = cache.enforce_cap(in_use=[])
    assert [e.hf_id for e in evicted] == ["org/idle"]
    assert [e.hf_id for e in cache.entries()] == ["org/served"]


def test_shared_holds_coexist_and_an_exclusive_one_waits(tmp_path, other_process):
    cache = ModelCache(tmp_path, GB)
    other_process(cache.lock_path("org/m"), "shared")
    os.close(cache.hold("org/m", shared=True, wait=False))
    with pytest.raises(ModelBusy):
        cache.hold("org/m", shared=False, wait=False)


# ---------------------------------------------------------------- room before a download


def entry(name: str, size: int, used: float) -> CacheEntry:
    return CacheEntry(f"models--org--{name}", None, size, used)   # type: ignore[arg-type]


def test_room_is_made_by_evicting_the_least_recently_used_first():
    entries = [entry("old", 30 * GB, 1), entry("newer", 30 * GB, 2), entry("newest", 30 * GB, 3)]
    room = plan_room(entries, "org/big", 50 * GB, 0, 100 * GB, free_bytes=500 * GB)
    assert room.problem is None and [e.hf_id for e in room.evict] == ["org/old", "org/newer"]


def test_a_model_larger_than_the_cap_is_refused_up_front():
    room = plan_room([], "org/huge", 140 * GB, 0, 100 * GB, free_bytes=10**13)
    assert room.problem == ("org/huge needs 140.0 GB, more than the model cache's cap of 100.0 GB: "
                            "raise model_cache.max_size_gb")


def test_models_in_use_are_not_evicted_to_make_room():
    room = plan_room([entry("serving", 80 * GB, 1)], "org/next", 50 * GB, 0, 100 * GB, 10**13, in_use=["org/serving"])
    assert room.problem is not None and "held by models in use (org/serving)" in room.problem


def test_free_disk_counts_what_is_already_here_and_what_eviction_frees():
    entries = [entry("old", 20 * GB, 1)]
    assert plan_room(entries, "org/m", 16 * GB, 10 * GB, 100 * GB, free_bytes=8 * GB).problem is None
    short = plan_room(entries, "org/m", 16 * GB, 0, 100 * GB, free_bytes=8 * GB)
    assert short.problem == ("org/m needs 16.0 GB more on disk (and 1.0 GB to spare), but only 8.0 GB is free: "
                             "free space there or move model_cache.path to a larger disk")
    tight = plan_room(entries, "org/m", 90 * GB, 0, 100 * GB, free_bytes=75 * GB)
    assert tight.problem is None and [e.hf_id for e in tight.evict] == ["org/old"]


def test_making_room_on_a_real_cache_evicts_or_explains(tmp_path):
    cache = ModelCache(tmp_path, 3000)
    write_hub_model(cache, "org/old", tiny_files(1500), last_used=time.time() - 100)
    wanted = manifest_of("org/new", tiny_files(1500))
    make_room(cache, wanted)
    assert [e.hf_id for e in cache.entries()] == []
    with pytest.raises(ModelError, match=r"cannot download org/huge needs .* more than the model cache's cap"):
        make_room(cache, manifest_of("org/huge", tiny_files(5000)))


# ---------------------------------------------------------------- progress wording


def test_the_status_line_says_amount_rate_and_time_left():
    p = Progress("meta-llama/Llama-3.1-8B-Instruct", "downloading", int(6.2 * GB), int(16.1 * GB), 48 * MB)
    assert progress_line(p) == ("downloading meta-llama/Llama-3.1-8B-Instruct: 6.2 of 16.1 GB, 48 MB/s, "
                                "about 3 min left")
    assert log_line(p).startswith("downloading meta-llama/Llama-3.1-8B-Instruct: 39% (6.2 of 16.1 GB)")
    small = Progress("org/tiny", "verifying", 300_000, 2_000_000, None)
    assert progress_line(small) == "verifying org/tiny: 0.3 of 2.0 MB, measuring speed, time left unknown"
    assert progress_line(Progress("o/m", "downloading", 0, 100 * GB, 10 * MB)) .endswith("about 2 h 47 min left")


def test_journal_lines_come_every_tenth_or_every_30_seconds():
    pacer = LogPacer()
    assert pacer.due(0.0, 0)
    assert not pacer.due(0.05, 5)
    assert pacer.due(0.11, 6)            # a new tenth
    assert not pacer.due(0.15, 20)
    assert pacer.due(0.16, 36.1)         # 30 s since the last line


def test_rate_is_averaged_over_recent_samples():
    meter = RateMeter(window_s=10)
    assert meter.add(0, 0) is None
    assert meter.add(2, 2 * MB) is None            # too soon to tell
    assert meter.add(6, 6 * MB) == pytest.approx(MB)
    for t in range(7, 30):
        rate = meter.add(t, 2 * MB + (t - 2) * 5 * MB)
    assert rate == pytest.approx(5 * MB)


def test_small_models_are_sized_in_megabytes_not_as_zero_gigabytes():
    assert (size_text(6_560_017), size_text(16.1e9), size_text(0.1e9)) == ("6.6 MB", "16.1 GB", "0.1 GB")


def test_the_start_timeout_is_extended_only_while_bytes_arrive():
    watch = StallWatch(stall_s=30)
    assert watch.moving(0, 0) and watch.moving(100, 10) and watch.moving(100, 39)
    assert not watch.moving(100, 41)
    assert watch.moving(101, 42)


# ---------------------------------------------------------------- the token


def test_token_sources_in_order_and_only_the_downloader_gets_it(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "hf-token").write_text("hf_fromcredential\n")
    token_file = tmp_path / "token"
    token_file.write_text("hf_fromfile\n")
    token_file.chmod(0o600)
    env = {"CREDENTIALS_DIRECTORY": str(creds), "HF_TOKEN": "hf_fromenv"}
    assert read_hf_token(str(token_file), env) == HubToken("hf_fromfile", f"model_cache.hf_token_file {token_file}")
    assert read_hf_token("", env).value == "hf_fromcredential"
    (creds / "hf-token").write_text("\n")             # the unit's SetCredential= fallback: no token
    assert read_hf_token("", env).value == "hf_fromenv"
    assert read_hf_token("", {"CREDENTIALS_DIRECTORY": str(creds)}) is None
    assert "hf_fromfile" not in repr(read_hf_token(str(token_file), env)) + str(read_hf_token(str(token_file), env))
    child = download_env({"HF_TOKEN": "hf_fromenv", "HTTPS_PROXY": "http://proxy:3128", "SECRET": "x"}, "/cache",
                         HubToken("hf_fromfile", "file"))
    assert child["HF_TOKEN"] == "hf_fromfile" and child["HTTPS_PROXY"] == "http://proxy:3128"
    assert "SECRET" not in child and child["HF_HOME"] == "/cache"


def test_a_token_file_that_is_set_but_unusable_says_so(tmp_path):
    with pytest.raises(ModelError, match="cannot read the Hugging Face token file .*No such file"):
        read_hf_token(str(tmp_path / "absent"), {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ModelError, match="is empty"):
        read_hf_token(str(tmp_path / "empty"), {})


# ---------------------------------------------------------------- what the operator reads


@pytest.mark.parametrize("kind, status, token, expected", [
    ("gated", 401, None, "model org/m is gated: accept its licence at https://huggingface.co/org/m, put a token "
                         "of that account in /etc/xerotier/hf-token (or model_cache.hf_token_file), then "
                         "`systemctl restart ximd`"),
    ("gated", 403, HubToken("t", "f"), "model org/m is gated and the token from f has no access"),
    ("not_found", 404, None, "model org/m was not found at https://huggingface.co: check the name, or it is "
                             "private and no token is set"),
    ("http", 503, None, "answered HTTP 503"),
    ("network", None, None, "cannot reach the Hugging Face hub at https://huggingface.co to fetch org/m"),
])
def test_each_hub_problem_says_what_to_do(kind, status, token, expected):
    line = explain(HubProblem(kind, status, "detail"), "org/m", token, "https://huggingface.co")
    assert line.startswith(expected) or expected in line


def test_a_token_file_that_came_after_the_start_asks_for_a_restart_not_a_reload(tmp_path, monkeypatch):
    # systemd hands a service its credentials at start only: a reload leaves the blank fallback.
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "hf-token").write_text("\n")
    etc_token = tmp_path / "hf-token"
    monkeypatch.setattr(credentials, "DEFAULT_TOKEN_PATH", str(etc_token))
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert not credentials.token_awaits_restart("", env)            # no token file yet: nothing to restart for
    etc_token.write_text("hf_new\n")
    etc_token.chmod(0)                                              # root's file: only its existence is seen
    assert credentials.token_awaits_restart("", env)
    assert not credentials.token_awaits_restart("/etc/my-token", env)   # ximd's own file: a reload reads it
    assert not credentials.token_awaits_restart("", {})                   # not under the unit (`ximd model pull`)
    (creds / "hf-token").write_text("hf_new\n")
    assert not credentials.token_awaits_restart("", env)            # started with it: nothing waits
    for problem in (HubProblem("gated", 401, "d"), HubProblem("http", 401, "d")):
        line = explain(problem, "org/m", None, "https://huggingface.co", token_awaits_restart=True)
        assert line == ("model org/m is gated and /etc/xerotier/hf-token came after ximd started: systemd hands "
                        "it over only at start, so `systemctl restart ximd`")
    assert "came after" not in explain(HubProblem("gated", 403, "d"), "org/m", HubToken("t", "f"),
                                       "https://huggingface.co", token_awaits_restart=True)


def test_repo_file_etag_is_what_the_hub_client_names_the_blob():
    assert repo_file("config.json", b"{}").etag == repo_file("config.json", b"{}").blob_id
    weights = repo_file("model.safetensors", b"w")
    assert weights.etag == weights.sha256 and isinstance(weights, RepoFile)
