"""Fixtures shared by the serving tests."""

from __future__ import annotations

import pytest

from tests.support.standin_engine import StandinProcess


@pytest.fixture
def engine(tmp_path):
    """The stand-in engine as its own process on a unix socket, quick pace (5 ms, 400 tokens/s)."""
    proc = StandinProcess(tmp_path / "engine.sock", ttft_ms=5, tokens_per_s=400).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test with a served node shows the tails of ximd's and the router's logs:
    a flake in CI is otherwise a bare assertion with no story."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for name in ("vllm_node", "node"):
        served = getattr(item, "funcargs", {}).get(name)
        if served is None or not hasattr(served, "router"):
            continue
        if served.daemon is not None:
            report.sections.append(("ximd log (tail)", served.daemon.log()[-8000:]))
        report.sections.append(("router log (tail)", served.router.log()[-5000:]))
