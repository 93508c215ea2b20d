"""Fixtures for the mesh tests: a real xim-router subprocess and agent configs pointing at it."""

from __future__ import annotations

import logging

import pytest
import trustme

from tests.mesh.helpers import load_config, write_agent_config
from tests.support.router import RouterProcess
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


@pytest.fixture
def tls_router(tmp_path):
    """A real `xim-router serve` over HTTPS with a test CA: (router, the CA's PEM path)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    proc = RouterProcess(tmp_path, tls=(cert_path, key_path))
    try:
        yield proc.start(), ca_path
    finally:
        proc.stop()
