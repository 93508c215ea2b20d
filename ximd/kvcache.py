"""LMCache KV offload: whether it is on, how big its tiers are, and its config file.

`prepare()` is the one place that touches the world (a PING to the remote tier, the
engine interpreter asked to load the file with LMCache's own loader, the file
written); every decision around it is a pure function tested on data.

Degradation is graceful and always said out loud: an unreachable remote tier is
dropped with a warning and the local tiers stay; LMCache missing from the engine
environment, or rejecting the file, turns it off with a warning; `auto` on a CPU
engine turns it off with the reason. The engine itself is retried once without
LMCache when it dies during start-up with it (`retry_without_lmcache`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import redis
import yaml

from xim_proto.addresses import is_loopback_host
from xim_proto.files import write_atomically
from ximd.config import AUTO, mask_secret
from ximd.units import GIB

log = logging.getLogger("ximd.kvcache")

CONFIG_FILENAME = "lmcache_config.yaml"
CONFIG_ENV = "LMCACHE_CONFIG_FILE"
KV_TRANSFER_CONFIG = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
DEFAULT_SHARE = 0.10  # of RAM for the CPU tier, of the partition for the disk tier
REMOTE_SERDE = "naive"
# Valkey speaks RESP like Redis; LMCache's valkey:// connector needs valkey-glide,
# which no engine environment ships, so a Valkey server is addressed as Redis.
URL_SCHEMES = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss"}
PLAINTEXT_SCHEMES = ("redis", "valkey")
_warned_plaintext: set[str] = set()      # remote tiers already warned about, once per process

# Run by the engine's interpreter: the file must load with LMCache's own loader and
# every key we wrote must be one LMCache knows (its loader only warns on unknown keys).
_LOADER_CHECK = """
import sys
from lmcache.v1.config import LMCacheEngineConfig, _CONFIG_DEFINITIONS
import yaml   # after lmcache (which needs it): an interpreter without either is told "no lmcache"
written = yaml.safe_load(open(sys.argv[1]))
unknown = sorted(set(written) - set(_CONFIG_DEFINITIONS))
if unknown:
    sys.exit("keys LMCache does not know: " + ", ".join(unknown))
config = LMCacheEngineConfig.from_file(sys.argv[1])
config.validate()
print("ok", config.chunk_size, config.max_local_cpu_size, config.local_disk, config.remote_url)
"""
_NOT_INSTALLED_MARK = "ModuleNotFoundError: No module named 'lmcache'"


@dataclass(frozen=True)
class KVCacheSetup:
    """What the engine launch needs to know about LMCache."""

    enabled: bool
    reasons: tuple[str, ...] = ()
    config_path: Path | None = None
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def kv_transfer_config(self) -> str | None:
        return json.dumps(KV_TRANSFER_CONFIG, separators=(",", ":")) if self.enabled else None

    @property
    def env(self) -> dict[str, str]:
        return {CONFIG_ENV: str(self.config_path)} if self.enabled else {}


# ---------------------------------------------------------------- pure decisions


def decide(setting: str, accelerator: str) -> tuple[bool, str]:
    """Whether LMCache should be on for this engine, and why, before any probe."""
    if setting == "false":
        return False, "LMCache off: lmcache.enabled = false"
    if accelerator == "cpu":
        if setting == AUTO:
            return False, ("LMCache off on a CPU engine (lmcache.enabled = auto): LMCache has no "
                           "CPU connector, never hits, and adds a 3 s lookup timeout to every request; "
                           "vLLM's own prefix cache still works")
        return True, ("LMCache forced on a CPU engine (lmcache.enabled = true): expect no cache hits "
                      "and a 3 s lookup timeout per request")
    return True, f"LMCache on: {accelerator} engine (lmcache.enabled = {setting})"


def remote_url_for_lmcache(url: str) -> str:
    """The URL as LMCache and redis-py take it: valkey:// becomes redis://."""
    parts = urlsplit(url)
    scheme = URL_SCHEMES.get(parts.scheme)
    if scheme is None or not parts.hostname:
        raise ValueError(f"not a redis://, rediss://, valkey:// or valkeys:// URL: {mask_secret(url)}")
    return parts._replace(scheme=scheme).geturl()


def plaintext_remote_warning(url: str) -> str | None:
    """Why a remote tier URL is unsafe (no TLS to another host), or None."""
    parts = urlsplit(url)
    if parts.scheme not in PLAINTEXT_SCHEMES or is_loopback_host(parts.hostname or ""):
        return None
    return (f"LMCache remote tier {mask_secret(url)} is plain {parts.scheme}:// to another host: "
            "its password and every cached KV block cross the network in clear, and anyone on the "
            f"path can change them; use {parts.scheme}s://")


def size_gb(setting: Any, total_bytes: int, ranks: int) -> float:
    """An explicit size wins; `auto` is 10% of `total_bytes`, split evenly across TP ranks.

    LMCache sizes its tiers per worker (one per TP rank), so the per-rank share keeps
    the node's total at the intended fraction. Rounded down to 0.01 GiB.
    """
    if setting != AUTO:
        return float(setting)
    return math.floor(total_bytes * DEFAULT_SHARE / max(ranks, 1) / GIB * 100) / 100


def lmcache_config(*, chunk_size: int, cpu_size: Any, disk_size: Any, disk_path: Path,
                   ram_bytes: int, disk_partition_bytes: int, tp_size: int,
                   remote_url: str | None = None) -> dict[str, Any]:
    """The content of lmcache_config.yaml (keys as LMCache 0.5 names them)."""
    cpu_gb = size_gb(cpu_size, ram_bytes, tp_size)
    disk_gb = size_gb(disk_size, disk_partition_bytes, tp_size)
    config: dict[str, Any] = {
        "chunk_size": chunk_size,
        "local_cpu": cpu_gb > 0,
        "max_local_cpu_size": cpu_gb,
    }
    if disk_gb > 0:
        config["local_disk"] = f"file://{Path(disk_path)}/"
        config["max_local_disk_size"] = disk_gb
    if remote_url:
        config["remote_url"] = remote_url_for_lmcache(remote_url)
        config["remote_serde"] = REMOTE_SERDE
    return config


def config_from(cfg, *, ram_bytes: int, disk_partition_bytes: int, tp_size: int,
                remote_url: str | None) -> dict[str, Any]:
    """`lmcache_config` with the sizes and paths of ximd's configuration (its lmcache section)."""
    return lmcache_config(chunk_size=cfg.lmcache.chunk_size, cpu_size=cfg.lmcache.cpu_size_gb,
                          disk_size=cfg.lmcache.disk_size_gb, disk_path=Path(cfg.lmcache_disk_path),
                          ram_bytes=ram_bytes, disk_partition_bytes=disk_partition_bytes,
                          tp_size=tp_size, remote_url=remote_url)


@dataclass(frozen=True)
class TierPlan:
    """What `ximd plan` shows of LMCache: the decision and the tiers' sizes, with no probe
    (the remote tier is not PINGed, no file is written, LMCache's own check is not run)."""

    enabled: bool
    reason: str
    tp_size: int = 1
    cpu_gb: float = 0.0                  # per TP rank
    disk_path: Path | None = None        # None: no disk tier
    disk_gb: float = 0.0                 # per TP rank
    remote_url: str = ""                 # masked; "" when there is no remote tier
    warnings: tuple[str, ...] = ()


def plan_tiers(cfg, accelerator: str, tp_size: int, *, ram_bytes: int,
               disk_partition_bytes: int) -> TierPlan:
    """LMCache on or off and why, and each tier as `prepare` would size it."""
    on, reason = decide(cfg.lmcache.enabled, accelerator)
    if not on:
        return TierPlan(False, reason)
    remote = cfg.lmcache.redis_url
    warnings = []
    if remote:
        try:
            remote_url_for_lmcache(remote)
        except ValueError as exc:   # LMCache could not use it: no remote tier
            warnings.append(f"LMCache remote tier dropped: {exc}")
            remote = ""
    config = config_from(cfg, ram_bytes=ram_bytes, disk_partition_bytes=disk_partition_bytes,
                         tp_size=tp_size, remote_url=remote or None)
    plaintext = plaintext_remote_warning(remote) if remote else None
    if plaintext:
        warnings.append(plaintext)
    disk = "local_disk" in config
    return TierPlan(True, reason, tp_size, config["max_local_cpu_size"],
                    Path(cfg.lmcache_disk_path) if disk else None, config.get("max_local_disk_size", 0.0),
                    mask_secret(remote) if remote else "", tuple(warnings))


def retry_without_lmcache(lmcache_on: bool, ever_healthy: bool, already_retried: bool) -> bool:
    """An engine that died during start-up with LMCache on gets one try without it."""
    return lmcache_on and not ever_healthy and not already_retried


# ---------------------------------------------------------------- I/O


def write_config(path: Path, config: Mapping[str, Any]) -> None:
    """Write the YAML atomically, readable by its owner only (it may carry a password)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("# Written by ximd; regenerated at every engine start.\n"
            + yaml.safe_dump(dict(config), default_flow_style=False, sort_keys=False))
    write_atomically(path, text, mode=0o600)


def probe_remote(url: str, timeout_s: float = 1.0) -> str | None:
    """PING the Redis/Valkey server; None when it answered, else why not."""
    try:
        client = redis.Redis.from_url(remote_url_for_lmcache(url), socket_connect_timeout=timeout_s,
                                      socket_timeout=timeout_s)
    except ValueError as exc:
        return str(exc)
    try:
        client.ping()
        return None
    except (redis.RedisError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


def partition_bytes(path: Path) -> int:
    """Size of the filesystem that holds `path` (or would, once created)."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).total


def check_with_lmcache(engine_python: str, config_path: Path, timeout_s: float = 120.0) -> str | None:
    """Load the file with LMCache's own loader in the engine environment.

    None when it loads; otherwise why not (LMCache not installed, a key it does not
    know, a value it rejects, a timeout).
    """
    try:
        done = subprocess.run([engine_python, "-c", _LOADER_CHECK, str(config_path)],
                              capture_output=True, text=True, timeout=timeout_s,
                              env=_check_env(), stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return f"engine interpreter {engine_python} not found"
    except subprocess.TimeoutExpired:
        return f"loading it with LMCache took more than {timeout_s:g} s"
    if done.returncode == 0:
        return None
    if _NOT_INSTALLED_MARK in done.stderr:
        return f"lmcache is not installed in the engine environment ({engine_python})"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {done.returncode}"


def _check_env() -> dict[str, str]:
    # No usage reports, no downloads, nothing of ximd's environment the check needs.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def prepare(cfg, plan, *, engine_python: str, ram_bytes: int | None = None,
            probe_timeout_s: float = 1.0, check_timeout_s: float = 120.0) -> KVCacheSetup:
    """Decide, probe, size, write and check; log every decision with its reason.

    `cfg` is ximd's Config (its `lmcache` section, `state_dir`, `lmcache_disk_path`);
    `plan` gives `accelerator` and `tensor_parallel_size`.
    """
    on, reason = decide(cfg.lmcache.enabled, plan.accelerator)
    if not on:
        log.info(reason)
        return KVCacheSetup(False, (reason,))
    reasons = [reason]
    if plan.accelerator == "cpu":
        log.warning(reason)
    remote_url = cfg.lmcache.redis_url or None
    if remote_url:
        warning = plaintext_remote_warning(remote_url)
        if warning and remote_url not in _warned_plaintext:
            _warned_plaintext.add(remote_url)
            log.warning(warning)
        problem = probe_remote(remote_url, probe_timeout_s)
        if problem:
            dropped = (f"LMCache remote tier {mask_secret(remote_url)} unreachable ({problem}): "
                       "continuing with the local tiers only")
            log.warning(dropped)
            reasons.append(dropped)
            remote_url = None
        else:
            reasons.append(f"LMCache remote tier {mask_secret(remote_url)} answered PING")
    disk_path = Path(cfg.lmcache_disk_path)
    config = config_from(
        cfg, ram_bytes=ram_bytes if ram_bytes is not None else psutil.virtual_memory().total,
        disk_partition_bytes=partition_bytes(disk_path), tp_size=plan.tensor_parallel_size,
        remote_url=remote_url)
    if "local_disk" in config:
        disk_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    config_path = Path(cfg.state_dir) / CONFIG_FILENAME
    write_config(config_path, config)
    problem = check_with_lmcache(engine_python, config_path, check_timeout_s)
    if problem:
        off = f"LMCache off: {problem}"
        log.warning(off)
        return KVCacheSetup(False, (*reasons, off))
    log.info("LMCache enabled", extra={"fields": {"XIM_LMCACHE": "enabled"}})
    log.info("Wrote LMCache configuration config_path=%s", config_path,
             extra={"fields": {"CONFIG_PATH": str(config_path)}})
    return KVCacheSetup(True, tuple(reasons), config_path, config)
