"""Re-executing ximd in place: a new program image in the same process, the engine kept.

    `ximd reexec` ─ control socket ─▶ Agent.reexec():
        preflight (the installed ximd imports; its version) ─ fails ▶ answered, nothing changes
        RELOADING=1 + STATUS ─▶ the node hands over: the link drains (the router holds new
        requests), in-flight streams finish within agent.drain_grace_s, the link closes,
        the engine is detached (EngineHandover), metrics and control sockets close
        ─▶ <runtime_dir>/reexec.json (0600) ─▶ execve(the same interpreter, the same argv)
    the new image: run_daemon takes the state (and deletes it) ─▶ the node adopts the
        engine if it would start the very same one, else restarts it with the reason in
        the journal ─▶ READY=1 once it serves again.

Same PID: systemd's unit, cgroup, MAINPID and watchdog stay; the engine is still our
child. A crash of ximd is not a re-exec: the engine dies with it (pdeathsig) and
systemd starts both afresh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xim_proto.files import write_atomically
from ximd.engine.handover import EngineHandover

STATE_ENV = "XIMD_REEXEC_STATE"
STATE_NAME = "reexec.json"
FORMAT = 1
PREFLIGHT_TIMEOUT_S = 60.0
# What the new image must be able to do before the old one lets go of anything.
_PREFLIGHT = "import ximd, ximd.agent, ximd.cli; print(ximd.__version__)"


class ReexecError(Exception):
    """The re-exec cannot go ahead (or the state handed over is unusable); the message says why."""


@dataclass(frozen=True)
class ReexecState:
    from_version: str
    to_version: str
    generation: int            # re-execs this process has been through, this one included
    requested_at: float        # wall clock
    engine: EngineHandover | None

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "from_version": self.from_version, "to_version": self.to_version,
                "generation": self.generation, "requested_at": self.requested_at,
                "engine": self.engine.to_json() if self.engine else None}

    @classmethod
    def from_json(cls, data: Any) -> ReexecState:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            shown = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ReexecError(f"the re-exec state has format {shown!r}; this version reads {FORMAT}")
        try:
            engine = EngineHandover.from_json(data["engine"]) if data.get("engine") else None
            return cls(str(data["from_version"]), str(data["to_version"]), int(data["generation"]),
                       float(data["requested_at"]), engine)
        except (KeyError, TypeError, ValueError) as exc:
            raise ReexecError(f"the re-exec state is incomplete: {exc}") from None


def exec_argv() -> list[str]:
    """The command line this process was started with, on the same interpreter (absolute)."""
    return [sys.executable, *sys.orig_argv[1:]]


def preflight(python: str | None = None) -> str:
    """The version of the ximd installed now, proving that it imports; ReexecError if not."""
    try:
        done = subprocess.run([python or sys.executable, "-c", _PREFLIGHT], capture_output=True, text=True,
                              timeout=PREFLIGHT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReexecError(f"the installed ximd cannot be run: {exc}") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise ReexecError(f"the installed ximd does not start: {lines[-1] if lines else done.returncode}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "unknown"


def write_state(runtime_dir: Path, state: ReexecState) -> Path:
    return write_atomically(Path(runtime_dir) / STATE_NAME, json.dumps(state.to_json()), mode=0o600)


def take_state(environ: MutableMapping[str, str]) -> ReexecState | None:
    """The state an earlier image of this process left, read once and deleted; None when this
    process was not re-executed. ReexecError when it was but the state is unusable."""
    path = environ.pop(STATE_ENV, None)
    if not path:
        return None
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ReexecError(f"cannot read the re-exec state {path}: {exc.strerror}") from None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    try:
        return ReexecState.from_json(json.loads(text))
    except ValueError as exc:
        raise ReexecError(f"the re-exec state {path} is not JSON: {exc}") from None


def execute(argv: list[str], state_path: Path, environ: Mapping[str, str] | None = None) -> None:
    """Replace this program image. Returns only by raising OSError."""
    env = dict(os.environ if environ is None else environ)
    env[STATE_ENV] = str(state_path)
    os.execve(argv[0], argv, env)


def new_state(from_version: str, to_version: str, generation: int, engine: EngineHandover | None) -> ReexecState:
    return ReexecState(from_version, to_version, generation + 1, time.time(), engine)
