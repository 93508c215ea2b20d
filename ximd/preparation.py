"""Everything between the configuration and a ready-to-start engine.

    model source (hub, token) → [the node acquires the model] →
    hardware → model (config > router assignment > seed default) → plan → LMCache → launch

`prepare_engine` is blocking on purpose (tool probes, LMCache's own config
check in the engine's interpreter): the node runs it in a thread so the
watchdog keeps being fed meanwhile. A hub model is already complete in the
cache by then (ximd.models.acquire). Every decision is logged once with its reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from ximd import autoconfig, enrollment, hardware, kvcache, models
from ximd.autoconfig import Plan
from ximd.config import Config
from ximd.engine import EngineLaunch, EnginePaths, build_launch
from ximd.engine.launch import GroupRole
from ximd.logs import phase_fields
from ximd.models.acquire import HubSource
from ximd.models.credentials import read_hf_token, token_awaits_restart
from ximd.models.hub import Downloader, download_env, endpoint_of

log = logging.getLogger("ximd")
PLAN = phase_fields("plan")


@dataclass(frozen=True)
class Prepared:
    launch: EngineLaunch
    plan: Plan
    model: models.ResolvedModel
    kv: kvcache.KVCacheSetup
    hardware: hardware.Hardware


def log_plan(plan: Plan) -> None:
    for name, why in plan.reasons.items():
        log.info("plan: %s — %s", name, why, extra=PLAN)
    for warning in plan.warnings:
        log.warning("plan: %s", warning, extra=PLAN)


def choose_model(cfg: Config, assigned_model: str | None) -> models.ModelChoice:
    return models.choose_model(cfg.engine.model, cfg.origins["engine.model"], assigned_model)


def hub_source(cfg: Config, environ: Mapping[str, str] | None = None) -> HubSource:
    """Where a hub model comes from now: the engine's hub client with the token read afresh
    (ModelError for a token file that is set but unreadable). No downloader when the
    operator switched downloads off (HF_HUB_OFFLINE=1)."""
    env = os.environ if environ is None else environ
    token = read_hf_token(cfg.model_cache.hf_token_file, env)
    endpoint = endpoint_of(env)
    awaits_restart = token is None and token_awaits_restart(cfg.model_cache.hf_token_file, env)
    if env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return HubSource(None, endpoint, token, awaits_restart)
    python = EnginePaths.from_config(cfg).python
    return HubSource(Downloader(python, download_env(env, str(cfg.model_cache_path), token)), endpoint, token,
                     awaits_restart)


def prepare_engine(cfg: Config, assigned_model: str | None, group: GroupRole | None = None) -> Prepared:
    """Raises ModelError (NotCached for a hub model not acquired yet), PlanError or
    LaunchError with an operator-facing message. With ``group`` (this node's part in a
    group) the model is the group's, ``assigned_model``, whatever engine.model says:
    every member must load the same one."""
    paths = EnginePaths.from_config(cfg)
    if paths.python_note:
        log.warning("%s", paths.python_note, extra=PLAN)
    hw = hardware.detect()
    choice = choose_model(cfg, assigned_model) if group is None or not assigned_model \
        else models.ModelChoice(assigned_model, "router")
    log.info("model %s (from %s)", choice.ref, choice.origin,
             extra=phase_fields("plan", XIM_MODEL=choice.ref))
    resolved = models.resolve(choice, models.ModelCache.from_config(cfg))
    facts, note = autoconfig.load_model_facts(resolved.model_arg)
    plan = autoconfig.plan_from_config(cfg, hw, facts, note)
    log_plan(plan)
    kv = kvcache.prepare(cfg, plan, engine_python=paths.python, ram_bytes=hw.ram_bytes)
    # The supervisor logs the engine's command line at every start.
    launch = build_launch(cfg, plan, resolved, paths, kv=kv,
                          hidden=enrollment.secret_paths(cfg, os.environ), group=group)
    return Prepared(launch, plan, resolved, kv, hw)
