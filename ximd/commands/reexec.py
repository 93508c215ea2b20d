"""`ximd reexec [--no-wait] [--timeout S]`: replace the running daemon's program image in place.

Asks the daemon over its control socket (ximd.reexec says what it does), then
follows it until the new image has settled: serving again (the engine adopted or
restarted, and which), or waiting for something, or gone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from ximd import control
from ximd.commands.permissions import group_of, needs_privilege
from ximd.config import Config
from ximd.exitcodes import EX_NOT_RUNNING, EX_OK, EX_REFUSED, EX_UNAVAILABLE

POLL_S = 0.5
# Phases a new image settles in: serving, or waiting on something outside it.
SETTLED = {"serving", "not-enrolled", "model-waiting", "engine-unavailable"}
PREFLIGHT_ANSWER_S = 90.0


def settled(before: dict[str, Any], now: dict[str, Any]) -> bool:
    return now.get("generation", 0) > before.get("generation", 0) and now.get("phase") in SETTLED


def summary(before: dict[str, Any], now: dict[str, Any], took_s: float) -> str:
    """One line: from which version to which, how long, and what became of the engine."""
    engine = now.get("engine") or {}
    handover = engine.get("handover")
    if handover == "adopted":
        kept = f"engine pid {engine.get('pid')} kept"
    elif handover:
        kept = f"engine {handover} (new pid {engine.get('pid')})"
    else:
        kept = "no engine to keep"
    return (f"ximd re-executed in place (pid {now.get('pid')}): {before.get('version')} → {now.get('version')} "
            f"in {took_s:.1f} s; {kept}; now: {now.get('status')}")


def follow(path, before: dict[str, Any], timeout_s: float,
           ask: Callable[..., dict] = control.query) -> tuple[int, str]:
    """Wait for the new image to settle: (exit status, what to print)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        time.sleep(POLL_S)
        try:
            now = ask(path)
        except control.NotRunning:
            continue                      # between the images, no socket answers
        if now.get("pid") != before.get("pid"):
            return EX_REFUSED, (f"ximd was restarted instead (pid {before.get('pid')} → {now.get('pid')}); "
                                "see journalctl -u ximd")
        if settled(before, now):
            status = EX_OK if now.get("phase") == "serving" or before.get("phase") != "serving" else EX_UNAVAILABLE
            return status, summary(before, now, time.monotonic() - began)
    return EX_UNAVAILABLE, f"ximd did not settle within {timeout_s:g} s of the re-exec; see journalctl -u ximd"


def main(cfg: Config, *, wait: bool = True, timeout_s: float = 300.0) -> int:
    path = control.socket_path(cfg.runtime_dir)
    try:
        before = control.query(path)
        answer = control.query(path, "reexec", timeout=PREFLIGHT_ANSWER_S)
    except control.NotPermitted:
        return needs_privilege("reexec", f"connect to {path}", group_of(path))
    except control.NotRunning as exc:
        print(str(exc), file=sys.stderr)
        return EX_NOT_RUNNING
    if "error" in answer:
        print(f"ximd reexec: {answer['error']}", file=sys.stderr)
        return EX_REFUSED
    if not wait:
        print(f"ximd (pid {answer.get('pid')}) is re-executing {answer.get('from_version')} → "
              f"{answer.get('to_version')}; follow with: journalctl -u ximd -f")
        return EX_OK
    status, line = follow(path, before, timeout_s)
    print(line, file=sys.stdout if status == EX_OK else sys.stderr)
    return status
