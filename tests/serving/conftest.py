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
