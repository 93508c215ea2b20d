"""Finding 3: `ximd enroll` run as root must not follow links the service account planted.

The state directory (/var/lib/xerotier) belongs to the service account. Root
running `ximd enroll` used to mkdir/chmod/chown ``<state>/enrollment`` by path
and write the identity through it, so a symlink planted there by the service
account made root chmod 0700 and chown any directory, and write into it. These
tests plant the links as the service account would (owned by a non-root uid),
run the real `ximd enroll` CLI as root against a real router, and check that the
victims are untouched and that the legitimate path still works.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mesh.helpers import write_agent_config
from tests.support.router import RouterProcess
from ximd.exitcodes import EX_OK

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the attack is on root: run as root")

SERVICE_UID = SERVICE_GID = 65534     # stands in for the xerotier account


def service_owned_state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, SERVICE_UID, SERVICE_GID)
    return state


def plant_symlink(link: Path, target: Path) -> None:
    """A symlink as the service account makes it: owned by its uid, in its directory."""
    link.symlink_to(target)
    os.lchown(link, SERVICE_UID, SERVICE_GID)


def victim_dir(tmp_path: Path) -> Path:
    victim = tmp_path / "victim-dir"
    victim.mkdir(mode=0o755)
    (victim / "keep.txt").write_text("root's file\n")
    return victim


def victim_file(tmp_path: Path) -> Path:
    victim = tmp_path / "victim-file"
    victim.write_text("precious root-owned content\n")
    victim.chmod(0o644)
    return victim


def snapshot(path: Path) -> tuple:
    st = path.lstat()
    listing = sorted(os.listdir(path)) if stat.S_ISDIR(st.st_mode) else path.read_bytes()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, listing


def run_ximd(config: Path, *args: str) -> subprocess.CompletedProcess:
    """The real `ximd` CLI as root, with this tree's code."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "XEROTIER_AGENT_CONFIG": str(config),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "ximd.cli", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def run_enroll(tmp_path: Path, router: RouterProcess, state: Path, key: str,
               *flags: str) -> subprocess.CompletedProcess:
    config = write_agent_config(tmp_path / "agent.toml", url=router.http_url, state_dir=state,
                                join_key=key)
    return run_ximd(config, "enroll", *flags)


def test_a_symlinked_enrollment_directory_is_refused_and_its_target_untouched(tmp_path, router):
    state = service_owned_state(tmp_path)
    victim = victim_dir(tmp_path)
    before = snapshot(victim)
    plant_symlink(state / "enrollment", victim)

    done = run_enroll(tmp_path, router, state, router.join_key())

    assert snapshot(victim) == before, "root changed the directory the planted link points to"
    assert done.returncode != EX_OK, done.stdout
    assert "symbolic link" in done.stderr and str(state / "enrollment") in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert router.agents() == [], "the join key was spent although nothing could be saved"


def service_owned_enrollment_dir(tmp_path: Path) -> Path:
    enrollment = service_owned_state(tmp_path) / "enrollment"
    enrollment.mkdir(mode=0o700)
    os.chown(enrollment, SERVICE_UID, SERVICE_GID)
    return enrollment


def test_a_symlinked_identity_file_is_refused_then_replaced_not_followed(tmp_path, router):
    enrollment = service_owned_enrollment_dir(tmp_path)
    victim = victim_file(tmp_path)
    before = snapshot(victim)
    plant_symlink(enrollment / "identity.json", victim)
    key = router.join_key()

    refused = run_enroll(tmp_path, router, enrollment.parent, key)

    assert snapshot(victim) == before
    assert refused.returncode != EX_OK and "symbolic link" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr

    forced = run_enroll(tmp_path, router, enrollment.parent, key, "--force")

    assert snapshot(victim) == before, "root wrote through the planted link"
    assert forced.returncode == EX_OK, forced.stderr
    identity = enrollment / "identity.json"
    assert not identity.is_symlink()
    assert (identity.stat().st_uid, identity.stat().st_gid) == (SERVICE_UID, SERVICE_GID)
    assert json.loads(identity.read_text())["agent_id"] == router.agents()[0]["agent_id"]


def test_a_symlinked_pending_file_is_refused_before_the_key_is_spent(tmp_path, router):
    enrollment = service_owned_enrollment_dir(tmp_path)
    victim = victim_file(tmp_path)
    before = snapshot(victim)
    plant_symlink(enrollment / "pending.json", victim)

    done = run_enroll(tmp_path, router, enrollment.parent, router.join_key())

    assert snapshot(victim) == before
    assert done.returncode != EX_OK and "symbolic link" in done.stderr, done.stderr
    assert "join key is still unused" in done.stderr
    assert router.agents() == []


def test_an_enrollment_directory_owned_by_someone_else_is_refused(tmp_path, router):
    state = service_owned_state(tmp_path)
    enrollment = state / "enrollment"
    enrollment.mkdir(mode=0o755)
    os.chown(enrollment, 12345, 12345)       # neither root nor the state directory's owner

    done = run_enroll(tmp_path, router, state, router.join_key())

    assert done.returncode != EX_OK, done.stdout
    assert "owned by uid 12345" in done.stderr, done.stderr
    assert (stat.S_IMODE(enrollment.stat().st_mode), enrollment.stat().st_uid) == (0o755, 12345)
    assert router.agents() == []


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "existing-enrollment-dir"])
def test_root_enrolls_into_a_state_directory_owned_by_the_service_account(tmp_path, router, existing):
    state = service_owned_state(tmp_path)
    if existing:
        (state / "enrollment").mkdir(mode=0o755)
        os.chown(state / "enrollment", SERVICE_UID, SERVICE_GID)

    done = run_enroll(tmp_path, router, state, router.join_key())

    assert done.returncode == EX_OK, done.stderr
    identity = state / "enrollment" / "identity.json"
    for path, mode in ((identity, 0o600), (identity.parent, 0o700)):
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, SERVICE_UID, SERVICE_GID), path
    assert sorted(os.listdir(identity.parent)) == ["identity.json"], "no temporary or pending file left"


def test_unenroll_as_root_removes_nothing_through_a_planted_link(tmp_path, router):
    state = service_owned_state(tmp_path)
    assert run_enroll(tmp_path, router, state, router.join_key()).returncode == EX_OK
    # The service account moves its real directory away and points the name at root's.
    victim = tmp_path / "victim-dir"
    (state / "enrollment").rename(victim)
    plant_symlink(state / "enrollment", victim)
    victim.chmod(0o755)
    os.chown(victim, 0, 0)
    os.chown(victim / "identity.json", 0, 0)
    before = snapshot(victim)

    done = run_ximd(tmp_path / "agent.toml", "unenroll")

    assert snapshot(victim) == before, "root removed a file through the planted link"
    assert done.returncode != EX_OK and "symbolic link" in done.stderr, (done.stdout, done.stderr)
