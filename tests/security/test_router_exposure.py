"""Finding 9: the router's exposure defaults, through the real `xim-router` CLI and server.

- `serve` refused nothing: plain HTTP with no API key on 0.0.0.0 started silently.
  Now it exits 2 naming the flags, unless --allow-insecure-http; the other unsafe
  combinations start with a warning in the log.
- Enrollment and the OpenAI API shared one listener: --enroll-http splits them.
- There was no `join-key list` / `join-key revoke`.
- `join-key create --model` took any text, a path or a flag included.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.mesh.helpers import load_config, write_agent_config
from tests.support.router import RouterProcess
from tests.support.tls import loopback_cert
from xim_proto import joinkey
from ximd import enrollment
from ximd.enrollment import EnrollmentRejected

API_KEY = "sk-exposure-test"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xim_router.cli", *args], capture_output=True,
                          text=True, timeout=60)


def request(url: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def key_file(tmp_path: Path) -> str:
    path = tmp_path / "api-keys"
    path.write_text(API_KEY + "\n")
    return str(path)


@pytest.fixture
def tls_files(tmp_path):
    _, cert_path, key_path = loopback_cert(tmp_path)
    return cert_path, key_path


# ---------------------------------------------------------------- serve refuses / warns


@pytest.mark.parametrize("http", ["0.0.0.0:0", "[::]:0", "router.example.invalid:0"])
def test_public_plain_http_without_api_keys_is_refused(tmp_path, http):
    port = free_port()
    result = cli("serve", "--state-dir", str(tmp_path / "s"), "--http", http,
                 "--mesh", f"tcp://127.0.0.1:{port}")
    assert result.returncode == 2, f"serve on {http} with no TLS and no API key: {result.returncode}\n{result.stderr}"
    for flag in ("--allow-insecure-http", "--tls-cert", "--api-key-file"):
        assert flag in result.stderr
    assert "Traceback" not in result.stderr and "xim-router serving" not in result.stdout


def test_allow_insecure_http_starts_with_a_loud_warning(tmp_path):
    with RouterProcess(tmp_path, http="0.0.0.0:0", extra_args=("--allow-insecure-http",)) as router:
        assert request(router.http_url + "/healthz")[0] == 200
        assert "UNSAFE (--allow-insecure-http)" in router.log()


def test_tls_without_api_keys_on_a_public_address_warns(tmp_path, tls_files):
    with RouterProcess(tmp_path, http="0.0.0.0:0", tls=tls_files) as router:
        assert router.http_url.startswith("https://")
        assert "needs no API key" in router.log()


def test_api_keys_over_plain_http_on_a_public_address_warn(tmp_path):
    with RouterProcess(tmp_path, http="0.0.0.0:0",
                       extra_args=("--api-key-file", key_file(tmp_path))) as router:
        assert "cross the network in clear" in router.log()
        assert request(router.http_url + "/v1/models")[0] == 401
        assert request(router.http_url + "/v1/models", key=API_KEY)[0] == 200


def test_loopback_and_protected_public_listeners_start_quietly(tmp_path, tls_files):
    (tmp_path / "loopback").mkdir()
    with RouterProcess(tmp_path / "loopback") as router:
        assert "UNSAFE" not in router.log()
    with RouterProcess(tmp_path, http="0.0.0.0:0", tls=tls_files,
                       extra_args=("--api-key-file", key_file(tmp_path))) as router:
        assert "UNSAFE" not in router.log()


# ---------------------------------------------------------------- a separate enrollment listener


def test_enrollment_on_its_own_listener(tmp_path):
    with RouterProcess(tmp_path, extra_args=("--enroll-http", "127.0.0.1:0", "--api-key-file",
                                             key_file(tmp_path))) as router:
        assert router.enroll_url and router.enroll_url != router.http_url
        # The OpenAI API's listener knows no enrollment, the enrollment listener no API.
        assert request(router.http_url + "/v1/enroll", {})[0] == 404
        assert request(router.enroll_url + "/v1/chat/completions", {"model": "m"}, key=API_KEY)[0] == 404
        assert request(router.enroll_url + "/v1/models", key=API_KEY)[0] == 404
        assert request(router.http_url + "/v1/models", key=API_KEY)[0] == 200
        # A node enrolls, refreshes and unenrolls at the enrollment address.
        cfg = load_config(write_agent_config(tmp_path / "agent.toml", url=router.enroll_url,
                                             state_dir=tmp_path / "agent-state"))
        identity = asyncio.run(enrollment.enroll(cfg, router.join_key(), hostname="n", hardware={}))
        assert identity.router_url == router.enroll_url
        renewed = asyncio.run(enrollment.refresh(cfg, identity))
        asyncio.run(enrollment.unenroll(cfg, renewed))
        assert router.agent(identity.agent_id)["state"] == "unenrolled"


def test_a_public_plain_enrollment_listener_warns(tmp_path):
    with RouterProcess(tmp_path, extra_args=("--enroll-http", "0.0.0.0:0")) as router:
        assert "--enroll-http 0.0.0.0:0 is not a loopback address" in router.log()


# ---------------------------------------------------------------- join-key list / revoke


def test_join_key_list_shows_everything_but_the_key(tmp_path):
    state = str(tmp_path / "s")
    plain = cli("join-key", "create", "--state-dir", state, "--uses", "3", "--allow-any-model").stdout.strip()
    assigned = cli("join-key", "create", "--state-dir", state, "--model", "org/model-1").stdout.strip()
    listed = cli("join-key", "list", "--state-dir", state)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(cli("join-key", "list", "--state-dir", state, "--format", "json").stdout)
    assert [(r["fingerprint"], r["uses_left"], r["model"], r["state"]) for r in rows] == [
        (joinkey.fingerprint(plain), 3, None, "valid"), (joinkey.fingerprint(assigned), 1, "org/model-1", "valid")]
    for shown in (listed.stdout, json.dumps(rows)):
        assert plain not in shown and assigned not in shown
    assert joinkey.fingerprint(plain) in listed.stdout and "org/model-1" in listed.stdout
    assert cli("join-key", "list", "--state-dir", str(tmp_path / "empty")).stdout.strip() == "no join keys"


def test_a_revoked_join_key_enrolls_nobody(tmp_path):
    with RouterProcess(tmp_path) as router:
        key = router.join_key(uses=5)
        kept = router.join_key()
        revoked_now = router.admin("join-key", "revoke", joinkey.fingerprint(key))
        assert "revoked join key" in revoked_now.stdout
        cfg = load_config(write_agent_config(tmp_path / "agent.toml", url=router.http_url,
                                             state_dir=tmp_path / "agent-state"))
        with pytest.raises(EnrollmentRejected) as refused:
            asyncio.run(enrollment.enroll(cfg, key, hostname="n", hardware={}))
        assert refused.value.code == "join_key_expired"
        # Another key still enrolls.
        assert asyncio.run(enrollment.enroll(cfg, kept, hostname="n", hardware={})).agent_id
        rows = json.loads(router.admin("join-key", "list", "--format", "json").stdout)
        revoked = next(r for r in rows if r["fingerprint"] == joinkey.fingerprint(key))
        assert (revoked["uses_left"], revoked["state"]) == (0, "expired")
        again = router.admin("join-key", "revoke", joinkey.fingerprint(key), check=False)
        assert again.returncode == 1 and "already expired or used up" in again.stderr
        unknown = router.admin("join-key", "revoke", "sha256:000000000000", check=False)
        assert unknown.returncode == 1 and "no join key sha256:000000000000" in unknown.stderr


@pytest.mark.parametrize("model", ["/etc/shadow", "../models/x", "--model=--trust-remote-code", "org/../x",
                                   "a/b/c", "org/name with space"])
def test_join_key_create_takes_only_model_ids(tmp_path, model):
    argv = [model] if model.startswith("--model=") else ["--model", model]
    result = cli("join-key", "create", "--state-dir", str(tmp_path / "s"), *argv)
    assert result.returncode == 2, f"--model {model!r} accepted"
    assert "is not a Hugging Face model id" in result.stderr and "xjk_" not in result.stdout
