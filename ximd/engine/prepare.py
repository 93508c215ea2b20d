"""From configuration to an EngineLaunch, in the agent's order.

    paths, model = resolve_model(cfg, assigned_model=identity.model)   # blocking: may download
    plan = autoconfig.build_plan(..., facts from model.model_arg ...)
    launch = engine_launch(cfg, plan, model, paths)                     # blocking: probes, checks
    supervisor = EngineSupervisor(launch, on_state=..., startup_timeout=cfg.engine.startup_timeout_s)

The model comes first because the plan needs its facts; LMCache comes after the plan
because it needs the accelerator and the tensor-parallel size. Both functions block
(a download, a PING, a subprocess): the agent runs them with asyncio.to_thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from ximd import kvcache
from ximd.engine.launch import EngineLaunch, EnginePaths, build_launch
from ximd.models import ModelCache, ResolvedModel, choose_model, resolve

log = logging.getLogger("ximd.engine")


def resolve_model(cfg, *, assigned_model: str | None = None,
                  environ: Mapping[str, str] | None = None) -> tuple[EnginePaths, ResolvedModel]:
    """The engine's interpreter and directories, and the model it will serve (ModelError if none)."""
    environ = os.environ if environ is None else environ
    paths = EnginePaths.from_config(cfg)
    if paths.python_note:
        log.warning("%s", paths.python_note)
    choice = choose_model(cfg.engine.model, cfg.origins.get("engine.model", "default"), assigned_model)
    model = resolve(choice, ModelCache.from_config(cfg), engine_python=paths.python, environ=environ)
    log.info("Model %s (from the %s), served from %s", model.ref, choice.origin, model.model_arg)
    return paths, model


def engine_launch(cfg, plan, model: ResolvedModel, paths: EnginePaths, *,
                  environ: Mapping[str, str] | None = None) -> EngineLaunch:
    """LMCache decided and written, then the launch built and logged."""
    environ = os.environ if environ is None else environ
    kv = kvcache.prepare(cfg, plan, engine_python=paths.python)
    return build_launch(cfg, plan, model, paths, kv=kv, inherit=environ)
