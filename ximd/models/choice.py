"""Which model the engine serves, and what the engine is given for it.

The model comes from the config when it was set there (VLLM_MODEL), else from the
router's assignment, else the seed's default. A local path is used in place; a
Hugging Face id is served from its complete snapshot in the cache (fetching it is
ximd.models.acquire's job, before this runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from xim_proto.modelid import is_model_id
from ximd.config import SEED_DEFAULT_MODEL
from ximd.models.cache import ModelCache

# The engine never reaches the hub: what it serves is on disk, checked.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class ModelError(Exception):
    """The model cannot be served as configured; the message says what to do."""


class NotCached(ModelError):
    """A hub model without a complete snapshot in the cache (yet)."""


@dataclass(frozen=True)
class ModelChoice:
    ref: str      # an HF id or a local path, as given
    origin: str   # "config", "router" or "default"


@dataclass(frozen=True)
class ResolvedModel:
    ref: str                  # what was chosen
    origin: str
    model_arg: str            # what the engine's --model gets
    served_name: str          # the default name to serve it under
    local: bool
    env: dict[str, str] = field(default_factory=dict)   # HF_HOME, offline switches


def choose_model(configured: str, configured_origin: str, assigned: str | None,
                 default: str = SEED_DEFAULT_MODEL) -> ModelChoice:
    """Config (when set there, not defaulted) > router assignment > seed default."""
    if configured and configured_origin != "default":
        return ModelChoice(configured, "config")
    if assigned:
        return ModelChoice(assigned, "router")
    return ModelChoice(configured or default, "default")


def is_local_path(ref: str) -> bool:
    """Paths are absolute or start with . or ~; anything else is a Hugging Face id."""
    return ref.startswith(("/", ".", "~"))


def hub_id_of(choice: ModelChoice) -> str | None:
    """The Hugging Face id to fetch for ``choice``; None for a local path. Raises ModelError
    for something that is neither, or a path the router tried to assign."""
    ref = choice.ref.strip()
    if choice.origin == "router" and not is_model_id(ref):
        # Only the operator of this host may point the engine at a path; from
        # the router a model is a hub id, never a path or something flag-shaped.
        raise ModelError(f"the router assigned the model {ref!r}, which is not a Hugging Face id "
                         "(org/name); refusing it. Set engine.model on this node to serve a local path")
    if is_local_path(ref):
        return None
    if not is_model_id(ref):
        raise ModelError(f"model {ref!r} ({choice.origin}) is neither a Hugging Face id (org/name) "
                         "nor a path (absolute, or starting with ./)")
    return ref


def resolve(choice: ModelChoice, cache: ModelCache) -> ResolvedModel:
    """What the engine is given for ``choice``: a checked local path, or the complete
    snapshot of a hub id (NotCached when there is none)."""
    ref = choice.ref.strip()
    base_env = {"HF_HOME": str(cache.root), **OFFLINE_ENV}
    hf_id = hub_id_of(choice)
    if hf_id is None:
        path = Path(ref).expanduser()
        check_local_model(path)
        return ResolvedModel(ref, choice.origin, str(path), ref, True, base_env)
    snapshot = cache.snapshot(hf_id)
    if snapshot is None:
        raise NotCached(f"model {hf_id} has no complete copy in the model cache {cache.root}")
    # The snapshot directory itself, not the id: the engine then needs no hub lookup
    # at all (no refs to resolve, nothing to fetch), and serves it under the id.
    return ResolvedModel(ref, choice.origin, str(snapshot), hf_id, False, base_env)


def check_local_model(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model path {path} is a file but not a .gguf model; "
                             "give a model directory (with config.json) or a .gguf file")
        return
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {path} has no config.json: not a Hugging Face model directory")
