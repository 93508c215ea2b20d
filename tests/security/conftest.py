"""Fixtures for the hostile-node tests (`router`, a real xim-router, comes from tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.mesh.helpers import load_config, write_agent_config
from ximd import config as configmod


@pytest.fixture
def agent_cfg(tmp_path, router):
    """A factory: agent_cfg(name) -> Config of an agent enrolling with the module's router."""
    def make(name: str = "agent") -> configmod.Config:
        path = write_agent_config(tmp_path / f"{name}.toml", url=router.http_url,
                                  state_dir=tmp_path / f"{name}-state")
        return load_config(path)
    return make
