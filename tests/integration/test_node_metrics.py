"""`ximd run`'s /metrics exists from the daemon's first second, before any enrollment or engine.

A real daemon with no join key: it waits, not enrolled, and its metrics endpoint already
answers with every state series, the lease timestamp at 0 and the process figures, read
with prometheus_client's own parser.
"""

from __future__ import annotations

import socket
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import Daemon
from ximd.engine import EngineState
from ximd.mesh.state import LinkState
from ximd.metrics import DEFAULT_LISTEN, NODE_STATES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_for_scrape(port: int, daemon: Daemon, timeout: float = 15) -> dict[tuple[str, tuple], float]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return scrape(port)
        except OSError:
            if daemon.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no metrics endpoint (rc={daemon.proc.poll()}):\n{daemon.log()}") from None
            time.sleep(0.05)


def test_metrics_answer_before_enrollment_with_every_state_series(tmp_path):
    port = free_port()
    daemon = Daemon(tmp_path, env={"XEROTIER_AGENT_METRICS_ENABLED": "true",
                                   "XEROTIER_AGENT_METRICS_LISTEN": f"127.0.0.1:{port}"})
    try:
        daemon.start()
        first = wait_for_scrape(port, daemon)          # as soon as the daemon listens
        daemon.notify.wait_for("READY", "1")           # not enrolled: up and waiting
        values = scrape(port)
    finally:
        daemon.stop()
    for snapshot in (first, values):
        for state in NODE_STATES:
            assert ("ximd_state", (("state", state),)) in snapshot
        for engine in EngineState:
            assert ("ximd_engine_state", (("state", engine.value),)) in snapshot
        for link in LinkState:
            assert ("ximd_link_state", (("state", link.value),)) in snapshot
        assert snapshot[("ximd_lease_last_acknowledged_timestamp_seconds", ())] == 0
        assert snapshot[("ximd_engine_metrics_up", ())] == 0
        assert snapshot[("process_resident_memory_bytes", ())] > 0
        assert snapshot[("process_start_time_seconds", ())] > 0
    assert values[("ximd_state", (("state", "not-enrolled"),))] == 1
    assert sum(v for (name, _), v in values.items() if name == "ximd_state") == 1
    assert values[("ximd_engine_state", (("state", "stopped"),))] == 1


def test_the_default_port_is_outside_prometheus_allocations():
    port = int(DEFAULT_LISTEN.rsplit(":", 1)[1])
    assert not 9090 <= port <= 9999                  # Prometheus' own and its exporters'
    assert port not in (8000, 8080, 5555, 6379)     # vLLM, xim-router HTTP and mesh, Redis
