"""Models: which one is served, the cache it lives in, and getting it there.

    choice      config > router assignment > seed default; what the engine is given
    cache       the hub-layout cache: completeness markers, locks, room, eviction
    manifest    a revision's files with sizes and checksums; checking files against it
    hub         the official hub client, run in the engine's environment
    credentials the Hugging Face token's sources
    progress    measuring and wording a download's progress
    acquire     the whole fetch: lock, ask, make room, download, check, mark complete
"""

from ximd.config import SEED_DEFAULT_MODEL
from ximd.models.cache import CacheEntry, ModelBusy, ModelCache, cache_dir_name, plan_eviction, plan_room
from ximd.models.choice import (
    ModelChoice,
    ModelError,
    NotCached,
    ResolvedModel,
    check_local_model,
    choose_model,
    hub_id_of,
    is_local_path,
    resolve,
)

__all__ = [
    "SEED_DEFAULT_MODEL", "CacheEntry", "ModelBusy", "ModelCache", "ModelChoice", "ModelError", "NotCached",
    "ResolvedModel", "cache_dir_name", "check_local_model", "choose_model", "hub_id_of", "is_local_path",
    "plan_eviction", "plan_room", "resolve",
]
