"""Hub-layout models written straight into a ximd model cache, with real checksums.

The layout the hub client leaves (blobs named by their etag, snapshot files as
links to them, refs/main), and optionally the completion marker ximd writes
last, so tests can build complete, partial and corrupted caches without a hub.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ximd.models.cache import ModelCache
from ximd.models.manifest import Manifest, RepoFile

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def repo_file(path: str, data: bytes) -> RepoFile:
    lfs = path.endswith(LFS_SUFFIXES)
    return RepoFile(path, len(data), git_blob_id(data), hashlib.sha256(data).hexdigest() if lfs else None)


def manifest_of(hf_id: str, files: dict[str, bytes], revision: str = "a" * 40) -> Manifest:
    return Manifest(hf_id, revision, tuple(repo_file(path, data) for path, data in sorted(files.items())))


def tiny_files(weights_bytes: int = 1000) -> dict[str, bytes]:
    return {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}",
            "model.safetensors": b"\1" * weights_bytes}


def write_hub_model(cache: ModelCache, hf_id: str, files: dict[str, bytes], *, revision: str = "a" * 40,
                    complete: bool = True, last_used: float | None = None) -> tuple[Manifest, Path]:
    """The model as the hub client leaves it; marked complete by ximd when ``complete``."""
    manifest = manifest_of(hf_id, files, revision)
    entry = cache.entry_path(hf_id)
    blobs, snapshot = entry / "blobs", cache.snapshot_path(hf_id, revision)
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for item in manifest.files:
        (blobs / item.etag).write_bytes(files[item.path])
        link = snapshot / item.path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blobs / item.etag, link.parent))
    if complete:
        cache.mark_complete(manifest)
    if last_used is not None:
        cache.touch(hf_id)
        os.utime(entry / ".ximd-last-used", (last_used, last_used))
    return manifest, snapshot
