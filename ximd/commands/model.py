"""`ximd model pull|list|rm|import`: the model cache by hand, like `ollama pull/list/rm`.

They act on the daemon's cache with the daemon's rules: the same completeness
marker, the same locks (a model the daemon serves cannot be removed, two
downloads of one model never run at once), and run as root they do the work
as the cache's owner so that every file stays the daemon's.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from typing import IO, Any

from xim_proto.cliout import from_rfc3339, local_text, rfc3339
from xim_proto.privileges import become, owner_to_become
from ximd import preparation
from ximd.config import Config
from ximd.exitcodes import EX_OK, EX_REFUSED, EX_UNAVAILABLE
from ximd.models import ModelBusy, ModelCache, ModelChoice, ModelError, hub_id_of
from ximd.models.acquire import ModelWait, acquire
from ximd.models.cache import CacheEntry
from ximd.models.importing import build_manifest, find_source, install
from ximd.models.progress import LogPacer, Progress, log_line, progress_line
from ximd.modelsource import assigned_model
from ximd.units import gb_text, size_text


def _fail(text: str, status: int = EX_REFUSED) -> int:
    print(f"ximd model: {text}", file=sys.stderr)
    return status


class ConsoleReporter:
    """A redrawn line on a terminal; paced plain lines (every 10 % or 30 s) otherwise."""

    def __init__(self, stream: IO[str], tty: bool | None = None):
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.pacer = LogPacer()
        self._open_line = False

    def step(self, hf_id: str, line: str) -> None:
        self._end_line()
        print(line, file=self.stream, flush=True)

    def progress(self, p: Progress) -> None:
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns
            filled = int(p.fraction * 20)
            text = f"[{'#' * filled}{'.' * (20 - filled)}] {progress_line(p)}"
            self.stream.write("\r" + text[:width - 1].ljust(width - 1))
            self.stream.flush()
            self._open_line = True
        elif self.pacer.due(p.fraction, time.monotonic()):
            print(log_line(p), file=self.stream, flush=True)

    def _end_line(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False

    def close(self) -> None:
        self._end_line()


def _cache(cfg: Config) -> ModelCache:
    return ModelCache.from_config(cfg)


def _as_cache_owner(cfg: Config) -> None:
    owner = owner_to_become([cfg.model_cache_path, cfg.state_dir])
    if owner is not None:
        become(owner)


# ---------------------------------------------------------------- pull


def pull(cfg: Config, model: str | None) -> int:
    """Fetch MODEL (default: the one the daemon would serve) completely into the cache."""
    if model is not None:
        choice = ModelChoice(model, "config")
    else:
        choice = preparation.choose_model(cfg, assigned_model(cfg.state_dir)[0])
    try:
        hf_id = hub_id_of(choice)
        source = preparation.hub_source(cfg)       # reads the token while we may still be root
    except ModelError as exc:
        return _fail(str(exc))
    if hf_id is None:
        return _fail(f"{choice.ref} is a local path: there is nothing to pull")
    _as_cache_owner(cfg)
    reporter = ConsoleReporter(sys.stdout)
    cache = _cache(cfg)
    try:
        snapshot, hold = asyncio.run(acquire(hf_id, cache, source, reporter))
    except ModelWait as wait:
        reporter.close()
        return _fail(wait.line, EX_UNAVAILABLE)
    except ModelError as exc:
        reporter.close()
        return _fail(str(exc))
    os.close(hold)
    reporter.close()
    print(f"{hf_id} is complete in {snapshot}")
    return EX_OK


# ---------------------------------------------------------------- list


def in_use(cache: ModelCache, entry: CacheEntry) -> bool:
    """Whether a process (the daemon serving it, a download) holds the model now."""
    try:
        os.close(cache.hold(entry.hf_id, shared=False, wait=False))
    except ModelBusy:
        return True
    except OSError:
        return False
    return False


def describe(cache: ModelCache, entry: CacheEntry) -> dict[str, Any]:
    return {"model": entry.hf_id, "size_bytes": entry.size_bytes, "complete": entry.complete,
            "revision": entry.revision, "in_use": in_use(cache, entry),
            "last_used": rfc3339(entry.last_used)}


def last_used_text(moment: str | None) -> str:
    return local_text(from_rfc3339(moment)) if moment else "-"


def render_list(rows: list[dict[str, Any]], cache: ModelCache) -> str:
    if not rows:
        return f"no models in {cache.root}"
    width = max(len("MODEL"), *(len(r["model"]) for r in rows))
    lines = [f"{'MODEL':<{width}}  {'SIZE':>9}  {'STATE':<10}  {'IN USE':<6}  LAST USED"]
    for r in rows:
        state = "complete" if r["complete"] else "partial"
        lines.append(f"{r['model']:<{width}}  {size_text(r['size_bytes']):>9}  {state:<10}  "
                     f"{'yes' if r['in_use'] else 'no':<6}  {last_used_text(r['last_used'])}")
    total = sum(r["size_bytes"] for r in rows)
    lines.append(f"{len(rows)} model(s), {size_text(total)} of the {gb_text(cache.max_bytes)} cap, in {cache.root}")
    return "\n".join(lines)


def list_models(cfg: Config, fmt: str = "text") -> int:
    _as_cache_owner(cfg)
    cache = _cache(cfg)
    rows = [describe(cache, e) for e in cache.entries()]
    print(json.dumps(rows, indent=2) if fmt == "json" else render_list(rows, cache))
    return EX_OK


# ---------------------------------------------------------------- rm


def remove(cfg: Config, model: str) -> int:
    _as_cache_owner(cfg)
    cache = _cache(cfg)
    entry = next((e for e in cache.entries() if e.hf_id == model), None)
    if entry is None:
        return _fail(f"{model} is not in the model cache {cache.root} (see `ximd model list`)")
    try:
        cache.remove(entry)
    except ModelBusy:
        return _fail(f"{model} is in use (the running ximd serves it, or a download holds it); "
                     "serve another model first")
    print(f"removed {model} ({size_text(entry.size_bytes)})")
    return EX_OK


# ---------------------------------------------------------------- import


def import_model(cfg: Config, what: str, as_id: str | None) -> int:
    """Check a copied model and install it in the cache (root reads the source, the cache's owner owns the copy)."""
    cache = _cache(cfg)
    cache.owner = owner_to_become([cfg.model_cache_path, cfg.state_dir])
    reporter = ConsoleReporter(sys.stdout)
    try:
        source = find_source(what, as_id, os.environ)
        print(f"importing {source.hf_id} from the {source.shape} {source.directory}")
        total = sum((source.directory / f).stat().st_size for f in source.files)
        checked = [0]

        def count(n: int) -> None:
            checked[0] += n
            reporter.progress(Progress(source.hf_id, "verifying", checked[0], total, None))

        manifest = build_manifest(source, on_bytes=count)
        reporter.close()
        with cache.lock(source.hf_id, wait=False):
            snapshot = install(cache, source, manifest)
    except ModelBusy:
        reporter.close()
        return _fail(f"{what}: another process holds that model (serving or downloading it)")
    except (ModelError, OSError) as exc:
        reporter.close()
        return _fail(str(exc))
    print(f"{source.hf_id} is complete in {snapshot} (revision {manifest.revision}, {len(manifest.files)} files, "
          f"{size_text(manifest.total_bytes)}, checked)")
    return EX_OK
