"""`ximd status [--format json]`: ask the running daemon over its control socket and show the answer.

The daemon's reply is the JSON as it stands (moments in RFC 3339 UTC); text shows them in local time.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from xim_proto.cliout import from_rfc3339, local_text
from ximd import control
from ximd.commands.permissions import group_of, needs_privilege
from ximd.config import Config
from ximd.exitcodes import EX_NOT_RUNNING, EX_OK


def main(cfg: Config, fmt: str = "text") -> int:
    """Exit 3 (as `systemctl status` of an inactive unit) when no daemon answers."""
    path = control.socket_path(cfg.runtime_dir)
    try:
        reply = control.query(path)
    except control.NotPermitted:
        return needs_privilege("status", f"connect to {path}", group_of(path))
    except control.NotRunning as exc:
        print(str(exc), file=sys.stderr)
        return EX_NOT_RUNNING
    print(json.dumps(reply, indent=2) if fmt == "json" else render_status(reply))
    return EX_OK


def shown(key: str, value: Any) -> Any:
    """A value as text shows it: the daemon's RFC 3339 UTC moments (`…_at`) in local time, none as '-'."""
    if value is None:
        return "-"
    if key.endswith("_at") and isinstance(value, str):
        try:
            return local_text(from_rfc3339(value))
        except ValueError:
            return value            # an older daemon's local-time text
    return value


def render_status(reply: dict[str, Any]) -> str:
    """`key: value` lines; a nested section as `key:` and its items indented below it."""
    lines = []
    for key, value in reply.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {shown(k, v)}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {shown(key, value)}")
    return "\n".join(lines)
