"""Fixtures every tier shares."""

from __future__ import annotations

import pytest

from tests.support.router import RouterProcess


@pytest.fixture
def router(tmp_path):
    """A real `xim-router serve` in its own state directory, stopped after the test."""
    with RouterProcess(tmp_path) as proc:
        yield proc
