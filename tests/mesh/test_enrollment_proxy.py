"""Enrollment behind a proxy: HTTPS_PROXY/HTTP_PROXY are honoured and NO_PROXY skips them.

A real proxy on loopback (tests/support/proxy.py) records what it was asked; the
router is the real xim-router, over HTTPS (a CONNECT tunnel) and plain HTTP.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.mesh.helpers import load_config, write_agent_config
from tests.support.proxy import Proxy
from ximd import enrollment

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                   "NO_PROXY", "no_proxy")


@pytest.fixture
def clean_proxy_env(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def enroll_over_https(router, ca_path, tmp_path):
    cfg = load_config(write_agent_config(tmp_path / "a.toml", url=router.http_url, state_dir=tmp_path / "s",
                                         insecure=False, ca_file=str(ca_path)))
    return asyncio.run(enrollment.enroll(cfg, router.join_key(), hostname="proxied", hardware={}))


def test_https_enrollment_goes_through_https_proxy(tls_router, tmp_path, clean_proxy_env):
    router, ca_path = tls_router
    with Proxy() as proxy:
        clean_proxy_env.setenv("HTTPS_PROXY", proxy.url)
        identity = enroll_over_https(router, ca_path, tmp_path)
    authority = router.http_url.removeprefix("https://").rstrip("/")
    assert proxy.requests == [f"CONNECT {authority} HTTP/1.1"]
    assert router.agent(identity.agent_id)["hostname"] == "proxied"


def test_no_proxy_skips_the_proxy(tls_router, tmp_path, clean_proxy_env):
    router, ca_path = tls_router
    with Proxy() as proxy:
        clean_proxy_env.setenv("HTTPS_PROXY", proxy.url)
        clean_proxy_env.setenv("NO_PROXY", "localhost,127.0.0.1")
        identity = enroll_over_https(router, ca_path, tmp_path)
    assert proxy.requests == []
    assert router.agent(identity.agent_id)["hostname"] == "proxied"


def test_plain_http_enrollment_goes_through_http_proxy(router, tmp_path, clean_proxy_env):
    cfg = load_config(write_agent_config(tmp_path / "a.toml", url=router.http_url, state_dir=tmp_path / "s"))
    with Proxy() as proxy:
        clean_proxy_env.setenv("HTTP_PROXY", proxy.url)
        asyncio.run(enrollment.enroll(cfg, router.join_key(), hostname="proxied", hardware={}))
    assert len(proxy.requests) == 1
    assert proxy.requests[0].startswith(f"POST {router.http_url.rstrip('/')}/") and "enroll" in proxy.requests[0]
