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

# Paths the node's .deb and .rpm must ship (the .deb keeps the unit in /lib, see
# packaging/README.md).
SHIPPED = [
    "/usr/bin/ximd",
    "/usr/sbin/xerotier-engine-install",
    "/usr/lib/sysusers.d/xerotier-agent.conf",
    "/usr/lib/tmpfiles.d/xerotier-agent.conf",
    "/usr/lib/sysctl.d/60-xerotier-agent.conf",
    "/etc/xerotier/agent.toml",
    "/usr/share/xerotier-agent/engine/requirements-cpu.txt",
]


# The router's, in its own package.
ROUTER_SHIPPED = [
    "/usr/bin/xim-router",
    "/etc/xim-router/router.toml",
    "/usr/lib/sysusers.d/xim-router.conf",
    "/usr/lib/tmpfiles.d/xim-router.conf",
]
PYTHON_PACKAGES = {"xerotier-agent": "ximd", "xim-router": "xim_router", "python3-xim-proto": "xim_proto"}


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)


def deb_paths(deb: Path, *, files_only: bool = False) -> set[str]:
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    return {line.split()[-1].lstrip(".").rstrip("/") for line in listing.splitlines()
            if not (files_only and line.startswith("d"))}


def test_one_source_three_packages_no_file_in_two(packages):
    """xerotier-agent, xim-router and python3-xim-proto: each Python package in exactly one
    .deb, the node and the router each on the protocol package of the same version."""
    contents = {name: deb_paths(deb) for name, deb in packages.debs.items()}
    for name, paths in contents.items():
        print(f"==== dpkg-deb -c {packages.debs[name].name}")
        print("\n".join(sorted(p for p in paths if "__pycache__" not in p)))
    files = {name: deb_paths(deb, files_only=True) for name, deb in packages.debs.items()}
    for a in files:
        for b in files:
            if a < b:
                assert not files[a] & files[b], (a, b, sorted(files[a] & files[b]))
    for name, module in PYTHON_PACKAGES.items():
        owners = [other for other, paths in contents.items()
                  if f"/usr/lib/python3/dist-packages/{module}/__init__.py" in paths]
        assert owners == [name], (module, owners)
    for name in ("xerotier-agent", "xim-router"):
        depends = run(["dpkg-deb", "-f", str(packages.debs[name]), "Depends"]).stdout
        assert f"python3-xim-proto (= {packages.version})" in depends, depends
        fields = run(["dpkg-deb", "-f", str(packages.debs[name]), "Source", "Architecture"]).stdout.split()
        assert fields[-1] == "all"
    assert "/usr/bin/xim-router" not in contents["xerotier-agent"]
    assert "/usr/bin/ximd" not in contents["xim-router"]


def test_deb_contents_and_maintainer_scripts(packages):
    listing = run(["dpkg-deb", "-c", str(packages.deb)]).stdout
    paths = deb_paths(packages.deb)
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


def test_router_deb_contents_and_maintainer_scripts(packages):
    deb = packages.debs["xim-router"]
    paths = deb_paths(deb)
    assert set(ROUTER_SHIPPED) | {"/lib/systemd/system/xim-router.service"} <= paths
    # No secret in the config: world-readable, a conffile; the TLS files are credentials.
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    assert "-rw-r--r-- root/root" in next(line for line in listing.splitlines() if "router.toml" in line)
    control = Path(run(["mktemp", "-d"]).stdout.strip())
    try:
        run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
        assert (control / "conffiles").read_text().split() == ["/etc/xim-router/router.toml"]
        postinst = (control / "postinst").read_text()
        assert postinst.index("systemd-sysusers") < postinst.index("deb-systemd-invoke start 'xim-router.service'")
        # Upgrades restart a running router only once the new version accepts router.toml.
        assert postinst.index("xim-router config validate") < postinst.index('deb-systemd-invoke restart "$UNIT"')
        assert "deb-systemd-invoke stop 'xim-router.service'" in (control / "prerm").read_text()
        assert "rm -rf /var/lib/xim-router" in (control / "postrm").read_text()
    finally:
        shutil.rmtree(control)


def test_deb_lintian_reports_no_errors(packages):
    if shutil.which("lintian") is None:
        pytest.fail("lintian is missing: apt-get install lintian", pytrace=False)
    done = run(["lintian", "--fail-on", "error", *map(str, packages.debs.values())])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "E:" not in done.stdout


def test_rpm_builds_lints_and_installs_into_a_scratch_root(tmp_path, packages):
    for tool, pkg in {"rpmbuild": "rpm", "rpmlint": "rpmlint"}.items():
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: apt-get install {pkg}", pytrace=False)
    built = run([str(REPO / "tools/build-rpm.sh"), str(tmp_path / "dist")])  # rpmlint included
    assert built.returncode == 0, built.stderr
    rpm_files = built.stdout.split()
    assert [Path(f).name for f in rpm_files] == [f"{name}-{packages.version}-1.noarch.rpm" for name in PYTHON_PACKAGES]
    rpm_file, router_rpm, proto_rpm = rpm_files
    assert "0 errors" in built.stderr
    listed = {}
    for name, path in zip(PYTHON_PACKAGES, rpm_files):
        listed[name] = run(["rpm", "-qpl", path]).stdout.split()
        print(f"==== rpm -qpl {Path(path).name}")
        print("\n".join(p for p in listed[name] if "__pycache__" not in p))
    for name, module in PYTHON_PACKAGES.items():
        owners = [other for other, files in listed.items() if any(f.endswith(f"/{module}/__init__.py") for f in files)]
        assert owners == [name], (module, owners)
    assert set(ROUTER_SHIPPED) | {"/usr/lib/systemd/system/xim-router.service", "/var/lib/xim-router"} <= set(
        listed["xim-router"])
    assert f"python3-xim-proto = {packages.version}-1" in run(["rpm", "-qpR", router_rpm]).stdout
    assert run(["rpm", "-qp", "--configfiles", router_rpm]).stdout.split() == ["/etc/xim-router/router.toml"]
    router_scripts = run(["rpm", "-qp", "--scripts", router_rpm]).stdout
    for fragment in ("systemd-sysusers", "preset xim-router.service", "xim-router config validate",
                     "systemctl try-restart xim-router.service"):
        assert fragment in router_scripts, fragment

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
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nxerotier:x:990:990::/var/lib/xerotier:/sbin/nologin\n"
                                     "xim-router:x:991:991::/var/lib/xim-router:/sbin/nologin\n")
    (root / "etc/group").write_text("root:x:0:\nxerotier:x:990:\nxim-router:x:991:\n")
    rpm = ["rpm", "--root", str(root), "--dbpath", "/var/lib/rpm"]
    assert run([*rpm, "--initdb"]).returncode == 0
    # No scriptlets: the scratch root has no /bin/sh (they run in the .deb's guest test).
    # All three in one transaction: rpm refuses two packages that ship the same file.
    installed = run([*rpm, "--nodeps", "--noscripts", "-i", *rpm_files])
    assert installed.returncode == 0, installed.stderr
    verified = run([*rpm, "-V", "--nodeps", *PYTHON_PACKAGES])
    assert verified.returncode == 0, verified.stdout + verified.stderr
    st = os.stat(root / "etc/xerotier/agent.toml")
    assert (oct(st.st_mode & 0o777), st.st_uid, st.st_gid) == ("0o640", 0, 990)
    st = os.stat(root / "var/lib/xerotier")
    assert (oct(st.st_mode & 0o777), st.st_uid, st.st_gid) == ("0o700", 990, 990)
    st = os.stat(root / "var/lib/xim-router")
    assert (oct(st.st_mode & 0o777), st.st_uid, st.st_gid) == ("0o700", 991, 991)
    erased = run([*rpm, "-e", "--nodeps", "--noscripts", "xerotier-agent"])
    assert erased.returncode == 0, erased.stderr
    assert not (root / "usr/bin/ximd").exists()
    assert (root / "usr/bin/xim-router").exists()
