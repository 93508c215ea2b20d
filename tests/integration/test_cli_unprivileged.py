"""The commands run by a user who is neither root nor in the xerotier group: one clear sentence, exit 77.

Run for real: the test (as root) drops to `nobody` with setpriv against files that
user may not read, as an operator's own account meets /etc/xerotier/agent.toml
(0640 root:xerotier), the control socket and the identity.
"""

from __future__ import annotations

import grp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ximd.exitcodes import EX_NOPERM

REPO = Path(__file__).resolve().parents[2]
GROUP = "users"            # a group nobody is not in; its name must come back in the message

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="dropping to another user needs root and setpriv (util-linux)")


@pytest.fixture(scope="module", autouse=True)
def nobody_can_import_ximd():
    """A checkout under a private directory (a `mktemp -d`, say) cannot be imported by
    `nobody`: that is the checkout's place, not what these tests are about."""
    probe = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                            sys.executable, "-c", "import ximd"], capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}, cwd="/", timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot import ximd from {REPO} with {sys.executable} "
                    f"({probe.stderr.strip().splitlines()[-1:]}): clone where others may enter")


def as_nobody(*argv: str, config: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "XEROTIER_AGENT_CONFIG": str(config),
           "LANG": "C.UTF-8"}
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           sys.executable, "-m", "ximd", *argv],
                          capture_output=True, text=True, env=env, cwd="/", timeout=60)


@pytest.fixture
def place():
    """A directory everyone may enter (pytest's own temporary directories are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="ximd-unprivileged-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def config_file(place: Path, text: str, mode: int) -> Path:
    path = place / "agent.toml"
    path.write_text(text)
    os.chown(path, 0, grp.getgrnam(GROUP).gr_gid)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("command", [["status"], ["doctor"], ["plan"], ["config", "show"], ["model", "list"],
                                     ["reexec"], ["enroll"], ["unenroll"]])
def test_a_config_the_user_may_not_read_says_who_may(place, command):
    config = config_file(place, "[agent]\nlog_level = \"info\"\n", 0o640)
    done = as_nobody(*command, config=config)
    assert done.returncode == EX_NOPERM, done.stderr
    assert f"`ximd {' '.join(command)}` needs root or membership of the {GROUP} group" in done.stderr
    assert f"nobody may not read {config}" in done.stderr
    assert "invalid configuration" not in done.stderr and "Traceback" not in done.stderr


def test_config_validate_of_an_unreadable_file(place):
    config = config_file(place, "[agent]\n", 0o640)
    done = as_nobody("config", "validate", str(config), config=config)
    assert done.returncode == EX_NOPERM and "needs root or membership" in done.stderr, done.stderr


def test_unreadable_dropin_directory_is_the_same(place):
    config = config_file(place, "[agent]\n", 0o644)
    dropins = place / "agent.toml.d"
    dropins.mkdir(mode=0o750)
    (dropins / "10.toml").write_text("[agent]\n")
    done = as_nobody("config", "show", config=config)
    assert done.returncode == EX_NOPERM, done.stderr
    assert f"may not read {dropins}" in done.stderr and "Traceback" not in done.stderr


def test_a_root_only_control_socket_says_who_may(place):
    runtime = place / "run"
    runtime.mkdir(mode=0o755)
    config = config_file(place, f'[agent]\nruntime_dir = "{runtime}"\n', 0o644)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(runtime / "control.sock"))
    listener.listen()
    os.chown(runtime / "control.sock", 0, grp.getgrnam(GROUP).gr_gid)
    os.chmod(runtime / "control.sock", 0o660)
    try:
        for command in ("status", "reexec"):
            done = as_nobody(command, config=config)
            assert done.returncode == EX_NOPERM, done.stderr
            assert f"needs root or membership of the {GROUP} group: nobody may not connect to " \
                   f"{runtime / 'control.sock'}" in done.stderr
    finally:
        listener.close()


def test_an_identity_only_the_service_account_may_read_needs_root(place):
    state = place / "state"
    (state / "enrollment").mkdir(parents=True)
    (state / "enrollment" / "identity.json").write_text("{}")
    os.chmod(state, 0o700)
    config = config_file(place, f'[agent]\nstate_dir = "{state}"\n', 0o644)
    for command in ("enroll", "unenroll"):
        done = as_nobody(command, config=config)
        assert done.returncode == EX_NOPERM, done.stderr
        assert f"`ximd {command}` needs root: nobody may not read" in done.stderr
