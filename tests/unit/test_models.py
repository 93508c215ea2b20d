"""Model choice, resolution and the model cache's LRU eviction, on real files of known sizes."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from tests.support.engine import load_config
from tests.support.hubcache import tiny_files, write_hub_model
from ximd.models import (
    SEED_DEFAULT_MODEL,
    CacheEntry,
    ModelCache,
    ModelChoice,
    ModelError,
    NotCached,
    cache_dir_name,
    choose_model,
    is_local_path,
    plan_eviction,
    resolve,
)

MB = 1000**2


def fake_model(cache: ModelCache, hf_id: str, size_bytes: int, last_used: float | None = None,
               complete: bool = True) -> Path:
    """A hub-layout model of about ``size_bytes`` (like the hub client leaves it), marked complete."""
    _, snapshot = write_hub_model(cache, hf_id, tiny_files(size_bytes), complete=complete, last_used=last_used)
    return snapshot


# ---------------------------------------------------------------- choice


@pytest.mark.parametrize("configured, origin, assigned, expected", [
    ("org/from-config", "env:VLLM_MODEL", "org/assigned", ModelChoice("org/from-config", "config")),
    ("org/from-file", "/etc/xerotier/agent.toml", None, ModelChoice("org/from-file", "config")),
    (SEED_DEFAULT_MODEL, "default", "org/assigned", ModelChoice("org/assigned", "router")),
    (SEED_DEFAULT_MODEL, "default", None, ModelChoice(SEED_DEFAULT_MODEL, "default")),
    ("", "default", None, ModelChoice(SEED_DEFAULT_MODEL, "default")),
])
def test_config_beats_router_beats_seed_default(configured, origin, assigned, expected):
    assert choose_model(configured, origin, assigned) == expected


def test_choice_from_a_real_config_uses_its_origins(tmp_path):
    assert choose_model(load_config(tmp_path).engine.model, load_config(tmp_path).origins["engine.model"],
                        "org/assigned").origin == "router"
    cfg = load_config(tmp_path, VLLM_MODEL="org/mine")
    assert choose_model(cfg.engine.model, cfg.origins["engine.model"], "org/assigned") == ModelChoice("org/mine", "config")


@pytest.mark.parametrize("ref, local", [
    ("/srv/models/llama", True), ("./llama", True), ("~/llama", True),
    ("meta-llama/Llama-3.2-1B-Instruct", False), ("gpt2", False),
])
def test_paths_and_hub_ids(ref, local):
    assert is_local_path(ref) is local


def test_cache_directory_names_follow_the_hub_client():
    assert cache_dir_name("meta-llama/Llama-3.2-1B-Instruct") == "models--meta-llama--Llama-3.2-1B-Instruct"


# ---------------------------------------------------------------- eviction plan (pure)


def entry(name: str, size: int, used: float) -> CacheEntry:
    return CacheEntry(cache_dir_name(name), Path("/x") / name, size, used)


def test_eviction_takes_least_recently_used_first_until_it_fits():
    entries = [entry("a/old", 40, 1), entry("a/mid", 40, 2), entry("a/new", 40, 3)]
    assert [e.hf_id for e in plan_eviction(entries, 80, in_use=[])] == ["a/old"]
    assert [e.hf_id for e in plan_eviction(entries, 40, in_use=[])] == ["a/old", "a/mid"]
    assert plan_eviction(entries, 120, in_use=[]) == []


def test_eviction_never_takes_a_model_in_use_even_the_oldest():
    entries = [entry("a/old", 40, 1), entry("a/mid", 40, 2), entry("a/new", 40, 3)]
    assert [e.hf_id for e in plan_eviction(entries, 80, in_use=["a/old"])] == ["a/mid"]
    assert [e.hf_id for e in plan_eviction(entries, 10, in_use=["a/new"])] == ["a/old", "a/mid"]


# ---------------------------------------------------------------- the cache on disk


def test_sizes_count_blobs_once_not_the_snapshot_symlinks(tmp_path):
    cache = ModelCache(tmp_path, 10 * MB)
    fake_model(cache, "org/a", 3 * MB)
    [found] = cache.entries()
    assert found.hf_id == "org/a" and 3 * MB <= found.size_bytes < 3 * MB + 2000   # + small files and the marker


def test_cap_evicts_least_recently_used_models_not_in_use(tmp_path, caplog):
    now = time.time()
    cache = ModelCache(tmp_path, 5 * MB)
    fake_model(cache, "org/oldest", 2 * MB, last_used=now - 300)
    fake_model(cache, "org/older", 2 * MB, last_used=now - 200)
    fake_model(cache, "org/active", 2 * MB, last_used=now - 400)   # oldest of all, but in use
    caplog.set_level(logging.INFO, "ximd.models")
    evicted = cache.enforce_cap(in_use=["org/active"])
    assert [e.hf_id for e in evicted] == ["org/oldest"]
    assert sorted(e.hf_id for e in cache.entries()) == ["org/active", "org/older"]
    assert "Evicted model org/oldest" in caplog.text


def test_active_model_alone_over_the_cap_stays_with_a_warning(tmp_path, caplog):
    cache = ModelCache(tmp_path, 1 * MB)
    fake_model(cache, "org/big", 3 * MB)
    caplog.set_level(logging.INFO, "ximd.models")
    assert cache.enforce_cap(in_use=["org/big"]) == []
    assert [e.hf_id for e in cache.entries()] == ["org/big"]
    assert "over its" in caplog.text and "in use" in caplog.text


def test_using_a_model_makes_it_the_most_recent(tmp_path):
    now = time.time()
    cache = ModelCache(tmp_path, 3 * MB)
    fake_model(cache, "org/a", 2 * MB, last_used=now - 100)
    fake_model(cache, "org/b", 2 * MB, last_used=now - 50)
    cache.touch("org/a")
    assert [e.hf_id for e in cache.enforce_cap(in_use=[])] == ["org/b"]


def test_cap_comes_from_the_config_in_decimal_gigabytes(tmp_path):
    cfg = load_config(tmp_path, XEROTIER_AGENT_MODEL_CACHE_MAX_SIZE_GB="2.5",
                      XEROTIER_AGENT_MODEL_CACHE_PATH=str(tmp_path / "models"))
    cache = ModelCache.from_config(cfg)
    assert cache.max_bytes == 2_500_000_000 and cache.root == tmp_path / "models"
    assert ModelCache.from_config(load_config(tmp_path)).root == Path(load_config(tmp_path).state_dir) / "models"


# ---------------------------------------------------------------- resolving


def test_local_model_directory_is_used_in_place(tmp_path):
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cache = ModelCache(tmp_path / "cache", MB)
    resolved = resolve(ModelChoice(str(model), "config"), cache)
    assert resolved.model_arg == str(model) and resolved.local and resolved.served_name == str(model)
    assert resolved.env["HF_HOME"] == str(tmp_path / "cache") and resolved.env["HF_HUB_OFFLINE"] == "1"
    assert not (tmp_path / "cache").exists()   # nothing copied


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "has no config.json"),
    (lambda p: p.write_text("weights"), "not a .gguf"),
])
def test_bad_local_paths_are_refused_with_the_reason(tmp_path, make, message):
    path = tmp_path / "model"
    make(path)
    with pytest.raises(ModelError, match=message):
        resolve(ModelChoice(str(path), "config"), ModelCache(tmp_path / "c", MB))


def test_cached_hub_model_is_served_from_its_snapshot_offline(tmp_path):
    cache = ModelCache(tmp_path, 10 * MB)
    snapshot = fake_model(cache, "org/tiny", MB)
    resolved = resolve(ModelChoice("org/tiny", "router"), cache)
    assert resolved.model_arg == str(snapshot) and resolved.served_name == "org/tiny" and not resolved.local
    assert resolved.env == {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_a_snapshot_not_marked_complete_is_never_served(tmp_path):
    cache = ModelCache(tmp_path, 10 * MB)
    fake_model(cache, "org/partial", MB, complete=False)
    assert cache.snapshot("org/partial") is None
    with pytest.raises(NotCached, match="org/partial has no complete copy"):
        resolve(ModelChoice("org/partial", "config"), cache)


@pytest.mark.parametrize("ref", ["not a model", "org/name/extra", "org/na me"])
def test_neither_id_nor_path_is_refused(tmp_path, ref):
    with pytest.raises(ModelError, match="neither a Hugging Face id"):
        resolve(ModelChoice(ref, "config"), ModelCache(tmp_path, MB))
