"""Getting a hub model into the cache completely, or saying plainly why not.

    complete snapshot? → lock → ask the hub (manifest) → make room → fetch
    (progress from the cache directory) → check every file against the hub's
    checksums → mark complete (atomically, last) → serve

Everything that can go wrong outside ximd (a gated repository, no network, a
hub error, no room) is a `ModelWait`: a sentence for the operator and a retry,
never a crash or a restart loop. A partial snapshot is resumed, never served.
Cancelling `acquire` (a stop) kills the downloader at once and keeps what was
fetched for the next start.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ximd.logs import phase_fields
from ximd.models.cache import PARTIAL_SUFFIX, ModelBusy, ModelCache, free_bytes, plan_room
from ximd.models.choice import ModelError
from ximd.models.credentials import HubToken
from ximd.models.hub import Downloader, HubProblem, explain
from ximd.models.manifest import Manifest, RepoFile, check_files, select_for_serving
from ximd.models.progress import LogPacer, Progress, RateMeter, amount_text, log_line
from ximd.units import size_text

log = logging.getLogger("ximd.models")

TICK_S = 1.0
LOCK_POLL_S = 2.0
DOWNLOAD_ATTEMPTS = 2     # a file that fails its checksum is fetched once more


class ModelWait(ModelError):
    """The model cannot be had now for a reason outside ximd; ``line`` says what to do."""

    def __init__(self, kind: str, line: str, retry: bool = True):
        super().__init__(line)
        self.kind = kind
        self.line = line
        self.retry = retry


class Reporter(Protocol):
    """Who hears how an acquisition goes: the daemon (STATUS, journal) or `ximd model pull`."""

    def step(self, hf_id: str, line: str) -> None: ...           # a short phase: asking the hub, waiting

    def progress(self, p: Progress) -> None: ...                  # bytes downloaded or checked


@dataclass(frozen=True)
class HubSource:
    """Where models come from: the downloader (None when downloads are off) and, for the
    wording of problems, the endpoint, the token and whether a token file waits for a restart
    (ximd.models.credentials.token_awaits_restart)."""
    downloader: Downloader | None
    endpoint: str
    token: HubToken | None
    token_awaits_restart: bool = False

    def explain(self, problem: HubProblem, hf_id: str) -> str:
        return explain(problem, hf_id, self.token, self.endpoint, self.token_awaits_restart)


class JournalReporter:
    """Progress as journal lines: at most every 10 % or 30 s, with structured fields."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._pacers: dict[tuple[str, str], LogPacer] = {}

    def step(self, hf_id: str, line: str) -> None:
        log.info("%s", line, extra=phase_fields("model", XIM_MODEL=hf_id))

    def progress(self, p: Progress) -> None:
        pacer = self._pacers.setdefault((p.model, p.phase), LogPacer())
        if pacer.due(p.fraction, self.clock()):
            log.info("%s", log_line(p), extra=phase_fields(
                "model", XIM_MODEL=p.model, XIM_STEP=p.phase, XIM_BYTES_DONE=str(p.done),
                XIM_BYTES_TOTAL=str(p.total)))


# ---------------------------------------------------------------- the steps


async def acquire(hf_id: str, cache: ModelCache, source: HubSource, reporter: Reporter) -> tuple[Path, int]:
    """The complete snapshot of ``hf_id`` and a shared hold on it (a lock descriptor: close it
    when the model is no longer served). Raises ModelWait or ModelError."""
    fd = _try_hold(cache, hf_id, shared=True)
    if fd is not None:
        snapshot = cache.snapshot(hf_id)
        if snapshot is not None:
            return snapshot, fd
        os.close(fd)
    if source.downloader is None:
        raise ModelWait("offline", f"model {hf_id} is not in the model cache {cache.root} and downloads are off "
                                   "(HF_HUB_OFFLINE=1): bring it with `ximd model import DIR`, then "
                                   "`systemctl reload ximd`")
    fd = await _hold_exclusively(cache, hf_id, reporter)
    try:
        snapshot = cache.snapshot(hf_id)           # another process may have finished it meanwhile
        if snapshot is None:
            snapshot = await _fetch_complete(hf_id, cache, source, reporter)
        fcntl.flock(fd, fcntl.LOCK_SH)             # from now on only serving it: others may share
        return snapshot, fd
    except BaseException:
        os.close(fd)
        raise


def _try_hold(cache: ModelCache, hf_id: str, *, shared: bool) -> int | None:
    try:
        return cache.hold(hf_id, shared=shared, wait=False)
    except ModelBusy:
        return None


async def _hold_exclusively(cache: ModelCache, hf_id: str, reporter: Reporter) -> int:
    said = False
    while (fd := _try_hold(cache, hf_id, shared=False)) is None:
        if not said:
            reporter.step(hf_id, f"waiting for another process (ximd model?) that is downloading or "
                                 f"removing {hf_id}")
            said = True
        await asyncio.sleep(LOCK_POLL_S)
    return fd


async def _fetch_complete(hf_id: str, cache: ModelCache, source: HubSource, reporter: Reporter) -> Path:
    downloader = source.downloader
    assert downloader is not None
    reporter.step(hf_id, f"asking the hub at {source.endpoint} about {hf_id}")
    try:
        manifest = select_for_serving(await downloader.manifest(hf_id))
    except HubProblem as problem:
        raise ModelWait(problem.kind, source.explain(problem, hf_id)) from None
    make_room(cache, manifest)
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        await _download(cache, manifest, downloader, source, reporter)
        bad = await _check(cache, manifest, reporter)
        if not bad:
            break
        names = ", ".join(f.path for f in bad[:5])
        log.warning("model %s: %d file(s) differ from the hub's checksums (%s); %s", hf_id, len(bad), names,
                    "fetching them again" if attempt < DOWNLOAD_ATTEMPTS else "giving up for now",
                    extra=phase_fields("model", XIM_MODEL=hf_id))
        discard(cache, manifest, bad)
    else:
        corrupt = HubProblem("corrupt", None, f"{len(bad)} file(s) failed the hub's checksums twice ({names}); "
                                              "check the mirror (HF_ENDPOINT) or the disk")
        raise ModelWait("corrupt", source.explain(corrupt, hf_id))
    cache.mark_complete(manifest)
    log.info("model %s is complete: revision %s, %d files, %s, every file checked against the hub's checksums",
             hf_id, manifest.revision, len(manifest.files), size_text(manifest.total_bytes),
             extra=phase_fields("model", XIM_MODEL=hf_id))
    return cache.snapshot_path(hf_id, manifest.revision)


def make_room(cache: ModelCache, manifest: Manifest) -> None:
    """Evict what the plan says, or raise ModelWait with why the model cannot fit."""
    room = plan_room(cache.entries(), manifest.repo, manifest.total_bytes, cache.present_bytes(manifest),
                     cache.max_bytes, free_bytes(cache.root))
    if room.problem:
        raise ModelWait("no-room", f"cannot download {room.problem}")
    for entry in room.evict:
        if not cache.evict(entry, f"to make room for {manifest.repo}"):
            raise ModelWait("no-room", f"cannot download {manifest.repo} yet: {entry.hf_id} must go to make "
                                       "room and another process holds it")


async def _download(cache: ModelCache, manifest: Manifest, downloader: Downloader, source: HubSource,
                    reporter: Reporter) -> None:
    hf_id = manifest.repo
    present = cache.present_bytes(manifest)
    if present:
        log.info("resuming the download of %s: %s already here", hf_id, amount_text(present, manifest.total_bytes),
                 extra=phase_fields("model", XIM_MODEL=hf_id))
    else:
        log.info("downloading %s (revision %s, %d files, %s) from %s into %s", hf_id, manifest.revision,
                 len(manifest.files), size_text(manifest.total_bytes), source.endpoint, cache.root,
                 extra=phase_fields("model", XIM_MODEL=hf_id))
    cache.make_dir(cache.hub)
    watcher = asyncio.create_task(_watch(lambda: cache.present_bytes(manifest), hf_id, "downloading",
                                         manifest.total_bytes, reporter))
    try:
        await downloader.fetch(manifest, str(cache.hub))
    except HubProblem as problem:
        raise ModelWait(problem.kind, source.explain(problem, hf_id)) from None
    finally:
        watcher.cancel()
    reporter.progress(Progress(hf_id, "downloading", cache.present_bytes(manifest), manifest.total_bytes, None))


async def _check(cache: ModelCache, manifest: Manifest, reporter: Reporter) -> list[RepoFile]:
    """Every file against the hub's checksum, in a thread; a stop ends it within a chunk."""
    checked = [0]
    stop = threading.Event()

    def count(n: int) -> None:
        checked[0] += n

    snapshot = cache.snapshot_path(manifest.repo, manifest.revision)
    watcher = asyncio.create_task(_watch(lambda: checked[0], manifest.repo, "verifying", manifest.total_bytes,
                                         reporter))
    try:
        return await asyncio.to_thread(check_files, snapshot, manifest.files, on_bytes=count, stop=stop)
    except asyncio.CancelledError:
        stop.set()                       # the thread ends within a chunk (Stopped, unheard)
        raise
    finally:
        watcher.cancel()


async def _watch(measure: Callable[[], int], hf_id: str, phase: str, total: int, reporter: Reporter) -> None:
    meter = RateMeter()
    while True:
        done = measure()
        reporter.progress(Progress(hf_id, phase, done, total, meter.add(time.monotonic(), done)))
        await asyncio.sleep(TICK_S)


def discard(cache: ModelCache, manifest: Manifest, files: list[RepoFile]) -> None:
    """Remove bad files (the snapshot's link and the blob) so the next fetch starts them afresh."""
    entry = cache.entry_path(manifest.repo)
    for item in files:
        for path in (cache.snapshot_path(manifest.repo, manifest.revision) / item.path,
                     entry / "blobs" / item.etag, entry / "blobs" / (item.etag + PARTIAL_SUFFIX)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
