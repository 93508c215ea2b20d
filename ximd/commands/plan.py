"""`ximd plan [--format json]`: the engine settings ximd would choose, and why.

ximd.autoconfig decides (and raises PlanError for an impossible setting) for the
model the daemon would serve (ximd.modelsource: config > router assignment > seed
default, facts from the cached snapshot, nothing downloaded), and ximd.kvcache
decides LMCache and sizes its tiers (no probe, no file, no LMCache check); this
module shows the decisions as one line per setting or as JSON, and turns a
PlanError into exit 78.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ximd import hardware, kvcache, modelsource
from ximd.autoconfig import Plan, PlanError, plan_from_config
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


def tiers_to_dict(t: kvcache.TierPlan) -> dict[str, Any]:
    """LMCache as `--format json` shows it (sizes in GiB per TP rank, the URL masked)."""
    out = dataclasses.asdict(t)
    out["disk_path"] = str(t.disk_path) if t.disk_path else None
    out["warnings"] = list(t.warnings)
    return out


def _per_rank(gb: float, ranks: int) -> str:
    total = f" × {ranks} TP ranks = {gb * ranks:.2f} GiB" if ranks > 1 else ""
    return f"{gb:.2f} GiB per TP rank{total}"


def render_tiers(t: kvcache.TierPlan) -> str:
    """LMCache on or off and why; when on, one line per tier."""
    lines = [f"{'lmcache':<24}{'on' if t.enabled else 'off':<16}{t.reason}"]
    if t.enabled:
        cpu = _per_rank(t.cpu_gb, t.tp_size) + " of RAM" if t.cpu_gb > 0 else "off (size 0)"
        lines.append(f"{'lmcache cpu tier':<24}{cpu}")
        disk = f"{t.disk_path}: {_per_rank(t.disk_gb, t.tp_size)}" if t.disk_path else "off (size 0)"
        lines.append(f"{'lmcache disk tier':<24}{disk}")
        remote = (f"{t.remote_url} (not probed here; ximd PINGs it at start and goes on without it "
                  "if it does not answer)" if t.remote_url else "none (lmcache.redis_url is empty)")
        lines.append(f"{'lmcache remote tier':<24}{remote}")
    lines += [f"warning: {w}" for w in t.warnings]
    return "\n".join(lines)


def main(cfg: Config, fmt: str = "text", hw: Hardware | None = None) -> int:
    """`ximd plan [--format json]`: detect, plan, print. 78 on an impossible setting."""
    hw = hw or hardware.detect()
    source = modelsource.locate_for(cfg)
    facts, note = modelsource.load_facts(source)
    try:
        result = plan_from_config(cfg, hw, facts, note)
    except PlanError as exc:
        print(f"ximd plan: invalid configuration: {exc}", file=sys.stderr)
        return EX_CONFIG
    tiers = kvcache.plan_tiers(cfg, result.accelerator, result.tensor_parallel_size, ram_bytes=hw.ram_bytes,
                               disk_partition_bytes=kvcache.partition_bytes(Path(cfg.lmcache_disk_path)))
    if fmt == "json":
        data = plan_to_dict(result)
        data["model_source"] = {"model": source.choice.ref, "origin": source.choice.origin,
                                "where": source.where, "found": source.found,
                                "facts_dir": str(source.facts_dir) if source.facts_dir else None,
                                "note": source.note}
        data["lmcache"] = tiers_to_dict(tiers)
        print(json.dumps(data, indent=2))
    else:
        print(render_plan(result) + "\n" + render_tiers(tiers))
    return EX_OK
