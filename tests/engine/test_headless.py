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
import signal
import socket
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.engine import SupervisorThread, post_json, short_tempdir, tiny_cpu_plan, tiny_launch
from ximd.engine import EngineSupervisor, headless
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


def test_two_members_serve_the_tiny_model_split_tp2_over_two_nodes(engine_py, tiny_model_dir, recorder):
    """Both parts under ximd's supervisor as a group runs them: no restart of its own, the
    follower without a health endpoint, each in ximd's engine sandbox."""
    with ExitStack() as stack:
        roots = [stack.enter_context(short_tempdir(f"ximd-m{rank}-")) for rank in (0, 1)]
        port = free_port()
        launches = [member_launch(roots[rank], engine_py, tiny_model_dir, rank=rank, port=port, cpu=rank)[0]
                    for rank in (0, 1)]
        assert launches[0].health_check and not launches[1].health_check
        assert ENGINE_MODULE not in launches[1].argv and "--uds" not in launches[1].argv
        supervisors = [EngineSupervisor(launch, restart=False, startup_timeout=GROUP_START_TIMEOUT_S)
                       for launch in launches]
        runners = [stack.enter_context(SupervisorThread(s)) for s in supervisors]
        leader, follower = supervisors
        began = time.monotonic()
        runners[0].wait_for(lambda: leader.healthy, GROUP_START_TIMEOUT_S, "the leader healthy")
        assert follower.healthy and follower.starts == 1
        started_s = time.monotonic() - began

        body = post_json(leader.socket_path, "/v1/completions", {
            "model": leader.launch.served_model_name, "prompt": "def hello():", "max_tokens": 8,
            "temperature": 0, "ignore_eos": True})
        assert body["usage"]["completion_tokens"] == 8
        assert any("headless multiproc executor" in m for m in recorder.messages("ximd.engine")), started_s

        # A part that dies stays down: the group restarts as one (the router's epoch), never a lone follower.
        os.kill(follower.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not runners[1].future.done() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert follower.state == "failed" and follower.starts == 1 and "while serving" in follower.last_error


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
