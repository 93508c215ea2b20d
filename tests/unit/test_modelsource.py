"""Which model `ximd plan` and `ximd doctor` size for: the daemon's choice (config > router
assignment in the identity > seed default) and its facts from the cached snapshot, on real
files in a temporary state directory; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.hubcache import write_hub_model
from ximd import config, doctor, identity, models, modelsource
from ximd.config import SEED_DEFAULT_MODEL

ASSIGNED = "acme/assigned-7b"
# Enough of a config.json for the facts the plan reads.
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "num_attention_heads": 2,
               "num_key_value_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 2048,
               "torch_dtype": "float32"}


def make_cfg(tmp_path: Path, extra: str = "", env: dict[str, str] | None = None) -> config.Config:
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\nstate_dir = "{state}"\ncache_dir = "{tmp_path / "cache"}"\n' + extra)
    return config.load(path, env=env or {})


def save_assignment(cfg: config.Config, model: str | None) -> None:
    identity.save_identity(cfg.state_dir, identity.Identity(
        agent_id="a", worker_id="w", router_url="https://r", mesh_endpoints=("tcp://r:1",),
        router_public_key="k" * 40, agent_public_key="p" * 40, agent_secret_key="s" * 40,
        token="xat_t", assigned_model=model))


def cache_snapshot(cfg: config.Config, hf_id: str, revision: str = "abc123" * 6 + "abcd",
                   config_json: bytes | None = None) -> Path:
    """A complete snapshot in the model cache (the hub client's layout, ximd's completion marker)."""
    files = {"config.json": config_json or json.dumps(TINY_CONFIG).encode(), "model.safetensors": b"\0" * 4096}
    _, snapshot = write_hub_model(models.ModelCache.from_config(cfg), hf_id, files, revision=revision)
    return snapshot


def test_seed_default_when_nothing_else_says_and_it_is_not_cached(tmp_path):
    source = modelsource.locate_for(make_cfg(tmp_path))
    assert (source.choice.ref, source.choice.origin, source.found) == (SEED_DEFAULT_MODEL, "default", "not-cached")
    assert source.describe() == (f"{SEED_DEFAULT_MODEL} (seed default), not cached yet (fetched at the first "
                                 "start): sizes are estimates")
    facts, note = modelsource.load_facts(source)
    assert facts is None and note == source.describe()


def test_the_router_assignment_in_the_identity_wins_over_the_default_and_is_read_from_the_cache(tmp_path):
    cfg = make_cfg(tmp_path)
    save_assignment(cfg, ASSIGNED)
    snapshot = cache_snapshot(cfg, ASSIGNED)
    source = modelsource.locate_for(cfg)
    assert (source.choice.ref, source.where, source.found, source.facts_dir) == (
        ASSIGNED, "router assignment", "cached", snapshot)
    assert source.describe() == f"{ASSIGNED} (router assignment), cached at {snapshot}"
    facts, note = modelsource.load_facts(source)
    assert facts is not None and facts.num_layers == 2 and facts.weights_bytes == 4096
    assert note.startswith(f"{ASSIGNED} (router assignment), cached at {snapshot}: 2 layers")


def test_the_configuration_wins_over_the_router_and_names_where_it_was_set(tmp_path):
    cfg = make_cfg(tmp_path, '[engine]\nmodel = "acme/configured-1b"\n')
    save_assignment(cfg, ASSIGNED)
    source = modelsource.locate_for(cfg)
    assert (source.choice.ref, source.choice.origin) == ("acme/configured-1b", "config")
    assert source.where == f"engine.model from {tmp_path / 'agent.toml'}"
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    env_cfg = make_cfg(env_dir, env={"VLLM_MODEL": "acme/from-env"})
    assert modelsource.locate_for(env_cfg).where == "engine.model from env:VLLM_MODEL"


def test_an_identity_without_an_assignment_falls_back_to_the_default(tmp_path):
    cfg = make_cfg(tmp_path)
    save_assignment(cfg, None)
    source = modelsource.locate_for(cfg)
    assert (source.choice.origin, source.note) == ("default", "")


def test_an_unreadable_identity_is_tolerated_and_said(tmp_path):
    cfg = make_cfg(tmp_path)
    save_assignment(cfg, ASSIGNED)
    identity.identity_path(cfg.state_dir).write_text("{not json")
    source = modelsource.locate_for(cfg)
    assert source.choice.origin == "default"
    assert source.note.startswith("the router's assignment is unknown: ")
    assert "is not a valid identity" in source.describe()
    check = doctor.check_model(source)
    assert check.status == "warn" and check.fix == "run `ximd doctor` as root or as the xerotier user"


def test_the_note_is_dropped_when_the_configuration_names_the_model(tmp_path):
    cfg = make_cfg(tmp_path, '[engine]\nmodel = "acme/configured-1b"\n')
    source = modelsource.locate(cfg, None, "the router's assignment is unknown: denied")
    assert source.note == ""


def test_a_local_directory_is_read_as_is(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY_CONFIG))
    source = modelsource.locate_for(make_cfg(tmp_path, f'[engine]\nmodel = "{model_dir}"\n'))
    assert (source.found, source.facts_dir) == ("local", model_dir)
    facts, note = modelsource.load_facts(source)
    assert facts is not None and ", a local directory: 2 layers" in note
    assert doctor.check_model(source).status == "ok"


def test_a_missing_local_directory_fails_the_doctor_check(tmp_path):
    source = modelsource.locate_for(make_cfg(tmp_path, f'[engine]\nmodel = "{tmp_path / "absent"}"\n'))
    assert source.found == "missing" and source.describe().endswith("no such directory: sizes are estimates")
    check = doctor.check_model(source)
    assert check.status == "fail" and check.fix.startswith("set engine.model to a model directory")


def test_a_router_assignment_that_is_no_hub_id_is_refused_as_the_daemon_does(tmp_path):
    cfg = make_cfg(tmp_path)
    source = modelsource.locate(cfg, "--not-an-id")
    assert source.found == "invalid" and "ximd refuses it" in source.describe()
    check = doctor.check_model(source)
    assert check.status == "fail" and "ask the router's operator" in check.fix


def test_a_broken_cached_config_json_leaves_estimates_and_says_why(tmp_path):
    cfg = make_cfg(tmp_path)
    snapshot = cache_snapshot(cfg, SEED_DEFAULT_MODEL, config_json=b"{broken")
    facts, note = modelsource.load_facts(modelsource.locate_for(cfg))
    assert facts is None
    assert note.startswith(f"{SEED_DEFAULT_MODEL} (seed default), cached at {snapshot}: ")
    assert note.endswith("; sizes are estimates")


def test_a_model_cache_this_user_cannot_read_is_said(tmp_path, monkeypatch):
    # Tests run as root, where modes do not refuse: the refusal is made where it is met.
    def refuse(self, hf_id):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(models.ModelCache, "snapshot", refuse)
    cfg = make_cfg(tmp_path)
    Path(cfg.model_cache_path).mkdir()
    source = modelsource.locate_for(cfg)
    assert source.found == "unreadable"
    assert source.describe() == (f"{SEED_DEFAULT_MODEL} (seed default), the model cache {cfg.model_cache_path} "
                                 "is not readable by this user: sizes are estimates")
    assert doctor.check_model(source).status == "warn"


@pytest.mark.parametrize("cached", [True, False])
def test_doctor_names_the_model_it_checked(tmp_path, cached):
    cfg = make_cfg(tmp_path)
    if cached:
        cache_snapshot(cfg, SEED_DEFAULT_MODEL)
    model = doctor.check_model(modelsource.locate_for(cfg))
    assert model.status == "ok" and model.detail.startswith(f"{SEED_DEFAULT_MODEL} (seed default), ")
    assert ("cached at" in model.detail) is cached
