"""The vLLM engine as a supervised child process of ximd.

- `launch`: argv and a clean environment from config + plan + model (pure).
- `supervisor`: `EngineSupervisor` starts, health-checks, restarts and stops it.
- `processes`: its process group, and earlier engines of ours still alive.
- `output`: its stdout/stderr forwarded to logging without blocking.
"""

from ximd.engine.launch import EngineLaunch, EnginePaths, LaunchError, build_launch, describe, instance_id
from ximd.engine.processes import OrphanError
from ximd.engine.supervisor import EngineReport, EngineState, EngineSupervisor, backoff_delay

__all__ = ["EngineLaunch", "EnginePaths", "EngineReport", "EngineState", "EngineSupervisor", "LaunchError",
           "OrphanError", "backoff_delay", "build_launch", "describe", "instance_id"]
