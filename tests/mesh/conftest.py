"""Fixtures for the mesh tests: a real xim-router subprocess and agent configs pointing at it."""

from __future__ import annotations

import logging

import pytest

from tests.mesh.helpers import load_config, write_agent_config
from xim_router import store as store_mod
from ximd import config as configmod


@pytest.fixture
def store(tmp_path):
    """A router store in a fresh state directory."""
    s = store_mod.Store(tmp_path / "state")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def agent_cfg(tmp_path, router):
    """A factory: agent_cfg(**router_keys) -> Config pointing at the router fixture."""
    def make(name: str = "agent", **kw) -> configmod.Config:
        kw.setdefault("url", router.http_url)
        path = write_agent_config(tmp_path / f"{name}.toml", state_dir=tmp_path / f"{name}-state", **kw)
        return load_config(path)
    return make


@pytest.fixture
def mesh_log(caplog):
    caplog.set_level(logging.DEBUG, logger="ximd")
    return caplog
