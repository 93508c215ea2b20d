"""Finding 10: configuration errors echoed secret values into the journal and STATUS=.

A bad join key or Redis URL (with its password) in agent.toml, the environment
or `--set` must be reported by key and source with its value masked — by
`ximd config validate`, `ximd config show` and a real `ximd run`, whose log and
sd_notify STATUS= the journal keeps.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.daemon import Daemon
from ximd.exitcodes import EX_CONFIG

JOIN_KEY_SECRET = "JKSECRET0123456789abcdef"
PASSWORD = "hunter2-redis-password"
BAD_FILES = {
    "a join key without its prefix": f'[router]\njoin_key = "key_{JOIN_KEY_SECRET}"\n',
    "a redis URL with the wrong scheme": f'[lmcache]\nredis_url = "http://:{PASSWORD}@cache.lan:6379"\n',
    "a redis URL without a host": f'[lmcache]\nredis_url = "redis://:{PASSWORD}@"\n',
}
SECRETS = (JOIN_KEY_SECRET, PASSWORD)


def ximd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ximd.cli", *args], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", **(env or {})})


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a secret value is echoed: {text!r}"


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_config_validate_masks_secret_values(tmp_path, case):
    path = tmp_path / "agent.toml"
    path.write_text(BAD_FILES[case])
    result = ximd("config", "validate", str(path))
    assert result.returncode == EX_CONFIG
    assert f"{path}:2:" in result.stderr            # still names the file, line and key
    assert_no_secret(result.stdout + result.stderr)


def test_environment_and_set_flag_mask_secret_values(tmp_path):
    env_result = ximd("config", "show", env={"XEROTIER_AGENT_CONFIG": str(tmp_path / "none.toml"),
                                             "XEROTIER_AGENT_LMCACHE_REDIS_URL": f"ftp://u:{PASSWORD}@h:1"})
    flag_result = ximd("config", "show", "--set", f"router.join_key=key_{JOIN_KEY_SECRET}",
                       env={"XEROTIER_AGENT_CONFIG": str(tmp_path / "none.toml")})
    for result, key in ((env_result, "lmcache.redis_url"), (flag_result, "router.join_key")):
        assert result.returncode == EX_CONFIG and key in result.stderr, result.stderr
        assert_no_secret(result.stdout + result.stderr)


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_the_daemon_keeps_secrets_out_of_its_log_and_status(tmp_path, case):
    daemon = Daemon(tmp_path, config=BAD_FILES[case])
    try:
        daemon.start()
        assert daemon.wait(timeout=30) == EX_CONFIG
        daemon.notify.poll(0.5)
        statuses = [fields.get("STATUS", "") for _, fields in daemon.notify.messages]
        assert any("invalid configuration" in s for s in statuses), statuses
        assert_no_secret(daemon.log())
        assert_no_secret("\n".join(statuses))
    finally:
        daemon.stop()
