"""Finding 10: the router could assign a node a path or a flag-shaped model.

A hostile (or mistyped) assignment reaches `ximd.models.resolve` as a choice of
origin "router", then the engine's argv. The node must refuse anything but a
Hugging Face id from the router — a model directory that exists on the node
included — and the engine's argv must carry the model so that vLLM's parser
never reads it as a flag. An id from the router, and a path the node's own
operator configured, keep working.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest

from tests.support.engine import load_config, tiny_cpu_plan
from tests.support.hubcache import tiny_files, write_hub_model
from ximd.engine import EnginePaths, build_launch
from ximd.models import ModelCache, ModelChoice, ModelError, ResolvedModel, resolve


def model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def cache(tmp_path) -> ModelCache:
    cache = ModelCache(tmp_path / "models", 1 << 40)
    write_hub_model(cache, "org/model", tiny_files())
    return cache


@pytest.mark.parametrize("assigned", ["{local}", "./secrets", "~/.ssh", "../../etc", "org/../x",
                                      "--trust-remote-code", "-x", "org/model --trust-remote-code"])
def test_the_router_cannot_assign_a_path_or_a_flag(tmp_path, cache, assigned):
    local = model_dir(tmp_path / "operators-private-model")
    ref = assigned.format(local=local)
    with pytest.raises(ModelError, match="the router assigned the model"):
        resolve(ModelChoice(ref, "router"), cache)


def test_the_router_may_assign_a_hub_id_and_the_operator_a_path(tmp_path, cache):
    by_router = resolve(ModelChoice("org/model", "router"), cache)
    assert by_router.model_arg == str(cache.snapshot("org/model"))
    local = model_dir(tmp_path / "mine")
    by_operator = resolve(ModelChoice(str(local), "config"), cache)
    assert by_operator.model_arg == str(local) and by_operator.local


def vllm_like_parser() -> argparse.ArgumentParser:
    """The options of vLLM's server parser that matter here, declared as vLLM declares them."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--model")
    parser.add_argument("--served-model-name", nargs="+")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--uds")
    return parser


def test_the_engine_argv_never_reads_a_model_as_a_flag(tmp_path):
    cfg = load_config(tmp_path, XEROTIER_AGENT_STATE_DIR="/var/lib/xerotier",
                      XEROTIER_AGENT_CACHE_DIR="/var/cache/xerotier", XEROTIER_AGENT_RUNTIME_DIR="/run/ximd")
    paths = EnginePaths("/usr/bin/python3", Path(cfg.state_dir), Path(cfg.cache_dir), Path(cfg.runtime_dir))
    flagish = ResolvedModel("-m", "config", "--trust-remote-code", "--trust-remote-code", True, {})
    launch = build_launch(cfg, tiny_cpu_plan(), flagish, paths)
    args, _ = vllm_like_parser().parse_known_args(list(launch.argv[3:]))
    assert args.model == "--trust-remote-code", shlex.join(launch.argv)
    assert args.served_model_name == ["--trust-remote-code"]
    assert args.trust_remote_code is False
