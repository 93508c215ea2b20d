"""`ximd model list|rm|import|pull` end to end on real files (no hub: the pull that needs
one is in tests/engine/test_model_acquire.py, against the stand-in hub)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import pytest

from tests.support.engine import load_config
from tests.support.hubcache import tiny_files, write_hub_model
from ximd import cli
from ximd.exitcodes import EX_OK, EX_REFUSED
from ximd.models import ModelCache

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_SH)
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def cfg_args(tmp_path, monkeypatch):
    """The argv that points `ximd` at a private config, state and cache."""
    cfg = load_config(tmp_path)
    config_file = tmp_path / "agent.toml"
    config_file.write_text(f'[agent]\nstate_dir = "{cfg.state_dir}"\n[model_cache]\nmax_size_gb = 1\n')
    return ["--config", str(config_file)]


def cache_of(args) -> ModelCache:
    from ximd.config import load
    return ModelCache.from_config(load(args[1], env={}))


def test_list_shows_size_state_and_use(cfg_args, capsys):
    cache = cache_of(cfg_args)
    write_hub_model(cache, "org/done", tiny_files(2000))
    write_hub_model(cache, "org/half", tiny_files(500), complete=False)
    assert cli.main(["model", "list", *cfg_args]) == EX_OK
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["MODEL", "SIZE", "STATE", "IN", "USE", "LAST", "USED"]
    assert out[1].split()[:5] == ["org/done", "0.0", "MB", "complete", "no"]
    assert out[2].split()[:5] == ["org/half", "0.0", "MB", "partial", "no"]
    assert out[3].startswith("2 model(s)")
    assert cli.main(["model", "list", "--format", "json", *cfg_args]) == EX_OK
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["complete"], r["in_use"]) for r in rows] == [("org/done", True, False),
                                                                       ("org/half", False, False)]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["last_used"]) for r in rows), rows


def test_rm_removes_a_model_but_refuses_the_one_in_use(cfg_args, capsys):
    cache = cache_of(cfg_args)
    write_hub_model(cache, "org/idle", tiny_files())
    write_hub_model(cache, "org/served", tiny_files())
    cache.lock_path("org/served").parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(cache.lock_path("org/served"))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main(["model", "rm", "org/served", *cfg_args]) == EX_REFUSED
        assert "org/served is in use" in capsys.readouterr().err
        assert cli.main(["model", "list", "--format", "json", *cfg_args]) == EX_OK
        assert {r["model"]: r["in_use"] for r in json.loads(capsys.readouterr().out)} == \
            {"org/idle": False, "org/served": True}
        assert cli.main(["model", "rm", "org/idle", *cfg_args]) == EX_OK
        assert "removed org/idle" in capsys.readouterr().out
        assert [e.hf_id for e in cache.entries()] == ["org/served"]
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(["model", "rm", "org/absent", *cfg_args]) == EX_REFUSED
    assert "org/absent is not in the model cache" in capsys.readouterr().err


def test_import_a_hub_cache_entry_checks_each_blob_against_its_name(cfg_args, tmp_path, capsys):
    elsewhere = ModelCache(tmp_path / "other-machine", 10**9)
    _, _ = write_hub_model(elsewhere, "org/copied", tiny_files(3000), complete=False)
    entry = elsewhere.entry_path("org/copied")
    assert cli.main(["model", "import", str(entry), *cfg_args]) == EX_OK
    out = capsys.readouterr().out
    assert "importing org/copied from the hub cache entry" in out and "is complete in" in out
    cache = cache_of(cfg_args)
    snapshot = cache.snapshot("org/copied")
    assert snapshot is not None and (snapshot / "model.safetensors").read_bytes() == b"\1" * 3000


def test_import_refuses_a_damaged_copy_and_an_incomplete_one(cfg_args, tmp_path, capsys):
    elsewhere = ModelCache(tmp_path / "other-machine", 10**9)
    manifest, _ = write_hub_model(elsewhere, "org/damaged", tiny_files(3000), complete=False)
    weights = next(f for f in manifest.files if f.path == "model.safetensors")
    (elsewhere.entry_path("org/damaged") / "blobs" / weights.etag).write_bytes(b"\2" * 3000)
    assert cli.main(["model", "import", str(elsewhere.entry_path("org/damaged")), *cfg_args]) == EX_REFUSED
    assert "does not match the checksum its source records" in capsys.readouterr().err
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text("{}")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (sharded / "model-00001-of-00002.safetensors").write_bytes(b"w")
    assert cli.main(["model", "import", str(sharded), "--as", "org/sharded", *cfg_args]) == EX_REFUSED
    assert "lacks 1 weight shard(s) its index names: model-00002-of-00002.safetensors" in capsys.readouterr().err
    assert cache_of(cfg_args).entries() == []


def test_import_a_plain_directory_needs_an_id_and_uses_hf_download_metadata(cfg_args, tmp_path, capsys):
    plain = tmp_path / "local-dir"
    plain.mkdir()
    for name, data in tiny_files(4000).items():
        (plain / name).write_bytes(data)
    assert cli.main(["model", "import", str(plain), *cfg_args]) == EX_REFUSED
    assert "say which model it is with --as ORG/NAME" in capsys.readouterr().err
    meta = plain / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    commit = "c" * 40
    (meta / "model.safetensors.metadata").write_text(
        f"{commit}\n{hashlib.sha256(b'x').hexdigest()}\n1700000000\n")   # not what the file holds
    assert cli.main(["model", "import", str(plain), "--as", "org/plain", *cfg_args]) == EX_REFUSED
    assert "the copy is damaged" in capsys.readouterr().err
    weights_sha256 = hashlib.sha256(tiny_files(4000)["model.safetensors"]).hexdigest()
    (meta / "model.safetensors.metadata").write_text(f"{commit}\n{weights_sha256}\n1700000000\n")
    assert cli.main(["model", "import", str(plain), "--as", "org/plain", *cfg_args]) == EX_OK
    capsys.readouterr()
    cache = cache_of(cfg_args)
    assert cache.snapshot("org/plain") == cache.snapshot_path("org/plain", commit)


def test_pull_of_a_local_path_or_a_bad_id_says_why(cfg_args, tmp_path, capsys):
    assert cli.main(["model", "pull", str(tmp_path), *cfg_args]) == EX_REFUSED
    assert "is a local path: there is nothing to pull" in capsys.readouterr().err
    assert cli.main(["model", "pull", "not a model", *cfg_args]) == EX_REFUSED
    assert "neither a Hugging Face id" in capsys.readouterr().err
