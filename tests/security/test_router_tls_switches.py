"""Finding 10: `router.insecure` silently turned certificate checks off.

One switch meant both "allow plain http" and "skip verification", so a node
set up for an http test router also trusted any certificate, without a word.
Now `router.allow_http` and `router.tls_skip_verify` are separate, skipping the
check is logged every time, and `router.insecure` is a deprecated alias that
warns. Driven against real `xim-router serve` processes, over http and https.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.mesh.helpers import load_config, toml_str
from tests.support.router import RouterProcess
from tests.support.tls import loopback_cert
from ximd import enrollment
from ximd.enrollment import RouterConfigError, RouterUnreachable


@pytest.fixture
def tls_router(tmp_path):
    _, cert_path, key_path = loopback_cert(tmp_path)
    with RouterProcess(tmp_path, tls=(cert_path, key_path)) as router:
        yield router


@pytest.fixture
def plain_router(tmp_path):
    (tmp_path / "plain").mkdir()
    with RouterProcess(tmp_path / "plain") as router:
        yield router


def node_config(tmp_path, url: str, **router_keys: bool):
    lines = ["[agent]", f"state_dir = {toml_str(str(tmp_path / 'node'))}", "", "[router]",
             f"url = {toml_str(url)}"]
    lines += [f"{key} = {'true' if value else 'false'}" for key, value in router_keys.items()]
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path)


def enroll(cfg, router: RouterProcess):
    return asyncio.run(enrollment.enroll(cfg, router.join_key(), hostname="n", hardware={}))


def test_allow_http_does_not_skip_certificate_checks(tmp_path, plain_router, tls_router):
    cfg = node_config(tmp_path, plain_router.http_url, allow_http=True)
    assert enroll(cfg, plain_router).agent_id
    https = node_config(tmp_path, tls_router.http_url, allow_http=True)
    with pytest.raises(RouterUnreachable, match="not trusted"):
        enroll(https, tls_router)


def test_skipping_verification_is_said_every_time(tmp_path, tls_router, caplog):
    caplog.set_level(logging.WARNING, logger="ximd.enrollment")
    cfg = node_config(tmp_path, tls_router.http_url, tls_skip_verify=True)
    assert enroll(cfg, tls_router).agent_id
    assert "router.tls_skip_verify: the certificate of" in caplog.text
    with pytest.raises(RouterConfigError, match="router.allow_http"):
        enroll(node_config(tmp_path, "http://127.0.0.1:9", tls_skip_verify=True), tls_router)


def test_insecure_is_a_deprecated_alias_that_warns(tmp_path, tls_router, caplog):
    caplog.set_level(logging.WARNING, logger="ximd.enrollment")
    cfg = node_config(tmp_path, tls_router.http_url, insecure=True)
    assert (cfg.router.allow_http, cfg.router.tls_skip_verify) == (True, True)
    assert any("router.insecure" in w and "deprecated" in w and "certificate" in w for w in cfg.warnings)
    assert enroll(cfg, tls_router).agent_id
    assert "router.tls_skip_verify: the certificate of" in caplog.text
    # Each setting given on its own still wins over what the alias implies.
    own = node_config(tmp_path, tls_router.http_url, insecure=True, tls_skip_verify=False)
    assert (own.router.allow_http, own.router.tls_skip_verify) == (True, False)
    with pytest.raises(RouterUnreachable, match="not trusted"):
        enroll(own, tls_router)
