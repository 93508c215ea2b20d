"""Which model the engine serves, and the model cache it lives in.

The model comes from the config when it was set there (VLLM_MODEL), else from the
router's assignment, else the seed's default. A local path is used in place. A
Hugging Face id lives in the cache directory, laid out exactly as the Hugging Face
hub client lays out HF_HOME (`<cache>/hub/models--org--name/...`), so the engine
finds it with HF_HOME pointed there and runs offline once it is present.

The cache has a size cap: least-recently-used models that are not in use are
evicted, never the active one. "Used" is recorded in a marker file's mtime because
atime is unreliable (relatime, noatime).

Downloads run in the engine environment (`huggingface_hub.snapshot_download`, then
`verify_repo_checksums` against the hub), never in ximd itself; a failed or corrupt
download leaves nothing in the cache.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from xim_proto.modelid import is_model_id
from ximd.config import SEED_DEFAULT_MODEL
from ximd.hubenv import DOWNLOAD_ENV_NAMES, passed_through
from ximd.units import GB

log = logging.getLogger("ximd.models")

LAST_USED_MARKER = ".ximd-last-used"
# Runs in the engine environment: fetch, then check every file against the hub's
# checksums (sha256 for LFS files, git-sha1 for the rest).
_DOWNLOAD = """
import sys
from huggingface_hub import HfApi, snapshot_download
path = snapshot_download(repo_id=sys.argv[1])
check = HfApi().verify_repo_checksums(sys.argv[1], cache_dir=sys.argv[2])
bad = [m["path"] for m in check.mismatches] + list(check.missing_paths)
if bad:
    sys.exit("files that do not match the hub's checksums: " + ", ".join(bad[:10]))
print(path)
"""


class ModelError(Exception):
    """The model cannot be served as configured; the message says what to do."""


@dataclass(frozen=True)
class ModelChoice:
    ref: str      # an HF id or a local path, as given
    origin: str   # "config", "router" or "default"


@dataclass(frozen=True)
class ResolvedModel:
    ref: str                  # what was chosen
    origin: str
    model_arg: str            # what the engine's --model gets
    served_name: str          # the default name to serve it under
    local: bool
    env: dict[str, str] = field(default_factory=dict)   # HF_HOME, offline switches


@dataclass(frozen=True)
class CacheEntry:
    name: str          # "models--org--name"
    path: Path
    size_bytes: int
    last_used: float   # epoch seconds

    @property
    def hf_id(self) -> str:
        return self.name.removeprefix("models--").replace("--", "/")


# ---------------------------------------------------------------- pure decisions


def choose_model(configured: str, configured_origin: str, assigned: str | None,
                 default: str = SEED_DEFAULT_MODEL) -> ModelChoice:
    """Config (when set there, not defaulted) > router assignment > seed default."""
    if configured and configured_origin != "default":
        return ModelChoice(configured, "config")
    if assigned:
        return ModelChoice(assigned, "router")
    return ModelChoice(configured or default, "default")


def is_local_path(ref: str) -> bool:
    """Paths are absolute or start with . or ~; anything else is a Hugging Face id."""
    return ref.startswith(("/", ".", "~"))


def cache_dir_name(hf_id: str) -> str:
    """The hub client's directory name for a model repo."""
    return "models--" + hf_id.replace("/", "--")


def plan_eviction(entries: Iterable[CacheEntry], max_bytes: int,
                  in_use: Iterable[str]) -> list[CacheEntry]:
    """Least recently used first, skipping models in use, until the total fits."""
    entries = list(entries)
    keep = {cache_dir_name(ref) for ref in in_use}
    total = sum(e.size_bytes for e in entries)
    evict = []
    for entry in sorted(entries, key=lambda e: (e.last_used, e.name)):
        if total <= max_bytes:
            break
        if entry.name in keep:
            continue
        evict.append(entry)
        total -= entry.size_bytes
    return evict


def hub_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What a download inherits from ximd's environment (ximd.hubenv)."""
    return passed_through(environ, DOWNLOAD_ENV_NAMES)


def offline_requested(environ: Mapping[str, str]) -> bool:
    return environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------- the cache


class ModelCache:
    """`root` is HF_HOME for the engine; models live under `root/hub`."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes

    @classmethod
    def from_config(cls, cfg) -> ModelCache:
        return cls(Path(cfg.model_cache_path), int(cfg.model_cache.max_size_gb * GB))

    @property
    def hub(self) -> Path:
        return self.root / "hub"

    def entry_path(self, hf_id: str) -> Path:
        return self.hub / cache_dir_name(hf_id)

    def snapshot(self, hf_id: str) -> Path | None:
        """A complete snapshot of the model (one with config.json): refs/main's, else the newest."""
        entry = self.entry_path(hf_id)
        snapshots = entry / "snapshots"
        if not snapshots.is_dir():
            return None
        main = entry / "refs" / "main"
        if main.is_file():
            pinned = snapshots / main.read_text().strip()
            if (pinned / "config.json").exists():
                return pinned
        found = [s for s in snapshots.iterdir() if (s / "config.json").exists()]
        return max(found, key=lambda s: s.stat().st_mtime) if found else None

    def touch(self, hf_id: str) -> None:
        marker = self.entry_path(hf_id) / LAST_USED_MARKER
        marker.touch()
        now = time.time()
        os.utime(marker, (now, now))

    def entries(self) -> list[CacheEntry]:
        if not self.hub.is_dir():
            return []
        return [CacheEntry(p.name, p, tree_size(p), last_used(p))
                for p in sorted(self.hub.iterdir()) if p.is_dir() and p.name.startswith("models--")]

    def enforce_cap(self, in_use: Iterable[str]) -> list[CacheEntry]:
        """Evict until the cache fits its cap; return what went. Never touches `in_use`."""
        in_use = list(in_use)
        entries = self.entries()
        evicted = plan_eviction(entries, self.max_bytes, in_use)
        for entry in evicted:
            log.info("Evicting model %s from the cache (%.2f GB, last used %s) to stay under %.2f GB",
                     entry.hf_id, entry.size_bytes / GB, time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used)),
                     self.max_bytes / GB)
            shutil.rmtree(entry.path)
        remaining = sum(e.size_bytes for e in entries) - sum(e.size_bytes for e in evicted)
        if remaining > self.max_bytes:
            log.warning("Model cache %s holds %.2f GB, over its %.2f GB cap, but the rest is in use (%s)",
                        self.root, remaining / GB, self.max_bytes / GB, ", ".join(in_use))
        return evicted

    def download(self, hf_id: str, engine_python: str, environ: Mapping[str, str],
                 timeout_s: float) -> None:
        """Fetch `hf_id` into the cache with the engine environment's hub client."""
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
               **hub_env(environ), "HF_HOME": str(self.root), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1"}
        self.root.mkdir(parents=True, exist_ok=True)
        log.info("Downloading model %s into %s", hf_id, self.root)
        try:
            done = subprocess.run([engine_python, "-c", _DOWNLOAD, hf_id, str(self.hub)], env=env, text=True,
                                  capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise ModelError(f"model {hf_id} is not in the model cache {self.root}, and the engine "
                             f"interpreter {engine_python} that would download it does not exist") from None
        except subprocess.TimeoutExpired:
            shutil.rmtree(self.entry_path(hf_id), ignore_errors=True)
            raise ModelError(f"downloading model {hf_id} took more than {timeout_s:g} s") from None
        if done.returncode != 0:
            shutil.rmtree(self.entry_path(hf_id), ignore_errors=True)   # nothing half-made stays
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            why = lines[-1] if lines else f"exit status {done.returncode}"
            raise ModelError(f"model {hf_id} is not in the model cache {self.root}, and downloading it "
                             f"from the Hugging Face hub failed: {why}")


def tree_size(path: Path) -> int:
    """Bytes in regular files under `path`; the hub's snapshot symlinks count once (as blobs)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(directory, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def last_used(entry: Path) -> float:
    marker = entry / LAST_USED_MARKER
    return (marker if marker.exists() else entry).stat().st_mtime


# ---------------------------------------------------------------- resolving


def resolve(choice: ModelChoice, cache: ModelCache, *, engine_python: str,
            environ: Mapping[str, str] | None = None, download_timeout_s: float = 6 * 3600) -> ResolvedModel:
    """Make the chosen model servable: check a path, or find (or fetch) an HF id in the cache.

    Blocking (a download can take hours): the agent runs it in a thread. Raises
    ModelError with a message meant for the operator.
    """
    environ = os.environ if environ is None else environ
    ref = choice.ref.strip()
    base_env = {"HF_HOME": str(cache.root)}
    if choice.origin == "router" and not is_model_id(ref):
        # Only the operator of this host may point the engine at a path; from
        # the router a model is a hub id, never a path or something flag-shaped.
        raise ModelError(f"the router assigned the model {ref!r}, which is not a Hugging Face id "
                         "(org/name); refusing it. Set engine.model on this node to serve a local path")
    if is_local_path(ref):
        path = Path(ref).expanduser()
        check_local_model(path)
        return ResolvedModel(ref, choice.origin, str(path), ref, True,
                             {**base_env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if not is_model_id(ref):
        raise ModelError(f"model {ref!r} ({choice.origin}) is neither a Hugging Face id (org/name) "
                         "nor a path (absolute, or starting with ./)")
    snapshot = cache.snapshot(ref)
    if snapshot is None:
        if offline_requested(environ):
            raise ModelError(f"model {ref} is not in the model cache {cache.root} and downloads are off "
                             f"(HF_HUB_OFFLINE=1): fetch it there first (HF_HOME={cache.root} "
                             f"hf download {ref}) or allow downloads")
        cache.enforce_cap(in_use=[ref])
        cache.download(ref, engine_python, environ, download_timeout_s)
        snapshot = cache.snapshot(ref)
        if snapshot is None:
            raise ModelError(f"model {ref} was downloaded but has no config.json in {cache.entry_path(ref)}")
    cache.touch(ref)
    cache.enforce_cap(in_use=[ref])
    # The snapshot directory itself, not the id: the engine then needs no hub lookup
    # at all (no refs to resolve, nothing to fetch), and serves it under the id.
    return ResolvedModel(ref, choice.origin, str(snapshot), ref, False,
                         {**base_env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


def check_local_model(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model path {path} is a file but not a .gguf model; "
                             "give a model directory (with config.json) or a .gguf file")
        return
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {path} has no config.json: not a Hugging Face model directory")
