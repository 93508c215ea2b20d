"""`ximd doctor [--format json]`: the host's checks as a table or JSON, and the exit status.

The checks and their verdict are ximd.doctor's; this module only shows them.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from ximd.config import Config
from ximd.doctor import Check, collect, failed, summary
from ximd.exitcodes import EX_OK, EX_REFUSED
from ximd.hardware import Hardware


def render_table(checks: list[Check]) -> str:
    """One line per check, its fix below a warning or failure, the counts last."""
    width = max(len(c.name) for c in checks) if checks else 0
    lines = []
    for c in checks:
        lines.append(f"{c.status.upper():<5} {c.name:<{width}}  {c.detail}")
        if c.fix and c.status in ("warn", "fail"):
            lines.append(f"{'':<5} {'':<{width}}  fix: {c.fix}")
    counts = summary(checks)
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()) + (" — FAILED" if failed(checks) else ""))
    return "\n".join(lines)


def to_json(checks: list[Check]) -> str:
    """What `--format json` prints: the verdict, the counts and every check."""
    return json.dumps({"ok": not failed(checks), "summary": summary(checks),
                       "checks": [asdict(c) for c in checks]}, indent=2)


def main(cfg: Config, fmt: str = "text", hw: Hardware | None = None) -> int:
    """`ximd doctor [--format json]`: run every check, show them, exit 1 when one failed."""
    checks = collect(cfg, hw)
    print(to_json(checks) if fmt == "json" else render_table(checks))
    return EX_REFUSED if failed(checks) else EX_OK
