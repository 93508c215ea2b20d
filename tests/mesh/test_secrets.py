"""The join key never shows in `ps` or in any log of a full enrollment (real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.mesh.helpers import write_agent_config
from ximd import enrollment, exitcodes
from ximd.commands import enroll as enroll_cmd
from ximd.identity import identity_path


def ps_args() -> str:
    return subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True,
                          check=True).stdout


def ximd_enroll(config, *extra: str, stdin=subprocess.PIPE) -> subprocess.Popen:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "XEROTIER_AGENT_LOG_LEVEL": "debug"}
    return subprocess.Popen([sys.executable, "-m", "ximd.cli", "enroll", "--config", str(config),
                             *extra], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def assert_key_absent(key: str, *texts: str) -> None:
    for text in texts:
        assert key not in text
        assert key[4:] not in text        # not even without its prefix


def test_key_from_stdin_is_never_in_ps_or_logs(router, tmp_path):
    key = router.join_key()
    config = write_agent_config(tmp_path / "agent.toml", url=router.http_url,
                                state_dir=tmp_path / "state")
    proc = ximd_enroll(config, "--join-key-file", "-")
    try:
        # While ximd waits on stdin, and while it enrolls, look at every argv.
        seen = [ps_args() for _ in range(5)]
        proc.stdin.write(key + "\n")
        proc.stdin.close()
        while proc.poll() is None:
            seen.append(ps_args())
            time.sleep(0.02)
        out, err = proc.stdout.read(), proc.stderr.read()    # small: no pipe can fill
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert any("ximd.cli enroll" in s for s in seen)       # we did look while it ran
    identity_text = identity_path(tmp_path / "state").read_text()
    assert_key_absent(key, *seen, out, err, router.log(), identity_text)
    assert enrollment.fingerprint(key) in router.log()     # logs name it by fingerprint
    assert json.loads(identity_text)["join_key_fingerprint"] == enrollment.fingerprint(key)


def test_key_from_the_config_file_is_never_in_ps_or_logs(router, tmp_path):
    key = router.join_key()
    config = write_agent_config(tmp_path / "agent.toml", url=router.http_url,
                                state_dir=tmp_path / "state", join_key=key)
    proc = ximd_enroll(config, stdin=subprocess.DEVNULL)
    seen = []
    while proc.poll() is None:
        seen.append(ps_args())
        time.sleep(0.02)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "enrolled as agent" in out
    assert_key_absent(key, *seen, out, err, router.log())
    # Run again with the same key: "already enrolled", still nothing leaks.
    again = ximd_enroll(config, stdin=subprocess.DEVNULL)
    out2, err2 = again.communicate(timeout=30)
    assert again.returncode == 0 and "already enrolled" in out2
    assert_key_absent(key, out2, err2)


def test_refused_key_is_not_echoed(router, tmp_path):
    key = router.join_key()
    first = write_agent_config(tmp_path / "a.toml", url=router.http_url, state_dir=tmp_path / "a",
                               join_key=key)
    second = write_agent_config(tmp_path / "b.toml", url=router.http_url, state_dir=tmp_path / "b",
                                join_key=key)
    assert ximd_enroll(first, stdin=subprocess.DEVNULL).wait(30) == 0
    proc = ximd_enroll(second, stdin=subprocess.DEVNULL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == exitcodes.EX_REFUSED
    assert "join_key_used" in err and "Traceback" not in err
    assert_key_absent(key, out, err, router.log())


def test_debug_logs_of_an_enrollment_never_hold_the_key(router, tmp_path, caplog, capsys):
    """Every logger at DEBUG (ours, aiohttp's, asyncio's) while main_enroll runs in-process."""
    import asyncio
    import io
    import logging

    from tests.mesh.helpers import load_config

    caplog.set_level(logging.DEBUG)
    key = router.join_key()
    cfg = load_config(write_agent_config(tmp_path / "agent.toml", url=router.http_url,
                                         state_dir=tmp_path / "state"))
    assert asyncio.run(enroll_cmd.main_enroll(cfg, join_key_file="-", stdin=io.StringIO(key))) == 0
    out, err = capsys.readouterr()
    assert "enrolling with" in caplog.text and "standard input" in caplog.text
    assert_key_absent(key, caplog.text, out, err)
