"""The whole node as processes: a real xim-router, `ximd run`, and the paced
stand-in engine behind bench/standin-python (the real vLLM runs in tests/engine).

Enroll with a key → READY only once the engine is healthy → link up → leases
on the router; restart without the key → same identity; revoke → not enrolled;
SIGTERM → no engine process left.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil

from tests.support.daemon import Daemon
from tests.support.router import RouterProcess, wait_for
from ximd.identity import identity_path

REPO = Path(__file__).resolve().parents[2]
STANDIN_PYTHON = REPO / "bench" / "standin-python"
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
               "head_dim": 64, "max_position_embeddings": 2048, "torch_dtype": "float32"}



def node_config(router: RouterProcess, join_key: str | None) -> str:
    key = f'join_key = "{join_key}"\n' if join_key else ""
    return f'[router]\nurl = "{router.http_url}"\ninsecure = true\n{key}'


def make_daemon(tmp_path: Path, router: RouterProcess, join_key: str | None) -> Daemon:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    return Daemon(tmp_path, config=node_config(router, join_key), env={
        "XEROTIER_AGENT_ENGINE_PYTHON": str(STANDIN_PYTHON),
        "VLLM_MODEL": str(model),
        "XEROTIER_AGENT_SERVED_MODEL_NAME": "tiny",
        "XEROTIER_AGENT_MAX_CONCURRENT": "4",
    })


def engine_processes(daemon: Daemon) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "bench.standin_engine" in cmdline and str(daemon.runtime_dir) in cmdline:
            found.append(proc)
    return found


def test_enroll_serve_restart_and_stop(tmp_path, router):
    daemon = make_daemon(tmp_path, router, router.join_key())
    try:
        daemon.start()
        daemon.notify.wait_for("READY", "1", timeout=60)
        assert any("loading" in f.get("STATUS", "") for _, f in daemon.notify.messages) or \
            "engine ready" in daemon.log()
        daemon.notify.wait_for("STATUS", "serving tiny; router connected", timeout=30)
        identity = json.loads(identity_path(daemon.state_dir).read_text())
        assert identity_path(daemon.state_dir).stat().st_mode & 0o777 == 0o600
        wait_for(lambda: router.agent(identity["agent_id"])["state"] == "active", 20, "agent active")

        status = json.loads(daemon.cli("status", "--format", "json").stdout)
        assert status["phase"] == "serving"
        assert status["enrollment"]["agent_id"] == identity["agent_id"]
        assert status["engine"]["state"] == "healthy" and status["link"]["state"] == "connected"

        # Restart with the key gone from the config: same identity, link up again.
        daemon.stop()
        daemon = make_daemon(tmp_path, router, None)
        daemon.start()
        daemon.notify.wait_for("STATUS", "serving tiny; router connected", timeout=60)
        again = json.loads(identity_path(daemon.state_dir).read_text())
        assert again["agent_id"] == identity["agent_id"]
        assert "join_key" not in daemon.log().lower() or "xjk_" not in daemon.log()

        engines = engine_processes(daemon)
        assert engines, "the stand-in engine should be running under ximd"
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
        gone, alive = psutil.wait_procs(engines, timeout=15)
        assert not alive, f"engine processes left behind: {alive}"
    finally:
        daemon.stop()


def test_router_down_at_start_does_not_block_readiness(tmp_path, router):
    key = router.join_key()
    daemon = make_daemon(tmp_path, router, key)
    try:
        daemon.start()
        daemon.notify.wait_for("STATUS", "serving tiny; router connected", timeout=60)
        daemon.stop()
        router.stop()
        daemon = make_daemon(tmp_path, router, None)
        daemon.start()
        ready = daemon.notify.wait_for("READY", "1", timeout=60)
        # Ready on the engine alone: the router being away only shows in STATUS.
        assert ready["STATUS"].startswith("serving tiny; router ")
        assert ready["STATUS"] != "serving tiny; router connected"
        router.start()
        daemon.notify.wait_for("STATUS", "serving tiny; router connected", timeout=60)
    finally:
        daemon.stop()


def test_revoked_identity_waits_not_enrolled(tmp_path, router):
    daemon = make_daemon(tmp_path, router, router.join_key())
    try:
        daemon.start()
        daemon.notify.wait_for("STATUS", "serving tiny; router connected", timeout=60)
        agent_id = json.loads(identity_path(daemon.state_dir).read_text())["agent_id"]
        engines = engine_processes(daemon)
        router.revoke(agent_id)
        daemon.wait_for_log("identity was revoked", timeout=60)
        assert daemon.proc.poll() is None, "a revoked node waits; it does not exit"
        gone, alive = psutil.wait_procs(engines, timeout=20)
        assert not alive, "the engine stops while the node is not enrolled"
        # The phase changes once the node has finished stopping (its link and bridge too),
        # which on a loaded machine may be a moment after the engine's processes are gone.
        deadline = time.monotonic() + 30
        while (phase := json.loads(daemon.cli("status", "--format", "json").stdout)["phase"]) != "not-enrolled" \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert phase == "not-enrolled"

        # A new key and a reload bring it back.
        daemon.config_path.write_text(node_config(router, router.join_key()))
        daemon.signal(signal.SIGHUP)
        daemon.notify.wait_for("STATUS", "serving tiny; router connected", timeout=60)
    finally:
        daemon.stop()
