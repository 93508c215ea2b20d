"""The model cache on disk: where models live, which are complete, who holds them, and
how room is made.

Laid out exactly as the Hugging Face hub client lays out ``HF_HOME``
(``<root>/hub/models--org--name/{blobs,snapshots,refs}``), so the client downloads
into it, resumes its own ``.incomplete`` files, and the engine finds a model
offline. Beside the client's files ximd keeps, per model:

- ``.ximd/complete-<revision>.json``: the revision's manifest, written last and
  atomically once every file was checked against the hub's checksums. Only a
  snapshot with this marker is ever served; anything else is a download to resume.
- ``.ximd-last-used``: its mtime is when the model was last served (atime is
  unreliable under relatime/noatime); the least recently used go first.

Locks (``<root>/locks/<name>.lock``, flock) keep the daemon and ``ximd model``
out of each other's way: a download or a removal holds it exclusively, the
daemon holds it shared while it serves the model, so an eviction or an
``rm`` skips a model in use, in whichever process that is.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from xim_proto.files import write_atomically
from ximd.models.manifest import Manifest, ManifestError, sizes_match
from ximd.units import GB, gb_text

log = logging.getLogger("ximd.models")

LAST_USED_MARKER = ".ximd-last-used"
XIMD_DIR = ".ximd"
# Where the downloader keeps a file's bytes until it is whole (ximd.models.hub).
PARTIAL_SUFFIX = ".ximd-partial"
# Left free on the disk beyond the model itself: the engine's compile caches and the
# logs live on the same partition more often than not.
DISK_HEADROOM_BYTES = 1 * GB


class ModelBusy(Exception):
    """Another process holds the model (serving it, downloading it, removing it)."""


@dataclass(frozen=True)
class CacheEntry:
    name: str            # "models--org--name"
    path: Path
    size_bytes: int
    last_used: float     # epoch seconds
    revision: str | None = None   # the complete revision, None while incomplete

    @property
    def hf_id(self) -> str:
        return hf_id_of(self.name)

    @property
    def complete(self) -> bool:
        return self.revision is not None


def cache_dir_name(hf_id: str) -> str:
    """The hub client's directory name for a model repo."""
    return "models--" + hf_id.replace("/", "--")


def hf_id_of(dir_name: str) -> str:
    return dir_name.removeprefix("models--").replace("--", "/")


# ---------------------------------------------------------------- pure decisions


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


@dataclass(frozen=True)
class RoomPlan:
    evict: tuple[CacheEntry, ...]
    problem: str | None = None     # why the model cannot fit; None when it can


def plan_room(entries: Iterable[CacheEntry], hf_id: str, model_bytes: int, present_bytes: int,
              max_bytes: int, free_bytes: int, in_use: Iterable[str] = ()) -> RoomPlan:
    """What to evict so that ``hf_id`` (``model_bytes`` in all, ``present_bytes`` of it already
    here) fits under the cap and on the disk; or why it cannot.

    Decided before a byte is fetched: a download bound to fail half-way is worse than none.
    """
    others = [e for e in entries if e.name != cache_dir_name(hf_id)]
    if model_bytes > max_bytes:
        return RoomPlan((), f"{hf_id} needs {gb_text(model_bytes)}, more than the model cache's cap of "
                            f"{gb_text(max_bytes)}: raise model_cache.max_size_gb")
    evict = plan_eviction(others, max_bytes - model_bytes, in_use)
    left_over = sum(e.size_bytes for e in others) - sum(e.size_bytes for e in evict)
    if left_over + model_bytes > max_bytes:
        held = ", ".join(sorted({e.hf_id for e in others} - {e.hf_id for e in evict}))
        return RoomPlan((), f"{hf_id} needs {gb_text(model_bytes)}; the model cache's cap is {gb_text(max_bytes)} "
                            f"and {gb_text(left_over)} of it is held by models in use ({held})")
    still_needed = model_bytes - present_bytes
    freed = sum(e.size_bytes for e in evict)
    if still_needed + DISK_HEADROOM_BYTES > free_bytes + freed:
        return RoomPlan((), f"{hf_id} needs {gb_text(still_needed)} more on disk (and {gb_text(DISK_HEADROOM_BYTES)} "
                            f"to spare), but only {gb_text(free_bytes + freed)} is free"
                            f"{' after evicting unused models' if evict else ''}: free space there or move "
                            "model_cache.path to a larger disk")
    return RoomPlan(tuple(evict))


# ---------------------------------------------------------------- the cache


class ModelCache:
    """``root`` is HF_HOME for the engine and the downloader; models live under ``root/hub``.

    ``owner`` (uid, gid): who what ximd creates here must belong to, when root
    writes into the service account's cache (`ximd model import`).
    """

    def __init__(self, root: Path, max_bytes: int, owner: tuple[int, int] | None = None):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.owner = owner

    def give(self, path: Path) -> Path:
        """Hand ``path`` (created by us) to the cache's owner; never follows a link."""
        if self.owner is not None:
            os.chown(path, *self.owner, follow_symlinks=False)
        return path

    def make_dir(self, path: Path) -> Path:
        """``path`` and its missing parents below the root, owned like the cache."""
        missing = []
        probe = Path(path)
        while not probe.exists() and probe != probe.parent:
            missing.append(probe)
            probe = probe.parent
        for directory in reversed(missing):
            directory.mkdir(mode=0o755, exist_ok=True)
            self.give(directory)
        return path

    @classmethod
    def from_config(cls, cfg) -> ModelCache:
        return cls(Path(cfg.model_cache_path), int(cfg.model_cache.max_size_gb * GB))

    @property
    def hub(self) -> Path:
        return self.root / "hub"

    def entry_path(self, hf_id: str) -> Path:
        return self.hub / cache_dir_name(hf_id)

    def snapshot_path(self, hf_id: str, revision: str) -> Path:
        return self.entry_path(hf_id) / "snapshots" / revision

    # ------------------------------------------------------------ completeness

    def complete_manifest(self, hf_id: str) -> Manifest | None:
        """The newest revision recorded complete whose files are all still there."""
        markers = self.entry_path(hf_id) / XIMD_DIR
        try:
            found = sorted(markers.glob("complete-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError:
            return None
        for marker in found:
            try:
                manifest = Manifest.from_json(json.loads(marker.read_text()))
            except (OSError, ValueError, ManifestError):
                continue
            if manifest.repo == hf_id and sizes_match(self.snapshot_path(hf_id, manifest.revision), manifest.files):
                return manifest
        return None

    def snapshot(self, hf_id: str) -> Path | None:
        """The directory of a complete snapshot of ``hf_id``, or None (absent, partial, unchecked)."""
        manifest = self.complete_manifest(hf_id)
        return self.snapshot_path(hf_id, manifest.revision) if manifest else None

    def mark_complete(self, manifest: Manifest) -> Path:
        """Record ``manifest`` as complete (the last step of a download or an import)."""
        entry = self.entry_path(manifest.repo)
        self.make_dir(entry / XIMD_DIR)
        self.make_dir(entry / "refs")
        # refs/main as the hub client writes it, so `hf` tools see the same revision.
        write_atomically(entry / "refs" / "main", manifest.revision, mode=0o644, owner=self.owner)
        return write_atomically(entry / XIMD_DIR / f"complete-{manifest.revision}.json",
                                json.dumps(manifest.to_json(), indent=1), mode=0o644, owner=self.owner)

    def present_bytes(self, manifest: Manifest) -> int:
        """Bytes of ``manifest`` already on disk: finished blobs and the downloader's partial files.

        What a progress line counts, read from the directory so that it needs
        nothing from the downloader and survives its restarts.
        """
        blobs = self.entry_path(manifest.repo) / "blobs"
        total = 0
        for item in manifest.files:
            for name in (item.etag, item.etag + PARTIAL_SUFFIX):
                try:
                    total += min(os.stat(blobs / name).st_size, item.size)
                    break
                except OSError:
                    continue
        return total

    # ------------------------------------------------------------ use and listing

    def touch(self, hf_id: str) -> None:
        marker = self.entry_path(hf_id) / LAST_USED_MARKER
        marker.touch()
        self.give(marker)
        now = time.time()
        os.utime(marker, (now, now))

    def entries(self) -> list[CacheEntry]:
        if not self.hub.is_dir():
            return []
        found = []
        for path in sorted(self.hub.iterdir()):
            if path.is_dir() and path.name.startswith("models--"):
                manifest = self.complete_manifest(hf_id_of(path.name))
                found.append(CacheEntry(path.name, path, tree_size(path), last_used(path),
                                        manifest.revision if manifest else None))
        return found

    def remove(self, entry: CacheEntry) -> None:
        """Delete a model, unless some process holds it (ModelBusy)."""
        with self.lock(entry.hf_id, wait=False):
            shutil.rmtree(entry.path)

    def enforce_cap(self, in_use: Iterable[str]) -> list[CacheEntry]:
        """Evict until the cache fits its cap; return what went. Never touches ``in_use`` or a held model."""
        in_use = list(in_use)
        entries = self.entries()
        evicted = []
        for entry in plan_eviction(entries, self.max_bytes, in_use):
            if self.evict(entry, f"to stay under {gb_text(self.max_bytes)}"):
                evicted.append(entry)
        remaining = sum(e.size_bytes for e in entries) - sum(e.size_bytes for e in evicted)
        if remaining > self.max_bytes:
            log.warning("Model cache %s holds %s, over its %s cap, but the rest is in use (%s)",
                        self.root, gb_text(remaining), gb_text(self.max_bytes), ", ".join(in_use))
        return evicted

    def evict(self, entry: CacheEntry, why: str) -> bool:
        try:
            self.remove(entry)
        except ModelBusy:
            log.info("Not evicting model %s: another process holds it", entry.hf_id)
            return False
        log.info("Evicted model %s from the cache (%s, last used %s) %s", entry.hf_id, gb_text(entry.size_bytes),
                 time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used)), why)
        return True

    # ------------------------------------------------------------ locks

    def lock_path(self, hf_id: str) -> Path:
        return self.root / "locks" / (cache_dir_name(hf_id) + ".lock")

    @contextlib.contextmanager
    def lock(self, hf_id: str, *, shared: bool = False, wait: bool = True) -> Iterator[None]:
        held = self.hold(hf_id, shared=shared, wait=wait)
        try:
            yield
        finally:
            os.close(held)

    def hold(self, hf_id: str, *, shared: bool = False, wait: bool = True) -> int:
        """Take the model's lock and return its descriptor (close it to let go).

        Raises ModelBusy when ``wait`` is False and another process holds it.
        """
        path = self.lock_path(hf_id)
        self.make_dir(path.parent)
        # Read-only is enough for flock, and opens a lock file someone else created.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        if self.owner is not None:
            os.fchown(fd, *self.owner)
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, mode)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ModelBusy(hf_id) from None
            raise
        return fd


def tree_size(path: Path) -> int:
    """Bytes in regular files under ``path``; the hub's snapshot symlinks count once (as blobs)."""
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


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem that holds ``path`` (or its nearest parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
