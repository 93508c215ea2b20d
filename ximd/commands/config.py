"""`ximd config show` and `ximd config validate`, and how any command reports an invalid configuration.

ximd.config loads, validates and says where each value came from; this module
shows it (TOML or JSON) and owns the one message and exit status (78) of a
configuration that does not load.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ximd import config as configmod
from ximd.commands.permissions import group_of, needs_privilege
from ximd.configdoc import literal
from ximd.exitcodes import EX_CONFIG, EX_OK


def show(cfg: configmod.Config, *, origin: bool, fmt: str) -> int:
    """`ximd config show [--origin] [--format text|json]`: the effective values; load warnings on stderr."""
    print(render_config(cfg, origin=origin, fmt=fmt))
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EX_OK


def render_config(cfg: configmod.Config, *, origin: bool, fmt: str) -> str:
    """TOML sections (each value's origin as a comment with `origin`), or JSON."""
    if fmt == "json":
        shown = {name: ({"value": configmod.shown_value(name, value), "origin": where} if origin
                        else configmod.shown_value(name, value))
                 for name, value, where in cfg.items()}
        return json.dumps(shown, indent=2)
    lines, section = [], None
    for name, value, where in cfg.items():
        sec, key = name.split(".", 1)
        if sec != section:
            lines += ([""] if section else []) + [f"[{sec}]"]
            section = sec
        line = f"{key} = {literal(configmod.shown_value(name, value))}"
        lines.append(f"{line:<56} # {origin_comment(where)}" if origin else line)
    return "\n".join(lines)


def origin_comment(where: str) -> str:
    """An origin as a TOML comment may hold it: a path with a control character is shown quoted."""
    return where if where.isprintable() else literal(where)


def validate(path: str | Path | None) -> int:
    """`ximd config validate [PATH]`: load the file and its drop-ins without the environment.

    A ConfigError propagates to the front door, which reports it with `invalid`.
    """
    path = path or configmod.DEFAULT_CONFIG_PATH
    cfg = configmod.load(path, use_env=False)
    print(f"{path}: OK ({len(cfg.sources)} file(s): {', '.join(cfg.sources) or 'defaults only'})")
    return EX_OK


def invalid(exc: configmod.ConfigError, command: str = "") -> int:
    """Any command whose configuration does not load: every problem on stderr, exit 78.

    A file this user may not read is no invalid configuration: the command needs
    root or the file's group (xerotier), and says so with exit 77.
    """
    denied = [p for p in exc.problems if p.denied]
    if denied:
        return needs_privilege(command, "read " + ", ".join(p.source for p in denied), group_of(denied[0].source))
    print("ximd: invalid configuration:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)
    return EX_CONFIG
