"""The engine's processes: its process group, and earlier engines of ours still alive.

vLLM's workers can outlive a killed API server (and ximd can be killed without a
chance to stop them), so before every start the supervisor looks for engines of
ours: processes whose environment carries our instance marker, or whose command
line holds our socket. They are ours to kill. A GPU held by a process that is not
ours is reported, never touched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from ximd.engine.launch import INSTANCE_ENV

log = logging.getLogger("ximd.engine.supervisor")

NVIDIA_APPS_COMMAND = ("nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                       "--format=csv,noheader,nounits")
NVIDIA_SMI_TIMEOUT_S = 15.0   # a wedged driver can make nvidia-smi hang
KILL_WAIT_S = 5.0


class OrphanError(RuntimeError):
    """An earlier engine of ours is still alive and could not be removed."""


@dataclass(frozen=True)
class FoundProcess:
    pid: int
    name: str
    cmdline: str
    why: str       # "instance marker", "holds <socket>", "GPU <mib> MiB"

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.name}: {self.cmdline[:120]}) [{self.why}]"


@dataclass(frozen=True)
class GpuApp:
    pid: int
    name: str
    used_mib: int | None


# ---------------------------------------------------------------- pure parsing


def parse_compute_apps(text: str) -> list[GpuApp]:
    """`nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader,nounits`."""
    apps = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        used = parts[-1]
        apps.append(GpuApp(int(parts[0]), ",".join(parts[1:-1]), int(used) if used.isdigit() else None))
    return apps


def is_ours(environ: dict | None, cmdline: list[str] | None, instance: str, socket_path: Path) -> str | None:
    """Why a process is an engine of ours, or None."""
    if environ and environ.get(INSTANCE_ENV) == instance:
        return "instance marker"
    if cmdline and str(socket_path) in cmdline:
        return f"holds {socket_path}"
    return None


# ---------------------------------------------------------------- finding


def find_ours(instance: str, socket_path: Path) -> list[FoundProcess]:
    """Live processes of an engine of ours (this process and zombies excluded)."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "name", "cmdline", "environ", "status"], ad_value=None):
        info = proc.info
        if info["pid"] == me or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        why = is_ours(info["environ"], info["cmdline"], instance, socket_path)
        if why:
            found.append(FoundProcess(info["pid"], info["name"] or "?", " ".join(info["cmdline"] or ()), why))
    return found


def gpu_apps() -> list[GpuApp] | None:
    """Processes holding NVIDIA GPUs; None when nvidia-smi is absent or fails."""
    if shutil.which(NVIDIA_APPS_COMMAND[0]) is None:
        return None
    try:
        done = subprocess.run(NVIDIA_APPS_COMMAND, capture_output=True, text=True,
                              timeout=NVIDIA_SMI_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("Could not ask nvidia-smi which processes hold the GPUs: %s", exc)
        return None
    if done.returncode != 0:
        log.warning("nvidia-smi --query-compute-apps failed: %s", done.stderr.strip() or done.returncode)
        return None
    return parse_compute_apps(done.stdout)


def gpu_holders(instance: str, socket_path: Path) -> tuple[list[FoundProcess], list[GpuApp]]:
    """GPU processes split into ours (to remove) and others (to report)."""
    ours, others = [], []
    for app in gpu_apps() or ():
        try:
            proc = psutil.Process(app.pid)
            why = is_ours(proc.environ(), proc.cmdline(), instance, socket_path)
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            why = None  # another user's (or another PID namespace's) process: not ours
        if why:
            ours.append(FoundProcess(app.pid, app.name, " ".join(proc.cmdline()), f"{why}, GPU {app.used_mib} MiB"))
        else:
            others.append(app)
    return ours, others


# ---------------------------------------------------------------- removing


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    alive = _alive(procs)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = _alive(alive)
    return alive


def remove_orphans(instance: str, socket_path: Path, grace_s: float = 10.0) -> list[FoundProcess]:
    """Kill every earlier engine of ours (SIGTERM, then SIGKILL); raise OrphanError if one stays.

    Blocking (up to grace + 5 s): the supervisor runs it in a thread.
    """
    found = find_ours(instance, socket_path)
    ours_on_gpu, others_on_gpu = gpu_holders(instance, socket_path)
    for app in others_on_gpu:
        log.warning("GPU memory held by pid %d (%s, %s MiB), which is not an engine of ours; "
                    "the engine may not get the memory it plans for", app.pid, app.name, app.used_mib)
    known = {f.pid for f in found}
    found += [f for f in ours_on_gpu if f.pid not in known]
    if not found:
        return []
    for item in found:
        log.warning("Found an earlier engine of ours still running: %s; stopping it", item)
    procs = []
    for item in found:
        try:
            procs.append(psutil.Process(item.pid))
        except psutil.NoSuchProcess:
            pass
    _signal_all(procs, signal.SIGTERM)
    alive = _wait_gone(procs, grace_s)
    if alive:
        _signal_all(alive, signal.SIGKILL)
        alive = _wait_gone(alive, KILL_WAIT_S)
    if alive:
        left = ", ".join(str(f) for f in found if f.pid in {p.pid for p in alive})
        raise OrphanError(f"an earlier engine of ours survives SIGKILL and holds its resources: {left}; "
                          "not starting a second one (is it stuck in the kernel, or owned by another user?)")
    return found


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (not zombie) processes of a process group."""
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.info["pid"]) == pgid:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


def signal_group(pgid: int, sig: int) -> None:
    if pgid == os.getpgrp():
        raise RuntimeError("refusing to signal ximd's own process group")
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


async def terminate_group(pgid: int, grace_s: float) -> list[int]:
    """SIGTERM the group, SIGKILL it after the grace; return pids that survived both."""
    if not group_members(pgid):
        return []
    signal_group(pgid, signal.SIGTERM)
    if await _wait_group_gone(pgid, grace_s):
        return []
    left = group_members(pgid)
    log.warning("Engine processes %s ignored SIGTERM for %.0f s; sending SIGKILL",
                [p.pid for p in left], grace_s)
    signal_group(pgid, signal.SIGKILL)
    if await _wait_group_gone(pgid, KILL_WAIT_S):
        return []
    return [p.pid for p in group_members(pgid)]


async def _wait_group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not await asyncio.to_thread(group_members, pgid):
            return True
        await asyncio.sleep(0.1)
    return not group_members(pgid)
