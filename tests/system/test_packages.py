"""The packages themselves: what they contain, their maintainer scripts, lintian and
rpmlint, and an RPM install into a scratch root (rpmbuild on Debian, no Fedora here)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]

# Paths both packages must ship (the .deb keeps the unit in /lib, see packaging/README.md).
SHIPPED = [
    "/usr/bin/ximd",
    "/usr/bin/xim-router",
    "/usr/sbin/xerotier-engine-install",
    "/usr/lib/sysusers.d/xerotier-agent.conf",
    "/usr/lib/tmpfiles.d/xerotier-agent.conf",
    "/usr/lib/sysctl.d/60-xerotier-agent.conf",
    "/etc/xerotier/agent.toml",
    "/usr/share/xerotier-agent/engine/requirements-cpu.txt",
]


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)


def test_deb_contents_and_maintainer_scripts(packages):
    listing = run(["dpkg-deb", "-c", str(packages.deb)]).stdout
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    assert set(SHIPPED) <= paths
    assert "/lib/systemd/system/ximd.service" in paths
    assert any(p.startswith("/usr/lib/python3/dist-packages/ximd/") for p in paths)
    assert "-rw-r----- root/root" in next(line for line in listing.splitlines() if "agent.toml" in line)
    assert run(["dpkg-deb", "-f", str(packages.deb), "Architecture"]).stdout.strip() == "all"

    control = Path(run(["mktemp", "-d"]).stdout.strip())
    try:
        run(["dpkg-deb", "-e", str(packages.deb), str(control)], check=True)
        assert (control / "conffiles").read_text().split() == ["/etc/xerotier/agent.toml"]
        postinst = (control / "postinst").read_text()
        # The account exists before the conffile's group is set and before the start.
        assert postinst.index("systemd-sysusers xerotier-agent.conf") \
            < postinst.index("dpkg-statoverride --update --add root xerotier 0640") \
            < postinst.index("start_without_waiting\n")
        # Starts and restarts are queued, never waited for (a first start may fetch a
        # model for an hour): no blocking deb-systemd-invoke start/restart.
        assert 'systemctl --no-block start "$UNIT"' in postinst
        assert 'systemctl --no-block try-restart "$UNIT"' in postinst
        # An upgrade re-executes a running daemon in place (the engine keeps its model).
        assert "ximd reexec --no-wait" in postinst
        assert "deb-systemd-invoke start" not in postinst and "deb-systemd-invoke try-restart" not in postinst
        # --no-start drops debhelper's stop on removal: the prerm does it.
        assert "deb-systemd-invoke stop ximd.service" in (control / "prerm").read_text()
        # Upgrades never stop the old daemon up front (no preinst stop snippet).
        assert not (control / "preinst").exists() or "stop" not in (control / "preinst").read_text()
    finally:
        shutil.rmtree(control)


def test_deb_lintian_reports_no_errors(packages):
    if shutil.which("lintian") is None:
        pytest.fail("lintian is missing: apt-get install lintian", pytrace=False)
    done = run(["lintian", "--fail-on", "error", str(packages.deb)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "E:" not in done.stdout


def test_rpm_builds_lints_and_installs_into_a_scratch_root(tmp_path, packages):
    for tool, pkg in {"rpmbuild": "rpm", "rpmlint": "rpmlint"}.items():
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: apt-get install {pkg}", pytrace=False)
    built = run([str(REPO / "tools/build-rpm.sh"), str(tmp_path / "dist")])  # rpmlint included
    assert built.returncode == 0, built.stderr
    rpm_file = built.stdout.strip().splitlines()[-1]
    assert Path(rpm_file).name == f"xerotier-agent-{packages.version}-1.noarch.rpm"
    assert "0 errors" in built.stderr

    files = run(["rpm", "-qpl", rpm_file]).stdout.split()
    assert set(SHIPPED) | {"/usr/lib/systemd/system/ximd.service"} <= set(files)
    scripts = run(["rpm", "-qp", "--scripts", rpm_file]).stdout
    for fragment in ("systemd-sysusers", "preset ximd.service", "systemd-tmpfiles --create",
                     "systemd-sysctl 60-xerotier-agent.conf", "disable --now ximd.service",
                     "ximd config validate", "ximd reexec --no-wait",
                     "systemctl --no-block try-restart ximd.service",
                     "systemctl enable --now --no-block ximd", "journalctl -u ximd -f"):
        assert fragment in scripts, fragment
    config_flags = run(["rpm", "-qp", "--configfiles", rpm_file]).stdout.split()
    assert config_flags == ["/etc/xerotier/agent.toml"]

    # The scratch root knows the package's account, so ownership resolves as on a host.
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nxerotier:x:990:990::/var/lib/xerotier:/sbin/nologin\n")
    (root / "etc/group").write_text("root:x:0:\nxerotier:x:990:\n")
    rpm = ["rpm", "--root", str(root), "--dbpath", "/var/lib/rpm"]
    assert run([*rpm, "--initdb"]).returncode == 0
    # No scriptlets: the scratch root has no /bin/sh (they run in the .deb's guest test).
    installed = run([*rpm, "--nodeps", "--noscripts", "-i", rpm_file])
    assert installed.returncode == 0, installed.stderr
    verified = run([*rpm, "-V", "--nodeps", "xerotier-agent"])
    assert verified.returncode == 0, verified.stdout + verified.stderr
    st = os.stat(root / "etc/xerotier/agent.toml")
    assert (oct(st.st_mode & 0o777), st.st_uid, st.st_gid) == ("0o640", 0, 990)
    st = os.stat(root / "var/lib/xerotier")
    assert (oct(st.st_mode & 0o777), st.st_uid, st.st_gid) == ("0o700", 990, 990)
    erased = run([*rpm, "-e", "--nodeps", "--noscripts", "xerotier-agent"])
    assert erased.returncode == 0, erased.stderr
    assert not (root / "usr/bin/ximd").exists()
