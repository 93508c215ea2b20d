"""The follower entry (ximd/engine/headless.py) runs vLLM's headless multi-node worker for real.

Two engine processes on loopback form a group of two "nodes": the tiny model split
TP=2 over nnodes=2, the leader an ordinary engine on its unix socket, the follower
the headless entry, both launched as ximd builds them (build_launch with a
GroupRole). One completion answered through the leader proves the follower holds
its half. (Loopback shares /dev/shm and the host between the two: failure
behaviour is for the namespace test, not this one.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.engine import http_get, kill_all, post_json, short_tempdir, tiny_cpu_plan, tiny_launch
from ximd.engine import headless
from ximd.engine.launch import ENGINE_MODULE, GroupRole

pytestmark = pytest.mark.engine

GROUP_START_TIMEOUT_S = 300   # measured 37 s on the 2-core VM when it is quiet
HEADLESS = Path(headless.__file__).resolve()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def member_launch(root: Path, engine_py: str, model: Path, *, rank: int, port: int, cpu: int):
    """ximd's launch for rank ``rank`` of a group of two on loopback: the tiny model, TP=2 over both."""
    group = GroupRole(name="tiny", rank=rank, size=2, tensor_parallel_size=2, pipeline_parallel_size=1,
                      master_address="127.0.0.1", master_port=port, fabric_address="127.0.0.1",
                      fabric_interface="lo", engine_port=port + 1 + 10 * rank)
    launch, _ = tiny_launch(root, engine_py, model, group=group, plan=tiny_cpu_plan(
        engine_env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": str(cpu)}))
    return launch, list(launch.argv), dict(launch.env)


def start(argv, env, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no output)"


def test_two_members_serve_the_tiny_model_split_tp2_over_two_nodes(engine_py, tiny_model_dir):
    with ExitStack() as stack:
        roots = [stack.enter_context(short_tempdir(f"ximd-m{rank}-")) for rank in (0, 1)]
        port = free_port()
        members = [member_launch(roots[rank], engine_py, tiny_model_dir, rank=rank, port=port, cpu=rank)
                   for rank in (0, 1)]
        for launch, _, _ in members:
            for d in launch.dirs:
                Path(d).mkdir(parents=True, exist_ok=True)
            stack.callback(kill_all, launch.instance_id)
        logs = [root / "engine.log" for root in roots]
        procs = [start(argv, env, log) for (_, argv, env), log in zip(members, logs, strict=True)]
        for proc in procs:
            stack.callback(proc.wait, 30)
            stack.callback(lambda p=proc: p.poll() is None and os.killpg(p.pid, 15))
        leader = members[0][0]

        began = time.monotonic()
        while True:
            try:
                if http_get(leader.socket_path, "/health")[0] == 200:
                    break
            except OSError:
                pass
            dead = [(rank, p.returncode) for rank, p in enumerate(procs) if p.poll() is not None]
            assert not dead, f"member ended before the group served: {dead}\nleader:\n{tail(logs[0])}\nfollower:\n{tail(logs[1])}"
            assert time.monotonic() - began < GROUP_START_TIMEOUT_S, f"leader:\n{tail(logs[0])}\nfollower:\n{tail(logs[1])}"
            time.sleep(0.5)

        body = post_json(leader.socket_path, "/v1/completions", {
            "model": leader.served_model_name, "prompt": "def hello():", "max_tokens": 8,
            "temperature": 0, "ignore_eos": True})
        assert body["usage"]["completion_tokens"] == 8
        follower_log = logs[1].read_text(errors="replace")
        assert "headless multiproc executor" in follower_log, tail(logs[1])
        assert ENGINE_MODULE not in members[1][1] and "--uds" not in members[1][1]


def test_the_entry_refuses_an_engine_of_another_version(engine_py, tmp_path):
    """A stand-in `vllm` package of another version on the path: the entry says why and exits 78."""
    fake = tmp_path / "vllm"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "version.py").write_text("__version__ = '0.99.1'\n")
    done = subprocess.run([engine_py, str(HEADLESS), "--model=x"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)})
    assert done.returncode == headless.EXIT_UNSUPPORTED
    assert "vLLM 0.99.1" in done.stderr and "0.32" in done.stderr
