"""Measure the engine's time to healthy under ximd's supervisor, and the supervisor's own share.

    .venv/bin/python -m tests.engine.measure_startup [--rounds 2]

Each round starts the same engine (the argv and environment ximd builds for the tiny
model) twice, alternating: once by hand (Popen + a tight /health poll, 20 ms) and once
under EngineSupervisor (default settings). It reports the medians, their difference,
and the supervisor's work measured directly: the time from run() to the spawn (orphan
scan, directories) and the time from the engine's first 200 on /health to the
supervisor noticing (bounded by its 0.25 s loading poll).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import time

from tests.support.engine import engine_python, processes_of, short_tempdir, tiny_launch, tiny_model
from ximd.engine import EngineSupervisor

DEADLINE_S = 300
HAND_POLL_S = 0.02


def health_ok(socket_path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(1)
            sock.connect(socket_path)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def by_hand(launch) -> float:
    for directory in launch.dirs:
        os.makedirs(directory, exist_ok=True)
    launch.socket_path.unlink(missing_ok=True)
    began = time.monotonic()
    proc = subprocess.Popen(launch.argv, env=dict(launch.env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while time.monotonic() - began < DEADLINE_S:
            if health_ok(str(launch.socket_path)):
                return time.monotonic() - began
            if proc.poll() is not None:
                raise RuntimeError(f"engine exited with {proc.returncode}")
            time.sleep(HAND_POLL_S)
        raise RuntimeError("engine not healthy in time")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        wait_gone(launch.instance_id)


def wait_gone(instance: str) -> None:
    deadline = time.monotonic() + 30
    while processes_of(instance) and time.monotonic() < deadline:
        time.sleep(0.2)


async def supervised(launch) -> dict[str, float]:
    supervisor = EngineSupervisor(launch)
    began = time.monotonic()
    task = asyncio.create_task(supervisor.run())
    spawned = first_ok = None
    while time.monotonic() - began < DEADLINE_S and not supervisor.healthy:
        if spawned is None and supervisor.pid:
            spawned = time.monotonic() - began
        if first_ok is None and spawned is not None and await asyncio.to_thread(health_ok, str(launch.socket_path)):
            first_ok = time.monotonic() - began
        await asyncio.sleep(HAND_POLL_S)
    healthy = time.monotonic() - began
    await supervisor.stop()
    await task
    wait_gone(launch.instance_id)
    return {"healthy_s": healthy, "spawn_s": spawned or 0.0,
            "notice_lag_s": healthy - first_ok if first_ok is not None else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    python = engine_python()
    model = tiny_model(python)
    hand, sup = [], []
    with short_tempdir() as root:
        launch, _ = tiny_launch(root, python, model)
        for _ in range(args.rounds):
            hand.append(by_hand(launch))
            sup.append(asyncio.run(supervised(launch)))
    result = {
        "by_hand_healthy_s": [round(x, 2) for x in hand],
        "supervised_healthy_s": [round(s["healthy_s"], 2) for s in sup],
        "median_by_hand_s": round(statistics.median(hand), 2),
        "median_supervised_s": round(statistics.median(s["healthy_s"] for s in sup), 2),
        "supervisor_spawn_s": [round(s["spawn_s"], 3) for s in sup],
        "supervisor_notice_lag_s": [round(s["notice_lag_s"], 3) for s in sup],
    }
    result["median_difference_s"] = round(result["median_supervised_s"] - result["median_by_hand_s"], 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
