"""`ximd status [--format json]`: ask the running daemon over its control socket and show the answer."""

from __future__ import annotations

import json
import sys
from typing import Any

from ximd import control
from ximd.config import Config
from ximd.exitcodes import EX_NOT_RUNNING, EX_OK


def main(cfg: Config, fmt: str = "text") -> int:
    """Exit 3 (as `systemctl status` of an inactive unit) when no daemon answers."""
    try:
        reply = control.query(control.socket_path(cfg.runtime_dir))
    except control.NotRunning as exc:
        print(str(exc), file=sys.stderr)
        return EX_NOT_RUNNING
    print(json.dumps(reply, indent=2) if fmt == "json" else render_status(reply))
    return EX_OK


def render_status(reply: dict[str, Any]) -> str:
    """`key: value` lines; a nested section as `key:` and its items indented below it."""
    lines = []
    for key, value in reply.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {v}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
