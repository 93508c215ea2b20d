"""`ximd doctor`: this host against the seed's prerequisites and what ximd needs.

Each check is a pure function of facts gathered once by `collect` (hardware,
stat results, a subprocess, a PING), so its ok/warn/fail boundaries are tested
without the host having to match. "warn" is below what is recommended or
something ximd works around; "fail" is something that stops ximd from serving
as configured. `ximd doctor` (ximd.commands.doctor) shows the checks and
exits 1 only when one failed.

Sizes follow the seed: "16GB VRAM", "32GB RAM" and "100GB disk" are decimal
gigabytes (10^9 bytes), so a card sold as 16 GB that reports 15360 MiB
(16.1 × 10^9 bytes) passes; the /dev/shm sizes are the seed's bytes (GiB).
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ximd import autoconfig, hardware, modelsource, tuning
from ximd.hardware import Gpu, Hardware
from ximd.units import GB, GIB, MIB
from ximd.units import gb_text as _gb
from ximd.units import gib_text as _gib

# The driver the shipped CUDA engine needs. xerotier-engine-install --flavor cuda installs
# packaging/engine/requirements-cuda.txt: vllm 0.33.0, whose wheel pins torch 2.14.0 (PyPI's
# CUDA 13 build) and nvidia-cutlass-dsl[cu13], and lmcache 0.5.6 (cupy-cuda13x, cuda-python
# 13), as that file's header says. NVIDIA's CUDA compatibility guide ("Minor
# Version Compatibility", table of driver ranges): CUDA 13.x needs driver >= 580 on Linux
# (CUDA 12.x needed >= 525). Change it with the CUDA major those pins bring.
ENGINE_CUDA_MAJOR = 13
MIN_NVIDIA_DRIVER = 580
MIN_VRAM_BYTES = 16 * GB
RECOMMENDED_VRAM_BYTES = 24 * GB       # the seed's recommended class: A30, RTX 3090 (24 GB)
MIN_RAM_BYTES = 32 * GB
RECOMMENDED_RAM_BYTES = 64 * GB
RECOMMENDED_DISK_BYTES = 500 * GB
# The seed's shm_size table: (largest parameter count, bytes).
SHM_BY_MODEL_SIZE = ((13e9, 8 * GIB), (70e9, 16 * GIB), (float("inf"), 32 * GIB))
SERVICE_USER = "xerotier"
ENGINE_IMPORT_TIMEOUT_S = 120.0        # importing vllm takes 15–30 s on a small CPU host
REDIS_TIMEOUT_S = 1.0

STATUSES = ("ok", "warn", "fail", "skip")


@dataclass(frozen=True)
class Check:
    name: str
    status: str            # "ok" | "warn" | "fail" | "skip"
    detail: str
    fix: str | None = None


# ---------------------------------------------------------------- GPUs


def check_gpus(hw: Hardware) -> Check:
    if hw.gpus:
        groups: dict[tuple[str, int], int] = {}
        for gpu in hw.gpus:
            groups[(gpu.name, gpu.memory_total_mib)] = groups.get((gpu.name, gpu.memory_total_mib), 0) + 1
        found = ", ".join(f"{n} × {name} ({_gib(mib * MIB)})" for (name, mib), n in groups.items())
        tools = ", ".join(p.tool for p in hw.probes if p.gpus)
        return Check("gpus", "ok", f"{found} via {tools}")
    failed = [p for p in hw.probes if p.found and p.error]
    if failed:
        why = "; ".join(f"{p.tool}: {p.error}" for p in failed)
        return Check("gpus", "fail", f"GPU tools are installed but found no usable GPU ({why})",
                     "check the driver: `nvidia-smi` (or `amd-smi list`) must list the GPUs; load the "
                     "kernel module or reboot after a driver update")
    absent = "/".join(p.tool for p in hw.probes if not p.found and p.tool != "rocm-smi") or "GPU tools"
    return Check("gpus", "warn", f"no GPU found ({absent} not present): ximd will run the CPU engine",
                 f"for a GPU node install the NVIDIA driver ({MIN_NVIDIA_DRIVER}+) or ROCm; a CPU node needs nothing more")


def check_gpu_devices(hw: Hardware) -> Check:
    """The device nodes CUDA/ROCm open, and their majors for the unit's DeviceAllow=."""
    vendor = hw.vendor
    if vendor is None:
        return Check("gpu device nodes", "skip", "no GPU")
    needed = ("nvidia", "nvidiactl", "nvidia-uvm") if vendor == "nvidia" else ("kfd", "drm")
    missing = [name for name in needed if name not in hw.device_majors]
    majors = ", ".join(f"{k} {v}" for k, v in sorted(hw.device_majors.items()))
    if missing:
        fix = ("`modprobe nvidia-uvm` (and add it to /etc/modules-load.d/): under systemd's DeviceAllow= "
               "the service cannot create it on first use" if "nvidia-uvm" in missing
               else "load the driver's kernel modules (amdgpu) and check /dev/kfd")
        return Check("gpu device nodes", "fail", f"/proc/devices lacks {', '.join(missing)} (has: {majors or 'none'})", fix)
    return Check("gpu device nodes", "ok", f"character majors: {majors}")


def check_driver(gpus: tuple[Gpu, ...]) -> Check:
    if not gpus:
        return Check("gpu driver", "skip", "no GPU")
    nvidia = [g for g in gpus if g.vendor == "nvidia"]
    if not nvidia:
        versions = sorted({g.driver_version or "unknown" for g in gpus})
        return Check("gpu driver", "ok", f"amdgpu {', '.join(versions)} (the seed sets no minimum for AMD)")
    versions = sorted({g.driver_version for g in nvidia})
    parsed = [_driver_major(v) for v in versions]
    majors = [m for m in parsed if m is not None]
    if len(majors) < len(parsed):
        return Check("gpu driver", "warn", f"NVIDIA driver version not understood: {', '.join(versions)}",
                     f"check `nvidia-smi`; the CUDA {ENGINE_CUDA_MAJOR} engine needs {MIN_NVIDIA_DRIVER} or later")
    if min(majors) < MIN_NVIDIA_DRIVER:
        return Check("gpu driver", "fail",
                     f"NVIDIA driver {', '.join(versions)} is older than {MIN_NVIDIA_DRIVER}, the minimum of "
                     f"the CUDA {ENGINE_CUDA_MAJOR} engine (xerotier-engine-install --flavor cuda)",
                     f"install driver {MIN_NVIDIA_DRIVER} or later (e.g. `apt install nvidia-driver-{MIN_NVIDIA_DRIVER}`)")
    return Check("gpu driver", "ok",
                 f"NVIDIA driver {', '.join(versions)} (≥ {MIN_NVIDIA_DRIVER}, CUDA {ENGINE_CUDA_MAJOR} engine)")


def _driver_major(version: str) -> int | None:
    head = version.split(".")[0]
    return int(head) if head.isdigit() else None


def check_vram(gpus: tuple[Gpu, ...]) -> Check:
    if not gpus:
        return Check("vram", "skip", "no GPU")
    sizes = ", ".join(f"GPU {g.index} {_gb(g.memory_total_mib * MIB)}" for g in gpus)
    unknown = [g.index for g in gpus if g.memory_total_mib <= 0]
    small = [g.index for g in gpus if 0 < g.memory_total_mib * MIB < MIN_VRAM_BYTES]
    modest = [g.index for g in gpus if MIN_VRAM_BYTES <= g.memory_total_mib * MIB < RECOMMENDED_VRAM_BYTES]
    if small:
        return Check("vram", "fail", f"{sizes}: below the {_gb(MIN_VRAM_BYTES)} minimum per GPU",
                     "use GPUs with 16 GB or more, or leave the small ones out with engine.cuda_visible_devices")
    if unknown:
        return Check("vram", "warn", f"{sizes}: size not reported for GPU {','.join(map(str, unknown))}")
    if modest:
        return Check("vram", "warn", f"{sizes}: meets the {_gb(MIN_VRAM_BYTES)} minimum, below the recommended "
                                     f"{_gb(RECOMMENDED_VRAM_BYTES)} class (A30, RTX 3090 or better)")
    return Check("vram", "ok", f"{sizes} (≥ {_gb(RECOMMENDED_VRAM_BYTES)} each)")


# ---------------------------------------------------------------- host resources


def check_ram(ram_bytes: int, gpu_host: bool) -> Check:
    """The seed's 32 GB minimum is for GPU nodes; a CPU node only gets a warning below it."""
    shown = _gb(ram_bytes)
    if ram_bytes < MIN_RAM_BYTES:
        if gpu_host:
            return Check("ram", "fail", f"{shown}: below the seed's {_gb(MIN_RAM_BYTES)} minimum for a GPU node",
                         "add memory: model loading and the LMCache CPU tier live in RAM")
        return Check("ram", "warn", f"{shown}: below the {_gb(MIN_RAM_BYTES)} a GPU node needs; enough for the "
                                    f"CPU engine with a small model")
    if ram_bytes < RECOMMENDED_RAM_BYTES:
        return Check("ram", "warn", f"{shown}: meets the {_gb(MIN_RAM_BYTES)} minimum, below the recommended "
                                    f"{_gb(RECOMMENDED_RAM_BYTES)}")
    return Check("ram", "ok", f"{shown} (≥ {_gb(RECOMMENDED_RAM_BYTES)} recommended)")


def check_disk(path: Path, free_bytes: int | None, cache_cap_gb: float, cache_used_bytes: int = 0) -> Check:
    """The model cache may grow to model_cache.max_size_gb (the seed's 100 GB by default).

    What the cache already holds counts towards the cap, so a full cache on a
    disk with little left is not reported as a failure.
    """
    cap = int(cache_cap_gb * GB)
    need = max(0, cap - cache_used_bytes)
    if free_bytes is None:
        return Check("disk", "fail", f"cannot inspect the file system of {path}",
                     "check that the model cache path's parent exists and is readable")
    shown = f"{_gb(free_bytes)} free at {path}"
    if cache_used_bytes:
        shown += f" (the cache holds {_gb(cache_used_bytes)})"
    if free_bytes < need:
        return Check("disk", "fail", f"{shown}; the model cache may grow to {_gb(cap)} (model_cache.max_size_gb)",
                     "free space there, move model_cache.path to a larger disk, or lower model_cache.max_size_gb")
    if free_bytes + cache_used_bytes < RECOMMENDED_DISK_BYTES:
        return Check("disk", "warn", f"{shown}: enough for the {_gb(cap)} cache cap, below the recommended "
                                     f"{_gb(RECOMMENDED_DISK_BYTES)}")
    return Check("disk", "ok", f"{shown} (≥ {_gb(RECOMMENDED_DISK_BYTES)} recommended)")


def tree_size(path: Path) -> int:
    """Bytes the files under path occupy (0 when it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue  # removed while walking (eviction)
    return total


def shm_needed(params: int | None) -> int:
    """The seed's shm_size for a model of this many parameters (8 GiB when unknown: 1–8B)."""
    if params is None:
        return SHM_BY_MODEL_SIZE[0][1]
    return next(size for limit, size in SHM_BY_MODEL_SIZE if params < limit)


def check_shm(shm_bytes: int, params: int | None) -> Check:
    need = shm_needed(params)
    size = f"{params / 1e9:.1f}B" if params and params >= 1e8 else f"{(params or 0) / 1e6:.1f}M"
    which = f"a {size}-parameter model" if params else "1–8B models (the model's size is unknown)"
    if shm_bytes <= 0:
        return Check("/dev/shm", "fail", "/dev/shm is missing or empty; vLLM's worker processes share memory there",
                     "mount a tmpfs on /dev/shm")
    if shm_bytes < need:
        return Check("/dev/shm", "warn", f"{_gib(shm_bytes)}: the seed recommends {_gib(need)} for {which}",
                     f"grow it, e.g. `mount -o remount,size={need // GIB}G /dev/shm` (and in /etc/fstab)")
    return Check("/dev/shm", "ok", f"{_gib(shm_bytes)} (≥ {_gib(need)} for {which})")


def check_sysctls(readings: list[tuning.SysctlReading]) -> Check:
    problem = tuning.explain(readings)
    if problem:
        return Check("socket buffers", "warn", problem.split(". Fix: ")[0],
                     problem.split(". Fix: ", 1)[1] if ". Fix: " in problem else None)
    return Check("socket buffers", "ok", tuning.describe(readings))


# ---------------------------------------------------------------- directories


@dataclass(frozen=True)
class DirState:
    exists: bool
    is_dir: bool = False
    mode: int = 0
    uid: int = -1

    @classmethod
    def of(cls, path: Path) -> DirState:
        try:
            st = path.stat()
        except FileNotFoundError:
            return cls(False)
        return cls(True, stat.S_ISDIR(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid)


def check_directory(label: str, path: Path, state: DirState, service_uid: int | None, private: bool) -> Check:
    """A directory ximd writes. `private`: it holds the identity, so others must not read it."""
    name = f"{label} directory"
    if not state.exists:
        return Check(name, "warn", f"{path} does not exist yet; systemd creates it when ximd starts "
                                   f"(or run `install -d -m {'0700' if private else '0755'} {path}`)")
    if not state.is_dir:
        return Check(name, "fail", f"{path} exists but is not a directory", "remove it or point ximd elsewhere")
    mode = f"{state.mode:04o}"
    if state.mode & stat.S_IWOTH:
        return Check(name, "fail", f"{path} is writable by everyone (mode {mode})", f"chmod o-w {path}")
    owner = _user_name(state.uid)
    detail = f"{path} mode {mode} owner {owner}"
    if service_uid is not None and state.uid != service_uid:
        return Check(name, "warn", f"{detail}; ximd runs as {SERVICE_USER}",
                     f"chown -R {SERVICE_USER}: {path} (systemd's StateDirectory=/CacheDirectory= also fix it at start)")
    if private and state.mode & 0o077:
        return Check(name, "warn", f"{detail}: group/others have access to where the node identity lives",
                     f"chmod 0700 {path}")
    if service_uid is None:
        detail += f" (no {SERVICE_USER} user on this host: owner not checked)"
    return Check(name, "ok", detail)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def service_uid() -> int | None:
    try:
        return pwd.getpwnam(SERVICE_USER).pw_uid
    except KeyError:
        return None


# ---------------------------------------------------------------- engine, Redis, plan


@dataclass(frozen=True)
class EngineProbe:
    python: str
    note: str = ""               # why it is not the configured interpreter, when it is not
    version: str | None = None
    error: str | None = None


def probe_engine(configured: str, timeout_s: float = ENGINE_IMPORT_TIMEOUT_S) -> EngineProbe:
    """Import vLLM in the interpreter the engine will use (the same fallback as the engine's)."""
    from ximd.engine.launch import choose_python

    python, note = choose_python(configured, sys.executable)
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    try:
        proc = subprocess.run([python, "-c", "import vllm, sys; print(vllm.__version__)"], capture_output=True,
                              text=True, timeout=timeout_s, env=env, stdin=subprocess.DEVNULL, errors="replace")
    except subprocess.TimeoutExpired:
        return EngineProbe(python, note, error=f"`import vllm` did not finish within {timeout_s:g} s")
    except OSError as exc:
        return EngineProbe(python, note, error=f"cannot run {python}: {exc.strerror or exc}")
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        return EngineProbe(python, note, error=lines[-1].strip() if lines else f"exit {proc.returncode}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return EngineProbe(python, note, version=lines[-1].strip() if lines else "unknown")


def check_engine(probe: EngineProbe, configured: str) -> Check:
    where = probe.python + (f" ({probe.note})" if probe.note else "")
    if probe.version:
        return Check("engine", "ok", f"vLLM {probe.version} in {where}")
    return Check("engine", "fail", f"vLLM is not importable in {where}: {probe.error}",
                 "build the engine environment: `sudo xerotier-engine-install --flavor cuda` (or rocm, "
                 f"or cpu) --prefix {configured.removesuffix('/bin/python')}; or set engine.python")


def check_group_fabric(group, interfaces: dict[str, list[str]], engine_version: str | None) -> Check:
    """The fabric a group's engines would use (docs/groups.md): set, on this host, private,
    and an engine whose version the follower entry knows."""
    from ximd.engine.headless import unsupported
    from ximd.fabric import FabricError, public_reason, resolve_fabric

    if not group.fabric_interface and not group.fabric_address:
        return Check("group fabric", "skip", "group.fabric_interface and group.fabric_address are not set: "
                     "this node cannot take part in a group (one model across hosts)")
    try:
        fabric = resolve_fabric(group.fabric_interface, group.fabric_address, interfaces,
                                port_range=group.port_range, allow_public=group.allow_public_fabric)
    except FabricError as exc:
        return Check("group fabric", "fail", str(exc),
                     "set group.fabric_interface or group.fabric_address to this node's private network")
    where = (f"{fabric.address} on {fabric.interface}, ports {fabric.first_port}-{fabric.last_port}; the "
             "group's members must reach each other there on every TCP port (Gloo and NCCL use ephemeral ones)")
    if public_reason(fabric.address):
        return Check("group fabric", "warn", f"{where}; it is PUBLIC (group.allow_public_fabric = true): "
                     "the engines exchange unauthenticated pickles over it",
                     "use a private network (a VLAN, WireGuard, Tailscale) and turn allow_public_fabric off")
    refusal = unsupported(engine_version) if engine_version else None
    if refusal:
        return Check("group fabric", "warn", f"{where}; but {refusal}")
    return Check("group fabric", "ok", where)


def check_redis(shown_url: str, enabled: str, error: str | None) -> Check:
    if not shown_url:
        return Check("lmcache remote", "skip", "lmcache.redis_url not set")
    if enabled == "false":
        return Check("lmcache remote", "skip", f"LMCache disabled (lmcache.enabled = false); {shown_url} not used")
    if error:
        # ximd keeps serving without the remote tier (with a warning), so this is not a failure.
        return Check("lmcache remote", "warn", f"{shown_url} does not answer PING within {REDIS_TIMEOUT_S:g} s: "
                                               f"{error}; ximd will run without the shared tier",
                     "start the Redis/Valkey server, open the port, or clear lmcache.redis_url")
    return Check("lmcache remote", "ok", f"{shown_url} answers PING")


def check_engine_sandbox(abi: int, unavailable_reason: str) -> Check:
    """Landlock keeps the engine (which parses untrusted prompts) away from the node's secrets."""
    if abi >= 1:
        return Check("engine sandbox", "ok", f"Landlock ABI {abi}: the engine cannot read the identity, "
                                             "the configuration or the join-key credential")
    return Check("engine sandbox", "warn",
                 f"no Landlock ({unavailable_reason}): the engine runs unconfined and could read the "
                 "node's identity, its join key and credentials",
                 "run Linux 5.13 or later with landlock in the lsm= boot parameter "
                 "(cat /sys/kernel/security/lsm shows the active list)")


def check_model(source: modelsource.ModelSource) -> Check:
    """Which model the daemon would serve, from where, and whether its facts are at hand."""
    detail = source.describe()
    if source.found in (modelsource.MISSING, modelsource.INVALID):
        fix = ("set engine.model to a model directory or a Hugging Face id (org/name)"
               if source.choice.origin == "config" else
               "set engine.model on this node, or ask the router's operator for a Hugging Face id")
        return Check("model", "fail", detail, fix)
    if source.found == modelsource.UNREADABLE or source.note:
        return Check("model", "warn", detail, "run `ximd doctor` as root or as the xerotier user")
    return Check("model", "ok", detail)


def check_plan(make_plan) -> Check:
    """Whether the configuration can be planned on this hardware (`ximd plan` shows the details)."""
    try:
        p = make_plan()
    except autoconfig.PlanError as exc:
        return Check("plan", "fail", str(exc), f"change {exc.key} in the configuration (see `ximd plan`)")
    devices = f"GPU {','.join(map(str, p.visible_devices))}, " if p.visible_devices else ""
    summary = (f"{p.accelerator}: {devices}TP {p.tensor_parallel_size}, max_concurrent {p.max_concurrent}, "
               f"max_num_seqs {p.max_num_seqs}, max_model_len {p.max_model_len or 'model default'}")
    if p.warnings:
        return Check("plan", "warn", f"{summary}; " + "; ".join(p.warnings), "see `ximd plan`")
    return Check("plan", "ok", summary)


# ---------------------------------------------------------------- collecting and judging


def free_bytes_at(path: Path) -> tuple[Path, int | None]:
    """Free bytes for an unprivileged writer on the file system that holds (or will hold) path."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return probe, None
    return probe, st.f_bavail * st.f_frsize


def collect(cfg, hw: Hardware | None = None) -> list[Check]:
    """Every check, in the order an operator fixes things."""
    from ximd.config import mask_secret
    from ximd.engine import sandbox  # stdlib-only: asks the kernel what the engine will get
    from ximd.fabric import host_interfaces

    hw = hw or hardware.detect()
    source = modelsource.locate_for(cfg)
    facts, note = modelsource.load_facts(source)
    params = _params(facts)
    cache = cfg.model_cache_path
    _, free = free_bytes_at(cache)
    uid = service_uid()
    redis_url = cfg.lmcache.redis_url
    redis_error = None
    if redis_url and cfg.lmcache.enabled != "false":
        from ximd.kvcache import probe_remote  # the probe the engine's LMCache set-up uses
        redis_error = probe_remote(redis_url, REDIS_TIMEOUT_S)
    return [
        check_gpus(hw),
        check_driver(hw.gpus),
        check_vram(hw.gpus),
        check_gpu_devices(hw),
        check_ram(hw.ram_bytes, bool(hw.gpus)),
        check_disk(cache, free, cfg.model_cache.max_size_gb, tree_size(cache)),
        check_model(source),
        check_shm(hw.shm_bytes, params),
        check_sysctls(tuning.check_socket_buffers(cfg.tuning.socket_buffer_bytes)),
        check_directory("state", cfg.state_dir, DirState.of(cfg.state_dir), uid, private=True),
        check_directory("cache", cfg.cache_dir, DirState.of(cfg.cache_dir), uid, private=False),
        check_engine(engine := probe_engine(cfg.engine.python), cfg.engine.python),
        check_engine_sandbox(sandbox.landlock_abi(), sandbox.unavailable_reason()),
        check_redis(mask_secret(redis_url) if redis_url else "", cfg.lmcache.enabled, redis_error),
        check_group_fabric(cfg.group, host_interfaces(), engine.version),
        check_plan(lambda: autoconfig.plan_from_config(cfg, hw, facts, note)),
    ]


def _params(facts: autoconfig.ModelFacts | None) -> int | None:
    if facts is None:
        return None
    if facts.params is not None:
        return facts.params
    return facts.weights_bytes // facts.dtype_bytes if facts.weights_bytes else None


def failed(checks: list[Check]) -> bool:
    return any(c.status == "fail" for c in checks)


def summary(checks: list[Check]) -> dict[str, int]:
    return {s: sum(c.status == s for c in checks) for s in STATUSES}


