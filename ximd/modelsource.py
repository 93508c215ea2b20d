"""Which model the daemon would serve, and where its facts can be read, without fetching it.

The daemon chooses with `models.choose_model` (engine.model when the configuration sets
it > the router's assignment kept in the identity > the seed default) and, for a Hugging
Face id, serves the snapshot in the model cache (ximd.preparation). `ximd plan` and
`ximd doctor` size for the same model by asking here; they never download: a model that
is not cached yet is planned without its facts, and said so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xim_proto.modelid import is_model_id
from ximd import autoconfig, models
from ximd.identity import IdentityError, load_identity

ESTIMATES = "sizes are estimates"
# What was found where the daemon would read the model from.
CACHED, LOCAL, NOT_CACHED, MISSING, INVALID, UNREADABLE = (
    "cached", "local", "not-cached", "missing", "invalid", "unreadable")


@dataclass(frozen=True)
class ModelSource:
    choice: models.ModelChoice
    where: str                  # where the choice came from, in words
    found: str                  # one of CACHED … UNREADABLE
    facts_dir: Path | None      # the local directory or the cached snapshot (CACHED, LOCAL)
    note: str = ""              # why the router's assignment is unknown, when it is
    cache_root: Path | None = None

    @property
    def state(self) -> str:
        return {CACHED: f"cached at {self.facts_dir}",
                LOCAL: "a local directory",
                NOT_CACHED: "not cached yet (fetched at the first start)",
                MISSING: "no such directory",
                INVALID: "neither a Hugging Face id (org/name) nor a path: ximd refuses it",
                UNREADABLE: f"the model cache {self.cache_root} is not readable by this user"}[self.found]

    def describe(self) -> str:
        """'meta-llama/X (router assignment), cached at /var/lib/…' and the like."""
        head = f"{self.choice.ref} ({self.where}), {self.state}"
        if self.facts_dir is None:
            head += f": {ESTIMATES}"
        return f"{head}; {self.note}" if self.note else head


def assigned_model(state_dir: str | Path) -> tuple[str | None, str]:
    """The router's assignment kept in the identity, and a note when it cannot be read."""
    try:
        identity = load_identity(state_dir)
    except IdentityError as exc:
        return None, f"the router's assignment is unknown: {exc}"
    return (identity.assigned_model if identity else None), ""


def where_from(choice: models.ModelChoice, config_origin: str) -> str:
    if choice.origin == "config":
        return f"engine.model from {config_origin}"
    return {"router": "router assignment", "default": "seed default"}.get(choice.origin, choice.origin)


def locate(cfg, assigned: str | None = None, note: str = "") -> ModelSource:
    """The model the daemon would serve with `cfg` and the assignment `assigned`."""
    origin = cfg.origins.get("engine.model", "default")
    choice = models.choose_model(cfg.engine.model, origin, assigned)
    where = where_from(choice, origin)
    # The assignment does not matter when the configuration names the model.
    note = "" if choice.origin == "config" else note
    ref = choice.ref.strip()
    if models.is_local_path(ref):
        path = Path(ref).expanduser()
        found = LOCAL if path.is_dir() else MISSING
        return ModelSource(choice, where, found, path if found == LOCAL else None, note)
    if not is_model_id(ref):
        return ModelSource(choice, where, INVALID, None, note)
    cache = models.ModelCache.from_config(cfg)
    try:
        cache.root.stat()           # absent is fine (nothing cached); refused is not
        snapshot = cache.snapshot(ref)
    except PermissionError:
        return ModelSource(choice, where, UNREADABLE, None, note, cache.root)
    except FileNotFoundError:
        snapshot = None
    if snapshot is None:
        return ModelSource(choice, where, NOT_CACHED, None, note, cache.root)
    return ModelSource(choice, where, CACHED, snapshot, note, cache.root)


def locate_for(cfg) -> ModelSource:
    """`locate` with the assignment read from the identity in cfg.state_dir (tolerating none)."""
    assigned, note = assigned_model(cfg.state_dir)
    return locate(cfg, assigned, note)


def load_facts(source: ModelSource) -> tuple[autoconfig.ModelFacts | None, str]:
    """(facts, note) for the plan: what was read, or why the plan must do without."""
    if source.facts_dir is None:
        return None, source.describe()
    try:
        facts = autoconfig.model_facts_from_dir(source.facts_dir)
    except autoconfig.ModelFactsError as exc:
        return None, f"{source.describe()}: {exc}; {ESTIMATES}"
    return facts, f"{source.describe()}: {facts.describe()}"
