"""tools/package-args.sh, the command line tools/build-deb.sh and tools/build-rpm.sh share:
--version is refused up front unless the wheel inside the packages can carry it unchanged,
and the accepted one is written where the wheel takes its version from.

Building the packages needs dpkg-buildpackage or rpmbuild and a git checkout; that is the
system tier's (tests/system/test_packages.py). These run the argument handling alone, in
well under a second, so they also run inside the .deb's own build.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# What the scripts do before their own checks: the shared arguments, then stop.
SOURCED = 'die() { echo "$0: $*" >&2; exit 1; }; . tools/package-args.sh; printf "%s\\n" "$version"'

# Each is what packaging.version.Version keeps as it is (str(Version(v)) == v), no epoch.
ACCEPTED = ["0.1.0", "1.2.0rc1", "1.2.0a0", "1.2.0.post1", "1.2.0.dev3", "0.1.0+systest1", "0.1.0+a.1", "1.0+0a",
            "2024.1", "1.0.0.0.1"]
# Not a PEP 440 version at all (~, ^, _), one Python's tools would rename (the form in
# brackets: the wheel's dist-info would not be named by the package's version), or one
# with an epoch (1!), which neither rpm's Version nor a native .deb's version can hold.
REFUSED = ["1.0~rc1", "1.0^git1", "1.0_1", "1.0-1 [1.0.post1]", "v1.0 [1.0]", "1.0.RC1 [1.0rc1]", "01.0 [1.0]",
           "1.0-rc1 [1.0rc1]", "1.0+01 [1.0+1]", "1.0+Local [1.0+local]", "1.0+x-y [1.0+x.y]", "1!1.0", "1.0\nx"]


def args(*argv: str, script: str = "tools/build-rpm.sh") -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", SOURCED, script, *argv], capture_output=True, text=True, cwd=REPO, timeout=30)


@pytest.mark.parametrize("version", ACCEPTED)
def test_a_canonical_python_version_is_taken(version):
    done = args("--no-lint", "--version", version, "/nonexistent/out")
    assert (done.returncode, done.stdout, done.stderr) == (0, version + "\n", "")


def test_without_version_pyproject_gives_it():
    with open(REPO / "pyproject.toml", "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert args().stdout == version + "\n"


@pytest.mark.parametrize("script", ["tools/build-rpm.sh", "tools/build-deb.sh"])
@pytest.mark.parametrize("version", [v.split(" [")[0] for v in REFUSED])
def test_the_build_scripts_refuse_any_other_version_in_one_line_before_building(tmp_path, script, version):
    out = tmp_path / "dist"
    done = subprocess.run(["sh", script, "--no-lint", "--version", version, str(out)], capture_output=True, text=True,
                          cwd=REPO, timeout=30)
    name = Path(script).stem
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"{name}: version '{version}' is not a canonical PEP 440 version"), done.stderr
    assert done.stderr.count("\n") == 1 + version.count("\n")
    assert not out.exists()


def test_stamp_version_writes_the_version_the_wheel_and_the_daemon_report(tmp_path):
    for relative in ("pyproject.toml", "xim_proto/__init__.py"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / relative, tmp_path / relative)
    script = 'die() { echo "$0: $*" >&2; exit 1; }; . tools/package-args.sh; stamp_version "$STAMP_DIR"'
    done = subprocess.run(["sh", "-c", script, "tools/build-rpm.sh", "--version", "7.8.9+t1"], capture_output=True,
                          text=True, cwd=REPO, timeout=30, env={"PATH": "/usr/bin:/bin", "STAMP_DIR": str(tmp_path)})
    assert (done.returncode, done.stderr) == (0, "")
    with open(tmp_path / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    assert project["project"]["version"] == "7.8.9+t1"
    assert project["tool"] == tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]   # nothing else touched
    assert '__version__ = "7.8.9+t1"' in (tmp_path / "xim_proto/__init__.py").read_text()
