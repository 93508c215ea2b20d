"""Embeddings and metrics end to end: `openai` → `xim-router serve` → two real `ximd run` nodes.

Both nodes serve the same model through the stand-in engine (bench/standin-python); only
the second runs it as vLLM would with ``--runner pooling``, so only its engine has
/v1/embeddings. The first node connects first, so it is the one a choice that ignored the
capability would pick: every embeddings request must still reach the second. The router's
and the node's /metrics are read with prometheus_client's parser.
"""

from __future__ import annotations

import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.serving.test_daemon import MESSAGES, MODEL, standin_node
from tests.support.daemon import Daemon
from tests.support.engine import short_tempdir


def parsed(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def router_metrics(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        return parsed(resp.read().decode())


def embedding_node(root, router, model_dir, python: str) -> Daemon:
    key = router.join_key()
    config = (f'[router]\nurl = "{router.http_url}"\njoin_key = "{key}"\ninsecure = true\n'
              f'[engine]\nmodel = "{model_dir}"\nserved_model_name = "{MODEL}"\n'
              f'python = "{python}"\n')
    root.mkdir()
    return Daemon(root, config=config, watchdog_usec=None, env={
        "XEROTIER_AGENT_VLLM_ARGS": "--runner pooling --standin-ttft-ms 5 --standin-tokens-per-s 200"})


def drain_notify(daemon: Daemon) -> threading.Thread:
    """Read sd_notify as systemd would (an unread queue would block the daemon)."""
    def read():
        while daemon.notify.sock.fileno() != -1:
            try:
                daemon.notify.poll(0.2)
            except OSError:
                return
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_embeddings_reach_only_the_node_whose_engine_embeds():
    with short_tempdir("xe-") as root:
        first = standin_node(root / "a")
        first.start()
        second = None
        try:
            second = embedding_node(root / "b", first.router, first.model_dir, first.python).start()
            drain_notify(second)
            deadline = time.monotonic() + 60
            while True:
                nodes = router_metrics(first.router.http_url).get("xim_router_node_info", [])
                if len(nodes) == 2 and all(m.get("model") == MODEL and v == 1 for m, v in router_metrics(
                        first.router.http_url).get("xim_router_node_model_ready", [])):
                    break
                assert time.monotonic() < deadline and second.proc.poll() is None, \
                    f"the embedding node did not join:\n{second.log()[-5000:]}"
                time.sleep(0.2)
            assert sorted(labels["embeddings"] for labels, _ in nodes) == ["false", "true"]

            client = first.client()
            vectors = [client.embeddings.create(model=MODEL, input=f"text number {i}").data[0].embedding
                       for i in range(6)]
            assert len(vectors) == 6 and all(len(v) == 8 for v in vectors)
            assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4) \
                .usage.completion_tokens == 4
            served = client.models.retrieve(MODEL)
            assert served.model_extra["max_model_len"] == 2048     # both engines report it

            values = router_metrics(first.router.http_url)
            requests = {(m["endpoint"], m["status"]): v for m, v in values["xim_router_requests_total"]}
            assert requests[("embeddings", "200")] == 6 and ("embeddings", "400") not in requests
            assert "xim_router_request_errors_total" not in values or not values["xim_router_request_errors_total"]

            node = parsed(first.metrics())          # the generation node's own /metrics
            state = {m["state"]: v for m, v in node["ximd_state"]}
            assert state["serving"] == 1 and sum(state.values()) == 1
            (ack,) = [v for _, v in node["ximd_lease_last_acknowledged_timestamp_seconds"]]
            assert time.time() - 30 < ack <= time.time() + 1
            assert dict((m["state"], v) for m, v in node["ximd_engine_state"])["healthy"] == 1
        finally:
            if second is not None:
                second.stop()
            first.stop()
