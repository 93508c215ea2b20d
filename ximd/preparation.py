"""Everything between the configuration and a ready-to-start engine.

    hardware → model (config > router assignment > seed default) → plan → LMCache → launch

Blocking on purpose (tool probes, a possible model download, LMCache's own
config check in the engine's interpreter): the agent runs `prepare_engine`
in a thread so the watchdog keeps being fed meanwhile. Every decision is
logged once with its reason.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ximd import autoconfig, enrollment, hardware, kvcache, models
from ximd.autoconfig import Plan
from ximd.config import Config
from ximd.engine import EngineLaunch, EnginePaths, build_launch
from ximd.logs import phase_fields

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


def prepare_engine(cfg: Config, assigned_model: str | None) -> Prepared:
    """Raises ModelError, PlanError or LaunchError with an operator-facing message."""
    paths = EnginePaths.from_config(cfg)
    if paths.python_note:
        log.warning("%s", paths.python_note, extra=PLAN)
    hw = hardware.detect()
    choice = models.choose_model(cfg.engine.model, cfg.origins["engine.model"], assigned_model)
    log.info("model %s (from %s)", choice.ref, choice.origin,
             extra=phase_fields("plan", XIM_MODEL=choice.ref))
    resolved = models.resolve(choice, models.ModelCache.from_config(cfg), engine_python=paths.python)
    facts, note = autoconfig.load_model_facts(resolved.model_arg)
    plan = autoconfig.plan_from_config(cfg, hw, facts, note)
    log_plan(plan)
    kv = kvcache.prepare(cfg, plan, engine_python=paths.python, ram_bytes=hw.ram_bytes)
    # The supervisor logs the engine's command line at every start.
    launch = build_launch(cfg, plan, resolved, paths, kv=kv,
                          hidden=enrollment.secret_paths(cfg, os.environ))
    return Prepared(launch, plan, resolved, kv, hw)
