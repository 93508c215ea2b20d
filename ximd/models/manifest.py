"""What a complete model is: the hub's list of a revision's files with their sizes and
checksums, and the check of files on disk against it.

The hub names every file's content: an LFS file (weights) by its sha256, any other
file by its git blob id (sha1 of ``blob <size>\\0`` + content). The hub client keys
its cache's blobs on the same names, so a blob can also be checked against its own
file name with no hub at all (an air-gapped import).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK_BYTES = 4 * 1024 * 1024


class ManifestError(ValueError):
    """The hub's description of a revision is not something we can trust or use."""


class Stopped(Exception):
    """A check was asked to stop (the daemon is stopping)."""


@dataclass(frozen=True)
class RepoFile:
    path: str                 # relative, '/'-separated, as the hub names it
    size: int
    blob_id: str              # git blob sha1 (the hub's oid)
    sha256: str | None = None  # set for LFS files

    @property
    def etag(self) -> str:
        """The name the hub client gives this file's blob in the cache."""
        return self.sha256 or self.blob_id

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "blob_id": self.blob_id, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    repo: str
    revision: str             # the commit sha
    files: tuple[RepoFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {"repo": self.repo, "revision": self.revision, "files": [f.to_json() for f in self.files]}

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Parse (and check) a manifest from the downloader or a completion marker."""
        if not isinstance(data, dict):
            raise ManifestError("not an object")
        repo, revision, files = data.get("repo"), data.get("revision"), data.get("files")
        if not isinstance(repo, str) or not isinstance(revision, str) or not _is_hex(revision):
            raise ManifestError("no repo or revision")
        if not isinstance(files, list) or not files:
            raise ManifestError(f"revision {revision} of {repo} lists no files")
        return cls(repo, revision, tuple(_repo_file(item) for item in files))


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdef" for c in text.lower())


def safe_relative_path(path: Any) -> str:
    """A file name from the hub, refused unless it stays inside the snapshot."""
    if not isinstance(path, str) or not path or "\\" in path or "\0" in path:
        raise ManifestError(f"file name {path!r} is not a relative path")
    if path.startswith("/") or any(part in ("..", ".", "") for part in path.split("/")):
        raise ManifestError(f"file name {path!r} leaves the model directory")
    return path


def _repo_file(item: Any) -> RepoFile:
    if not isinstance(item, dict):
        raise ManifestError("a file entry is not an object")
    path = safe_relative_path(item.get("path"))
    size, blob_id, sha256 = item.get("size"), item.get("blob_id"), item.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{path}: no size")
    if not isinstance(blob_id, str) or len(blob_id) != 40 or not _is_hex(blob_id):
        raise ManifestError(f"{path}: no git blob id")
    if sha256 is not None and (not isinstance(sha256, str) or len(sha256) != 64 or not _is_hex(sha256)):
        raise ManifestError(f"{path}: malformed sha256")
    return RepoFile(path, size, blob_id.lower(), sha256.lower() if sha256 else None)


# ---------------------------------------------------------------- checking files


def _hasher(expected: str, size: int):
    """sha256 for a 64-digit name, git's blob sha1 (header first) for a 40-digit one."""
    if len(expected) == 64:
        return hashlib.sha256()
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(b"blob %d\0" % size)
    return digest


def content_matches(path: Path, expected: str, size: int, *, on_bytes: Callable[[int], None] | None = None,
                    stop: threading.Event | None = None) -> bool:
    """Whether ``path`` holds ``size`` bytes whose checksum is ``expected`` (sha256 or git sha1)."""
    try:
        if os.stat(path).st_size != size:
            return False
    except OSError:
        return False
    digest = _hasher(expected, size)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            if stop is not None and stop.is_set():
                raise Stopped()
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest() == expected.lower()


def check_files(snapshot: Path, files: Iterable[RepoFile], *, on_bytes: Callable[[int], None] | None = None,
                stop: threading.Event | None = None) -> list[RepoFile]:
    """The files of ``files`` that are missing from ``snapshot`` or differ from the hub's checksum."""
    bad = []
    for item in files:
        if not content_matches(snapshot / item.path, item.etag, item.size, on_bytes=on_bytes, stop=stop):
            bad.append(item)
    return bad


def sizes_match(snapshot: Path, files: Iterable[RepoFile]) -> bool:
    """A cheap look (no hashing): every file is there with the hub's size."""
    try:
        return all(os.stat(snapshot / item.path).st_size == item.size for item in files)
    except OSError:
        return False


# ---------------------------------------------------------------- what to fetch

# Weights in another format than the one the engine loads: a repository often carries
# the same model twice (Llama's original/consolidated.*.pth beside its safetensors).
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".ot", ".gguf")
SKIPPED_DIRS = ("original/",)


def select_for_serving(manifest: Manifest) -> Manifest:
    """The files the engine needs: everything, minus weights in a second format when
    the repository has safetensors, and the ``original/`` checkpoint (vLLM's own rule)."""
    has_safetensors = any(f.path.endswith(".safetensors") for f in manifest.files)
    kept = tuple(f for f in manifest.files
                 if not f.path.startswith(SKIPPED_DIRS)
                 and not (has_safetensors and f.path.endswith(OTHER_WEIGHT_SUFFIXES)))
    return Manifest(manifest.repo, manifest.revision, kept or manifest.files)
