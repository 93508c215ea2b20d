"""What one program image of ximd hands the next about the engine it keeps running.

Re-executing in place (ximd.reexec) keeps the engine: the old image detaches from
it and writes this down; the new image adopts it only if it would have started the
very same engine (the launch's fingerprint: argv, environment, socket, sandbox)
and the PID still names the same process. Anything else is a clean restart of the
engine, with the reason in the journal.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from ximd.engine.launch import EngineLaunch


@dataclass(frozen=True)
class EngineHandover:
    pid: int
    output_fd: int            # an inheritable descriptor of the engine's output pipe
    create_time: float        # the process's start time (psutil), so a reused PID is not adopted
    fingerprint: str          # of the launch the engine was started with
    started_at: float         # wall clock
    healthy_at: float | None
    starts: int
    model: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> EngineHandover:
        if not isinstance(data, dict):
            raise ValueError("the engine's handover is not an object")
        try:
            return cls(pid=int(data["pid"]), output_fd=int(data["output_fd"]),
                       create_time=float(data["create_time"]), fingerprint=str(data["fingerprint"]),
                       started_at=float(data["started_at"]),
                       healthy_at=None if data.get("healthy_at") is None else float(data["healthy_at"]),
                       starts=int(data["starts"]), model=str(data["model"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the engine's handover is incomplete: {exc}") from None


def fingerprint(launch: EngineLaunch) -> str:
    """Everything about how the engine was started that a new image must agree with."""
    facts = {"argv": list(launch.argv), "env": sorted(launch.env.items()), "socket": str(launch.socket_path),
             "served": launch.served_model_name, "sandbox": repr(launch.sandbox)}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def same_process(handover: EngineHandover, start_time: float | None) -> bool:
    """Whether the PID still names the process handed over (``start_time``: its start time now)."""
    return start_time is not None and abs(start_time - handover.create_time) <= 0.01


def refusal(handover: EngineHandover, launch: EngineLaunch, start_time: float | None) -> str | None:
    """Why the new image must not adopt the engine (None: adopt it). ``start_time`` is the
    PID's process start time now (None when no such process)."""
    if start_time is None:
        return f"the engine (pid {handover.pid}) is gone"
    if not same_process(handover, start_time):
        return f"pid {handover.pid} is another process now"
    if handover.fingerprint != fingerprint(launch):
        return ("this version would start the engine differently (its command line, environment or "
                "sandbox changed)")
    return None


async def discard(handover: EngineHandover, grace_s: float) -> None:
    """Stop an engine handed over but not adopted (its group, then reap it), and close its pipe."""
    from ximd.engine import processes
    from ximd.engine.child import EngineChild

    child = EngineChild(handover.pid, handover.output_fd)
    if same_process(handover, process_start_time(handover.pid)):
        await processes.terminate_group(handover.pid, grace_s)
    child.poll()
    try:
        os.close(handover.output_fd)
    except OSError:
        pass
