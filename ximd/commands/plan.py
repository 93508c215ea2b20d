"""`ximd plan [--format json]`: the engine settings ximd would choose, and why.

ximd.autoconfig decides (and raises PlanError for an impossible setting); this
module shows the decision as one line per setting or as JSON, and turns a
PlanError into exit 78.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from ximd import hardware
from ximd.autoconfig import Plan, PlanError, load_model_facts, plan_from_config
from ximd.config import Config
from ximd.exitcodes import EX_CONFIG, EX_OK
from ximd.hardware import Hardware

_FIELD_ORDER = ("accelerator", "visible_devices", "tensor_parallel_size", "gpu_memory_utilization",
                "kv_capacity_tokens", "max_model_len", "max_concurrent", "max_num_seqs",
                "cpu_kvcache_space_gb", "cpu_threads")


def plan_to_dict(p: Plan) -> dict[str, Any]:
    """The plan as `--format json` shows it: every field, tuples as lists."""
    out = dataclasses.asdict(p)
    out["visible_devices"] = list(p.visible_devices)
    out["warnings"] = list(p.warnings)
    out["engine_env_remove"] = list(p.engine_env_remove)
    return out


def render_plan(p: Plan) -> str:
    """One line per decision: the value and why."""
    lines = []
    if "model" in p.reasons:
        lines.append(f"{'model':<24}{p.reasons['model']}")
    for name in _FIELD_ORDER:
        value = getattr(p, name)
        if value is None and name not in p.reasons:
            continue
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        shown = "model default" if (name == "max_model_len" and value is None) else shown
        shown = "-" if value in (None, ()) and name != "max_model_len" else shown
        lines.append(f"{name:<24}{shown!s:<16}{p.reasons.get(name, '')}")
    env = " ".join(f"{k}={v}" for k, v in p.engine_env.items())
    lines.append(f"{'engine_env':<24}{env}")
    unset = f"; unset: {' '.join(p.engine_env_remove)}" if p.engine_env_remove else ""
    lines.append(f"{'':<24}{p.reasons.get('engine_env', '')}{unset}")
    lines += [f"warning: {w}" for w in p.warnings]
    return "\n".join(lines)


def main(cfg: Config, fmt: str = "text", hw: Hardware | None = None) -> int:
    """`ximd plan [--format json]`: detect, plan, print. 78 on an impossible setting."""
    hw = hw or hardware.detect()
    facts, note = load_model_facts(cfg.engine.model)
    try:
        result = plan_from_config(cfg, hw, facts, note)
    except PlanError as exc:
        print(f"ximd plan: invalid configuration: {exc}", file=sys.stderr)
        return EX_CONFIG
    print(json.dumps(plan_to_dict(result), indent=2) if fmt == "json" else render_plan(result))
    return EX_OK
