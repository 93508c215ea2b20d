"""Air-gapped hosts: a model copied from another machine becomes a checked cache entry.

Two shapes are accepted, both what Hugging Face's own tools leave behind:

- a hub cache entry (``models--org--name/`` with ``blobs/`` and ``snapshots/``,
  from ``HF_HOME/hub`` of a machine that has the model, or found by id in this
  host's own hub cache): every blob is named by its checksum, so each file is
  checked against its own name with no hub at all;
- a plain model directory (``hf download --local-dir``, or any copy with a
  ``config.json``), given an id with ``--as``; where the download left its
  metadata (``.cache/huggingface/download/*.metadata``) the files are checked
  against the etags recorded there.

Either way the copy is checked for completeness (``config.json``, every shard a
safetensors index names) and lands in the cache like a download: blobs,
snapshot links, the completion marker last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from xim_proto.modelid import is_model_id
from ximd.models.cache import ModelCache, cache_dir_name, hf_id_of
from ximd.models.choice import ModelError
from ximd.models.manifest import CHUNK_BYTES, Manifest, RepoFile, Stopped, safe_relative_path

# Files the hub keeps in LFS (named by sha256); the rest are named by their git blob id.
LFS_MIN_BYTES = 10 * 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".model", ".onnx", ".h5", ".msgpack")
SKIPPED_NAMES = (".cache", ".git", ".gitattributes")


@dataclass(frozen=True)
class ImportSource:
    hf_id: str
    directory: Path                     # the snapshot (or plain directory) the files are read from
    files: tuple[str, ...]              # relative paths
    expected: Mapping[str, str]         # path -> the checksum its name or metadata promises
    revision: str | None                # the hub's commit, when the source knows it
    shape: str                          # "hub cache entry" or "model directory"


def _hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


def _walk(directory: Path) -> list[str]:
    found = []
    for root, dirs, names in os.walk(directory, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_NAMES)
        for name in sorted(names):
            if name not in SKIPPED_NAMES:
                found.append(os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/"))
    return found


def _entry_source(entry: Path, hf_id: str) -> ImportSource:
    snapshots = entry / "snapshots"
    ref = entry / "refs" / "main"
    revision = ref.read_text().strip() if ref.is_file() else None
    if not revision or not (snapshots / revision).is_dir():
        candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise ModelError(f"{entry} has no snapshot: not a complete hub cache entry")
        revision = candidates[-1].name
    snapshot = snapshots / revision
    files = _walk(snapshot)
    # Each snapshot file links to blobs/<checksum>: the name to check the content against.
    expected = {path: os.path.basename(os.readlink(snapshot / path))
                for path in files if (snapshot / path).is_symlink()}
    return ImportSource(hf_id, snapshot, tuple(files), expected, revision if _hex(revision, 40) else None,
                        "hub cache entry")


def _local_dir_metadata(directory: Path, files: list[str]) -> tuple[dict[str, str], str | None]:
    """Etags and the commit `hf download --local-dir` recorded (first line commit, second etag)."""
    expected, commits = {}, set()
    for path in files:
        meta = directory / ".cache" / "huggingface" / "download" / (path + ".metadata")
        try:
            lines = meta.read_text().splitlines()
        except OSError:
            continue
        if len(lines) >= 2:
            commits.add(lines[0].strip())
            expected[path] = lines[1].strip().strip('"')
    commit = commits.pop() if len(commits) == 1 else None
    return expected, commit if commit and _hex(commit, 40) else None


def find_source(what: str, as_id: str | None, environ: Mapping[str, str]) -> ImportSource:
    """What `ximd model import WHAT [--as ID]` would import; ModelError says why not."""
    if as_id is not None and not is_model_id(as_id):
        raise ModelError(f"--as {as_id!r} is not a Hugging Face id (org/name)")
    path = Path(what).expanduser()
    if path.is_dir():
        if path.name.startswith("models--") and (path / "snapshots").is_dir():
            return _entry_source(path, as_id or hf_id_of(path.name))
        if as_id is None:
            raise ModelError(f"{path} is a model directory: say which model it is with --as ORG/NAME")
        files = _walk(path)
        expected, commit = _local_dir_metadata(path, files)
        return ImportSource(as_id, path, tuple(files), expected, commit, "model directory")
    if is_model_id(what):
        home = Path(environ.get("HF_HOME") or Path(environ.get("HOME", "/root")) / ".cache" / "huggingface")
        entry = home / "hub" / cache_dir_name(what)
        if entry.is_dir():
            return _entry_source(entry, as_id or what)
        raise ModelError(f"{what} is not in this host's Hugging Face cache ({entry}); give the directory "
                         "copied from another machine instead")
    raise ModelError(f"{what} is neither a directory nor a Hugging Face id (org/name)")


def check_complete(source: ImportSource) -> None:
    """The engine would fail on a model missing its config or a weight shard: refuse it now."""
    names = set(source.files)
    if "config.json" not in names:
        raise ModelError(f"{source.directory} has no config.json: not a complete model")
    for index in (n for n in names if n.endswith(".safetensors.index.json")):
        try:
            shards = set(json.loads((source.directory / index).read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            raise ModelError(f"{source.directory / index} is not a readable safetensors index") from None
        missing = sorted(s for s in shards if s not in names)
        if missing:
            raise ModelError(f"{source.directory} lacks {len(missing)} weight shard(s) its index names: "
                             f"{', '.join(missing[:5])}")


def hash_file(path: Path, on_bytes: Callable[[int], None] | None = None,
              stop: threading.Event | None = None) -> tuple[int, str, str]:
    """(size, sha256, git blob id) of one file, in one pass."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            if stop is not None and stop.is_set():
                raise Stopped()
            sha256.update(chunk)
            sha1.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return size, sha256.hexdigest(), sha1.hexdigest()


def build_manifest(source: ImportSource, on_bytes: Callable[[int], None] | None = None,
                   stop: threading.Event | None = None) -> Manifest:
    """Checksum every file, check it against what the source promises, and describe it as the hub would."""
    check_complete(source)
    files = []
    for path in source.files:
        safe_relative_path(path)
        size, sha256, blob_id = hash_file(source.directory / path, on_bytes, stop)
        promised = source.expected.get(path)
        if promised is not None and promised not in (sha256, blob_id):
            raise ModelError(f"{source.directory / path} does not match the checksum its source records "
                             f"({promised}): the copy is damaged")
        lfs = (promised == sha256) if promised else (size >= LFS_MIN_BYTES or path.endswith(LFS_SUFFIXES))
        files.append(RepoFile(path, size, blob_id, sha256 if lfs else None))
    revision = source.revision or hashlib.sha1(  # a stable stand-in for a commit the source did not record
        "".join(f"{f.path}\0{f.blob_id}\n" for f in files).encode(), usedforsecurity=False).hexdigest()
    return Manifest(source.hf_id, revision, tuple(files))


def install(cache: ModelCache, source: ImportSource, manifest: Manifest) -> Path:
    """Copy the checked files into the cache (blobs, snapshot links) and mark the revision complete."""
    entry = cache.entry_path(manifest.repo)
    blobs = cache.make_dir(entry / "blobs")
    snapshot = cache.make_dir(cache.snapshot_path(manifest.repo, manifest.revision))
    for item in manifest.files:
        blob = blobs / item.etag
        if not blob.exists():
            partial = blobs / (item.etag + ".importing")
            shutil.copyfile(source.directory / item.path, partial)
            cache.give(partial)
            os.replace(partial, blob)
        link = snapshot / item.path
        cache.make_dir(link.parent)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
        cache.give(link)
    cache.mark_complete(manifest)
    return snapshot
