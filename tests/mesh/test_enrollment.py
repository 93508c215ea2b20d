"""Enrollment against a real xim-router: identity on disk, refusals, TLS, the key policy."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import stat

import pytest

from tests.mesh.helpers import enroll_fresh, load_config, write_agent_config
from ximd import enrollment, exitcodes
from ximd.commands import enroll as enroll_cmd
from ximd.enrollment import EnrollmentRejected, RouterConfigError, RouterUnreachable
from ximd.identity import IdentityError, identity_path


def enroll(cfg, key):
    return asyncio.run(enrollment.enroll(cfg, key, hostname="test-node", hardware={}))


def test_fresh_key_gives_an_identity_file_0600_in_a_0700_directory(router, agent_cfg):
    cfg = agent_cfg()
    identity = enroll_fresh(router, cfg, model="tiny")
    path = identity_path(cfg.agent.state_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert enrollment.load_identity(cfg.agent.state_dir) == identity
    assert identity.router_public_key == router.public_key
    assert identity.mesh_endpoints == (router.mesh_endpoint,)
    assert identity.assigned_model == "tiny"
    assert identity.token_expires_at > identity.enrolled_at
    saved = json.loads(path.read_text())
    assert saved["join_key_fingerprint"].startswith("sha256:")
    agent = router.agent(identity.agent_id)
    assert (agent["state"], agent["worker_id"], agent["hostname"]) == (
        "pending", identity.worker_id, "test-node")


def test_secret_material_stays_out_of_repr(router, agent_cfg):
    identity = enroll_fresh(router, agent_cfg())
    assert identity.agent_secret_key not in repr(identity)
    assert identity.token not in repr(identity)


def test_used_key_is_refused_clearly(router, agent_cfg):
    key = router.join_key()
    enroll(agent_cfg("first"), key)
    with pytest.raises(EnrollmentRejected) as info:
        enroll(agent_cfg("second"), key)
    assert (info.value.code, info.value.status) == ("join_key_used", 403)


def test_multi_use_key(router, agent_cfg):
    key = router.join_key(uses=2)
    a, b = enroll(agent_cfg("a"), key), enroll(agent_cfg("b"), key)
    assert a.agent_id != b.agent_id and a.worker_id != b.worker_id
    with pytest.raises(EnrollmentRejected, match="join_key_used"):
        enroll(agent_cfg("c"), key)


def test_expired_key_is_refused_clearly(router, agent_cfg):
    key = router.join_key(ttl="1s")
    import time
    time.sleep(1.2)
    with pytest.raises(EnrollmentRejected) as info:
        enroll(agent_cfg(), key)
    assert (info.value.code, info.value.status) == ("join_key_expired", 403)


def test_unknown_key_is_refused(router, agent_cfg):
    with pytest.raises(EnrollmentRejected) as info:
        enroll(agent_cfg(), "xjk_" + "A" * 43)
    assert (info.value.code, info.value.status) == ("invalid_join_key", 401)


def test_main_enroll_with_a_used_key_exits_1_with_one_clear_line(router, agent_cfg, tmp_path, capsys):
    key = router.join_key()
    enroll(agent_cfg("first"), key)
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    cfg = agent_cfg("second", join_key_file=str(key_file))
    assert asyncio.run(enroll_cmd.main_enroll(cfg)) == exitcodes.EX_REFUSED
    err = capsys.readouterr().err
    assert "already been used (join_key_used)" in err
    assert "Traceback" not in err and key not in err
    assert enrollment.load_identity(cfg.agent.state_dir) is None


def test_plain_http_needs_the_allow_http_switch(router, agent_cfg, capsys):
    cfg = agent_cfg(insecure=False, join_key=router.join_key())
    with pytest.raises(RouterConfigError, match="router.allow_http"):
        enroll(cfg, cfg.router.join_key)
    assert asyncio.run(enroll_cmd.main_enroll(cfg)) == exitcodes.EX_CONFIG
    assert "router.allow_http = true" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_router_is_retry_later(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    cfg = load_config(write_agent_config(tmp_path / "a.toml", url=url, state_dir=tmp_path / "s",
                                         join_key="xjk_" + "B" * 43))
    with pytest.raises(RouterUnreachable, match="cannot reach the router"):
        enroll(cfg, cfg.router.join_key)
    assert asyncio.run(enroll_cmd.main_enroll(cfg)) == exitcodes.EX_UNAVAILABLE
    assert "try again later" in capsys.readouterr().err


def test_no_router_url(tmp_path):
    cfg = load_config(write_agent_config(tmp_path / "a.toml", url="", state_dir=tmp_path / "s"))
    with pytest.raises(RouterConfigError, match="router.url is not set"):
        enroll(cfg, "xjk_" + "C" * 43)


# ---------------------------------------------------------------- HTTPS


def test_https_enrollment_with_a_ca_file(tls_router, tmp_path):
    router, ca_path = tls_router
    assert router.http_url.startswith("https://")
    cfg = load_config(write_agent_config(tmp_path / "a.toml", url=router.http_url,
                                         state_dir=tmp_path / "s", insecure=False,
                                         ca_file=str(ca_path)))
    identity = enroll(cfg, router.join_key())
    assert identity.router_url == router.http_url
    renewed = asyncio.run(enrollment.refresh(cfg, identity))
    assert renewed.token != identity.token


def test_https_without_the_ca_is_not_trusted(tls_router, tmp_path):
    router, _ = tls_router
    cfg = load_config(write_agent_config(tmp_path / "a.toml", url=router.http_url,
                                         state_dir=tmp_path / "s", insecure=False))
    with pytest.raises(RouterUnreachable, match="not trusted.*router.ca_file"):
        enroll(cfg, router.join_key())


def test_https_unverified_only_with_insecure(tls_router, tmp_path):
    router, _ = tls_router
    cfg = load_config(write_agent_config(tmp_path / "a.toml", url=router.http_url,
                                         state_dir=tmp_path / "s", insecure=True))
    assert enroll(cfg, router.join_key()).worker_id


def test_unreadable_ca_file_names_the_setting(tmp_path):
    with pytest.raises(RouterConfigError, match="router.ca_file"):
        enrollment.router_ssl("https://r.example", load_config(write_agent_config(
            tmp_path / "a.toml", url="https://r.example", state_dir=tmp_path / "s", insecure=False,
            ca_file=str(tmp_path / "missing.pem"))).router)


# ---------------------------------------------------------------- identity file


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_root_writes_files_owned_by_the_state_directory_owner(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    identity = enrollment.Identity(
        agent_id="a", worker_id="w", router_url="https://r", mesh_endpoints=("tcp://r:1",),
        router_public_key="k" * 40, agent_public_key="p" * 40, agent_secret_key="s" * 40,
        token="xat_t", token_expires_at=2.0, enrolled_at=1.0)
    path = enrollment.save_identity(state, identity)
    for p in (path, path.parent):
        assert (p.stat().st_uid, p.stat().st_gid) == (65534, 65534)
    assert not list(path.parent.glob(".*.tmp"))


@pytest.mark.parametrize("content, detail", [
    ("{not json", "not a valid identity"),
    ("[]", "not a JSON object"),
    ('{"format": 99}', "format 99"),
    ('{"format": 1, "agent_id": "a"}', "is missing"),
])
def test_corrupt_identity_is_a_clear_error(tmp_path, content, detail, capsys):
    path = identity_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(IdentityError, match=detail) as info:
        enrollment.load_identity(tmp_path)
    assert "ximd enroll" in str(info.value)
    cfg = load_config(write_agent_config(tmp_path / "a.toml", url="http://127.0.0.1:9",
                                         state_dir=tmp_path))
    assert asyncio.run(enroll_cmd.main_enroll(cfg)) == exitcodes.EX_CONFIG
    assert "--force" in capsys.readouterr().err


def test_missing_identity_is_none(tmp_path):
    assert enrollment.load_identity(tmp_path) is None


# ---------------------------------------------------------------- the join key's sources


def cfg_with(tmp_path, **kw):
    return load_config(write_agent_config(tmp_path / "k.toml", url="http://127.0.0.1:9",
                                          state_dir=tmp_path / "s", **kw))


KEY = "xjk_" + "k" * 43
OTHER = "xjk_" + "o" * 43


def test_join_key_sources_in_order(tmp_path):
    key_file = tmp_path / "key.txt"
    key_file.write_text(OTHER + "\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "join-key").write_text("xjk_" + "c" * 43)
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    # (the config refuses router.join_key and router.join_key_file together)
    in_config = cfg_with(tmp_path, join_key=KEY)
    assert enrollment.read_join_key(in_config, environ=env) == (
        KEY, f"router.join_key ({tmp_path / 'k.toml'})")
    assert enrollment.read_join_key(in_config, join_key_file="-", stdin=io.StringIO("xjk_" + "s" * 43),
                                    environ=env) == ("xjk_" + "s" * 43, "standard input")
    file_only = cfg_with(tmp_path, join_key_file=str(key_file))
    assert enrollment.read_join_key(file_only, environ=env) == (
        OTHER, f"router.join_key_file {key_file}")
    assert enrollment.read_join_key(cfg_with(tmp_path), environ=env) == (
        "xjk_" + "c" * 43, "systemd credential join-key")
    assert enrollment.read_join_key(cfg_with(tmp_path), environ={}) is None


def test_blank_credential_is_no_key(tmp_path):
    # The unit's fallback SetCredential=join-key:\n when /etc/xerotier/join-key is absent.
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "join-key").write_text("\n")
    assert enrollment.read_join_key(cfg_with(tmp_path), environ={"CREDENTIALS_DIRECTORY": str(creds)}) is None


def test_join_key_file_dash_means_stdin_in_config_too(tmp_path):
    cfg = cfg_with(tmp_path, join_key_file="-")
    assert enrollment.read_join_key(cfg, stdin=io.StringIO(KEY), environ={})[0] == KEY


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("not-a-key", "is not a join key"),
    ("xjk_short", "is not a join key"),
    ("xjk_" + "a" * 20 + " with spaces", "is not a join key"),
])
def test_bad_join_key_is_a_clear_error_without_the_value(tmp_path, text, message):
    with pytest.raises(enrollment.JoinKeyError, match=message) as info:
        enrollment.read_join_key(cfg_with(tmp_path), join_key_file="-", stdin=io.StringIO(text),
                                 environ={})
    if text:
        assert text not in str(info.value)


def test_unreadable_join_key_file(tmp_path, capsys):
    cfg = cfg_with(tmp_path, join_key_file=str(tmp_path / "absent"))
    with pytest.raises(enrollment.JoinKeyError, match="cannot read the join key file"):
        enrollment.read_join_key(cfg, environ={})
    assert asyncio.run(enroll_cmd.main_enroll(cfg)) == exitcodes.EX_CONFIG


def test_no_key_at_all_says_where_to_put_one(tmp_path, capsys):
    assert asyncio.run(enroll_cmd.main_enroll(cfg_with(tmp_path))) == exitcodes.EX_CONFIG
    err = capsys.readouterr().err
    assert "--join-key-file" in err and "router.join_key" in err


# ---------------------------------------------------------------- policy once enrolled


def test_same_key_again_is_fine_and_a_different_one_needs_force(router, agent_cfg, tmp_path, capsys):
    key = router.join_key()
    cfg = agent_cfg(join_key=key)
    assert asyncio.run(enroll_cmd.main_enroll(cfg)) == 0
    first = enrollment.load_identity(cfg.agent.state_dir)
    capsys.readouterr()
    # The same key still in the config: nothing to do, exit 0.
    assert asyncio.run(enroll_cmd.main_enroll(cfg)) == 0
    assert "already enrolled as agent " + first.agent_id in capsys.readouterr().out
    # A different key: said plainly, names --force, changes nothing.
    new_key = router.join_key()
    cfg2 = agent_cfg(join_key=new_key)
    assert asyncio.run(enroll_cmd.main_enroll(cfg2)) == exitcodes.EX_REFUSED
    err = capsys.readouterr().err
    assert "ximd enroll --force" in err and new_key not in err
    assert enrollment.load_identity(cfg.agent.state_dir) == first
    # --force enrolls anew and unenrolls the old identity on the router.
    assert asyncio.run(enroll_cmd.main_enroll(cfg2, force=True)) == 0
    second = enrollment.load_identity(cfg.agent.state_dir)
    assert second.agent_id != first.agent_id
    assert router.agent(first.agent_id)["state"] == "unenrolled"


def policy_levels(caplog) -> list[int]:
    """The levels enrollment logged: on a loaded machine other loggers (asyncio, aiohttp
    noticing a collected session late) may add records of their own; they are not ours."""
    return [r.levelno for r in caplog.records if r.name == "ximd.enrollment"]


def test_ensure_identity_logs_the_policy(router, agent_cfg, caplog):
    caplog.set_level(logging.INFO, logger="ximd.enrollment")
    key = router.join_key()
    cfg = agent_cfg(join_key=key)
    status = asyncio.run(enrollment.ensure_identity(cfg))
    assert status.identity is not None
    caplog.clear()
    again = asyncio.run(enrollment.ensure_identity(cfg))
    assert again.identity == status.identity
    assert policy_levels(caplog) == [logging.INFO]
    assert "can be removed" in caplog.text
    caplog.clear()
    other = agent_cfg(join_key=router.join_key())
    assert asyncio.run(enrollment.ensure_identity(other)).identity == status.identity
    assert policy_levels(caplog) == [logging.WARNING]
    assert "ximd enroll --force" in caplog.text
    assert key not in caplog.text


def test_ensure_identity_without_key_or_with_a_refused_key(router, agent_cfg):
    assert asyncio.run(enrollment.ensure_identity(agent_cfg("none"))).reason == "not enrolled: no join key"
    used = router.join_key()
    enroll(agent_cfg("first"), used)
    status = asyncio.run(enrollment.ensure_identity(agent_cfg("second", join_key=used)))
    assert status.identity is None and not status.retry
    assert "join_key_used" in status.reason


def test_ensure_identity_retries_later_when_the_router_is_down(tmp_path):
    cfg = load_config(write_agent_config(tmp_path / "a.toml", url=f"http://127.0.0.1:{free_port()}",
                                         state_dir=tmp_path / "s", join_key=KEY))
    status = asyncio.run(enrollment.ensure_identity(cfg))
    assert status.identity is None and status.retry


# ---------------------------------------------------------------- refresh and unenroll


def test_refresh_then_revoke(router, agent_cfg):
    cfg = agent_cfg()
    identity = enroll_fresh(router, cfg)
    renewed = asyncio.run(enrollment.token_refresher(cfg)(identity))
    assert renewed.token != identity.token
    assert enrollment.load_identity(cfg.agent.state_dir).token == renewed.token
    router.revoke(identity.agent_id)
    with pytest.raises(EnrollmentRejected) as info:
        asyncio.run(enrollment.refresh(cfg, renewed))
    assert (info.value.code, info.value.status) == ("revoked", 401)


def test_unenroll(router, agent_cfg, capsys):
    cfg = agent_cfg()
    identity = enroll_fresh(router, cfg)
    assert asyncio.run(enroll_cmd.main_unenroll(cfg)) == 0
    assert enrollment.load_identity(cfg.agent.state_dir) is None
    assert router.agent(identity.agent_id)["state"] == "unenrolled"
    assert asyncio.run(enroll_cmd.main_unenroll(cfg)) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_unenroll_keeps_the_identity_when_the_router_is_unreachable(tmp_path, capsys):
    cfg = load_config(write_agent_config(tmp_path / "a.toml", url="http://127.0.0.1:9",
                                         state_dir=tmp_path / "s"))
    identity = enrollment.Identity(
        agent_id="a", worker_id="w", router_url=f"http://127.0.0.1:{free_port()}",
        mesh_endpoints=("tcp://127.0.0.1:1",), router_public_key="k" * 40,
        agent_public_key="p" * 40, agent_secret_key="s" * 40, token="xat_t",
        token_expires_at=2.0, enrolled_at=1.0)
    enrollment.save_identity(cfg.agent.state_dir, identity)
    assert asyncio.run(enroll_cmd.main_unenroll(cfg)) == exitcodes.EX_UNAVAILABLE
    assert enrollment.load_identity(cfg.agent.state_dir) == identity
    assert "identity was kept" in capsys.readouterr().err
