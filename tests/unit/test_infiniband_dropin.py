"""The opt-in InfiniBand drop-in for group members (systemd/opt-in/ximd-infiniband.conf).

It must open exactly the RDMA devices NCCL needs and leave the unit's hardening alone;
the packages ship it where systemd does not read it (opt-in), and systemd itself must
accept it next to the unit.
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
from pathlib import Path

import pytest

from ximd import hardware

REPO = Path(__file__).resolve().parents[2]
DROPIN = REPO / "systemd" / "opt-in" / "ximd-infiniband.conf"
# /proc/devices of a host with the mlx5 driver loaded (the verbs group; rdma_cm is a misc device).
IB_PROC_DEVICES = "Character devices:\n  1 mem\n 10 misc\n195 nvidia\n231 infiniband_verbs\n\nBlock devices:\n"


def settings() -> list[tuple[str, str]]:
    """(``[Section]Key``, value) in file order; systemd's repeated keys stay apart."""
    pairs = []
    section = None
    for line in DROPIN.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        pairs.append((f"{section}{key}", value))
    return pairs


def test_it_opens_the_rdma_devices_and_touches_nothing_else():
    pairs = settings()
    assert {key for key, _ in pairs} == {"[Service]DeviceAllow", "[Service]RestrictAddressFamilies"}
    allowed = [value.split()[0] for key, value in pairs if key.endswith("DeviceAllow")]
    for group in hardware.parse_proc_devices(IB_PROC_DEVICES):
        if group.startswith("infiniband"):
            assert any(fnmatch.fnmatchcase(f"char-{group}", p) for p in allowed), group
    assert "/dev/infiniband/rdma_cm" in allowed
    assert all(value.split()[1] == "rw" for key, value in pairs if key.endswith("DeviceAllow"))
    assert dict(pairs)["[Service]RestrictAddressFamilies"] == "AF_IB"


def test_the_packages_ship_it_where_systemd_does_not_read_it():
    deb = (REPO / "packaging" / "debian" / "xerotier-agent.install").read_text()
    rpm = (REPO / "packaging" / "rpm" / "xerotier-agent.spec").read_text()
    assert "systemd/opt-in/ximd-infiniband.conf usr/share/xerotier-agent/" in deb
    assert "%{_datadir}/xerotier-agent/ximd-infiniband.conf" in rpm
    assert "ximd.service.d" not in deb + rpm


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_it_beside_the_unit(tmp_path):
    unit_dir = tmp_path / "system"
    (unit_dir / "ximd.service.d").mkdir(parents=True)
    shutil.copy(REPO / "systemd" / "ximd.service", unit_dir / "ximd.service")
    shutil.copy(DROPIN, unit_dir / "ximd.service.d" / "infiniband.conf")
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit_dir / "ximd.service")],
                          capture_output=True, text=True, timeout=60,
                          env={"SYSTEMD_UNIT_PATH": f"{unit_dir}:", "PATH": "/usr/bin:/bin"})
    # The unit's binary is not installed here: that complaint is expected, a syntax one is not.
    problems = [line for line in done.stderr.splitlines()
                if "infiniband.conf" in line or "Unknown" in line or "Failed to parse" in line]
    assert not problems, done.stderr
